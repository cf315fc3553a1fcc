"""Why the reference's online HE-DA was below kd on every seed in round 2 (docs/results/round2.md):
the weight of its KD term on the mixed images, or the joint forward pass?

    python benchmarks/online_heda_ablation.py --out runs/views-study --seeds 0,1,2,3,4 --weights 0.9,0.3,0

The setting of benchmarks/views_study.py, whose teacher, K = 8 table and kd runs it shares
(same --out): Fashion-MNIST with crops, 10,000 images, resnet8 teacher, cnn_tiny student, kd
from the stored views (--cached-logits), 6 epochs. Against that kd, kd + `--he-da online` at
each `--he-da-weight`. The student sees the batch and the mixed images in one forward pass, so
BatchNorm's batch statistics include the mixed images whatever the weight: weight 0 keeps the
mixing and the joint forward and adds no loss, which isolates that effect.
"""
import time

import energytools
from views_study import (paired_table, parser_with_common_options, prepare, run_once, runs_frame, teacher_line,
                         write_records)

VIEWS = 8


def main():
    parser = parser_with_common_options(__doc__)
    parser.add_argument("--weights", default="0.9,0.3,0", help="--he-da-weight values")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    weights = [float(w) for w in args.weights.split(",")]
    started = time.perf_counter()
    teacher, tables = prepare(args.out, args.limit, args.eval_limit, args.teacher_epochs, [VIEWS], args.data_root)

    def run(path, seed: int, **options) -> dict:
        return run_once(path, lambda: energytools.distill(tables[VIEWS], "cnn_tiny", path, overwrite=True, method="kd",
                                                          epochs=args.epochs, seed=seed, cached_logits=True,
                                                          **options))

    names = ["kd"] + [f"kd + online HE-DA, weight {w:g}" for w in weights]
    results = {}
    for seed in seeds:
        results[("kd", seed)] = run(args.out / f"views{VIEWS}-s{seed}", seed)  # views_study's run of the same kd
        for weight, name in zip(weights, names[1:]):
            results[(name, seed)] = run(args.out / f"views{VIEWS}+online-heda-w{weight:g}-s{seed}", seed,
                                        he_da="online", he_da_weight=weight)
    table = paired_table(results, names, seeds)
    print("\n".join(table))
    print(teacher_line(teacher, started))
    write_records(args.records, "online-heda-ablation", [table], runs_frame(results, names, seeds), started)


if __name__ == "__main__":
    main()
