"""Run energytools commands in this one process and count the host synchronisations each makes:
under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call (``.item()``, a
blocking copy, ``torch.cuda.synchronize``) warns once, and every warning is recorded.

    python scripts/gpu_probes/sync_count.py SPEC.json RESULT.json [--cuda]

SPEC: ``[{"name": ..., "args": [energytools arguments]}, ...]``, run in order; RESULT: the same
list with each run's ``exit`` status, ``syncs`` (the count) and ``origins`` (``file:line`` of the
Python code that made them -> count). Without ``--cuda`` the commands run uncounted (a dry run).
"""
import collections
import json
import sys
import warnings
from pathlib import Path

import torch

from energytools.cli import main as energytools_main

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str]) -> int:
    sys.argv = ["energytools", *args]
    try:
        energytools_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def where(caught: warnings.WarningMessage) -> str:
    path = Path(caught.filename)
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{caught.lineno}"


def counted(args: list[str], cuda: bool) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            code = run(args)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"exit": code, "syncs": len(syncs), "origins": dict(collections.Counter(map(where, syncs)).most_common())}


def main() -> None:
    spec, result, cuda = Path(sys.argv[1]), Path(sys.argv[2]), "--cuda" in sys.argv[3:]
    runs = []
    for entry in json.loads(spec.read_text()):
        runs.append({**entry, **counted(entry["args"], cuda)})
        print(f"sync-count: {entry['name']}: exit {runs[-1]['exit']}, {runs[-1]['syncs']} syncs", flush=True)
        result.write_text(json.dumps(runs, indent=1))  # what ran so far, should a later run hang


if __name__ == "__main__":
    main()
