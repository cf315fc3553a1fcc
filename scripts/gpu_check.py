"""`make gpu-check`: the first run on a borrowed GPU machine, in one command of at most 8 minutes.

    python scripts/gpu_check.py [--out DIR] [--dry] [--quick] [--only NAME ...]

Runs the checks of gpu_checks.CHECKS in order, each in its own process with its own time limit
(cut short by an overall stop at 8 minutes), and writes to DIR (default: $OUT, else
runs/gpu-check):

- gpu-check-summary.txt: one line a check, ``name | PASS, FAIL or SKIPPED (why) | seconds | key figure``,
  rewritten after every check, so a run cut short still leaves the lines so far;
- gpu-check.log: everything the checks and the commands they ran printed;
- gpu-check-environment.json and gpu-benchmark.json: the versions found, benchmarks/gpu.py's figures.

Exits 1 when a check failed. Offline: what the machine lacks comes from .gpu-wheels/ (`make
gpu-wheels`), installed into the work folder, never over the machine's own torch. Without CUDA
(or with --dry) the checks that need it say "SKIPPED (no CUDA ...)" and the rest run on the CPU,
small; --quick leaves out the slow CPU stand-ins (the test suite's dry run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gpu_checks
from gpu_checks import ROOT, Result

#: the overall stop: a device command may run 10 minutes, and the machine's start comes first
TOTAL_S = 480
#: what a check keeps for itself to report a timeout before its process is killed
MARGIN_S = 5
SUMMARY, LOG = "gpu-check-summary.txt", "gpu-check.log"


def run_check(check: gpu_checks.Check, args, work: Path, out: Path, cuda: bool, stop_at: float, log) -> Result:
    """``check`` in a child process (its own process group, killed whole at its time limit)."""
    limit = min(check.timeout_s, stop_at - time.time())
    if limit < 2 * MARGIN_S:
        return Result(check.name, "FAIL", "not started: the 8-minute stop came first", 0.0)
    result_file = work / "results" / f"{check.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--work", str(work),
               "--out", str(out), "--deadline", str(time.time() + limit - MARGIN_S)]
    command += ["--cuda"] * cuda + ["--quick"] * args.quick + ["--dry"] * args.dry
    log.write(f"\n===== {check.name} (limit {limit:.0f} s) =====\n")
    log.flush()
    started = time.time()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env=child_environment(work))
    try:
        child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(child)  # the commands it left running too
    seconds = time.time() - started
    if result_file.exists():
        return Result(**{**json.loads(result_file.read_text()), "seconds": seconds})
    why = f"timed out after {limit:.0f} s" if child.returncode in (None, -signal.SIGKILL, -signal.SIGTERM) \
        else f"its process ended with status {child.returncode}"
    return Result(check.name, "FAIL", f"{why}; see {LOG}", seconds)


def _kill_group(child: subprocess.Popen) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
    child.poll()


def child_environment(work: Path) -> dict:
    """This repository first (energytools is not installed on the device), then the wheels the
    environment check installed; no Hub downloads, unbuffered output, wide console lines."""
    paths = [str(ROOT), str(work / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "160"}


def write_summary(out: Path, results: list[Result], header: str) -> None:
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(header + "\n" + "".join(result.line() + "\n" for result in results))
    tmp.replace(out / SUMMARY)


def orchestrate(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu-check").resolve()
    work = Path(args.work or ROOT / "runs" / "gpu-check-work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "results").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stop_at = started + TOTAL_S
    mode = "dry run (cpu)" if args.dry else "auto"
    header = f"# gpu-check {time.strftime('%Y-%m-%d %H:%M:%S')}, {mode}{', quick' if args.quick else ''}"
    results: list[Result] = []
    cuda = False
    with open(out / LOG, "w") as log:
        log.write(header + "\n")
        for check in gpu_checks.CHECKS:
            if args.only and check.name not in args.only and check.name != "environment":
                continue
            if results and results[0].status == "FAIL":  # nothing can be trusted to import
                result = Result(check.name, "SKIPPED", "the environment check failed")
            else:
                result = run_check(check, args, work, out, cuda, stop_at, log)
            if check.name == "environment":
                cuda = bool(result.detail.get("cuda")) and not args.dry
            results.append(result)
            print(result.line(), flush=True)
            write_summary(out, results, header)
        total = time.time() - started
        footer = f"# {len(results)} checks in {total:.0f} s: " + ", ".join(
            f"{sum(r.status == s for r in results)} {s}" for s in ("PASS", "FAIL", "SKIPPED"))
        log.write(f"\n{footer}\n")
    write_summary(out, results, header + "\n" + footer)
    print(footer)
    print(f"summary: {out / SUMMARY}")
    return 1 if any(result.status == "FAIL" for result in results) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the summary and the log go (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--work", help="scratch folder, emptied first (default: runs/gpu-check-work)")
    parser.add_argument("--dry", action="store_true", help="run on the CPU even where CUDA is")
    parser.add_argument("--quick", action="store_true", help="leave out the slow CPU stand-ins")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these checks only (and the environment check, always first)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        context = gpu_checks.Context(work=Path(args.work), out=Path(args.out), cuda=args.cuda, quick=args.quick,
                                     dry=args.dry, deadline=args.deadline)
        return gpu_checks.run_in_child(args.child, context)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
