"""Run every throughput benchmark and write docs/benchmarks.md with each figure and its command.

    python benchmarks/run_all.py
"""
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from common import machine

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("score_throughput.py", [], "score stage / bare forward loop", "ratio", ">= 0.90"),
    ("augment_throughput.py", [], "augment: 2 workers / 1 worker", "scaling_2_vs_1", ">= 1.7"),
    ("augment_throughput.py", [], "augment: 2 workers / bare CutMix+PNG+teacher loop (1 process)",
     "stage_2_workers_vs_bare_with_teacher", ""),
    ("augment_throughput.py", [], "augment stage / bare CutMix+PNG loop", "stage_vs_bare_aug_png", ">= 0.8"),
    ("augment_throughput.py", [], "augment stage / bare CutMix+PNG+teacher loop", "stage_vs_bare_with_teacher", ">= 0.8"),
    *[("distill_overhead.py", [], f"distill epoch, {run}, {t} thread(s): energytools / bare loop (normalised "
       f"floats in memory)", f"{key}_over_bare_{t}t", "<= 1.05")
      for t in (1, 2) for run, key in (("ce", "ce"), ("kd (online teacher)", "kd"), ("kd (cached logits)", "kd_cached"),
                                       ("energy-kd (cached views, crops)", "energy_kd_cached_views"))],
    ("distill_overhead.py", [], "distill epoch: energy-kd on cached views / ce (crops), 2 threads",
     "energy_kd_views_over_ce_2t", "<= 1.10"),
    ("distill_overhead.py", [], "distill epoch: online teacher / cached logits (flip), 2 threads",
     "online_over_cached_flip_2t", ">= 1.5"),
    ("views_cost.py", [], "distill epoch, 32x32 resnet32x4 -> resnet8x4: online / cached views",
     "online_over_cached", ">= 2.0"),
    ("scale_score.py", [], "score: 2 processes / 1 process (torchrun)", "speedup", ">= 1.7"),
    ("teacher_input_size.py", [], "score, 32x32 data, timm resnet18 teacher: at 224 / at the data's size",
     "ratio", ""),
    ("report_scale.py", [], "report of a 1.28M-row table: seconds", "seconds", "seconds"),
    ("report_scale.py", [], "report of a 1.28M-row table: HTML MB", "html_mb", "a few MB"),
    ("report_scale.py", [], "report of two 1.28M-row tables compared: seconds", "two_tables_seconds", "seconds"),
    ("report_scale.py", [], "report of two 1.28M-row tables compared: HTML MB", "two_tables_html_mb", "a few MB"),
]


NOTES = "\n## Notes\n"  # hand-written; kept when the figures are re-written


def main():
    results, work = {}, Path(tempfile.mkdtemp())
    for script, extra, *_ in BENCHMARKS:
        if script in results:
            continue
        out = work / f"{script}.json"
        subprocess.run([sys.executable, str(HERE / script), *extra, "--json", str(out)], check=True)
        results[script] = json.loads(out.read_text())
    lines = ["# Benchmarks", "", f"Written by `python benchmarks/run_all.py` on {date.today()} ({machine()}).",
             "Every figure is a ratio of two runs in the same process (or command), so machine noise cancels.",
             "", "| figure | value | target | met | command |", "|---|---|---|---|---|"]
    for script, _extra, label, key, target in BENCHMARKS:
        value = results[script][key]
        met = ""
        if target.startswith(">="):
            met = "yes" if value >= float(target[2:]) else "**no**"
        elif target.startswith("<="):
            met = "yes" if value <= float(target[2:]) else "**no**"
        lines.append(f"| {label} | {value:.3f} | {target} | {met} | `python benchmarks/{script}` |")
    lines += ["", "Raw figures:", ""]
    for script, figures in results.items():
        lines += [f"`{script}`:", "```json", json.dumps(figures, indent=2), "```", ""]
    docs = HERE.parent / "docs" / "benchmarks.md"
    notes = docs.read_text().split(NOTES, 1)[1] if docs.exists() and NOTES in docs.read_text() else ""
    docs.write_text("\n".join(lines) + (NOTES + notes if notes else ""))
    print(docs.read_text())


if __name__ == "__main__":
    main()
