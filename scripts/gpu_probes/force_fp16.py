"""Run energytools as on a GPU without native bf16 (V100, T4): ``torch.cuda.is_bf16_supported``
answers as those do (emulated yes, native no), so autocast takes fp16 and training a GradScaler.

    python scripts/gpu_probes/force_fp16.py ENERGYTOOLS-ARGS...
"""
import sys

import torch

torch.cuda.is_bf16_supported = lambda including_emulation=True: including_emulation

from energytools.cli import main  # noqa: E402 - after the patch, as a device check's wrapper

if __name__ == "__main__":
    sys.argv = ["energytools", *sys.argv[1:]]
    main()
