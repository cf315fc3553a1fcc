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
- B again (issue 39.5): all 54,000 training images, 5 seeds, the full pool trained 8 epochs
  (round 3's baseline had 4) against pruning by energy and at random at equal steps: 25% dropped
  for 11 epochs (40,500 x 11 = 1.03x the full pool's 54,000 x 8 samples seen), 50% for 16. Cut
  for time: the lowest-EL2N half (energy's peer; round 3 has it) and round 3's equal-epoch rows;
- A with a student that is not capacity-bound (issue 39.6): resnet8 (mdistiller's, 78k
  parameters against cnn_small's 30k, and convolutions at full resolution) on round 3's 20k
  subset for 12 epochs, 5 seeds, with the rules that decide the temperature question: kd and the
  two Energy KD directions, in its own directory (its runs do not mix with cnn_small's). Cut for
  time (a resnet8 run took ~4x cnn_small's here, ~11 min two at a time): the other seven of round 3's ten rules, dtkd and
  ctkd among them (add them to ``RULES`` to run them; the finished runs are reused).
"""
from __future__ import annotations

from evidence3 import DROPS, HEDA_PAIRS, ROWS, SEEDS5, SUBSET
from runner import Row, Setting, Study, main

HEDA = ["kd", "kd + online HE-DA high 0.5", "kd + online HE-DA high 0.4", "kd + online HE-DA high 0.5, weight 0.3",
        "kd + HE-DA shards 0.5", "kd + random shards 0.5"]
LONG_TAIL = ["kd", "ctkd", "dtkd"]
CUT_ROWS = {name: ROWS[name] for name in dict.fromkeys(HEDA + LONG_TAIL)}

POOL_EPOCHS = 8  # the full pool's epochs; a pruned pool trains for the same steps (rounded up)
POOL_BASELINE = f"kd, full pool, {POOL_EPOCHS} epochs"


def equal_steps(fraction: float) -> int:
    """Epochs of a pool with ``fraction`` dropped that see at least the full pool's samples."""
    return -(-round(POOL_EPOCHS * 100) // round((1 - fraction) * 100))


POOL_DROPS = {"low-energy": (0.25, 0.5), "random": (0.25, 0.5)}  # low-EL2N (0.5,) cut for time
POOL_ROWS = {POOL_BASELINE: Row(epochs=POOL_EPOCHS),
             **{f"kd, drop {name} {round(r * 100)}%, {equal_steps(r)} epochs": Row(epochs=equal_steps(r),
                                                                               drop=(r, mode, by))
                for name, mode, by in DROPS for r in POOL_DROPS.get(name, ())}}
POOL_PAIRS = [(name, name.replace(f"drop {chosen} ", "drop random ")) for name in POOL_ROWS
              for chosen in ("low-energy", "low-EL2N") if f"drop {chosen} " in name]
LARGER_STUDENT = "resnet8"
RULES = ["kd", "energy-kd 6,4,2", "energy-kd 2,4,6"]  # dtkd, ctkd and five more cut for time
RULE_PAIRS = [("energy-kd 6,4,2", "energy-kd 2,4,6")]

ROUND4 = Study(
    name="evidence round 4",
    title="Results, round 4: the rows round 3 cut, run again beside their controls",
    rows={**CUT_ROWS, **{name: ROWS[name] for name in RULES}, **POOL_ROWS}, csv="evidence4.csv",
    doc="docs/results/round4.md",
    teachers={"teacher": "teacher of the balanced settings", "lt_teacher": "teacher trained on the long-tailed split"},
    intro="Round 3's rows that were cut for time (issue 39), each against its control run in the same "
          "invocation; the baseline is named in each table's Δ column.",
    settings={
        "HE-DA as published, 20k images": Setting(SUBSET, SEEDS5, HEDA, directory="fashion-mnist-20k",
                                                  pairs=[pair for pair in HEDA_PAIRS if pair[0] in HEDA]),
        "C: long tail, long-tailed teacher": Setting({"dataset": "fashion-mnist", "imbalance_factor": 100.0,
                                                      "eval_limit": 2000}, SEEDS5, LONG_TAIL, teacher="lt_teacher"),
        "B: pruning the full pool at equal steps": Setting({"dataset": "fashion-mnist", "eval_limit": 2000}, SEEDS5,
                                                           list(POOL_ROWS), baseline=POOL_BASELINE, pairs=POOL_PAIRS),
        "A: temperature rules, resnet8 student": Setting(SUBSET, SEEDS5, RULES, student=LARGER_STUDENT,
                                                         directory="fashion-mnist-20k-resnet8", pairs=RULE_PAIRS),
    },
    smoke={
        "HE-DA": Setting({"dataset": "digits"}, [0, 1], ["kd", "kd + online HE-DA high 0.4", "kd + HE-DA shards 0.5",
                                                          "kd + random shards 0.5"], directory="digits",
                         pairs=[pair for pair in HEDA_PAIRS if pair[0] in HEDA]),
        "C": Setting({"dataset": "digits", "imbalance_factor": 10.0}, [0, 1], ["kd", "ctkd"], teacher="lt_teacher"),
        "B": Setting({"dataset": "digits"}, [0, 1], [POOL_BASELINE, "kd, drop random 50%, 16 epochs"],
                     directory="digits", baseline=POOL_BASELINE),
        "A": Setting({"dataset": "digits"}, [0, 1], ["kd", "energy-kd 6,4,2"], student=LARGER_STUDENT,
                     directory="digits-resnet8"),
    })


if __name__ == "__main__":
    main(ROUND4)
