"""Energy-based pruning as commands: `select` by any difficulty score, `distill --exclude/--keep`."""
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import StepRecorder, invoke
from energytools.config import DistillConfig, TrainConfig
from energytools.table import load_table


@pytest.mark.parametrize("mode,by", [("low", "energy"), ("high", "margin"), ("low", "el2n"), ("random", "energy")])
def test_select_writes_the_chosen_ids(runner, digits_run, tmp_path, mode, by):
    out = tmp_path / "drop.parquet"
    result = invoke(runner, "select", "--scores", digits_run["scores"], "--mode", mode, "--by", by, "--ratio", "0.25",
                    "--out", out)
    assert result.exit_code == 0, result.output
    table, _ = load_table(digits_run["scores"])
    chosen = pl.read_parquet(out)
    assert chosen.height == int(0.25 * table.height) and chosen["sample_id"].is_unique().all()
    ranked = table.sort([by, "sample_id"], descending=[mode == "high", False])["sample_id"]
    if mode != "random":
        assert set(chosen["sample_id"]) == set(ranked.head(chosen.height))
    else:
        assert set(chosen["sample_id"]) != set(ranked.head(chosen.height))


def test_distill_excludes_or_keeps_the_selected_ids(runner, digits_run, tmp_path, monkeypatch):
    import energytools.stages.distill as stage

    drop = tmp_path / "drop.parquet"
    assert invoke(runner, "select", "--scores", digits_run["scores"], "--mode", "low", "--ratio", "0.5",
                  "--out", drop).exit_code == 0
    dropped = set(pl.read_parquet(drop)["sample_id"].to_list())
    for keyword, run in (("exclude", "pruned"), ("keep", "kept")):
        recorder = StepRecorder()
        stage.distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", method="kd",
                                    out=str(tmp_path / run), train=TrainConfig(epochs=1), **{keyword: str(drop)}),
                      on_step=recorder)
        flag = f"--{keyword}"
        trained = set(np.concatenate([b.sample_ids.numpy() for b in recorder.batches]).tolist())
        assert trained and (trained.isdisjoint(dropped) if flag == "--exclude" else trained == dropped)
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["subset"]["samples"] == len(trained) and len(config["subset"]) == 2  # count and sha256
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"id": [1]}).write_parquet(bad)
    result = invoke(runner, "distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--exclude", bad,
                    "--out", tmp_path / "x")
    assert result.exit_code == 2 and "no integer sample_id column" in result.stderr and not (tmp_path / "x").exists()


def test_select_by_a_score_an_older_table_lacks_says_to_re_score(runner, digits_run, tmp_path):
    old = tmp_path / "old.parquet"
    table = pq.read_table(digits_run["scores"])
    pq.write_table(table.drop(["el2n"]), old)  # keeps the schema metadata: a table scored before el2n existed
    assert load_table(old)[0].height == table.num_rows
    result = invoke(runner, "select", "--scores", old, "--by", "el2n", "--out", tmp_path / "x.parquet")
    assert result.exit_code == 2 and "lacks column 'el2n'" in result.stderr and "re-score" in result.stderr
