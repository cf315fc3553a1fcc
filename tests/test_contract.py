"""One contract, one config: the typed metadata, one source of options, content staleness,
unique HE-DA ids and validated outputs (issue 15)."""
import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import StepRecorder, invoke
from energytools.config import (AugmentConfig, DistillConfig, ScoreConfig, SelectConfig, TrainConfig, TrainStageConfig,
                                flat_names, resolve)
from energytools.errors import UserError
from energytools.table import SCHEMA_VERSION, TableMeta, load_table


# --- one config source ---------------------------------------------------------------------

@pytest.mark.parametrize("command,cls", [("train", TrainStageConfig), ("score", ScoreConfig), ("augment", AugmentConfig),
                                         ("select", SelectConfig), ("distill", DistillConfig)])
def test_every_config_field_is_a_cli_option(command, cls):
    import typer.main

    from energytools.cli import app

    params = {p.name for p in typer.main.get_command(app).commands[command].params}
    assert set(flat_names(cls)) <= params, set(flat_names(cls)) - params
    if cls is DistillConfig:  # the options that were Python-only
        assert {"dkd_alpha", "dkd_beta", "dkd_warmup", "ce_weight", "kd_weight", "momentum"} <= params


def _capture(monkeypatch, module: str, function: str) -> list:
    """Replace a stage function by one that records the config it is given (by the CLI or the API)."""
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(f"energytools.stages.{module}"), function,
                        lambda cfg, **callbacks: seen.append(cfg))
    return seen


def _cli(runner, *args):
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output


def test_api_cli_and_recipe_build_the_same_distill_config(monkeypatch, runner, tmp_path):
    import energytools
    from energytools.pipeline import load_recipe

    seen = _capture(monkeypatch, "distill", "distill")
    _cli(runner, "distill", "--scores", "s.parquet", "--student", "cnn_tiny", "--out", "o", "--method", "dkd",
         "--dkd-beta", "6", "--ce-weight", "0.5", "--epochs", "7", "--lr", "0.01", "--temperatures", "2,4,6")
    energytools.distill("s.parquet", "cnn_tiny", "o", method="dkd", dkd_beta=6.0, ce_weight=0.5, epochs=7, lr=0.01,
                        temperatures=(2, 4, 6))
    from_cli, from_api = seen
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n[teacher]\nmodel = "cnn_tiny"\n'
                      '[distill]\nstudent = "cnn_tiny"\nepochs = 7\nlr = 0.01\n'
                      'runs = [{ method = "dkd", dkd_beta = 6, ce_weight = 0.5, temperatures = [2, 4, 6] }]\n')
    from_recipe = dataclasses.replace(load_recipe(recipe).runs[0].config, scores="s.parquet", out="o")
    assert from_cli == from_api == from_recipe
    assert from_cli.train == dataclasses.replace(TrainConfig(), epochs=7, lr=0.01)  # the rest: one set of defaults


def test_defaults_are_the_dataclass_defaults(monkeypatch, runner):
    import energytools

    seen = _capture(monkeypatch, "distill", "distill")
    _cli(runner, "distill", "--student", "s", "--out", "o")
    energytools.distill("scores.parquet", "s", "o")
    cli, api = seen
    assert cli == api == DistillConfig(student="s", out="o")  # the API trains as many epochs as the CLI
    assert cli.train.epochs == TrainConfig().epochs


def test_the_resolved_configs_of_api_cli_and_recipe_runs_match(runner, tmp_path):
    """End to end: the same distill through the API, the CLI and a recipe writes the same config.json."""
    import energytools
    from energytools.pipeline import run_pipeline

    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\nlimit = 300\neval_limit = 100\n'
                      '[teacher]\nmodel = "cnn_tiny"\nepochs = 1\n[score]\nsave_logits = true\n'
                      '[distill]\nstudent = "cnn_tiny"\nepochs = 1\ncached_logits = true\n'
                      'runs = [{ method = "dkd", dkd_beta = 6, dkd_warmup = 2 }]\n[report]\nenabled = false\n')
    run_pipeline(recipe, tmp_path / "p")
    scores = tmp_path / "p" / "scores.parquet"
    energytools.distill(scores, "cnn_tiny", tmp_path / "api", method="dkd", dkd_beta=6, dkd_warmup=2, epochs=1,
                        cached_logits=True)
    result = invoke(runner, "distill", "--scores", scores, "--student", "cnn_tiny", "--out", tmp_path / "cli",
                    "--method", "dkd", "--dkd-beta", "6", "--dkd-warmup", "2", "--epochs", "1", "--cached-logits")
    assert result.exit_code == 0, result.output
    configs = [json.loads((d / "config.json").read_text())
               for d in (tmp_path / "p" / "runs" / "dkd", tmp_path / "api", tmp_path / "cli")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0]["method_options"]["dkd_beta"] == 6.0 and configs[0]["data"]["eval_limit"] == 100


def test_config_file_then_flags(monkeypatch, runner, tmp_path):
    config = tmp_path / "distill.toml"
    config.write_text('student = "cnn_tiny"\nout = "o"\nmethod = "kd"\nepochs = 3\n[train]\nlr = 0.2\n')
    seen = _capture(monkeypatch, "distill", "distill")
    _cli(runner, "distill", "--config", config, "--epochs", "5")
    cfg = seen[0]
    assert (cfg.method, cfg.train.epochs, cfg.train.lr) == ("kd", 5, 0.2)


@pytest.mark.parametrize("cls,given,expected", [
    (DistillConfig, {"student": "CNN-Tiny", "method": "Energy_KD", "temperature_source": "Views", "he_da": "ONLINE",
                     "temperature_rule": "Rank", "schedule": "Cosine"},
     {"student": "cnn_tiny", "method": "energy-kd", "temperature_source": "views", "he_da": "online",
      "temperature_rule": "rank", "schedule": "cosine"}),
    (TrainStageConfig, {"model": "ResNet8x4", "dataset": "FashionMNIST"}, {"model": "resnet8x4", "dataset": "fashion-mnist"}),
    (TrainStageConfig, {"model": "timm:resnet18", "dataset": "CIFAR-100"}, {"model": "timm:resnet18", "dataset": "cifar100"}),
    (SelectConfig, {"mode": "LOW", "by": "true-prob"}, {"mode": "low", "by": "true_prob"}),
    (AugmentConfig, {"select": "Random", "teacher_arch": "ResNet20", "policy": "CutMix"},
     {"select": "random", "teacher_arch": "resnet20", "policy": "cutmix"}),
    (AugmentConfig, {"policy": "my_policy.json"}, {"policy": "my_policy.json"}),
    (ScoreConfig, {"teacher": "t.pt", "split": "Test", "dataset": "fashion_mnist"}, {"split": "test", "dataset": "fashion-mnist"}),
])
def test_registry_names_take_other_spellings(cls, given, expected):
    from energytools.config import as_dict, resolve

    values = {"out": "o", **given} if "out" in flat_names(cls) else given
    flat = {}
    for key, value in as_dict(resolve(cls, values, "test")).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    assert {key: flat[key] for key in expected} == expected


def test_cli_spellings_reach_the_stage_and_unknown_names_are_still_refused(monkeypatch, runner):
    seen = _capture(monkeypatch, "distill", "distill")
    _cli(runner, "distill", "--student", "CNN_tiny", "--out", "o", "--method", "Energy-KD", "--temperature-source",
         "ONLINE")
    assert (seen[0].student, seen[0].method, seen[0].temperature_source) == ("cnn_tiny", "energy-kd", "online")
    monkeypatch.undo()
    result = invoke(runner, "distill", "--student", "cnn_tiny", "--out", "o", "--method", "energy-kdd")
    assert result.exit_code == 2 and "unknown method 'energy-kdd'; choose from" in result.stderr


@pytest.mark.parametrize("text,needle", [
    ("[data]\ndataset = 3\n", "[data]: dataset must be a string"),
    ("[data]\nlimit = 'many'\n", "[data]: limit must be a whole number"),
    ("[score]\nsave_logits = 'yes'\n", "[score]: save_logits must be true or false"),
    ("[score]\ntemperatures = [6, 'x', 2]\n", "[score]: temperatures must be a number"),
    ("[distill]\nstudent = 's'\nepochs = 'ten'\n", "[distill]: epochs must be a whole number"),
    ("[distill]\nstudent = 's'\nruns = [{ method = 'kd', dkd_beta = 'big' }]\n", "runs[0]: dkd_beta must be a number"),
    ("[distill]\nstudent = 's'\nruns = [{ method = 'kd', out = 'x' }]\n", "'out' is set by the pipeline"),
    ("[augment]\nratoi = 0.3\n", "[augment]: unknown key 'ratoi' (did you mean 'ratio'?)"),
    ("[teacher]\nmodel = 'cnn_tiny'\nepocs = 3\n", "unknown key 'epocs' (did you mean 'epochs'?)"),
    ("[teacher]\ncheckpoint = 'x.pt'\nepochs = 3\n", "checkpoint is given"),
    ("[report]\nenabled = 1\n", "enabled must be true or false"),
])
def test_every_recipe_value_is_type_checked(tmp_path, text, needle):
    from energytools.pipeline import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n' * ("[data]" not in text) + text +
                      "[teacher]\nmodel = 'cnn_tiny'\n" * ("[teacher]" not in text))
    with pytest.raises(UserError) as error:
        load_recipe(recipe)
    assert needle in str(error.value) and "r.toml" in str(error.value)


# --- the typed metadata ---------------------------------------------------------------------

def test_table_metadata_round_trips_and_has_a_schema_version(digits_run):
    meta = TableMeta.read(digits_run["scores"])
    raw = json.loads(pq.read_schema(digits_run["scores"]).metadata[b"energytools"])
    assert raw["schema_version"] == SCHEMA_VERSION == meta.schema_version
    assert meta.to_json() == raw
    assert meta.data.dataset == "digits" and meta.dataset.classes == tuple(str(d) for d in range(10))
    assert meta.has_logits and meta.teacher.sha256 == __import__("energytools.io").io.sha256_file(digits_run["teacher"])


def _variant(digits_run, tmp_path, change_meta=None, change_table=None):
    table = pq.read_table(digits_run["scores"])
    if change_table:
        table = change_table(table)
    if change_meta:
        raw = json.loads(table.schema.metadata[b"energytools"])
        value = change_meta(raw)
        encoded = value if isinstance(value, bytes) else json.dumps(value).encode()
        table = table.replace_schema_metadata({b"energytools": encoded})
    path = tmp_path / "variant.parquet"
    pq.write_table(table, path)
    return path


def _drop(raw, dotted):
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    del node[last]
    return raw


@pytest.mark.parametrize("change_meta,change_table,needle", [
    (lambda raw: b"{not json", None, "not valid JSON"),
    (lambda raw: {**raw, "schema_version": 99}, None, "schema version 99"),
    (lambda raw: _drop(raw, "energy.temperature"), None, "metadata field 'energy.temperature' is missing"),
    (lambda raw: _drop(raw, "teacher.sha256"), None, "metadata field 'teacher.sha256' is missing"),
    (lambda raw: {**raw, "temperatures": {"low": "hot", "mid": 4, "high": 2}}, None, "temperatures"),
    (lambda raw: {**raw, "data": {**raw["data"], "limit": "all"}}, None, "limit must be a whole number"),
    (lambda raw: {**raw, "groups": {**raw["groups"], "low_frac": 2}}, None, "low_frac"),
    (None, lambda t: t.drop_columns(["energy"]), "lacks column 'energy'"),
    (None, lambda t: t.set_column(t.schema.get_field_index("energy"), "energy",
                                  t["energy"].cast("string")), "column 'energy' is string"),
])
def test_a_broken_table_is_refused_with_one_line_naming_file_and_field(runner, digits_run, tmp_path, change_meta,
                                                                      change_table, needle):
    path = _variant(digits_run, tmp_path, change_meta, change_table)
    for args in (["augment", "--scores", path, "--out", tmp_path / "a"],
                 ["distill", "--scores", path, "--student", "cnn_tiny", "--out", tmp_path / "d"]):
        result = invoke(runner, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert needle in lines[0] and "variant.parquet" in lines[0], lines[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_a_version_1_table_still_loads(digits_run, tmp_path):
    """Tables written before the schema version was recorded read the same fields."""
    path = _variant(digits_run, tmp_path, lambda raw: {k: v for k, v in raw.items() if k != "schema_version"})
    _, meta = load_table(path)
    assert meta.schema_version == 1 and meta.rule == TableMeta.read(digits_run["scores"]).rule


# --- HE-DA ids, temperatures and what reaches the loss ----------------------------------------

def test_two_shard_directories_from_one_table_have_disjoint_ids(digits_run, tmp_path):
    from energytools.data.shards import read_shards
    from energytools.stages.augment import augment
    from energytools.stages.distill import distill

    first = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "a"), ratio=0.2))
    second = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "b"), ratio=0.3, seed=1))
    a, b = read_shards(first), read_shards(second)
    assert set(a["source_id"]) & set(b["source_id"])  # the selections overlap...
    assert not set(a["sample_id"]) & set(b["sample_id"])  # ...and the ids do not
    result = distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(tmp_path / "d"),
                                   method="kd", shards=(str(first), str(second)), cached_logits=True,
                                   train=TrainConfig(epochs=1)))
    assert result.metrics.height == 1
    with pytest.raises(UserError, match="given twice"):
        distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(tmp_path / "e"),
                              shards=(str(first), str(tmp_path / "a" / ".." / "a")), train=TrainConfig(epochs=1)))


def test_shard_lam_partner_label_and_rederived_temperatures_reach_the_loss(digits_run, tmp_path, monkeypatch):
    from energytools.data.shards import read_shards
    from energytools.stages.distill import distill

    rows = read_shards(digits_run["shards"]).drop("image")
    table, meta = load_table(digits_run["scores"])
    rule = dataclasses.replace(meta.rule, temperatures=(2.0, 4.0, 6.0))
    fitted = meta.fit_groups(table, rule)
    expected = {}
    for frame, is_shard in ((table, False), (rows, True)):
        _, temps = fitted.assign(frame["energy"].to_numpy(), frame["sample_id"].to_numpy())
        for i, row in enumerate(frame.iter_rows(named=True)):
            expected[row["sample_id"]] = (row["lam"] if is_shard else 1.0,
                                          row["partner_label"] if is_shard else row["label"], temps[i])
    recorder = StepRecorder()
    distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(tmp_path / "d"),
                          method="energy-kd", temperatures=(2.0, 4.0, 6.0), shards=(str(digits_run["shards"]),),
                          cached_logits=True, train=TrainConfig(epochs=1, batch_size=128)), on_step=recorder)
    steps, ids = recorder.steps, [batch.sample_ids for batch in recorder.batches]
    assert len(steps) == len(ids) > 0
    shard_rows_seen = 0
    for (_, info), batch_ids in zip(steps, ids):
        for k, sample_id in enumerate(batch_ids.tolist()):
            lam, partner, temperature = expected[sample_id]
            assert info.lam[k].item() == pytest.approx(lam) and info.partner_labels[k].item() == partner
            assert info.temperature[k].item() == pytest.approx(temperature)
            shard_rows_seen += sample_id in set(rows["sample_id"].to_list())
    assert shard_rows_seen == rows.height
    # the re-derived rule changes shard temperatures: the stored column (6,4,2) is not what reached the loss
    stored = dict(zip(rows["sample_id"].to_list(), rows["temperature"].to_list()))
    assert any(stored[s] != expected[s][2] for s in stored)


def test_cached_flipped_logits_reach_flipped_views(tmp_path, monkeypatch):
    """Each view's cached logits are the teacher's logits on that view (image or its mirror)."""
    import energytools
    from conftest import write_idx
    from energytools.models import load_model

    # Fashion-MNIST's format (its train transform flips) with a class-dependent band on one side,
    # so that an image and its mirror get clearly different logits
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, :, 2 * c:2 * c + 3] += 180
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    energytools.train("cnn_small", tmp_path / "t", dataset="fashion-mnist", data_root=tmp_path, epochs=15, lr=0.1)
    table = energytools.score(tmp_path / "t" / "best.pt", tmp_path / "s.parquet", save_logits=True)
    recorder = StepRecorder()
    energytools.distill(table, "cnn_tiny", tmp_path / "d", method="kd", cached_logits=True, epochs=1, batch_size=64,
                        on_step=recorder)
    steps = recorder.steps
    flipped = torch.cat([batch.flipped for batch in recorder.batches])
    assert 0 < int(flipped.sum()) < len(flipped)  # both kinds of view were trained on
    teacher, _ = load_model(tmp_path / "t" / "best.pt")
    flipped_views = 0
    for images, info in steps:
        with torch.no_grad():
            direct = teacher(images)
        torch.testing.assert_close(info.teacher_logits, direct, atol=2e-2, rtol=2e-3)
        unflipped = teacher(images.flip(-1))
        flipped_views += int((~torch.isclose(unflipped, direct, atol=2e-2).all(1)).sum())
    assert flipped_views > 0  # views whose mirror has other logits were seen, so the test can tell


def test_methods_declare_what_they_need(digits_run, tmp_path, monkeypatch):
    """ce never opens the teacher; a cached energy-kd run never opens it either; online kd does."""
    import energytools.stages.distill as stage
    from energytools.distillers import METHODS

    assert not METHODS["ce"].teacher_logits and METHODS["energy-dkd"].per_sample_temperature
    assert METHODS["kd"].teacher_logits and not METHODS["kd"].per_sample_temperature
    # every route to the teacher opens its file: name one that is not there
    common = dict(scores=str(digits_run["scores"]), student="cnn_tiny", train=TrainConfig(epochs=1),
                  teacher=str(tmp_path / "no-teacher.pt"))
    stage.distill(DistillConfig(out=str(tmp_path / "ce"), method="ce", temperature_source="online", **common))
    stage.distill(DistillConfig(out=str(tmp_path / "ekd"), method="energy-kd", cached_logits=True, **common))
    with pytest.raises(UserError, match="no-teacher.pt"):
        stage.distill(DistillConfig(out=str(tmp_path / "kd"), method="kd", **common))


# --- staleness by content and validated outputs ---------------------------------------------

def test_a_teacher_replaced_at_the_same_path_reruns_score_and_after(tmp_path):
    import energytools
    from energytools.pipeline import run_pipeline

    for seed in (0, 1):
        energytools.train("cnn_tiny", tmp_path / f"t{seed}", dataset="digits", limit=200, eval_limit=50, epochs=1,
                          seed=seed)
    checkpoint = tmp_path / "teacher.pt"
    shutil.copy(tmp_path / "t0" / "best.pt", checkpoint)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "digits"\nlimit = 200\neval_limit = 50\n[teacher]\ncheckpoint = "{checkpoint}"\n'
                      '[distill]\nstudent = "cnn_tiny"\nepochs = 1\nruns = [{ method = "kd" }]\n'
                      '[report]\nenabled = false\n')
    assert set(dict(run_pipeline(recipe, tmp_path / "p")).values()) == {"ran"}
    assert set(dict(run_pipeline(recipe, tmp_path / "p")).values()) == {"up to date"}
    shutil.copy(tmp_path / "t1" / "best.pt", checkpoint)  # same path, other weights
    assert dict(run_pipeline(recipe, tmp_path / "p")) == {"scores": "ran", "kd": "ran"}
    assert TableMeta.read(tmp_path / "p" / "scores.parquet").teacher.sha256 == \
        __import__("energytools.io").io.sha256_file(checkpoint)


@pytest.mark.parametrize("args,needle", [
    (["distill", "--scores", "{scores}", "--student", "cnn_tiny", "--out", "{file}"], "is a file"),
    (["distill", "--scores", "{scores}", "--student", "cnn_tiny", "--out", "{file}/run"], "is a file, not a folder"),
    (["distill", "--scores", "{scores}", "--student", "cnn_tiny", "--out", "{tmp}/new/run", "--resume"], "no run to resume"),
    (["train", "--model", "cnn_tiny", "--dataset", "digits", "--out", "{tmp}/new/t", "--resume"], "no run to resume"),
    (["train", "--model", "cnn_tiny", "--dataset", "digits", "--out", "{file}/t"], "is a file, not a folder"),
    (["score", "--teacher", "{teacher}", "--out", "{tmp}"], "is a folder"),
    (["score", "--teacher", "{teacher}", "--out", "{file}/s.parquet"], "is a file, not a folder"),
    (["augment", "--scores", "{scores}", "--out", "{file}"], "is a file"),
    (["select", "--scores", "{scores}", "--out", "{file}/x.parquet"], "is a file, not a folder"),
    (["run", "{recipe}", "--out", "{file}/p"], "is a file, not a folder"),
    (["run", "{missing_teacher_recipe}", "--out", "{tmp}/new/p"], "does not exist"),
    (["distill", "--scores", "{scores}", "--student", "nope", "--out", "{tmp}/new/run"], "unknown model"),
])
def test_bad_outputs_are_refused_and_leave_nothing_behind(runner, digits_run, tmp_path, args, needle):
    file = tmp_path / "file"
    file.write_text("not a folder")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n[teacher]\nmodel = "cnn_tiny"\n')
    missing = tmp_path / "m.toml"
    missing.write_text(f'[data]\ndataset = "digits"\n[teacher]\ncheckpoint = "{tmp_path}/gone.pt"\n')
    values = {"tmp": tmp_path, "file": file, "scores": digits_run["scores"], "teacher": digits_run["teacher"],
              "recipe": recipe, "missing_teacher_recipe": missing}
    before = set(tmp_path.rglob("*"))
    result = invoke(runner, *[a.format(**values) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert set(tmp_path.rglob("*")) == before


def test_a_run_that_fails_before_its_first_epoch_leaves_no_directory(digits_run, tmp_path, monkeypatch):
    from energytools.stages.distill import distill

    def diverge(event):
        raise UserError("training diverged")

    with pytest.raises(UserError):
        distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(tmp_path / "a" / "b"),
                              method="ce", train=TrainConfig(epochs=1)), on_step=diverge)
    assert not (tmp_path / "a").exists()


def test_per_class_selection_counts_use_exact_fractions():
    import polars as pl

    from energytools.selection import select_samples

    labels = np.repeat([0, 1, 2], [100, 7, 13])
    table = pl.DataFrame({"sample_id": np.arange(120), "label": labels, "energy": np.arange(120.0)})
    counts = dict(select_samples(table, 0.29, per_class=True).group_by("label").len().iter_rows())
    assert counts == {0: 29, 1: 2, 2: 3}  # floor(0.29 * n), with 0.29 * 100 counted as 29, not 28
    assert select_samples(table, 0.29).height == 34


def test_a_table_rewritten_by_polars_is_refused_with_what_happened(runner, digits_run, tmp_path):
    import polars as pl

    edited = tmp_path / "edited.parquet"
    pl.read_parquet(digits_run["scores"]).filter(pl.col("label") != 3).write_parquet(edited)  # drops the metadata
    result = invoke(runner, "distill", "--scores", edited, "--student", "cnn_tiny", "--out", tmp_path / "d")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "lost energytools' metadata" in lines[0]


@pytest.mark.parametrize("command", ["train", "score", "select", "augment", "distill"])
def test_every_stage_option_is_in_a_named_help_panel(command):
    """--help groups a command's options (inputs, data, temperatures, optimisation, output ...),
    as timm groups its flags: no option is left in the catch-all panel."""
    import typer.main

    from energytools.cli import app

    params = typer.main.get_command(app).commands[command].params
    loose = [p.name for p in params if p.name != "help" and getattr(p, "rich_help_panel", None) in (None, "Options")]
    assert not loose, loose
    panels = {p.rich_help_panel for p in params if p.name != "help"}
    assert {"Inputs", "Output", "Config file"} < panels, panels


def test_print_config_prints_toml_that_config_reads_back_and_runs_nothing(runner, tmp_path):
    import tomllib

    flags = ["distill", "--scores", tmp_path / "s.parquet", "--student", "cnn_tiny", "--out", tmp_path / "run",
             "--method", "DKD", "--temperatures", "2,4,6", "--shards", "a", "--shards", "b", "--lr", "0.01",
             "--teacher-input-size", "data"]
    printed = invoke(runner, *flags, "--print-config")
    assert printed.exit_code == 0, printed.output
    parsed = tomllib.loads(printed.stdout)
    assert parsed["method"] == "dkd" and parsed["temperatures"] == [2.0, 4.0, 6.0] and parsed["shards"] == ["a", "b"]
    assert parsed["train"]["lr"] == 0.01 and parsed["preprocessing"]["teacher_input_size"] == "data"
    saved = tmp_path / "distill.toml"
    saved.write_text(printed.stdout)
    again = invoke(runner, "distill", "--config", saved, "--print-config")
    assert again.exit_code == 0 and again.stdout == printed.stdout
    assert resolve(DistillConfig, parsed) == resolve(DistillConfig, tomllib.loads(again.stdout))
    assert not (tmp_path / "run").exists()
    bad = invoke(runner, "distill", "--student", "cnn_tiny", "--out", tmp_path / "run", "--lr", "-1", "--print-config")
    assert bad.exit_code == 2  # the same checks as a run
