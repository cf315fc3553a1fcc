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


def test_round3_tables_rebuild_from_its_csv_with_the_long_tail_direction_pair():
    """docs/results/round3.md's tables are what its CSV gives (benchmarks/csv_tables.py, the study's
    own functions), C's direction pair included; the CSV's rows say which commit recorded them."""
    import polars as pl

    csv_tables = pytest.importorskip("csv_tables")
    evidence3 = pytest.importorskip("evidence3")
    root = Path(__file__).resolve().parents[1]
    runs = pl.read_csv(root / "docs" / "results" / "evidence3.csv")
    assert runs["commit"].str.starts_with("recorded at ").all()
    rebuilt = csv_tables.csv_tables(evidence3.ROUND3, runs)
    pair = "| energy-kd 6,4,2 | energy-kd 2,4,6 | 5 | 2.32 ± 1.19 | [0.84, 3.80] | 5/5 | better | better |"
    assert pair in csv_tables.csv_tables(evidence3.ROUND3, runs, ["C: long tail, long-tailed teacher"])
    doc = (root / "docs" / "results" / "round3.md").read_text()
    block = doc[doc.index("<!-- evidence round 3: begin -->"):doc.index("<!-- evidence round 3: end -->")]
    table_lines = [line for line in rebuilt.splitlines() if line.startswith("|")]
    assert pair in table_lines and [line for line in block.splitlines() if line.startswith("|")] == table_lines


def test_the_results_summary_links_every_round_page_and_the_study_scripts_write_there():
    import re

    import evidence3

    root = Path(__file__).resolve().parents[1]
    summary = (root / "docs" / "results.md").read_text()
    links = re.findall(r"\]\((results/[^)]+)\)", summary)
    assert {"results/round1.md", "results/round2.md", "results/round3.md"} <= set(links)
    assert all((root / "docs" / link).exists() for link in links)
    import evidence4

    assert "results/round4.md" in links
    for study, marker in ((evidence4.ROUND4, "evidence round 4"), (evidence3.ROUND3, "evidence round 3"),
                          (evidence.ROUND2, "evidence round 2")):
        page = (root / study.doc).read_text()
        assert page.count(f"<!-- {marker}: begin -->") == 1 and f"<!-- {marker}: end -->" in page


def test_round4_runs_round3s_own_rows_beside_their_controls():
    import evidence3
    import evidence4

    study = evidence4.ROUND4
    assert evidence4.CUT_ROWS and all(row == evidence3.ROWS[name] for name, row in evidence4.CUT_ROWS.items())
    assert all(study.rows[name] == evidence3.ROWS[name] for name in evidence4.RULES)
    for setting in [*study.settings.values(), *study.smoke.values()]:
        assert setting.baseline in setting.rows
        assert all(a in setting.rows and b in setting.rows for a, b in setting.pairs)
    published = study.settings["HE-DA as published, 20k images"]
    assert {"kd + online HE-DA high 0.4", "kd + online HE-DA high 0.5, weight 0.3"} <= set(published.rows)
    assert ("kd + HE-DA shards 0.5", "kd + random shards 0.5") in published.pairs
    assert {"ctkd", "dtkd"} <= set(study.settings["C: long tail, long-tailed teacher"].rows)


def test_round4_b_trains_pruned_pools_for_at_least_the_full_pools_steps_and_a_names_its_student():
    import evidence4

    study, pool = evidence4.ROUND4, 54000
    b = study.settings["B: pruning the full pool at equal steps"]
    full = study.rows[b.baseline]
    assert full.epochs >= 8 and b.seeds == [0, 1, 2, 3, 4]
    for name in b.rows:
        row = study.rows[name]
        if row.drop is not None:
            seen, full_seen = round(pool * (1 - row.drop[0])) * row.epochs, pool * full.epochs
            assert full_seen <= seen < full_seen * 1.05, name
    assert {row.drop[0] for row in map(study.rows.get, b.rows) if row.drop} == {0.25, 0.5}
    assert all(a in b.rows and c in b.rows and "random" in c for a, c in b.pairs)
    a = study.settings["A: temperature rules, resnet8 student"]
    assert a.student == "resnet8" and a.directory not in {s.directory for s in study.settings.values() if s is not a}
    assert a.seeds == [0, 1, 2, 3, 4] and {"kd", "energy-kd 6,4,2", "energy-kd 2,4,6"} <= set(a.rows)
