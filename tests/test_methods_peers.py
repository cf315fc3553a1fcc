"""Logit standardization, CTKD and DTKD beside Energy KD (issue 27): each loss against an
independent float64 implementation of its published formula, and each method run offline from
cached teacher logits through the CLI, the API and a recipe, with resume."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import interrupted, invoke

from energytools.distillers import SampleInfo, method_spec

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Fashion-MNIST (dataset-fashion-mnist) is not installed")


def fixed_logits(seed: int, rows: int = 6, classes: int = 7, spread: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=generator, dtype=torch.float64) * spread


LABELS = torch.tensor([0, 3, 6, 2, 2, 5])


# --- independent float64 formulas (plain loops over rows, no energytools code) ----------------

def z_score(row):
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))  # unbiased
    return [(v - mean) / (1e-7 + std) for v in row]


def softmax(row, t):
    top = max(v / t for v in row)
    exps = [math.exp(v / t - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def kd_row(zs, zt, t_s, t_t=None):
    """KL(softmax(z_t / t_t) || softmax(z_s / t_s)) for one row."""
    return kl(softmax(zt, t_t if t_t is not None else t_s), softmax(zs, t_s))


def ce_row(zs, y):
    top = max(zs)
    return -(zs[y] - top - math.log(sum(math.exp(v - top) for v in zs)))


def info_for(teacher, epoch=0, temperature=None, labels=LABELS):
    return SampleInfo(labels, None, None, temperature, teacher, epoch)


def build(method: str, **given):
    return method_spec(method).build(torch.nn.Identity(), given)


# --- logit standardization -------------------------------------------------------------------

def test_standardization_is_the_unbiased_z_score_with_its_epsilon():
    from energytools.losses import standardize_logits

    z = fixed_logits(0)
    expected = torch.tensor([z_score(row) for row in z.tolist()], dtype=torch.float64)
    assert torch.allclose(standardize_logits(z), expected, rtol=1e-12, atol=1e-12)
    flat = torch.full((1, 5), 3.0, dtype=torch.float64)  # std 0: the epsilon keeps it finite
    assert torch.equal(standardize_logits(flat), torch.zeros(1, 5, dtype=torch.float64))


def test_ls_kd_is_kd_on_standardized_logits_with_the_papers_defaults():
    zs, zt = fixed_logits(1), fixed_logits(2, spread=6.0)
    losses = build("ls-kd").losses(zs, info_for(zt))
    t = 2.0
    kd = sum(kd_row(z_score(s), z_score(tt), t) for s, tt in zip(zs.tolist(), zt.tolist())) / len(zs) * t * t
    ce = sum(ce_row(s, y) for s, y in zip(zs.tolist(), LABELS.tolist())) / len(zs)
    assert losses["kd"].item() == pytest.approx(9.0 * kd, rel=1e-9)
    assert losses["ce"].item() == pytest.approx(0.1 * ce, rel=1e-9)  # CE on the raw logits


def test_standardized_energy_kd_uses_each_samples_group_temperature_as_base():
    zs, zt = fixed_logits(3), fixed_logits(4, spread=5.0)
    temps = torch.tensor([2.0, 4.0, 6.0, 2.0, 4.0, 6.0], dtype=torch.float64)
    losses = build("energy-kd", standardize_logits=True).losses(zs, info_for(zt, temperature=temps))
    kd = sum(kd_row(z_score(s), z_score(tt), t) * t * t
             for s, tt, t in zip(zs.tolist(), zt.tolist(), temps.tolist())) / len(zs)
    assert losses["kd"].item() == pytest.approx(0.9 * kd, rel=1e-9)


@pytest.mark.parametrize("method", ["kd", "dkd", "ctkd", "dtkd"])
def test_standardization_makes_the_kd_term_invariant_to_shift_and_scale(method):
    zs, zt = fixed_logits(5), fixed_logits(6, spread=4.0)
    generator = torch.Generator().manual_seed(7)

    def shift(z):
        return z * (0.5 + 3 * torch.rand(len(z), 1, generator=generator, dtype=torch.float64)) \
            + 10 * torch.randn(len(z), 1, generator=generator, dtype=torch.float64)
    moved_s, moved_t = shift(zs), shift(zt)

    def kd_terms(standardize, s, t):
        losses = build(method, standardize_logits=standardize).losses(s, info_for(t, epoch=30))
        return sum(v for k, v in losses.items() if k != "ce").item()

    assert kd_terms(True, moved_s, moved_t) == pytest.approx(kd_terms(True, zs, zt), rel=1e-6)
    assert kd_terms(False, moved_s, moved_t) != pytest.approx(kd_terms(False, zs, zt), rel=1e-3)  # it is the z-score


def test_ls_dkd_has_the_papers_defaults_and_standardizes():
    options = method_spec("ls-dkd").options({})
    assert (options["dkd_alpha"], options["dkd_beta"], options["kd_temperature"]) == (9.0, 72.0, 2.0)
    assert options["standardize_logits"] and options["ce_weight"] == 1.0
    assert method_spec("ls-energy-dkd").per_sample_temperature and not method_spec("ls-dkd").per_sample_temperature
    zs, zt = fixed_logits(8), fixed_logits(9)
    scaled = build("ls-dkd").losses(zs * 3 + 1, info_for(zt * 0.5 - 2, epoch=30))["dkd"]
    assert scaled.item() == pytest.approx(build("ls-dkd").losses(zs, info_for(zt, epoch=30))["dkd"].item(), rel=1e-6)


# --- CTKD ------------------------------------------------------------------------------------

def reference_reversal(epoch_1_based: int, loops: int = 10, high: float = 0.0, low: float = -1.0) -> float:
    """The reference's CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch)."""
    i = min(max(epoch_1_based, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (high - low) + low


@pytest.mark.parametrize("epoch", [0, 3, 9, 40])
def test_ctkd_temperature_and_its_reversed_gradient(epoch):
    distiller = build("ctkd")
    with torch.no_grad():
        distiller.theta.fill_(0.3)
    zs = fixed_logits(10).float().requires_grad_(True)
    zt = fixed_logits(11, spread=5.0).float()
    losses = distiller.losses(zs, info_for(zt, epoch=epoch))
    sum(losses.values()).backward()

    tau = 1.0 + 20.0 / (1.0 + math.exp(-0.3))
    assert distiller.temperature().item() == pytest.approx(tau, rel=1e-6)
    assert distiller.epoch_metrics()["method_temperature"] == pytest.approx(tau, rel=1e-6)

    def kd(t):
        return sum(kd_row(s, tt, t) for s, tt in zip(zs.tolist(), zt.tolist())) / len(zs) * t * t

    assert losses["kd"].item() == pytest.approx(0.9 * kd(tau), rel=1e-5)
    # d(loss)/d(theta) by central differences of the float64 formula, through tau(theta)
    h = 1e-5

    def tau_of(theta):
        return 1.0 + 20.0 / (1.0 + math.exp(-theta))
    dloss = 0.9 * (kd(tau_of(0.3 + h)) - kd(tau_of(0.3 - h))) / (2 * h)
    weight = reference_reversal(epoch + 1)
    assert weight <= 0 and (weight == -1.0) == (epoch + 1 >= 10)
    assert distiller.theta.grad.item() == pytest.approx(weight * dloss, rel=1e-3, abs=1e-9)
    # the student's gradient is not reversed: d/dz_s of 0.9 tau^2 KL + 0.1 CE, in closed form
    n = len(zs)
    expected = [[0.9 * tau * (ps - pt) / n + 0.1 * (pc - (j == y)) / n
                 for j, (ps, pt, pc) in enumerate(zip(softmax(s, tau), softmax(tt, tau), softmax(s, 1.0)))]
                for s, tt, y in zip(zs.tolist(), zt.tolist(), LABELS.tolist())]
    assert torch.allclose(zs.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_ls_ctkd_is_ctkd_on_standardized_logits_with_the_reference_ctkd_ls_weights():
    """The LS paper's CTKD+LS runs (its CTKD/scripts/run_cifar_distill.sh): CE 0.1, KD weight 9,
    standardized logits, the learned temperature and reversal ramp of ctkd."""
    options = method_spec("ls-ctkd").options({})
    assert (options["ce_weight"], options["kd_weight"], options["standardize_logits"]) == (0.1, 9.0, True)
    assert (options["ctkd_t_start"], options["ctkd_t_end"], options["ctkd_grl_epochs"]) == (1.0, 20.0, 10)
    distiller = build("ls-ctkd")
    with torch.no_grad():
        distiller.theta.fill_(-0.4)
    zs, zt = fixed_logits(14), fixed_logits(15, spread=5.0) + 2.0
    losses = distiller.losses(zs, info_for(zt, epoch=2))
    tau = 1.0 + 20.0 / (1.0 + math.exp(0.4))
    kd = sum(kd_row(z_score(s), z_score(tt), tau) for s, tt in zip(zs.tolist(), zt.tolist())) / len(zs) * tau * tau
    ce = sum(ce_row(s, y) for s, y in zip(zs.tolist(), LABELS.tolist())) / len(zs)
    assert losses["kd"].item() == pytest.approx(9.0 * kd, rel=1e-5)  # the temperature is float32, as ctkd's
    assert losses["ce"].item() == pytest.approx(0.1 * ce, rel=1e-9)  # CE on the raw logits
    assert distiller.extra_parameter_groups()[0]["params"] == [distiller.theta]


def test_ctkd_reversal_ramp_matches_the_reference_schedule():
    distiller = build("ctkd")
    assert [distiller.reversal_weight(e) for e in range(12)] == pytest.approx(
        [reference_reversal(e + 1) for e in range(12)], abs=1e-12)
    assert distiller.reversal_weight(0) == pytest.approx(-0.0244717, abs=1e-6)


def test_ctkd_theta_is_in_its_own_parameter_group_and_not_the_students():
    student = torch.nn.Linear(3, 2)
    distiller = method_spec("ctkd").build(student, {})
    groups = distiller.extra_parameter_groups()
    assert len(groups) == 1 and groups[0]["params"] == [distiller.theta]
    assert all(p is not distiller.theta for p in student.parameters())
    assert set(distiller.extra_state()) == {"theta"}
    assert build("kd").extra_parameter_groups() == [] and build("kd").extra_state() == {}


# --- DTKD ------------------------------------------------------------------------------------

def test_dtkd_temperatures_and_loss_match_the_reference_formula():
    zs, zt = fixed_logits(12) + 4.0, fixed_logits(13, spread=5.0) + 6.0  # positive maxima, as trained nets have
    distiller = build("dtkd")
    losses = distiller.losses(zs, info_for(zt, epoch=4))
    t = 4.0
    dyn = kdv = 0.0
    t_ts, t_ss = [], []
    for s, tt in zip(zs.tolist(), zt.tolist()):
        t_t = 2 * max(tt) / (max(tt) + max(s)) * t
        t_s = 2 * max(s) / (max(tt) + max(s)) * t
        t_ts.append(t_t)
        t_ss.append(t_s)
        dyn += kd_row(s, tt, t_s, t_t) * t_t * t_s
        kdv += kd_row(s, tt, t) * t * t
    n = len(zs)
    expected = (5 / 20) * (3.0 * dyn / n + 1.0 * kdv / n)  # epoch 4 (0-based): warm-up 5/20
    assert losses["dtkd"].item() == pytest.approx(expected, rel=1e-6)
    ce = sum(ce_row(s, y) for s, y in zip(zs.tolist(), LABELS.tolist())) / n
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-9)

    from energytools.losses import dtkd_temperatures

    got_t, got_s = dtkd_temperatures(zs, zt, t)
    assert got_t.tolist() == pytest.approx(t_ts, rel=1e-12) and got_s.tolist() == pytest.approx(t_ss, rel=1e-12)
    metrics = distiller.epoch_metrics()
    assert metrics["method_teacher_t_min"] == pytest.approx(min(t_ts)) and metrics["method_student_t_max"] == \
        pytest.approx(max(t_ss))
    assert distiller.epoch_metrics() == {}  # reset for the next epoch


# --- runs: CLI, API, recipe, cached logits, resume -------------------------------------------

@pytest.fixture(scope="module")
def fashion_table(tmp_path_factory):
    """A tiny teacher on real Fashion-MNIST and its train table with logits (clean and mirrored)."""
    import energytools

    root = tmp_path_factory.mktemp("fashion")
    energytools.train("cnn_tiny", root / "teacher", dataset="fashion-mnist", data_root=str(FASHION), limit=300,
                      eval_limit=100, epochs=1, batch_size=64)
    return energytools.score(teacher=root / "teacher" / "best.pt", out=root / "scores.parquet", save_logits=True)


@needs_fashion
@pytest.mark.parametrize("method,extra", [("ctkd", []), ("dtkd", []), ("ls-kd", []), ("ls-ctkd", []),
                                          ("ls-energy-dkd", []), ("energy-kd", ["--standardize-logits"])])
def test_each_method_runs_from_the_cli_with_cached_logits(fashion_table, runner, tmp_path, method, extra):
    out = tmp_path / method
    result = invoke(runner, "distill", "--scores", fashion_table, "--student", "cnn_tiny", "--method", method,
                    "--cached-logits", "--epochs", 1, "--batch-size", 64, "--out", out, "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["method_options"]["standardize_logits"] == (
        method.startswith("ls-") or bool(extra))
    metrics = pl.read_parquet(out / "metrics.parquet")
    assert metrics.height == 1 and np.isfinite(metrics["loss"].to_numpy()).all()
    if method in ("ctkd", "ls-ctkd"):
        assert metrics["method_temperature"][0] != pytest.approx(1 + 20 / (1 + math.exp(-1)), abs=1e-7)  # it trained
    if method == "dtkd":
        assert metrics["method_teacher_t_min"][0] <= metrics["method_teacher_t_max"][0]
    from energytools.stages.report_runs import read_runs

    shown = read_runs([out])["temperatures"][0]
    assert {"ctkd": "learned", "dtkd": "T_t", "ls-kd": "2 (one T), standardized", "ls-ctkd": "standardized",
            "ls-energy-dkd": "standardized", "energy-kd": "standardized"}[method] in shown


@needs_fashion
def test_ctkd_and_dtkd_replay_stored_views_from_a_per_view_cache(fashion_table, tmp_path):
    import energytools

    table = energytools.score(teacher=Path(fashion_table).parent / "teacher" / "best.pt", out=tmp_path / "v.parquet",
                              views=2)
    for method in ("ctkd", "ls-dkd"):
        run = energytools.distill(table, "cnn_tiny", tmp_path / method, method=method, cached_logits=True, epochs=1,
                                  batch_size=64, device="cpu")
        config = json.loads((tmp_path / method / "config.json").read_text())
        assert config["replayed_views"]["count"] == 2 and math.isfinite(run.metrics["loss"][0])


def test_dtkd_and_ctkd_run_with_shards_from_cached_logits(digits_run, tmp_path):
    import energytools

    for method in ("dtkd", "ctkd"):
        run = energytools.distill(digits_run["scores"], "cnn_tiny", tmp_path / method, method=method,
                                  shards=[digits_run["shards"]], cached_logits=True, epochs=1, batch_size=128)
        assert run.metrics.height == 1 and math.isfinite(run.metrics["loss"][0])


@needs_fashion
def test_ctkd_resume_restores_the_learned_temperature_exactly(fashion_table, tmp_path, monkeypatch):
    import energytools
    from energytools.models import load_checkpoint

    common = {"method": "ctkd", "cached_logits": True, "epochs": 3, "batch_size": 64, "device": "cpu",
              "ctkd_grl_epochs": 2, "lr": 0.2}
    whole = energytools.distill(fashion_table, "cnn_tiny", tmp_path / "whole", **common)
    interrupted(lambda on_step: energytools.distill(fashion_table, "cnn_tiny", tmp_path / "cut", on_step=on_step,
                                                    **common))  # dies in the third epoch
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["epoch"] == 2 and set(saved["distiller"]) == {"theta"}
    resumed = energytools.distill(fashion_table, "cnn_tiny", tmp_path / "cut", resume=True, **common)
    curve = whole.metrics["method_temperature"].to_list()
    assert resumed.metrics["method_temperature"].to_list() == curve  # bit for bit
    assert len(set(curve)) == 3  # the temperature moves every epoch
    a, b = (load_checkpoint(d / "last.pt") for d in (tmp_path / "whole", tmp_path / "cut"))
    assert torch.equal(a["distiller"]["theta"], b["distiller"]["theta"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_api_cli_and_recipe_give_the_same_config_for_the_new_options(monkeypatch, runner, tmp_path):
    import importlib

    import energytools
    from energytools.pipeline import load_recipe

    seen = []
    monkeypatch.setattr(importlib.import_module("energytools.stages.distill"), "distill",
                        lambda cfg, **callbacks: seen.append(cfg))
    result = invoke(runner, "distill", "--scores", "s.parquet", "--student", "cnn_tiny", "--out", "o", "--method",
                    "CTKD", "--ctkd-t-end", "10", "--ctkd-grl-epochs", "5", "--standardize-logits",
                    "--dtkd-alpha", "2")
    assert result.exit_code == 0, result.output
    energytools.distill("s.parquet", "cnn_tiny", "o", method="ctkd", ctkd_t_end=10, ctkd_grl_epochs=5,
                        standardize_logits=True, dtkd_alpha=2)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n[teacher]\nmodel = "cnn_tiny"\n[distill]\nstudent = "cnn_tiny"\n'
                      'runs = [{ method = "ctkd", ctkd_t_end = 10, ctkd_grl_epochs = 5, standardize_logits = true, '
                      'dtkd_alpha = 2 }]\n')
    from_recipe = dataclasses.replace(load_recipe(recipe).runs[0].config, scores="s.parquet", out="o")
    assert seen[0] == seen[1] == from_recipe
    assert (seen[0].method, seen[0].ctkd_t_end, seen[0].standardize_logits) == ("ctkd", 10.0, True)
    assert method_spec("ctkd").options({"ctkd_t_end": 10.0, "ctkd_t_start": None})["ctkd_t_end"] == 10.0


def test_distill_help_lists_the_methods_and_their_sources(runner):
    result = invoke(runner, "distill", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("ctkd", "dtkd", "ls-kd", "ls-dkd", "ls-ctkd", "energy-kd", "--standardize-logits", "--ctkd-t-start",
                 "--dtkd-beta", "Sun et al. 2024", "Li et al. 2023"):
        assert name in text, name


def test_ctkd_and_dtkd_under_torchrun(digits_run, tmp_path):
    """Two gloo processes: theta is outside DDP, so the engine averages its gradient (a rank
    that skipped the all-reduce would hang the other)."""
    from test_distributed import torchrun

    for method in ("ctkd", "dtkd"):
        out = tmp_path / method
        result = torchrun("distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--method", method,
                          "--cached-logits", "--epochs", 1, "--out", out, "--device", "cpu")
        assert result.returncode == 0, result.stderr[-3000:]
        column = {"ctkd": "method_temperature", "dtkd": "method_teacher_t_max"}[method]
        assert math.isfinite(pl.read_parquet(out / "metrics.parquet")[column][0])
