"""benchmarks/students.py: study A's rules with round 3's and round 4's students side by side,
from the rounds' CSVs, each student against its own kd with its own round's Holm count."""
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
students = pytest.importorskip("students")


def fake_runs(rules: dict[str, float], seeds: int) -> pl.DataFrame:
    """Runs whose best accuracy is the rule's value plus a seed's offset (so deltas vary)."""
    return pl.DataFrame([{"config": rule, "seed": seed, "best": value + 0.1 * (seed % 2) * (rule != "kd"),
                          "last": value} for rule, value in rules.items() for seed in range(seeds)])


def test_only_the_rules_both_students_ran_each_against_its_own_kd_with_its_rounds_holm():
    cnn = fake_runs({"kd": 88.0, "energy-kd 6,4,2": 88.5, "energy-kd 2,4,6": 88.2, "dtkd": 89.0}, 5)
    resnet = fake_runs({"kd": 90.0, "energy-kd 6,4,2": 89.0, "energy-kd 2,4,6": 90.1}, 3)
    rules, pairs, counts = students.student_rows({"cnn_small (round 3)": cnn, "resnet8 (round 4)": resnet})
    assert set(rules["config"]) == {"kd", "energy-kd 6,4,2", "energy-kd 2,4,6"}  # dtkd: only round 3 ran it
    assert counts == {"cnn_small (round 3)": 3, "resnet8 (round 4)": 2}  # Holm over each round's own comparisons
    row = rules.filter((pl.col("config") == "energy-kd 6,4,2") & (pl.col("student") == "resnet8 (round 4)")).row(0, named=True)
    assert row["delta_best"].startswith("-0.9") and row["seeds"] == 3  # against resnet8's kd, not cnn_small's
    assert pairs.filter(pl.col("student") == "resnet8 (round 4)")["against"].to_list() == ["energy-kd 2,4,6"]


def test_the_block_goes_after_round_4s_tables_and_is_replaced_not_repeated(tmp_path):
    doc = tmp_path / "round4.md"
    doc.write_text("# Round 4\n<!-- evidence round 4: begin -->\ntables\n<!-- evidence round 4: end -->\n\nnotes\n")
    students.main(["--doc", str(doc)])
    students.main(["--doc", str(doc)])
    text = doc.read_text()
    assert text.count("## A: both students side by side") == 1
    assert text.index("<!-- evidence round 4: end -->") < text.index("side by side") < text.index("notes")
    assert "cnn_small (round 3)" in text and "resnet8 (round 4)" in text
