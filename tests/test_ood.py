"""Out-of-distribution scoring of new data (issue 38, part 3): images without labels scored,
`score --reference` flagging inputs at the threshold that keeps 95% of the reference's
validation split, the functional core against scikit-learn, refusals, the report's section."""
import io
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score, roc_curve

import energytools as et
from conftest import invoke
from energytools.config import DataConfig, TrainConfig, TrainStageConfig
from energytools.data.transforms import normalize
from energytools.models import load_model
from energytools.stages.train import train
from energytools.table import load_table

DIGITS = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def new_images(tmp_path):
    """A folder of images without labels: 12 digits (RGB, 16x16) beside it and 8 of noise in a
    nested plain folder."""
    root = tmp_path / "new"
    (root / "noise" / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(np.repeat(DIGITS[i][..., None], 3, -1)).resize((16, 16)).save(root / f"digit{i:02d}.png")
    for i in range(8):
        folder = root / "noise" / ("more" if i % 2 else "")
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
    (root / ".DS_Store").write_bytes(b"x")  # not an image: skipped
    return root


def _parquet(root, ids, labels=None):
    """A Parquet dataset of the digits images ``ids`` (8x8 gray PNG), with a label column when given."""
    (root / "data").mkdir(parents=True)
    columns = {"image": [{"bytes": _png(DIGITS[i]), "path": None} for i in ids]}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    pq.write_table(pa.table(columns), root / "data" / "train-00000.parquet")
    return root


def _one_line_error(result, *needles):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("energytools: error:") and all(n in lines[0] for n in needles), lines[0]


# --- the functional core ------------------------------------------------------------------------

def test_ood_metrics_and_threshold_equal_scikit_learns():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_in, n_out = rng.integers(1, 400, size=2)
        # rounded, so that ties within and across the two sets are common
        inside, outside = np.round(rng.normal(1, 1, n_in), 1), np.round(rng.normal(0, 1.5, n_out), 1)
        tpr = (0.95, 0.9, 0.5)[trial % 3]
        got = et.ood_metrics(inside, outside, tpr=tpr)
        truth = np.r_[np.ones(n_in), np.zeros(n_out)]
        assert got["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[inside, outside]), abs=1e-12)
        fpr, tprs, thresholds = roc_curve(truth, np.r_[inside, outside], drop_intermediate=False)
        first = int(np.argmax(tprs >= tpr))  # the first point (largest threshold) reaching the target
        assert got["threshold"] == thresholds[first] == et.ood_threshold(inside, tpr=tpr)
        assert got["fpr"] == pytest.approx(fpr[first], abs=1e-12) and got["tpr"] == pytest.approx(tprs[first])
        # it keeps at least tpr of the in-distribution scores, and no larger threshold does
        assert np.mean(inside >= got["threshold"]) >= tpr > np.mean(inside > got["threshold"])


def test_ood_scores_orientation_and_temperature():
    logits = np.random.default_rng(1).normal(0, 3, (50, 10)).astype(np.float32)
    log_sum_exp = np.log(np.exp(logits.astype(np.float64)).sum(1))
    assert et.ood_scores(logits) == pytest.approx(log_sum_exp, rel=1e-5)  # -E at T = 1, higher = in-distribution
    assert et.ood_scores(logits) == pytest.approx(-et.energy_scores(logits, energy_temperature=1.0), rel=1e-6)
    assert et.ood_scores(logits, score="max-logit") == pytest.approx(logits.max(1))
    softmax = np.exp(logits - log_sum_exp[:, None])
    assert et.ood_scores(logits, score="msp") == pytest.approx(softmax.max(1), rel=1e-5)


@pytest.mark.parametrize("call, needle", [
    (lambda: et.ood_threshold([1.0, 2.0], tpr=1.0), "tpr must be in (0, 1)"),
    (lambda: et.ood_threshold([]), "in_scores is empty"),
    (lambda: et.ood_metrics([1.0], [np.nan]), "out_scores hold NaN"),
    (lambda: et.ood_scores(np.zeros((2, 3)), score="odin"), "unknown OOD score 'odin'"),
])
def test_ood_functions_refuse_bad_input(call, needle):
    with pytest.raises(et.UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


# --- scoring data without labels ------------------------------------------------------------------

def test_unlabelled_image_folder_is_scored_as_the_teachers_data(runner, digits_run, new_images, tmp_path):
    out = tmp_path / "new.parquet"
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "imagefolder", "--data-root",
                    new_images, "--out", out)
    assert result.exit_code == 0, result.output
    assert "20 have no label" in result.output and "1 channel(s), 8x8" in result.output
    frame, meta = load_table(out)
    assert frame.height == 20 and sorted(frame["path"].to_list())[:2] == ["digit00.png", "digit01.png"]
    assert sum(p.startswith("noise/") for p in frame["path"]) == 8  # the nested plain folders, not classes
    for column in ("label", "correct", "true_prob", "el2n"):
        assert frame[column].null_count() == 20, column
    assert frame["energy"].is_finite().all() and frame["confidence"].is_between(0, 1).all()
    assert meta.summary["accuracy"] is None and meta.summary["unlabelled"] == 20
    assert meta.dataset.num_classes == 10 and meta.ood is None and "ood" not in frame.columns


def test_unlabelled_parquet_rows_get_null_labels_and_the_teachers_energies(runner, digits_run, tmp_path):
    table, _ = load_table(digits_run["scores"])
    ids = table["sample_id"].to_numpy()[:30]
    labels = [int(y) if k % 3 else None for k, y in enumerate(load_digits().target[ids])]  # every third: no label
    data = _parquet(tmp_path / "pq", ids, labels)
    out = tmp_path / "pq.parquet"
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "parquet", "--data-root", data,
                    "--out", out)
    assert result.exit_code == 0, result.output
    frame, meta = load_table(out)
    unlabelled = frame.filter(pl.col("label").is_null())
    assert unlabelled.height == 10 and unlabelled["true_prob"].null_count() == unlabelled["correct"].null_count() == 10
    labelled = frame.filter(pl.col("label").is_not_null())
    assert labelled["label"].to_list() == [y for y in labels if y is not None]
    assert labelled["true_prob"].null_count() == 0 and meta.summary["unlabelled"] == 10
    # the same pixels, fed as the teacher's data (digits' mean and std): the train table's energies
    expected = table["energy"].to_numpy()[:30]
    assert frame.sort("sample_id")["energy"].to_numpy() == pytest.approx(expected, rel=1e-5)

    no_label_column = _parquet(tmp_path / "pq2", ids)
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "parquet", "--data-root",
                    no_label_column, "--out", tmp_path / "pq2.parquet")
    assert result.exit_code == 0, result.output
    assert load_table(tmp_path / "pq2.parquet")[0]["label"].null_count() == 30


# --- score --reference: the OOD flag --------------------------------------------------------------

def _validation_scores(teacher_path) -> dict[str, np.ndarray]:
    """The OOD scores of the digits validation split, computed here from the checkpoint."""
    val = DataConfig(dataset="digits").build("val")
    model, _ = load_model(teacher_path)
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        logits = model(normalize(images, val.info)).numpy()
    return {name: et.ood_scores(logits, score=name) for name in ("energy", "msp", "max-logit")}


def test_reference_flags_below_the_threshold_that_keeps_95_percent_of_its_validation(runner, digits_run,
                                                                                      new_images, tmp_path):
    out = tmp_path / "new.parquet"
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "imagefolder", "--data-root",
                    new_images, "--reference", digits_run["scores"], "--out", out)
    assert result.exit_code == 0, result.output
    frame, meta = load_table(out)
    ood = meta.ood
    assert (ood.score, ood.tpr, ood.energy_temperature) == ("energy", 0.95, 1.0) and meta.energy_temperature == 4.0
    validation = _validation_scores(digits_run["teacher"])
    inside = validation["energy"]
    assert ood.reference["validation"]["size"] == len(inside)
    assert ood.threshold == pytest.approx(np.sort(inside)[::-1][int(np.ceil(0.95 * len(inside))) - 1], rel=1e-5)
    assert np.mean(inside >= ood.threshold - 1e-4) >= 0.95 > np.mean(inside > ood.threshold + 1e-4)
    assert ood.kept == pytest.approx(np.mean(inside >= ood.threshold), abs=1 / len(inside))
    # the energy score is -E at T = 1 (higher = in-distribution), beside the table's E at T_E = 4
    assert frame["ood_score"].to_numpy() == pytest.approx(-frame["energy_t1"].to_numpy())
    assert (frame["energy_t1"] > frame["energy"]).all()  # E(T=1) > E(T=4): logsumexp shrinks as T grows
    assert frame["ood"].to_list() == (frame["ood_score"] < ood.threshold).to_list()
    assert ood.flagged == frame["ood"].sum() > 0  # some noise is flagged, so the comparison above can fail
    assert f"ood: {ood.flagged} of 20 samples" in result.output

    msp = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "imagefolder", "--data-root",
                 new_images, "--reference", digits_run["scores"], "--ood-score", "msp", "--ood-tpr", "0.9",
                 "--out", tmp_path / "msp.parquet")
    assert msp.exit_code == 0, msp.output
    frame, meta = load_table(tmp_path / "msp.parquet")
    assert (meta.ood.score, meta.ood.tpr) == ("msp", 0.9)
    assert meta.ood.threshold == pytest.approx(et.ood_threshold(validation["msp"], tpr=0.9), rel=1e-5)
    assert frame["ood_score"].to_list() == frame["confidence"].to_list()
    assert frame["ood"].to_list() == (frame["confidence"] < meta.ood.threshold).to_list()


def test_reference_scored_by_another_teacher_or_fed_otherwise_is_refused(runner, digits_run, new_images, tmp_path):
    other = tmp_path / "other"
    train(TrainStageConfig(model="cnn_tiny", out=str(other), data=DataConfig(dataset="digits", limit=200),
                           train=TrainConfig(epochs=1, seed=1)))
    out = tmp_path / "new.parquet"
    common = ["--dataset", "imagefolder", "--data-root", new_images, "--reference", digits_run["scores"], "--out", out]
    refused = invoke(runner, "score", "--teacher", other / "best.pt", *common)
    _one_line_error(refused, "was scored by another teacher")
    contradicting = invoke(runner, "score", "--teacher", digits_run["teacher"], "--teacher-mean", "0.5", *common)
    _one_line_error(contradicting, "--teacher-mean 0.5 contradicts --reference", "mean 0.3")
    resized = invoke(runner, "score", "--teacher", digits_run["teacher"], "--image-size", "16", *common)
    _one_line_error(resized, "--image-size 16 contradicts the reference's data", "8x8")
    hotter = invoke(runner, "score", "--teacher", digits_run["teacher"], "--energy-temperature", "1", *common)
    _one_line_error(hotter, "used T_E=4.0, not 1.0")
    alone = invoke(runner, "score", "--teacher", digits_run["teacher"], "--ood-score", "msp", *common[:4], "--out", out)
    _one_line_error(alone, "--ood-score and --ood-tpr need --reference")
    assert not out.exists() and not (tmp_path / "new.parquet.parts").exists()


# --- where labels are needed ------------------------------------------------------------------------

def test_data_without_labels_is_refused_where_labels_are_needed(runner, digits_run, new_images, tmp_path):
    trained = invoke(runner, "train", "--dataset", "imagefolder", "--data-root", new_images, "--model", "cnn_tiny",
                     "--epochs", "1", "--out", tmp_path / "run")
    _one_line_error(trained, f"imagefolder in {new_images}", "20 of the 20 images", "have no label")
    assert not (tmp_path / "run").exists()
    table = tmp_path / "new.parquet"
    assert invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "imagefolder", "--data-root",
                  new_images, "--out", table).exit_code == 0
    distilled = invoke(runner, "distill", "--scores", table, "--student", "cnn_tiny", "--epochs", "1",
                       "--out", tmp_path / "student")
    _one_line_error(distilled, f"imagefolder in {new_images}", "have no label")
    assert not (tmp_path / "student").exists()
    augmented = invoke(runner, "augment", "--scores", table, "--out", tmp_path / "he-da")
    _one_line_error(augmented, f"imagefolder in {new_images}", "have no label")
    _one_line_error(invoke(runner, "select", "--scores", table, "--per-class"), "--per-class needs labels")
    _one_line_error(invoke(runner, "select", "--scores", table, "--by", "true_prob"), "--by true_prob needs labels")
    selected = invoke(runner, "select", "--scores", table, "--ratio", "0.5")  # by energy: no label needed
    assert selected.exit_code == 0 and "no label: 10" in selected.output, selected.output


# --- the report -----------------------------------------------------------------------------------

def test_report_overlays_new_data_on_the_reference_and_gives_auroc_for_known_ood(runner, digits_run, new_images,
                                                                                 tmp_path):
    table = tmp_path / "new.parquet"
    assert invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "imagefolder", "--data-root",
                  new_images, "--reference", digits_run["scores"], "--out", table).exit_code == 0
    out = tmp_path / "report.html"
    result = invoke(runner, "report", "--ood", table, "--known-ood", table, "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.count("<h2>Out-of-distribution: new.parquet</h2>") == 2
    assert text.count("AUROC %") == 1  # only the section of the known-OOD table has the metrics
    frame, meta = load_table(table)
    validation = json.loads(pq.read_schema(table).metadata[b"energytools"])["ood"]["validation"]
    inside = np.frombuffer(__import__("base64").b64decode(validation["energy"]), "<f4")
    expected = et.ood_metrics(inside, -frame["energy_t1"].to_numpy())
    assert f"{100 * expected['auroc']:.2f}" in text and f"{100 * expected['fpr']:.2f}" in text
    plain = invoke(runner, "report", digits_run["scores"], "--out", tmp_path / "plain.html", "--no-images")
    assert plain.exit_code == 0 and "Out-of-distribution" not in (tmp_path / "plain.html").read_text()
    _one_line_error(invoke(runner, "report", "--ood", digits_run["scores"], "--out", tmp_path / "x.html"),
                    "holds no OOD scores", "--reference")
