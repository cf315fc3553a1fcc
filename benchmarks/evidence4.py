"""The evidence study, round 4 (issue 39): the rows round 3 cut for time, run by recorded code.
Writes its block into docs/results/round4.md and every run's numbers into docs/results/evidence4.csv.

    python benchmarks/evidence4.py --teacher runs/r4/teacher-r20/best.pt \
        --lt-teacher runs/r4/teacher-r20-lt/best.pt --out runs/r4/evidence
    python benchmarks/evidence4.py --smoke --out /tmp/evidence4-smoke     # digits, CI-sized

The teachers are round 3's recipes, trained again (round 3's checkpoints are gone; not counted
in the study's wall time):

    energytools train --dataset fashion-mnist --model resnet20 --epochs 6 --out runs/r4/teacher-r20
    energytools train --dataset fashion-mnist --imbalance-factor 100 --model resnet20 --epochs 15 \
        --out runs/r4/teacher-r20-lt

The rows are round 3's (benchmarks/evidence3.py: the same options, epochs and data), each with
its own control run again beside it, since round 3's runs were made by code that is no longer
recorded and cannot be mixed with these:
- HE-DA as published on the 20k subset: online HE-DA at high 0.5 (5 seeds; round 3 had 4), 0.4
  and at weight 0.3, against kd at equal steps; HE-DA shards 0.5 against random shards 0.5;
- C (the long-tailed teacher on its own split): ctkd and dtkd against kd.
Not here yet (issue 39, later rounds): study B again (the full pool to convergence) and study A
with a student that is not capacity-bound.
"""
from __future__ import annotations

from evidence3 import HEDA_PAIRS, ROWS, SEEDS5, SUBSET
from runner import Setting, Study, main

HEDA = ["kd", "kd + online HE-DA high 0.5", "kd + online HE-DA high 0.4", "kd + online HE-DA high 0.5, weight 0.3",
        "kd + HE-DA shards 0.5", "kd + random shards 0.5"]
LONG_TAIL = ["kd", "ctkd", "dtkd"]
ROUND4 = Study(
    name="evidence round 4",
    title="Results, round 4: the rows round 3 cut, run again beside their controls",
    rows={name: ROWS[name] for name in dict.fromkeys(HEDA + LONG_TAIL)}, csv="evidence4.csv",
    doc="docs/results/round4.md",
    teachers={"teacher": "teacher of the balanced settings", "lt_teacher": "teacher trained on the long-tailed split"},
    intro="Round 3's rows that were cut for time (issue 39), each against its control run in the same "
          "invocation; the baseline is named in each table's Δ column.",
    settings={
        "HE-DA as published, 20k images": Setting(SUBSET, SEEDS5, HEDA, directory="fashion-mnist-20k",
                                                  pairs=[pair for pair in HEDA_PAIRS if pair[0] in HEDA]),
        "C: long tail, long-tailed teacher": Setting({"dataset": "fashion-mnist", "imbalance_factor": 100.0,
                                                      "eval_limit": 2000}, SEEDS5, LONG_TAIL, teacher="lt_teacher"),
    },
    smoke={
        "HE-DA": Setting({"dataset": "digits"}, [0, 1], ["kd", "kd + online HE-DA high 0.4", "kd + HE-DA shards 0.5",
                                                          "kd + random shards 0.5"], directory="digits",
                         pairs=[pair for pair in HEDA_PAIRS if pair[0] in HEDA]),
        "C": Setting({"dataset": "digits", "imbalance_factor": 10.0}, [0, 1], ["kd", "ctkd"], teacher="lt_teacher"),
    })


if __name__ == "__main__":
    main(ROUND4)
