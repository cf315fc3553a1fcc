import json
from pathlib import Path

import pytest

from energytools.errors import UserError
from energytools.pipeline import load_recipe, run_pipeline

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: p.name)
def test_every_recipe_parses_and_plans(recipe, tmp_path):
    parsed = load_recipe(recipe)
    assert parsed.data.dataset
    statuses = run_pipeline(recipe, tmp_path / "plan", dry_run=True)
    assert statuses and all(status == "planned" for _, status in statuses)
    assert not (tmp_path / "plan").exists()


def test_recipe_errors_name_file_and_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[teacher]\nmodel = 'cnn_tiny'\n[augment]\nratoi = 0.3\n")
    with pytest.raises(UserError, match=r"r.toml \[augment\]: unknown key 'ratoi' \(did you mean 'ratio'\?\)"):
        load_recipe(recipe)
    recipe.write_text("[teacher]\nmodel = 'cnn_tiny'\n[distill]\nstudent = 's'\nepochs = 'ten'\n")
    with pytest.raises(UserError, match="epochs must be a whole number"):
        load_recipe(recipe)
    recipe.write_text("[data\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(recipe)


def test_reduced_quickstart_runs_skips_and_reruns_what_changed(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.toml").read_text()
    text = (text.replace('dataset = "fashion-mnist"', 'dataset = "digits"').replace("limit = 10000", "limit = 600")
            .replace("eval_limit = 3000", "eval_limit = 200").replace('model = "resnet8"', 'model = "cnn_small"')
            .replace("epochs = 6", "epochs = 2").replace("epochs = 8", "epochs = 1"))
    recipe = tmp_path / "mini.toml"
    recipe.write_text(text)
    out = tmp_path / "run"
    first = dict(run_pipeline(recipe, out))
    assert set(first.values()) == {"ran"}
    for path in ("scores.parquet", "he-da/manifest.json", "report.html", "recipe.json",
                 "runs/energy-kd+he-da/summary.json", "runs/kd/metrics.parquet"):
        assert (out / path).exists(), path
    assert set(dict(run_pipeline(recipe, out)).values()) == {"up to date"}
    recipe.write_text(text.replace("ratio = 0.3", "ratio = 0.2"))
    changed = dict(run_pipeline(recipe, out))
    assert changed["teacher"] == changed["scores"] == "up to date"
    assert changed["he-da"] == changed["energy-kd+he-da"] == changed["report"] == "ran"
    assert changed["kd"] == "up to date"
    assert json.loads((out / "he-da" / "manifest.json").read_text())["selection"]["ratio"] == 0.2
    again = dict(run_pipeline(recipe, out, start="augment"))
    assert again["scores"] == "up to date" and again["he-da"] == "ran" and again["kd"] == "ran"
    original = (out / "scores.parquet").read_bytes()
    (out / "scores.parquet").write_bytes(original[:1000])  # damaged after it was written
    repaired = dict(run_pipeline(recipe, out))
    assert repaired["scores"] == "ran" and (out / "scores.parquet").read_bytes() == original
    assert repaired["he-da"] == repaired["kd"] == "up to date"  # the same table again: what uses it stays


def test_a_new_unset_option_leaves_finished_steps_fresh(monkeypatch):
    """Adding an option (default None) to a stage config must not make every stamp stale."""
    import dataclasses

    from energytools.config import DistillConfig
    from energytools.pipeline import _content

    before = _content(DistillConfig(student="s", out="o"))
    Extended = dataclasses.make_dataclass("Extended", [("new_option", "str | None", dataclasses.field(default=None))],
                                          bases=(DistillConfig,), kw_only=True)
    assert _content(Extended(student="s", out="o")) == before
    assert _content(Extended(student="s", out="o", new_option="x")) != before
