"""Label issues through cleanlab: `energytools label-issues`, its file in `distill --exclude/--keep`,
`select --by label_quality` and the report's section; the functional core."""
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import StepRecorder, invoke
from energytools.config import DistillConfig, TrainConfig
from energytools.io import sha256_file
from energytools.table import METADATA_KEY

# the optional extra energytools[cleanlab]; energytools[test] installs it
cleanlab = pytest.importorskip("cleanlab", reason="label issues need cleanlab: pip install 'energytools[cleanlab]'")
cleanlab_filter = pytest.importorskip("cleanlab.filter")
cleanlab_rank = pytest.importorskip("cleanlab.rank")

FLIPPED = 40


def with_metadata(table: pa.Table, **changes) -> pa.Table:
    """``table`` with fields of its energytools metadata set (None removes one)."""
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    return table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(meta).encode()})


@pytest.fixture(scope="module")
def noisy(digits_run, tmp_path_factory):
    """The digits table with the given labels of FLIPPED samples changed to another class: the
    teacher, which trained on the true labels, predicts the true class for them, as an
    out-of-fold teacher would for a mislabeled sample."""
    root = tmp_path_factory.mktemp("noisy")
    table = pq.read_table(digits_run["scores"])
    labels = table["label"].to_numpy().copy()
    rng = np.random.default_rng(0)
    rows = rng.choice(len(labels), FLIPPED, replace=False)
    labels[rows] = (labels[rows] + rng.integers(1, 10, FLIPPED)) % 10
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    pq.write_table(table, root / "noisy.parquet")  # the schema metadata goes with it
    return {"root": root, "scores": root / "noisy.parquet", "flipped": set(table["sample_id"].to_numpy()[rows].tolist()),
            "table": table}


@pytest.fixture(scope="module")
def issues(noisy):
    from typer.testing import CliRunner

    out = noisy["root"] / "label-issues.parquet"
    result = invoke(CliRunner(), "label-issues", "--scores", noisy["scores"], "--out", out)
    assert result.exit_code == 0, result.output
    return {"path": out, "stderr": result.stderr, "frame": pl.read_parquet(out)}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def stored_logits(table: pa.Table) -> np.ndarray:
    return np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)


def flagged_ids(frame: pl.DataFrame) -> set:
    return set(frame.filter(pl.col("is_label_issue"))["sample_id"].to_list())


def test_functional_core_is_cleanlab_on_the_softmax():
    import energytools as et

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4)) + 5 * np.eye(4)[truth]
    given = truth.copy()
    given[:20] = (given[:20] + 1) % 4
    flags = et.find_label_issues(logits, given)
    probs = softmax(logits)
    assert flags.dtype == bool and flags.tolist() == cleanlab_filter.find_label_issues(given, probs).tolist()
    assert flags[:20].mean() > 0.8
    assert et.find_label_issues(probs, given, probabilities=True, filter_by="both").tolist() == \
        cleanlab_filter.find_label_issues(given, probs, filter_by="both").tolist()
    scores = et.label_issue_scores(logits, given, method="confidence_weighted_entropy")
    np.testing.assert_allclose(scores["label_quality"], cleanlab_rank.get_label_quality_scores(
        given, probs, method="confidence_weighted_entropy"), rtol=1e-5)
    assert scores["suggested_label"].tolist() == probs.argmax(axis=1).tolist()
    for bad, needle in (({"method": "vote"}, "unknown label quality method"), ({"filter_by": "x"}, "unknown filter_by")):
        with pytest.raises(et.UserError, match=needle):
            et.label_issue_scores(logits, given, **bad)
    with pytest.raises(et.UserError, match="pred_probs must be probabilities"):
        et.find_label_issues(logits, given, probabilities=True)
    with pytest.raises(et.UserError, match="labels has 3 entries"):
        et.find_label_issues(logits, given[:3])


def test_label_issues_flags_the_flipped_labels(noisy, issues):
    frame, table = issues["frame"], noisy["table"]
    assert frame.columns == ["sample_id", "label", "label_quality", "suggested_label", "is_label_issue"]
    assert frame["sample_id"].to_list() == sorted(table["sample_id"].to_pylist())
    assert frame["label"].to_list() == table["label"].to_pylist()
    flagged = flagged_ids(frame)
    assert len(flagged & noisy["flipped"]) >= 0.8 * FLIPPED  # most mislabeled samples are found
    assert len(flagged - noisy["flipped"]) <= 0.5 * len(flagged)  # and flags are mostly them
    quality = dict(zip(frame["sample_id"].to_list(), frame["label_quality"].to_list()))
    assert np.median([quality[i] for i in noisy["flipped"]]) < 0.1 < np.median(list(quality.values()))
    # thin over cleanlab: its own answer on the softmax of the stored logits at T = 1
    probs, labels = softmax(stored_logits(table)), table["label"].to_numpy()
    expected = cleanlab_filter.find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    assert frame["is_label_issue"].to_list() == expected.tolist()
    np.testing.assert_allclose(frame["label_quality"].to_numpy(),
                               cleanlab_rank.get_label_quality_scores(labels, probs), atol=1e-5)
    assert frame["suggested_label"].to_list() == probs.argmax(axis=1).tolist()
    meta = json.loads(pq.read_schema(issues["path"]).metadata[METADATA_KEY])
    assert meta["kind"] == "label-issues" and meta["cleanlab"]["version"] == cleanlab.__version__
    assert (meta["cleanlab"]["method"], meta["cleanlab"]["filter_by"]) == ("self_confidence", "prune_by_noise_rate")
    assert meta["scores"]["sha256"] == sha256_file(noisy["scores"]) and meta["scores"]["out_of_sample"] is False
    assert meta["counts"]["label_issues"] == len(flagged) and meta["counts"]["samples"] == frame.height
    assert sum(row["label_issues"] for row in meta["counts"]["per_class"]) == len(flagged)
    assert "energytools" in meta["versions"] and meta["dataset"]["name"] == "digits"
    # the table is in-sample (no out-of-fold record): one warning line that points at K folds
    warning = [line for line in issues["stderr"].splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "optimistic" in warning[0] and "--folds" in warning[0]


def test_out_of_fold_table_options_and_overwrite(runner, noisy, issues, tmp_path):
    out_of_fold = tmp_path / "oof.parquet"
    pq.write_table(with_metadata(noisy["table"], scores="out-of-fold"), out_of_fold)
    out = tmp_path / "issues.parquet"
    result = invoke(runner, "label-issues", "--scores", out_of_fold, "--out", out, "--method", "normalized-margin",
                    "--filter-by", "confident_learning")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    frame = pl.read_parquet(out)
    probs, labels = softmax(stored_logits(noisy["table"])), noisy["table"]["label"].to_numpy()
    np.testing.assert_allclose(frame["label_quality"].to_numpy(), cleanlab_rank.get_label_quality_scores(
        labels, probs, method="normalized_margin"), atol=1e-5)
    assert frame["is_label_issue"].to_list() == cleanlab_filter.find_label_issues(
        labels, probs, filter_by="confident_learning").tolist()
    assert json.loads(pq.read_schema(out).metadata[METADATA_KEY])["scores"]["out_of_sample"] is True
    before = out.read_bytes()
    result = invoke(runner, "label-issues", "--scores", out_of_fold, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and out.read_bytes() == before
    assert invoke(runner, "label-issues", "--scores", out_of_fold, "--out", out, "--overwrite").exit_code == 0
    assert pl.read_parquet(out).equals(issues["frame"])  # the defaults again, on the same logits and labels
    result = invoke(runner, "label-issues", "--scores", out_of_fold, "--out", out, "--filter-by", "vote")
    assert result.exit_code == 2 and "--filter-by" in result.stderr


def test_a_table_without_logits_is_refused(runner, noisy, tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(noisy["table"].drop(["logits"]), plain)  # as `score` without --save-logits writes it
    out = tmp_path / "issues.parquet"
    result = invoke(runner, "label-issues", "--scores", plain, "--out", out)
    assert result.exit_code == 2 and "--save-logits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_without_cleanlab_one_line_names_the_extra(noisy, tmp_path):
    out = tmp_path / "issues.parquet"
    wrapper = ("import sys; sys.modules['cleanlab'] = None\n"  # as if cleanlab were not installed
               "from energytools.cli import main\n"
               f"sys.argv = ['energytools', 'label-issues', '--scores', {str(noisy['scores'])!r}, '--out', {str(out)!r}]\n"
               "main()\n")
    result = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["energytools: error: this needs cleanlab: pip install "
                                                  "'energytools[cleanlab]'"]
    assert not out.exists()


def test_distill_excludes_or_keeps_exactly_the_flagged_ids(runner, digits_run, issues, tmp_path):
    import energytools.stages.distill as stage

    flagged = flagged_ids(issues["frame"])
    everything = set(issues["frame"]["sample_id"].to_list())
    assert 0 < len(flagged) < len(everything)
    for keyword, expected in (("exclude", everything - flagged), ("keep", flagged)):
        recorder = StepRecorder()
        stage.distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", method="ce",
                                    out=str(tmp_path / keyword), train=TrainConfig(epochs=1),
                                    **{keyword: str(issues["path"])}), on_step=recorder)
        trained = np.concatenate([b.sample_ids.numpy() for b in recorder.batches]).tolist()
        assert set(trained) == expected and len(trained) == len(expected)
    # a file that flags nothing, or names another split's samples, is one line
    none = tmp_path / "none.parquet"
    pq.write_table(pq.read_table(issues["path"]).set_column(4, "is_label_issue", pa.array([False] * len(everything))),
                   none)
    test_split = tmp_path / "test-split.parquet"
    table = pq.read_table(issues["path"])
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    pq.write_table(with_metadata(table, dataset={**meta["dataset"], "split": "test"}), test_split)
    for path, needle in ((none, "flags no label issues"), (test_split, "digits's test split")):
        result = invoke(runner, "distill", "--scores", digits_run["scores"], "--student", "cnn_tiny", "--exclude", path,
                        "--out", tmp_path / "x")
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()


def test_select_by_label_quality(runner, digits_run, noisy, issues, tmp_path):
    out = tmp_path / "relabel.parquet"
    result = invoke(runner, "select", "--scores", noisy["scores"], "--by", "label_quality", "--mode", "low",
                    "--ratio", "0.03", "--label-issues", issues["path"], "--out", out)
    assert result.exit_code == 0, result.output
    chosen = pl.read_parquet(out)
    lowest = issues["frame"].sort(["label_quality", "sample_id"]).head(chosen.height)
    assert chosen.height == int(0.03 * issues["frame"].height)
    assert set(chosen["sample_id"]) == set(lowest["sample_id"])
    assert json.loads(pq.read_schema(out).metadata[METADATA_KEY])["label_issues"]["sha256"] == \
        sha256_file(issues["path"])
    result = invoke(runner, "select", "--scores", noisy["scores"], "--by", "label_quality", "--out", tmp_path / "x.pq")
    assert result.exit_code == 2 and "--label-issues" in result.stderr and not (tmp_path / "x.pq").exists()
    # a file that gives the same ids other labels is of other samples
    result = invoke(runner, "select", "--scores", digits_run["scores"], "--by", "label_quality", "--label-issues",
                    issues["path"])
    assert result.exit_code == 2 and "another label" in result.stderr


def test_report_has_a_label_issues_section(runner, noisy, issues, tmp_path):
    out = tmp_path / "report.html"
    result = invoke(runner, "report", noisy["scores"], "--label-issues", issues["path"], "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    section = page[page.index("<h2>Label issues: label-issues.parquet</h2>"):]
    section = section[:section.index("</section>")]
    frame = issues["frame"]
    flagged = frame.filter(pl.col("is_label_issue"))
    assert f"{flagged.height} of {frame.height} samples" in section and "In-sample scores" in section
    per_class = section[section.index("data-name='issues_per_class'"):section.index("data-name='issues_images'")]
    counts = flagged.group_by("label").len()
    for label, count in counts.iter_rows():
        assert f"<td>{label} {label}</td><td class='num' data-sort='{(frame['label'] == label).sum()}'>" \
               f"{(frame['label'] == label).sum()}</td><td class='num' data-sort='{count}'>" in per_class
    images = section[section.index("data-name='issues_images'"):section.index("data-name='issues_matrix'")]
    assert images.count("<img ") == 24
    worst = flagged.sort(["label_quality", "sample_id"]).row(0, named=True)
    assert f"{worst['label']} {worst['label']} → {worst['suggested_label']} {worst['suggested_label']} ⚑" in images
    pairs = section[section.index("data-name='issues_pairs'"):]
    top = flagged.group_by("label", "suggested_label").len().sort(["len", "label", "suggested_label"],
                                                                  descending=[True, False, False]).row(0)
    assert f"<td>{top[0]} {top[0]}</td><td>{top[1]} {top[1]}</td><td class='num' data-sort='{top[2]}'>" in pairs
    # a file given as a path is found as well; one that is not a label-issues file is one line
    assert invoke(runner, "report", issues["path"], "--out", tmp_path / "alone.html", "--no-images").exit_code == 0
    result = invoke(runner, "report", noisy["scores"], "--label-issues", noisy["scores"], "--out", tmp_path / "x.html")
    assert result.exit_code == 2 and "not an energytools label-issues file" in result.stderr
