"""HE-DA shards replayed from stored views, at equal optimizer steps (round 2's question, with
the teacher never running now that shards store their views).

    python benchmarks/shards_equal_steps.py --out runs/views-study --seeds 0,1,2,3,4 --ratio 0.3

The setting of benchmarks/views_study.py, whose teacher, K = 8 table and runs it shares (same
--out): Fashion-MNIST with crops, 10,000 images, resnet8 teacher, cnn_tiny student, kd from the
stored views (--cached-logits), 6 epochs. A ratio-r shard run trains on (1 + r)x the images,
so its equal-step baseline is kd for round(6 (1 + r)) epochs; a random selection of the same
size is the control for the high-energy one.
"""
import time
from pathlib import Path

import energytools
from energytools.config import AugmentConfig
from runner import ensure_shards
from views_study import (paired_table, parser_with_common_options, prepare, run_once, runs_frame, teacher_line,
                         write_records)

VIEWS = 8


def main():
    parser = parser_with_common_options(__doc__)
    parser.add_argument("--ratio", type=float, default=0.3, help="HE-DA ratio")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    out, ratio = args.out, args.ratio
    teacher, tables = prepare(out, args.limit, args.eval_limit, args.teacher_epochs, [VIEWS], args.data_root)

    def shard_dir(select: str, seed: int) -> Path:
        """The high-energy shards (views_study's, so its runs are shared: their CutMix draws are fixed
        on purpose, seed 0, as views_study made them) or the random control's, drawn per run seed."""
        path = out / (f"he-da-k{VIEWS}-r{ratio:g}" if select == "high" else f"random-k{VIEWS}-r{ratio:g}-s{seed}")
        return ensure_shards(AugmentConfig(scores=str(tables[VIEWS]), out=str(path), ratio=ratio, select=select,
                                           seed=0 if select == "high" else seed, overwrite=True))
    equal_epochs = round(args.epochs * (1 + ratio))
    rows = {  # name: (run directory prefix, epochs, shards)
        f"kd {args.epochs} ep": (f"views{VIEWS}", args.epochs, None),
        f"kd {equal_epochs} ep (equal steps)": (f"views{VIEWS}-{equal_epochs}ep", equal_epochs, None),
        f"kd + HE-DA shards {ratio:g}": (f"views{VIEWS}+heda{ratio:g}", args.epochs, "high"),
        f"kd + random shards {ratio:g}": (f"views{VIEWS}+random{ratio:g}", args.epochs, "random"),
    }

    def run(path, seed: int, epochs: int, select) -> dict:
        extra = {"shards": [str(shard_dir(select, seed))]} if select else {}
        return run_once(path, lambda: energytools.distill(tables[VIEWS], "cnn_tiny", path, overwrite=True, method="kd",
                                                          epochs=epochs, seed=seed, cached_logits=True, **extra))

    results = {}
    for seed in seeds:
        for name, (prefix, epochs, shard) in rows.items():
            results[(name, seed)] = run(out / f"{prefix}-s{seed}", seed, epochs, shard)
    names = list(rows)
    tables = [paired_table(results, [names[1], names[2], names[3]], seeds), paired_table(results, names[:3:2], seeds)]
    print("\n\n".join("\n".join(table) for table in tables))
    print(teacher_line(teacher, started))
    write_records(args.records, "shards-equal-steps", tables, runs_frame(results, names, seeds), started)


if __name__ == "__main__":
    main()
