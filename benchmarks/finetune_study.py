"""Issue 26's accuracy study: a pretrained student against the from-scratch student (at the same
epochs and at equal wall time), and the EMA against the raw weights, over seeds with paired
differences; writes RECORDS/finetune_study.md and .csv, and with --results its block into that
page (docs/results/finetune.md).

    python benchmarks/finetune_study.py [--seeds 0,1,2] [--epochs 6] [--records docs/records] [--work runs/finetune-study]

Fashion-MNIST. The "pretrained" student is cnn_small trained with CE on the first half of the
training subset's samples (``--pretrain-limit``, its own seed); nothing downloads here. The
teacher (resnet8, trained with CE) is scored once with cached logits. Every student run is
energy-kd with AdamW (lr 2e-3, wd 0.05), 1 warm-up epoch, cosine to 1e-5, clip-grad 5 and EMA
0.998:

- scratch: random init, ``--epochs`` epochs (the baseline);
- pretrained: ``--student-init`` the pretrained weights, the same epochs;
- scratch (equal time): random init, as many more epochs as the pretraining took wall time;
- raw / EMA of the pretrained runs: the validation-selected test accuracy of the raw weights and
  of the EMA weights in the same runs (metrics.parquet's val_acc/test_acc and ema_val_acc/ema_test_acc).

A full run takes well over ten minutes on a 2-core CPU (the teacher alone ~10 min); it was not
run for the commit that added it.
"""
import argparse
import math
import time
from pathlib import Path

import polars as pl

from energytools.config import DataConfig, DistillConfig, ScoreConfig, TrainConfig, TrainStageConfig
from energytools.stages.distill import distill
from energytools.stages.score import score
from energytools.stages.train import train
from views_study import paired_table, runs_frame, write_records

FINETUNE = dict(optimizer="adamw", lr=0.002, weight_decay=0.05, warmup_epochs=1.0, warmup_lr=0.0001,
                schedule="cosine", min_lr=0.00001, clip_grad=5.0, ema_decay=0.998)


def selected(metrics: pl.DataFrame, prefix: str = "") -> dict:
    """Test accuracy at the best validation epoch and at the last, of the raw or EMA weights."""
    best = metrics.sort([f"{prefix}val_acc", "epoch"], descending=[True, False]).row(0, named=True)
    return {"best_test_acc": best[f"{prefix}test_acc"], "last_test_acc": metrics[f"{prefix}test_acc"][-1],
            "seconds": float(metrics["seconds"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--pretrain-limit", type=int, default=10000)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-study"))
    parser.add_argument("--records", type=Path, default=Path("docs/results"))
    parser.add_argument("--results", type=Path, help="also write the record and tables into this Markdown file "
                        "(docs/results/finetune.md), under its own heading")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = DataConfig(dataset="fashion-mnist", limit=args.limit, eval_limit=3000)
    work = args.work
    teacher = train(TrainStageConfig(model="resnet8", out=str(work / "teacher"), data=data, overwrite=True,
                                     train=TrainConfig(epochs=args.teacher_epochs, seed=0)))
    table = score(ScoreConfig(teacher=str(teacher.out_dir / "best.pt"), out=str(work / "scores.parquet"),
                              save_logits=True, overwrite=True))
    pre_data = DataConfig(dataset="fashion-mnist", limit=args.pretrain_limit, eval_limit=3000)
    pretrain = train(TrainStageConfig(model="cnn_small", out=str(work / "pretrained"), data=pre_data,
                                      overwrite=True, train=TrainConfig(epochs=args.pretrain_epochs, seed=100)))
    results = {}

    def run(name: str, seed: int, epochs: int, init: str | None):
        cfg = DistillConfig(scores=str(table), student="cnn_small", method="energy-kd", cached_logits=True,
                            out=str(work / name.replace(" ", "-").replace("(", "").replace(")", "") / str(seed)),
                            student_init=init, overwrite=True, train=TrainConfig(epochs=epochs, seed=seed, **FINETUNE))
        return distill(cfg)

    per_epoch = None
    for seed in seeds:
        scratch = run("scratch", seed, args.epochs, None)
        per_epoch = per_epoch or scratch.seconds / args.epochs
        pretrained = run("pretrained", seed, args.epochs, str(pretrain.out_dir / "best.pt"))
        extra = math.ceil(pretrain.seconds / per_epoch)
        equal = run("scratch (equal time)", seed, args.epochs + extra, None)
        for name, result in (("scratch", scratch), ("pretrained", pretrained), ("scratch (equal time)", equal)):
            results[(name, seed)] = selected(result.metrics)
        results[("pretrained raw", seed)] = selected(pretrained.metrics)
        results[("pretrained EMA", seed)] = selected(pretrained.metrics, "ema_")
    tables = [paired_table(results, ["scratch", "pretrained", "scratch (equal time)"], seeds),
              paired_table(results, ["pretrained raw", "pretrained EMA"], seeds)]
    for table_lines in tables:
        print("\n".join(table_lines))
    names = ["scratch", "pretrained", "scratch (equal time)", "pretrained raw", "pretrained EMA"]
    write_records(args.records, "finetune_study", tables, runs_frame(results, names, seeds), started)
    if args.results:
        from common import record, record_lines, replace_block

        settings = (f"Fashion-MNIST, {args.limit} training images (val and test: 3,000 each), resnet8 teacher "
                    f"({args.teacher_epochs} epochs), cnn_small student, energy-kd on cached logits, {args.epochs} "
                    f"epochs, AdamW + 1 warm-up epoch + cosine + clip 5 + EMA 0.998; the \"pretrained\" student is "
                    f"cnn_small trained with CE on {args.pretrain_limit} images for {args.pretrain_epochs} epochs "
                    f"(nothing can be downloaded here); seeds {args.seeds}; test accuracy of the validation-selected "
                    "checkpoint, paired Δ with its 95% Student-t interval.")
        body = [*record_lines([record(time.perf_counter() - started)]), "", settings, ""]
        body += [line for table_lines in tables for line in table_lines + [""]]
        replace_block(args.results, "finetune study", "\n".join(body),
                      heading="# Fine-tuning a pretrained student (issue 26)")


if __name__ == "__main__":
    main()
