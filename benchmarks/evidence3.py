"""The evidence study, round 3 (issue 28): every per-sample temperature rule, the reference's
HE-DA as published, pruning at full scale and a long-tailed teacher. Writes its block into
docs/results/round3.md and every run's numbers into docs/results/evidence3.csv.

    python benchmarks/evidence3.py --teacher runs/r3/teacher-r20/best.pt \
        --lt-teacher runs/r3/teacher-r20-lt/best.pt --out runs/r3/evidence
    python benchmarks/evidence3.py --smoke --out /tmp/evidence3-smoke     # digits, CI-sized

The teachers (not counted in the study's wall time):

    energytools train --dataset fashion-mnist --model resnet20 --epochs 6 --out runs/r3/teacher-r20
    energytools train --dataset fashion-mnist --imbalance-factor 100 --model resnet20 --epochs 15 \
        --out runs/r3/teacher-r20-lt

Resumable, with stale inputs refused and a fail-fast pool (benchmarks/runner.py); cut for time
with --settings and --configs (the doc lists the rows that ran). Design:
- student cnn_small (about 30k parameters), SGD lr 0.05, batch 64, step schedule; Fashion-MNIST
  with its flip transform, whose teacher logits the table stores (`--cached-logits`: the
  teacher runs only for online HE-DA's mixed images and to build shards);
- A: a 20,000-image class-stratified subset (the study's data set, fixed on purpose: every
  row trains on the same images), 12 epochs, 5 seeds, every temperature rule against kd;
- HE-DA as published: online HE-DA with the reference's high fraction (0.5, 0.4) and weight
  (0.9, the KD weight; and 0.3), against kd at equal steps (online HE-DA adds no steps);
  shards at ratio 0.2 and 0.5 against random shards of the same size, both at the epochs that
  give kd's steps (24,000 rows x 10 = 30,000 x 8 = 20,000 x 12);
- B: all 54,000 training images, 3 seeds, at equal epochs (4) and the 50% rows also at equal
  steps (8 epochs); random drops are drawn per seed;
- C: the teacher trained on the long-tailed split itself (imbalance factor 100, 13,399 images),
  which it then scores; 12 epochs, 5 seeds; and the two Energy KD directions against each other
  (a pair added after the round ran, issue 39: A had it, C did not).
DKD's and DTKD's warm-up and CTKD's reversal ramp: 3 of the 12 epochs (the reference: 20 and
10 of 240), as round 2 scaled DKD's.
"""
from __future__ import annotations

from runner import Row, Setting, Study, main

RAMP = 3  # epochs, of 12
TEMPERATURE_ROWS = {
    "ce": Row("ce"),
    "kd": Row(),
    "energy-kd 6,4,2": Row("energy-kd", options={"temperatures": "6,4,2"}),
    "energy-kd 2,4,6": Row("energy-kd", options={"temperatures": "2,4,6"}),
    "ls-kd": Row("ls-kd"),
    "ls-energy-kd 6,4,2": Row("ls-energy-kd", options={"temperatures": "6,4,2"}),
    "ctkd": Row("ctkd", options={"ctkd_grl_epochs": RAMP}),
    "dtkd": Row("dtkd", options={"dkd_warmup": RAMP}),
    "dkd": Row("dkd", options={"dkd_warmup": RAMP}),
    "ls-dkd": Row("ls-dkd", options={"dkd_warmup": RAMP}),
}
HEDA_ROWS = {
    "kd + online HE-DA high 0.5": Row(options={"he_da": "online", "high_frac": 0.5}),
    "kd + online HE-DA high 0.4": Row(options={"he_da": "online", "high_frac": 0.4}),
    "kd + online HE-DA high 0.5, weight 0.3": Row(options={"he_da": "online", "high_frac": 0.5, "he_da_weight": 0.3}),
    "kd + HE-DA shards 0.2": Row(epochs=10, shards=(0.2, "high")),
    "kd + random shards 0.2": Row(epochs=10, shards=(0.2, "random")),
    "kd + HE-DA shards 0.5": Row(epochs=8, shards=(0.5, "high")),
    "kd + random shards 0.5": Row(epochs=8, shards=(0.5, "random")),
}
POOL_EPOCHS = 4
DROPS = (("low-energy", "low", "energy"), ("low-EL2N", "low", "el2n"), ("random", "random", "energy"))
PRUNING_ROWS = {
    "kd, full pool": Row(epochs=POOL_EPOCHS),
    **{f"kd, drop {name} {int(r * 100)}%": Row(epochs=POOL_EPOCHS, drop=(r, mode, by))
       for r in (0.25, 0.5) for name, mode, by in DROPS},
    **{f"kd, drop {name} 50%, equal steps": Row(epochs=2 * POOL_EPOCHS, drop=(0.5, mode, by))
       for name, mode, by in DROPS},
}
ROWS = {**TEMPERATURE_ROWS, **HEDA_ROWS, **PRUNING_ROWS}

TEMPERATURE_PAIRS = [("ls-energy-kd 6,4,2", "energy-kd 6,4,2"), ("ls-energy-kd 6,4,2", "ls-kd"),
                     ("ls-dkd", "dkd"), ("energy-kd 6,4,2", "energy-kd 2,4,6")]
# added after round 3 ran (issue 39): the direction contrast A has, on the long tail
LONG_TAIL_PAIRS = [("energy-kd 6,4,2", "energy-kd 2,4,6")]
HEDA_PAIRS = [(f"kd + HE-DA shards {r}", f"kd + random shards {r}") for r in (0.2, 0.5)]
PRUNING_PAIRS = [*[(f"kd, drop {name} {x}%", f"kd, drop random {x}%") for x in (25, 50)
                   for name in ("low-energy", "low-EL2N")],
                 *[(f"kd, drop {name} 50%, equal steps", "kd, drop random 50%, equal steps")
                   for name in ("low-energy", "low-EL2N")],
                 *[(f"kd, drop {name} 50%, equal steps", f"kd, drop {name} 50%") for name, _, _ in DROPS]]

SUBSET = {"dataset": "fashion-mnist", "limit": 20000, "eval_limit": 2000}
SEEDS5, SEEDS3 = [0, 1, 2, 3, 4], [0, 1, 2]
ROUND3 = Study(
    name="evidence round 3",
    title="Results, round 3: every temperature rule, HE-DA as published, pruning at full scale, a long-tailed teacher",
    rows=ROWS, csv="evidence3.csv", doc="docs/results/round3.md", teachers={"teacher": "teacher of the balanced settings",
                                              "lt_teacher": "teacher trained on the long-tailed split"},
    intro="Each table's baseline is named in its Δ column; the second table of a setting compares rows with "
          "their own controls.",
    settings={
        "A: temperature rules, 20k images": Setting(SUBSET, SEEDS5, list(TEMPERATURE_ROWS), directory="fashion-mnist-20k",
                                                    pairs=TEMPERATURE_PAIRS),
        "HE-DA as published, 20k images": Setting(SUBSET, SEEDS5, ["kd", *HEDA_ROWS], directory="fashion-mnist-20k",
                                                  pairs=HEDA_PAIRS),
        "B: pruning the full pool": Setting({"dataset": "fashion-mnist", "eval_limit": 2000}, SEEDS3,
                                            list(PRUNING_ROWS), baseline="kd, full pool", pairs=PRUNING_PAIRS),
        "C: long tail, long-tailed teacher": Setting({"dataset": "fashion-mnist", "imbalance_factor": 100.0,
                                                      "eval_limit": 2000}, SEEDS5,
                                                     ["ce", "kd", "energy-kd 6,4,2", "energy-kd 2,4,6", "ls-kd"],
                                                     teacher="lt_teacher", pairs=LONG_TAIL_PAIRS),
    },
    # 12 -> 4 epochs (pool rows: 4 -> 1 and 8 -> 3); one row of each kind
    smoke={
        "A": Setting({"dataset": "digits"}, [0, 1], ["kd", "ls-energy-kd 6,4,2", "ctkd", "dtkd"],
                     directory="digits", pairs=TEMPERATURE_PAIRS),
        "HE-DA": Setting({"dataset": "digits"}, [0, 1], ["kd", "kd + online HE-DA high 0.5", "kd + HE-DA shards 0.2",
                                                          "kd + random shards 0.2"], directory="digits",
                         pairs=HEDA_PAIRS),
        "B": Setting({"dataset": "digits"}, [0, 1], ["kd, full pool", "kd, drop random 50%",
                                                      "kd, drop random 50%, equal steps"],
                     directory="digits", baseline="kd, full pool", pairs=PRUNING_PAIRS),
        "C": Setting({"dataset": "digits", "imbalance_factor": 10.0}, [0, 1], ["kd", "energy-kd 2,4,6"],
                     teacher="lt_teacher"),
    })


if __name__ == "__main__":
    main(ROUND3)
