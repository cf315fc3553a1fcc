"""Run energytools with the given arguments (under torchrun: one rank of the job), then write the
sha256 of every parameter its optimizer updated (the student's and a method's own, such as CTKD's
temperature) to DIR/rank<RANK>.txt: ranks that trained in step hold equal digests.

    torchrun --standalone --nproc-per-node 2 scripts/gpu_probes/rank_digest.py DIR ENERGYTOOLS-ARGS...
"""
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from energytools.cli import main as energytools_main

optimizers: dict[int, torch.optim.Optimizer] = {}


def remember(optimizer, _args, _kwargs) -> None:
    optimizers[id(optimizer)] = optimizer


def digest(optimizer: torch.optim.Optimizer) -> tuple[str, int]:
    sha, count = hashlib.sha256(), 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            sha.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            count += 1
    return sha.hexdigest(), count


def main() -> int:
    out = Path(sys.argv[1])
    register_optimizer_step_post_hook(remember)
    sys.argv = ["energytools", *sys.argv[2:]]
    code = 0
    try:
        energytools_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if code == 0 and len(optimizers) == 1:
        value, count = digest(next(iter(optimizers.values())))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('RANK', '0')}.txt").write_text(f"{value} {count}\n")
    elif code == 0:
        print(f"rank-digest: expected one optimizer, saw {len(optimizers)}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
