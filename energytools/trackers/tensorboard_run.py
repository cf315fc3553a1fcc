"""--log tensorboard: event files under OUT/tensorboard (``tensorboard --logdir OUT``)."""
from __future__ import annotations

import json

from .base import Tracker, register


@register("tensorboard")
class TensorBoardTracker(Tracker):
    module, extra = "tensorboard", "tensorboard"

    def __init__(self, out, config, state, resumed):
        super().__init__(out, config, state, resumed)
        self.config, self.writer = config, None

    def _writer_at(self, step: int):
        """Opened at the first value: a resumed run purges what the killed one logged after its
        checkpoint (``purge_step``), so the curves continue without a doubled stretch."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step if self.resumed else None)
            if not self.resumed:
                self.writer.add_text("config", f"```\n{json.dumps(self.config, indent=2, default=str)}\n```", 0)
        return self.writer

    def log(self, values, step):
        writer = self._writer_at(step)
        for name, value in values.items():
            writer.add_scalar(name, value, step)

    def close(self, ok):
        if self.writer is not None:
            self.writer.close()
