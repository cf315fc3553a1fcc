"""Accuracy: KD from cached views against KD with the online teacher, Fashion-MNIST with crops.

    python benchmarks/views_study.py --out runs/views-study [--limit 10000] [--seeds 0,1,2] [--views 1,2,8]
    python benchmarks/views_study.py --out runs/views-study --views 2,8 --shards 0.3   # with HE-DA shards

A teacher (resnet8) is trained with the crop regime (--crop-pad 2: pad-2 crop + flip), the
training split is scored once per K with --views K, and a student (cnn_tiny) is distilled with
kd (T = 4) on the same seeds: with the teacher run online on every batch, and from each table's
cached views (--cached-logits: the teacher is never run). Paired differences to the online
run, per seed, with the 95% Student-t interval and the verdict of energytools.summaries.
Finished runs are kept (re-running the command skips them). The command, machine, date and
wall time, the table and every run's numbers go to --records (docs/results/views-study.md, .csv).

With ``--shards R`` every run also trains on HE-DA shards (CutMix of the highest-energy R of
the samples) made from its own table by ``augment``: the online run's teacher sees the shard
images' crops every batch, the cached runs replay the K views augment stored for each shard
image. Those runs are named with a ``+ HE-DA R`` suffix and compared among themselves.
"""
import argparse
import json
import time
from pathlib import Path

import energytools
from energytools.config import AugmentConfig
from runner import ensure_shards


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


def runs_frame(results: dict, names: list[str], seeds: list[int]):
    """One row per (run name, seed) of ``results``: config, seed, best, last, seconds."""
    import polars as pl

    return pl.DataFrame([{"config": name, "seed": s, "best": results[(name, s)]["best_test_acc"],
                          "last": results[(name, s)]["last_test_acc"], "seconds": results[(name, s)]["seconds"]}
                         for name in names for s in seeds])


def paired_table(results: dict, names: list[str], seeds: list[int]) -> list[str]:
    """Markdown rows: each run's test accuracy over seeds and its paired difference to ``names[0]``,
    with the 95% Student-t interval, the verdict and the Holm-adjusted verdict (energytools.summaries)."""
    from energytools.summaries import aggregate_runs, markdown_table, summary_cells

    baseline = names[0]
    cells = summary_cells(aggregate_runs(runs_frame(results, names, seeds), baseline))
    base = baseline.split(" ")[0]
    columns = {"run": "config", "seeds": "seeds", "best (val-selected)": "best", "last": "last",
               f"Δ {base} (best)": "delta_best", f"Δ {base} (last)": "delta_last", "95% CI (best)": "interval",
               "wins": "wins", "verdict": "verdict", "Holm": "holm", "s/run": "seconds"}
    tests = len(names) - 1
    note = [f"{tests} comparison{'s' * (tests > 1)} with {baseline}" + ("; Holm adjusts the verdicts for them."
                                                                     if tests > 1 else "."), ""]
    return note + markdown_table(cells, columns, decimals={"seconds": 0}).splitlines()


def write_records(records_dir: Path | None, study: str, tables: list[list[str]], runs, started: float) -> None:
    """The study's own record beside the docs: RECORDS/STUDY.md (the command, machine, date and
    wall time of this invocation, then its tables) and RECORDS/STUDY.csv (every run's numbers);
    the record lines are printed too."""
    from common import record, record_lines

    lines = record_lines([record(time.perf_counter() - started)])
    print("\n".join(lines))
    if records_dir is None:
        return
    records_dir.mkdir(parents=True, exist_ok=True)
    body = [f"# {study}", "", *lines, ""] + [line for table in tables for line in table + [""]]
    (records_dir / f"{study}.md").write_text("\n".join(body))
    runs.write_csv(records_dir / f"{study}.csv")


def parser_with_common_options(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--eval-limit", type=int, default=3000, help="val and test samples (class-stratified)")
    parser.add_argument("--data-root", help="where Fashion-MNIST is (default: where energytools looks for it)")
    parser.add_argument("--records", type=Path, default=Path("docs/results"),
                        help="where the study writes its record (STUDY.md) and every run's numbers (STUDY.csv)")
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
            ensure_shards(AugmentConfig(scores=str(tables[k]), out=str(shards[k]), ratio=args.shards, overwrite=True))

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
    names = [online] + [f"views K={k}" + suffix for k in counts]
    table = paired_table(results, names, seeds)
    print("\n".join(table))
    print(teacher_line(teacher, started))
    write_records(args.records, f"views-study{tag}", [table], runs_frame(results, names, seeds), started)


if __name__ == "__main__":
    main()
