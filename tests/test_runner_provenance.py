"""benchmarks/runner.py's provenance (issue 39): every run records the code that made it and its
resolved options; a run made by other code is stale (the study stops and names it, --report-only
lists it, --rerun-stale runs it again); a run whose options differ from its row's is refused; and
every invocation, a refused, failed, stopped or interrupted one too, writes its record line with
the commit. On digits, one seed, one-epoch runs."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from conftest import signal_when

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
runner = pytest.importorskip("runner")
common = pytest.importorskip("common")

DIGITS = {"digits": runner.Setting({"dataset": "digits"}, [0], ["kd"])}


def study(options=None, epochs=1, method="kd") -> "runner.Study":
    """A one-row study on digits (its smoke settings are its settings)."""
    rows = {"kd": runner.Row(method, epochs=epochs, options=options or {})}
    return runner.Study(name="provenance test", title="Provenance test", rows=rows, settings=DIGITS, smoke=DIGITS,
                        intro="", csv="runs.csv", smoke_epoch_scale=1.0)


def run(out: Path, *extra, options=None, method="kd") -> None:
    runner.main(study(options, method=method), ["--smoke", "--workers", "1", "--out", str(out), *map(str, extra)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "wall.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished study: the digits teacher, its score table and one kd run (copied by each test)."""
    out = tmp_path_factory.mktemp("provenance") / "study"
    run(out)
    return out


@pytest.fixture
def study_dir(finished, tmp_path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    return out


def made_elsewhere(run_dir: Path) -> None:
    """Rewrite the run's provenance as if other code (other package sources, another commit) made it."""
    path = run_dir / "provenance.json"
    provenance = json.loads(path.read_text())
    provenance["code"] = {"commit": "0123456789abcdef0123456789abcdef01234567", "version": "0.0.1",
                          "sources_sha256": "0" * 64}
    path.write_text(json.dumps(provenance))


def test_a_run_records_its_code_and_options_and_the_csv_and_record_the_commit(study_dir):
    run_dir = study_dir / "digits" / "kd" / "seed0"
    provenance = json.loads((run_dir / "provenance.json").read_text())
    code = common.code_identity()
    assert provenance["code"]["sources_sha256"] == code["sources_sha256"] == common.sources_sha256()
    assert provenance["code"]["commit"] == code["commit"] and provenance["code"]["version"]
    assert provenance["options"] == {"method": "kd", "options": {}, "epochs": 1, "shards": None, "drop": None,
                                     "drop_per_class": False, "cached": True, "draw_seed": None,
                                     "student": "cnn_small", "seed": 0, "eval_limit": None}
    assert pl.read_csv(study_dir / "results.csv")["commit"].to_list() == [common.code_label(code)]
    (line,) = records(study_dir)
    assert line["commit"] == common.code_label(code) and line["outcome"] == "finished"


def test_a_stale_run_is_refused_listed_by_report_only_and_rerun_with_rerun_stale(study_dir, tmp_path, capsys):
    run_dir = study_dir / "digits" / "kd" / "seed0"
    made_elsewhere(run_dir)
    summary = (run_dir / "summary.json").read_text()
    with pytest.raises(SystemExit) as refused:
        run(study_dir)
    message = str(refused.value.code)
    assert str(run_dir) in message and "0123456789abcdef" in message and "--rerun-stale" in message
    assert "\n" not in message and records(study_dir)[-1]["outcome"].startswith("refused: ")

    doc = tmp_path / "partial.md"
    run(study_dir, "--report-only", "--doc", doc)  # the tables from it, the run named as stale
    assert str(run_dir) in capsys.readouterr().err
    text = doc.read_text()
    assert "Made by other code than this checkout's (1 run, stale" in text and str(run_dir) in text
    assert "| kd | 1 |" in text and (tmp_path / "runs.csv").exists()
    assert pl.read_csv(study_dir / "results.csv")["commit"].to_list() == ["0123456789abcdef0123456789abcdef01234567"]
    assert (run_dir / "summary.json").read_text() == summary  # nothing ran

    run(study_dir, "--rerun-stale")
    assert json.loads((run_dir / "provenance.json").read_text())["code"] == common.code_identity()
    assert pl.read_csv(study_dir / "results.csv")["commit"].to_list() == [common.code_label(common.code_identity())]
    run(study_dir)  # fresh again: reused as it is
    # a run from before provenance was recorded counts as made by other code
    (run_dir / "provenance.json").unlink()
    with pytest.raises(SystemExit, match=r"\(not recorded\) made by other code"):
        run(study_dir)


def test_a_run_made_with_other_options_than_its_row_is_refused(study_dir):
    run_dir = study_dir / "digits" / "kd" / "seed0"
    with pytest.raises(SystemExit) as refused:
        run(study_dir, options={"kd_temperature": 2.0})
    message = str(refused.value.code)
    assert message.startswith(str(run_dir)) and "options.kd_temperature absent (not 2.0)" in message
    assert "\n" not in message
    with pytest.raises(SystemExit, match="method 'kd' \\(not 'ce'\\)"):
        run(study_dir, method="ce")
    with pytest.raises(SystemExit, match="options.kd_temperature"):  # --report-only does not reuse it either
        run(study_dir, "--report-only", options={"kd_temperature": 2.0})
    run(study_dir)  # the row as it was: reused


def test_a_failed_invocation_writes_its_record_line(study_dir):
    shutil.rmtree(study_dir / "digits" / "kd")
    with pytest.raises(Exception, match="no-such-method"):  # distill refuses the method: the study fails
        run(study_dir, method="no-such-method")
    line = records(study_dir)[-1]
    assert line["outcome"].startswith("failed: ") and "no-such-method" in line["outcome"]
    assert line["commit"] == common.code_label(common.code_identity())


STUDY_SCRIPT = """
import sys
sys.path.insert(0, {benchmarks!r})
from runner import Row, Setting, Study, main
DIGITS = {{"digits": Setting({{"dataset": "digits"}}, [0], ["kd"])}}
main(Study(name="provenance test", title="Provenance test", rows={{"kd": Row(epochs=40)}}, settings=DIGITS,
           smoke=DIGITS, intro="", csv="runs.csv", smoke_epoch_scale=1.0))
"""


@pytest.mark.parametrize("signum,status,outcome", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                  (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_stopped_or_interrupted_invocation_writes_its_record_line(study_dir, tmp_path, signum, status, outcome):
    script = tmp_path / "study.py"
    script.write_text(textwrap.dedent(STUDY_SCRIPT.format(benchmarks=str(ROOT / "benchmarks"))))
    shutil.rmtree(study_dir / "digits" / "kd")
    checkpoint = study_dir / "digits" / "kd" / "seed0" / "last.pt"
    stopped = signal_when(["--smoke", "--workers", "1", "--out", study_dir], checkpoint.exists, signum=signum,
                          program=[sys.executable, str(script)], timeout=120)
    assert stopped.returncode == status, stopped.stderr[-2000:]
    assert "re-run the same command to resume the study" in stopped.stderr and "Traceback" not in stopped.stderr
    line = records(study_dir)[-1]
    assert line["outcome"] == outcome and line["commit"] == common.code_label(common.code_identity())
    assert not (study_dir / "digits" / "kd" / "seed0" / "summary.json").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_identity_is_the_commit_dirty_or_the_version_and_the_sources_digest(tmp_path):
    checkout = tmp_path / "checkout"
    package = checkout / "energytools"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    outside = common.code_identity(package)  # not a git checkout: the version and the sources' digest
    assert outside["commit"] is None and outside["sources_sha256"] == common.sources_sha256(package)
    assert common.code_label(outside).startswith(f"energytools {outside['version']} (sources sha256 ")
    (package / "notes.txt").write_text("not code")
    assert common.sources_sha256(package) == outside["sources_sha256"]

    def git(*args):
        return subprocess.run(["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "code")
    (checkout / "README.md").write_text("docs are not code\n")
    clean = common.code_identity(package)
    assert clean["commit"] == git("rev-parse", "HEAD") and common.code_label(clean) == clean["commit"]
    (package / "sub" / "b.py").write_text("y = 3\n")
    dirty = common.code_identity(package)
    assert dirty["commit"] == clean["commit"] + "-dirty" and dirty["sources_sha256"] != clean["sources_sha256"]
    assert common.code_label(None) == "not recorded"
