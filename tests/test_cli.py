"""Bad input through the command line: one line on stderr, exit status 2, nothing left behind."""
import os
import shlex
import subprocess
import sys

import pytest

from conftest import invoke


def test_help_shows_examples(runner):
    for command in ([], ["train"], ["score"], ["augment"], ["select"], ["distill"], ["report"], ["run"]):
        result = invoke(runner, *command, "--help")
        assert result.exit_code == 0 and "Example" in result.output, command


def test_models_lists_the_zoo(runner):
    result = invoke(runner, "models")
    assert result.exit_code == 0 and "resnet32x4" in result.output and "ShuffleV2" in result.output


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "nope", "--out", "{tmp}/t", "--dataset", "digits"], "unknown model"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "nope"], "unknown dataset"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "digits", "--limit", "0"], "--limit"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "digits", "--imbalance-factor", "0.5"], "imbalance"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "digits", "--eval-limit", "0"],
     "--eval-limit must be positive"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "digits", "--lr", "inf"],
     "--lr must be a positive finite number, got inf"),
    (["train", "--model", "cnn_tiny", "--out", "{tmp}/t", "--dataset", "digits", "--batch-size", "0"],
     "--batch-size must be >= 1, got 0"),
    (["score", "--teacher", "{tmp}/missing.pt", "--out", "{tmp}/s.parquet"], "does not exist"),
    (["score", "--teacher", "{teacher}", "--out", "{tmp}/s.parquet", "--temperatures", "6,4"], "temperatures"),
    (["score", "--teacher", "{teacher}", "--out", "{tmp}/s.parquet", "--energy-temperature", "0"], "positive"),
    (["score", "--teacher", "{teacher}", "--out", "{scores}"], "already exists"),
    (["score", "--teacher", "{corrupt}", "--out", "{tmp}/s.parquet"], "not a complete torch checkpoint"),
    (["score", "--teacher", "{cut_teacher}", "--out", "{tmp}/s.parquet"], "not a complete torch checkpoint"),
    (["score", "--teacher", "{run_dir}", "--out", "{tmp}/s.parquet"], "is a training run's directory"),
    (["augment", "--scores", "{scores}", "--ratio", "0", "--out", "{tmp}/a"], "ratio"),
    (["augment", "--scores", "{scores}", "--ratio", "1.01", "--out", "{tmp}/a"], "ratio"),
    (["augment", "--scores", "{scores}", "--workers", "0", "--out", "{tmp}/a"], "--workers must be >= 1, got 0"),
    (["augment", "--scores", "{scores}", "--policy", "nope", "--out", "{tmp}/a"], "unknown policy"),
    (["augment", "--scores", "{corrupt}", "--out", "{tmp}/a"], "Parquet"),
    (["augment", "--scores", "{truncated}", "--out", "{tmp}/a"], "Parquet"),
    (["select", "--scores", "{tmp}/missing.parquet"], "does not exist"),
    (["select", "--scores", "{scores}", "--by", "bogus"], "--by must be one of energy"),
    (["distill", "--scores", "{scores}", "--student", "cnn_tiny", "--method", "fitnet", "--out", "{tmp}/d"], "unknown method"),
    (["distill", "--scores", "{scores}", "--student", "nope", "--out", "{tmp}/d", "--epochs", "1"], "unknown model"),
    (["distill", "--scores", "{scores}", "--student", "cnn_tiny", "--out", "{tmp}/d", "--temperature-source", "x"], "online"),
    (["report", "{tmp}/nothing-here"], "does not exist"),
    (["report", "{corrupt}"], "Parquet"),
    (["run", "{tmp}/missing.toml"], "does not exist"),
    (["run", "{bad_recipe}"], "did you mean"),
])
def test_bad_input_exits_2_with_one_line(runner, digits_run, tmp_path, args, needle):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(digits_run["scores"].read_bytes()[:500])
    cut_teacher = tmp_path / "cut.pt"
    cut_teacher.write_bytes(digits_run["teacher"].read_bytes()[:300])
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text("[data]\ndatset = 'digits'\n")
    values = {"tmp": tmp_path, "teacher": digits_run["teacher"], "scores": digits_run["scores"], "corrupt": corrupt,
              "truncated": truncated, "bad_recipe": bad_recipe, "cut_teacher": cut_teacher,
              "run_dir": digits_run["teacher"].parent}
    before = set(tmp_path.rglob("*"))
    result = invoke(runner, *[a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("energytools: error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before  # nothing left behind


def test_console_script_and_module_entry_points():
    result = subprocess.run([sys.executable, "-m", "energytools", "train", "--model", "nope", "--out", "/tmp/x",
                             "--dataset", "digits"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "unknown model" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "cnn_tiny", "--out", "o", "--epochs", "abc"], "'--epochs'"),
    (["train", "--model", "cnn_tiny", "--out", "o", "--epoch", "1"], "--epoch"),
    (["trian"], "'trian'"),
    (["select", "--ratio", "abc"], "'--ratio'"),
    (["distill", "--student"], "'--student'"),
    (["report"], "paths"),
    (["distill", "--config", "{tmp}", "--student", "cnn_tiny", "--out", "o"], "is a directory"),
    (["distill", "--config", "{typo}", "--student", "cnn_tiny", "--out", "o"], "typo.toml: unknown key 'epochz'"),
    (["distill", "--config", "{wrong_type}", "--student", "cnn_tiny", "--out", "o"], "wrong.toml: epochs"),
])
def test_usage_and_config_file_errors_are_one_line_from_the_command(tmp_path, args, needle):
    """What the argument parser refuses, and a bad --config file, are one line naming the option
    or the file, exit 2, from the installed command as from any other bad input."""
    (tmp_path / "typo.toml").write_text("[train]\nepochz = 3\n")
    (tmp_path / "wrong.toml").write_text('epochs = "abc"\n')
    values = {"tmp": tmp_path, "typo": tmp_path / "typo.toml", "wrong_type": tmp_path / "wrong.toml"}
    result = subprocess.run([sys.executable, "-m", "energytools", *[a.format(**values) for a in args]],
                            capture_output=True, text=True, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("energytools: error:") and needle in lines[0], lines[0]


def test_output_into_a_closed_pipe_stops_quietly():
    """`energytools models | head`: the reader is gone (`true` reads nothing) before the list is written."""
    command = f"{shlex.quote(sys.executable)} -m energytools models | true; echo ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.stdout.strip() == "141" and result.stderr == "", result.stderr


def test_bad_input_with_workers_is_still_one_line(digits_run, tmp_path):
    """No worker process starts (and prints a traceback of its own) before the inputs are checked."""
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    result = subprocess.run([sys.executable, "-m", "energytools", "augment", "--scores", str(corrupt), "--workers", "2",
                             "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "Parquet" in result.stderr, \
        result.stderr
    assert not (tmp_path / "a").exists()


def _table_variant(digits_run, tmp_path, change):
    import pyarrow.parquet as pq

    table = pq.read_table(digits_run["scores"])
    path = tmp_path / "variant.parquet"
    pq.write_table(change(table), path)
    return path


def test_tables_that_break_the_contract(runner, digits_run, tmp_path):
    import json

    import pyarrow as pa

    duplicated = _table_variant(digits_run, tmp_path, lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    result = invoke(runner, "augment", "--scores", duplicated, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "duplicate sample_id" in result.stderr

    def other_dataset(t):
        meta = json.loads(t.schema.metadata[b"energytools"])
        meta["dataset"]["fingerprint"] = "0" * 64
        return t.replace_schema_metadata({b"energytools": json.dumps(meta).encode()})

    foreign = _table_variant(digits_run, tmp_path, other_dataset)
    for args in (["augment", "--scores", foreign, "--out", tmp_path / "a"],
                 ["distill", "--scores", foreign, "--student", "cnn_tiny", "--out", tmp_path / "d"]):
        result = invoke(runner, *args)
        assert result.exit_code == 2 and "another dataset" in result.stderr, result.stderr
    missing = _table_variant(digits_run, tmp_path / "m" if (tmp_path / "m").mkdir() is None else tmp_path,
                             lambda t: t.slice(1))
    result = invoke(runner, "distill", "--scores", missing, "--student", "cnn_tiny", "--out", tmp_path / "d2")
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists() and not (tmp_path / "d2").exists()


def test_a_full_disk_is_one_line(runner, digits_run, tmp_path, monkeypatch):
    import errno

    import energytools.io as eio

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    monkeypatch.setattr(eio.os, "replace", full)
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--out", tmp_path / "s.parquet")
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    # one error line (the stage's progress notes go to stderr too), naming the file and the operation
    errors = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and not (tmp_path / "s.parquet").exists()
    assert "part-00000.parquet (renaming .tmp-part-00000.parquet" in errors[0]


def test_internal_errors_point_to_the_traceback(runner, monkeypatch, tmp_path):
    import energytools.stages.train as stage

    def boom(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(stage, "create_model", boom)
    result = invoke(runner, "train", "--model", "cnn_tiny", "--dataset", "digits", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "full traceback in" in result.stderr
    crash = result.stderr.split("full traceback in ")[1].strip().rstrip(")")
    assert "RuntimeError: something broke" in open(crash).read()


def test_summaries_name_the_classes(runner, fashion_root, tmp_path):
    """Per-class counts print Fashion-MNIST's class names, not indices."""
    result = invoke(runner, "train", "--model", "cnn_tiny", "--dataset", "fashion-mnist", "--data-root", fashion_root,
                    "--epochs", "1", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "score", "--teacher", tmp_path / "t" / "best.pt", "--out", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "select", "--scores", tmp_path / "s.parquet", "--ratio", "0.5")
    assert result.exit_code == 0 and "Trouser: " in result.stderr and "Ankle boot: " in result.stderr, result.stderr


def test_generated_help_names_types_and_defaults_plainly(runner):
    result = invoke(runner, "distill", "--help")
    text = " ".join(result.output.split())  # rich wraps lines and pads boxes
    assert result.exit_code == 0 and "<str>" not in text and "<float>" not in text and "(scores.parquet)" not in text
    assert "NUMBER" in text and "INTEGER" in text and "TEXT" in text
    assert "[default: scores.parquet]" in text and "[required]" in text and "[default: no-cached-logits]" in text


def test_a_full_disk_while_writing_a_part_names_the_file_and_the_run_resumes(runner, digits_run, tmp_path,
                                                                             monkeypatch):
    """pyarrow's own error ("Error writing bytes to file ...") named no file; the second part fails here."""
    import errno

    import energytools.table as table

    real, calls = table.pq.write_table, []

    def full_on_second(data, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(data, where, **kwargs)

    monkeypatch.setattr(table.pq, "write_table", full_on_second)
    out = tmp_path / "s.parquet"
    args = ("score", "--teacher", digits_run["teacher"], "--out", out, "--part-size", 256)
    result = invoke(runner, *args)
    lines = [line for line in result.stderr.splitlines() if line.startswith("energytools:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot write {out}.parts/part-00001.parquet (writing .tmp-part-00001.parquet" in lines[0]
    assert "No space left on device" in lines[0] and "re-run the same command" in lines[0]
    assert [p.name for p in (tmp_path / "s.parquet.parts").iterdir() if p.name != ".key"] == ["part-00000.parquet"]
    monkeypatch.setattr(table.pq, "write_table", real)
    resumed = invoke(runner, *args)
    assert resumed.exit_code == 0 and "resuming: 1 of 6 parts" in resumed.output, resumed.output


def test_scoring_another_dataset_than_the_teachers_is_noted(runner, digits_run, fashion_root, tmp_path):
    result = invoke(runner, "score", "--teacher", digits_run["teacher"], "--dataset", "fashion-mnist", "--data-root",
                    fashion_root, "--limit", "50", "--out", tmp_path / "s.parquet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "the teacher was trained on digits; scoring fashion-mnist" in " ".join(result.output.split())


def test_summary_lines_are_not_wrapped_when_piped(digits_run, tmp_path):
    """A piped or logged run keeps each summary on one line (rich wrapped them at 80 columns)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the tests' conftest widens the console
    result = subprocess.run([sys.executable, "-m", "energytools", "select", "--scores", str(digits_run["scores"]),
                             "--ratio", "0.3"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("selected ")]
    assert len(summary) == 1 and " 9: " in summary[0] and len(summary[0]) > 80, result.stderr  # all ten classes
