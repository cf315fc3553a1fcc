"""Run energytools and send this process SIGTERM (a scheduler's stop) right after optimizer step K:
the stop lands at the same step on every machine, however fast the GPU.

    python scripts/gpu_probes/stop_after_steps.py K ENERGYTOOLS-ARGS...
"""
import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from energytools.cli import main

steps = 0


def stop_at(k: int):
    def hook(_optimizer, _args, _kwargs) -> None:
        global steps
        steps += 1
        if steps == k:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


if __name__ == "__main__":
    register_optimizer_step_post_hook(stop_at(int(sys.argv[1])))
    sys.argv = ["energytools", *sys.argv[2:]]
    main()
