"""The functional API in a notebook: logits from any model in, energies, groups, temperatures
and a pruning selection out, then a score table the pipeline accepts.

    python examples/functional_api.py OUT_DIR

The "teacher" here is a scikit-learn logistic regression on the 8x8 digits (any framework's
logits work the same way); energytools never sees the model, only its logits.
"""
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import energytools as et
from energytools.data import build_dataset

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/functional")
out.mkdir(parents=True, exist_ok=True)

# energytools' train split of the digits (the validation carve left out): sample ids are positions
# in the 1,797 images, the ids a score table is keyed by
train = build_dataset("digits", "train")
ids = train.sample_ids
digits = load_digits()
teacher = LogisticRegression(C=0.05, max_iter=2000).fit(digits.data[ids], digits.target[ids])
logits = teacher.decision_function(digits.data[ids])  # (N, 10), from outside energytools

energies = et.energy_scores(logits)                      # (N,) float32, lower = more confident
scores = et.sample_scores(logits, digits.target[ids])    # confidence, margin, entropy, EL2N, ...
groups = et.energy_groups(energies, low_frac=0.2, high_frac=0.2)
temperatures = et.sample_temperatures(energies, temperatures=(6, 4, 2))
easiest = et.select_indices(energies, ratio=0.25, mode="low")  # what pruning would drop
print(f"{len(ids)} samples; energy {energies.min():.2f} .. {energies.max():.2f}; "
      f"groups {({str(g): int(c) for g, c in zip(*np.unique(groups, return_counts=True))})}")
for group in ("low", "mid", "high"):
    chosen = groups == group
    print(f"  {group:<4} T = {temperatures[chosen][0]:.0f}  mean confidence {scores['confidence'][chosen].mean():.3f}  "
          f"accuracy {100 * scores['correct'][chosen].mean():.1f}%")
print(f"pruning the easiest quarter drops {len(easiest)} samples, e.g. sample ids {ids[easiest[:5]].tolist()}")

# a score table from these logits: augment (with --teacher), select, distill --cached-logits and
# report take it like one that `energytools score` wrote
table = et.write_score_table(out / "scores.parquet", logits, digits.target[ids], sample_ids=ids,
                             dataset={"dataset": "digits"}, source="sklearn LogisticRegression(C=0.05)",
                             overwrite=True)
result = et.distill(table, "cnn_tiny", out / "student", method="energy-kd", cached_logits=True, epochs=2,
                    overwrite=True)
print(f"distilled from the table: {result.summary()}")
print(f"the same from a shell: energytools distill --scores {table} --student cnn_tiny --method energy-kd "
      f"--cached-logits --out {out / 'student'}")
