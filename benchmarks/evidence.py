"""The evidence study, round 2 (issue 19): equal-compute controls, the reference's online HE-DA,
a real student, and energy-based pruning. Writes its tables into docs/results/round2.md.

    python benchmarks/evidence.py --teacher runs/teacher-r20/best.pt --out runs/evidence --workers 2
    python benchmarks/evidence.py --smoke --out /tmp/evidence-smoke        # digits, CI-sized

Resumable, with stale inputs refused and a fail-fast pool (benchmarks/runner.py). Runs go to
--workers processes (one torch thread each: results are bit-reproducible for a fixed thread
count). The wall time of every invocation is appended to OUT/wall.jsonl and the doc reports it.

Design (see docs/results/round2.md for the reasons and what was cut):
- student cnn_small (about 30k parameters) for 12 epochs; teacher resnet20;
- Fashion-MNIST with the crop transform (--crop-pad 2: pad-2 crop + flip), cached per-view
  teacher logits (score --views 4), so distill does not run the teacher unless a row needs it;
- equal compute = equal optimizer steps: a ratio-r shard run has (1 + r)x the rows, so its
  baseline is kd for (1 + r)x the epochs ("kd 15 ep" for r = 0.25);
- shard rows run the teacher online on their crops, and so does their random control: when
  this round ran, HE-DA shards stored no views (they do now; a later round can cache them);
- pruning: drop the easiest X% by energy (lowest), by EL2N (lowest) or at random, X = 25, 50,
  at equal epochs (so fewer steps: the point of pruning).
"""
from __future__ import annotations

from runner import Row, Setting, Study, draw_seed, drop_file, main, pair_table, shard_dir  # noqa: F401

DKD_WARMUP = 3  # epochs, of 12 (the reference: 20 of 240)
ROWS = {
    "ce": Row("ce"),
    "kd": Row(),
    "kd 15 ep": Row(epochs=15),
    "energy-kd 6,4,2": Row("energy-kd", options={"temperatures": "6,4,2"}),
    "energy-kd 2,4,6": Row("energy-kd", options={"temperatures": "2,4,6"}),
    "energy-kd 6,4,2 views-T": Row("energy-kd", options={"temperatures": "6,4,2", "temperature_source": "views"}),
    "dkd": Row("dkd", options={"dkd_warmup": DKD_WARMUP}),
    "kd + online HE-DA": Row(options={"he_da": "online"}),
    "kd + online HE-DA 15 ep": Row(epochs=15, options={"he_da": "online"}),
    "kd + HE-DA shards 0.25": Row(shards=(0.25, "high"), cached=False),
    "kd + random shards 0.25": Row(shards=(0.25, "random"), cached=False),
    # the shard rows' equal-step baseline with their teacher source (online, fresh crops)
    "kd 15 ep, online teacher": Row(epochs=15, cached=False),
    **{f"kd, drop {name} {int(r * 100)}%": Row(drop=(r, mode, by))
       for r in (0.25, 0.5) for name, mode, by in (("low-energy", "low", "energy"), ("low-EL2N", "low", "el2n"),
                                                   ("random", "random", "energy"))},
    # added after the first pass showed whole easy classes dropped at 50%
    **{f"kd, drop {name} 50% per class": Row(drop=(0.5, "low", by), drop_per_class=True)
       for name, by in (("low-energy", "energy"), ("low-EL2N", "el2n"))},
}
#: (row, its control): equal optimizer steps for HE-DA, equal size for pruning
PAIRS = [("kd + HE-DA shards 0.25", "kd 15 ep"), ("kd + HE-DA shards 0.25", "kd 15 ep, online teacher"),
         ("kd + random shards 0.25", "kd 15 ep, online teacher"), ("kd 15 ep, online teacher", "kd 15 ep"),
         ("kd + HE-DA shards 0.25", "kd + random shards 0.25"),
         ("kd + online HE-DA", "kd"), ("kd + online HE-DA 15 ep", "kd 15 ep"),
         ("kd + online HE-DA 15 ep", "kd + HE-DA shards 0.25"), ("energy-kd 6,4,2 views-T", "energy-kd 6,4,2"),
         *[(f"kd, drop {name} {x}%", f"kd, drop random {x}%") for x in (25, 50) for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} 50% per class", f"kd, drop {name} 50%") for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} 50% per class", "kd, drop random 50%") for name in ("low-energy", "low-EL2N")],
         *[(f"kd, drop {name} {x}%", "kd") for x in (25, 50) for name in ("low-energy", "low-EL2N", "random")]]
COMMON_DATA = {"crop_pad": 2, "eval_limit": 2000}
VIEWS = 4
ROUND2 = Study(
    name="evidence round 2", title="Results, round 2: equal compute, online HE-DA, a real student, pruning",
    rows=ROWS, csv="evidence.csv", doc="docs/results/round2.md", intro="The baseline is kd.",
    settings={
        "fashion-mnist crops": Setting({"dataset": "fashion-mnist", "limit": 8000, **COMMON_DATA}, [0, 1, 2],
                                       list(ROWS), views=VIEWS, pairs=PAIRS),
        "fashion-mnist-lt crops": Setting({"dataset": "fashion-mnist", "imbalance_factor": 100.0, **COMMON_DATA},
                                          [0, 1, 2, 3, 4],
                                          ["ce", "kd", "energy-kd 6,4,2", "energy-kd 2,4,6", "kd + online HE-DA"],
                                          views=VIEWS, pairs=PAIRS)},
    # 12 -> 4 and 15 -> 5 epochs: the same step ratios, CI-sized
    smoke={"digits": Setting({"dataset": "digits"}, [0, 1], ["ce", "kd", "kd + online HE-DA", "kd + HE-DA shards 0.25",
                                                            "kd, drop low-energy 25%"], views=VIEWS, pairs=PAIRS)})


if __name__ == "__main__":
    main(ROUND2)
