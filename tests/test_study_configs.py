"""The study scripts' configuration building: random controls are drawn per run seed."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
evidence = pytest.importorskip("evidence")


def test_random_controls_follow_the_run_seed(tmp_path):
    rows = evidence.ROWS
    random_drop, shards, energy_drop = rows["kd, drop random 50%"], rows["kd + random shards 0.25"], \
        rows["kd, drop low-energy 50%"]
    assert [evidence.draw_seed(random_drop, s) for s in (0, 1, 2)] == [0, 1, 2]
    assert evidence.draw_seed(rows["kd + HE-DA shards 0.25"], 2) == 2  # CutMix draws too
    assert evidence.draw_seed(energy_drop, 2) is None and evidence.draw_seed(rows["kd"], 1) is None
    assert evidence.drop_file(tmp_path, random_drop, 1) != evidence.drop_file(tmp_path, random_drop, 2)
    assert evidence.drop_file(tmp_path, energy_drop, 1) == evidence.drop_file(tmp_path, energy_drop, 2)
    assert evidence.shard_dir(tmp_path, shards, 1).name == "he-da-random-0.25-s1"
    fixed = evidence.Row(drop=(0.5, "random", "energy"), fixed=True)  # a row that says it is fixed on purpose
    assert evidence.draw_seed(fixed, 3) == 0


def test_pair_table_gives_intervals_and_holm():
    import polars as pl

    runs = pl.DataFrame({"config": ["kd"] * 3 + ["kd + online HE-DA"] * 3, "seed": [0, 1, 2] * 2,
                         "best": [80.0, 81.0, 79.0, 78.0, 79.1, 76.9], "last": [80.0] * 6})
    pairs = evidence.pair_table(runs, evidence.PAIRS)
    row = pairs.row(0, named=True)
    assert (row["against"], row["verdict"], row["holm"]) == ("kd", "worse", "worse")
    assert row["interval"].startswith("[-2.") and row["wins"] == "0/3"


def test_a_score_table_from_another_teacher_or_data_is_refused(tmp_path):
    import subprocess

    from common import check_table
    from energytools.config import DataConfig

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sm"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "study.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    table, teacher = out / "digits" / "scores.parquet", out / "teacher" / "best.pt"
    check_table(table, teacher, DataConfig(dataset="digits"))  # the same provenance: accepted
    with pytest.raises(SystemExit, match="limit None"):
        check_table(table, teacher, DataConfig(dataset="digits", limit=100))
    with pytest.raises(SystemExit, match="teacher .*last.pt"):
        check_table(table, out / "teacher" / "last.pt", DataConfig(dataset="digits"))
    assert "study.py --smoke --out" in (out / "wall.jsonl").read_text()  # the invocation, as typed
