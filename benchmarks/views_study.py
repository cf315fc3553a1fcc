"""Accuracy: KD from cached views against KD with the online teacher, Fashion-MNIST with crops.

    python benchmarks/views_study.py --out runs/views-study [--limit 10000] [--seeds 0,1,2] [--views 1,2,8]
    python benchmarks/views_study.py --out runs/views-study --views 2,8 --shards 0.3   # with HE-DA shards

A teacher (resnet8) is trained with the crop regime (--crop-pad 2: pad-2 crop + flip), the
training split is scored once per K with --views K, and a student (cnn_tiny) is distilled with
kd (T = 4) on the same seeds: with the teacher run online on every batch, and from each table's
cached views (--cached-logits: the teacher is never run). Paired differences to the online
run, per seed; the verdict says whether |mean| exceeds two standard errors. Finished runs are
kept (re-running the command skips them).

With ``--shards R`` every run also trains on HE-DA shards (CutMix of the highest-energy R of
the samples) made from its own table by ``augment``: the online run's teacher sees the shard
images' crops every batch, the cached runs replay the K views augment stored for each shard
image. Those runs are named with a ``+ HE-DA R`` suffix and compared among themselves.
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import energytools


def run_once(path: Path, fn):
    summary = path / "summary.json"
    if not summary.exists():
        fn()
    return json.loads(summary.read_text())


def prepare(out: Path, limit: int, eval_limit: int, teacher_epochs: int, counts: list[int],
            data_root: str | None = None):
    """The study's teacher (resnet8 trained with crops) and one score table per K, each made once."""
    data = dict(dataset="fashion-mnist", data_root=data_root, limit=limit, eval_limit=eval_limit, crop_pad=2)
    teacher = out / "teacher"
    if not (teacher / "metrics.parquet").exists():
        energytools.train("resnet8", teacher, epochs=teacher_epochs, overwrite=True, **data)
    tables = {}
    for k in counts:
        tables[k] = out / f"scores-k{k}.parquet"
        if not tables[k].exists():
            energytools.score(teacher / "best.pt", tables[k], views=k)
    return teacher, tables


def paired_table(results: dict, names: list[str], seeds: list[int]) -> list[str]:
    """Markdown rows: each run's test accuracy over seeds and its paired difference to ``names[0]``."""
    baseline = names[0]
    lines = ["| run | seeds | best (val-selected) | last | Δ {0} (best) | Δ {0} (last) | wins | verdict | s/run |"
             .format(baseline.split(" ")[0]), "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        best = [results[(name, s)]["best_test_acc"] for s in seeds]
        last = [results[(name, s)]["last_test_acc"] for s in seeds]
        secs = statistics.mean(results[(name, s)]["seconds"] for s in seeds)
        row = f"| {name} | {len(seeds)} | {statistics.mean(best):.2f} ± {statistics.stdev(best):.2f} | " \
              f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f} | "
        if name == baseline:
            row += "— | — | — | — |"
        else:
            deltas = [b - results[(baseline, s)]["best_test_acc"] for b, s in zip(best, seeds)]
            deltas_last = [b - results[(baseline, s)]["last_test_acc"] for b, s in zip(last, seeds)]
            mean, sd = statistics.mean(deltas), statistics.stdev(deltas)
            se = sd / math.sqrt(len(deltas))
            verdict = "inside noise" if abs(mean) <= 2 * se else ("better" if mean > 0 else "worse")
            row += (f"{mean:+.2f} ± {sd:.2f} | {statistics.mean(deltas_last):+.2f} | "
                    f"{sum(d > 0 for d in deltas)}/{len(deltas)} | {verdict} |")
        lines.append(row + f" {secs:.0f} |")
    return lines


def parser_with_common_options(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--eval-limit", type=int, default=3000, help="val and test samples (class-stratified)")
    parser.add_argument("--data-root", help="where Fashion-MNIST is (default: where energytools looks for it)")
    return parser


def teacher_line(teacher: Path, started: float) -> str:
    import polars as pl

    metrics = pl.read_parquet(teacher / "metrics.parquet")
    return (f"\nteacher resnet8: test {metrics['test_acc'][-1]:.2f}% after {metrics.height} epochs; "
            f"wall time of this command {time.perf_counter() - started:.0f}s")


def main():
    parser = parser_with_common_options(__doc__)
    parser.add_argument("--views", default="1,2,8")
    parser.add_argument("--shards", type=float, default=0.0, help="also train on HE-DA shards of this ratio")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(k) for k in args.views.split(",")]
    out = args.out
    started = time.perf_counter()
    teacher, tables = prepare(out, args.limit, args.eval_limit, args.teacher_epochs, counts, args.data_root)
    shards, suffix, tag = {}, "", ""
    if args.shards:
        suffix, tag = f" + HE-DA {args.shards:g}", f"+heda{args.shards:g}"
        for k in counts:
            shards[k] = out / f"he-da-k{k}-r{args.shards:g}"
            if not (shards[k] / "manifest.json").exists():
                energytools.augment(tables[k], shards[k], ratio=args.shards, overwrite=True)

    def run(name: str, k: int, seed: int, **options) -> dict:
        """kd from table K (and its shards) on ``seed``, unless that run has finished already."""
        path = out / f"{name}{tag}-s{seed}"
        extra = {"shards": [str(shards[k])]} if shards else {}
        return run_once(path, lambda: energytools.distill(tables[k], "cnn_tiny", path, overwrite=True, method="kd",
                                                          epochs=args.epochs, seed=seed, **extra, **options))

    results = {}
    for seed in seeds:
        results[("online" + suffix, seed)] = run("online", counts[-1], seed)
        for k in counts:
            results[(f"views K={k}" + suffix, seed)] = run(f"views{k}", k, seed, cached_logits=True)
    online = "online" + suffix
    print("\n".join(paired_table(results, [online] + [f"views K={k}" + suffix for k in counts], seeds)))
    print(teacher_line(teacher, started))


if __name__ == "__main__":
    main()
