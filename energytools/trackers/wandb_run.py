"""--log wandb: a Weights & Biases run, offline unless WANDB_MODE says otherwise (``wandb sync``
uploads it later); its files under OUT/wandb."""
from __future__ import annotations

import os

from .base import Tracker, register


@register("wandb")
class WandbTracker(Tracker):
    module, extra = "wandb", "wandb"

    def __init__(self, out, config, state, resumed):
        super().__init__(out, config, state, resumed)
        import wandb

        run_id = state.get("run_id") if resumed else None
        self.run = wandb.init(dir=str(out), project=os.environ.get("WANDB_PROJECT", "energytools"), name=out.name,
                              id=run_id, resume="allow" if run_id else None, config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(console="off", quiet=True))  # leave energytools' output alone
        state.update(run_id=self.run.id)

    def log(self, values, step):
        self.run.log(values, step=step)

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)
