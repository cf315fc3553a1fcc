"""The student leaves the lab: `energytools export` (ONNX, checked with onnxruntime on the run's
validation images), `energytools profile` (size and speed) and the report's deployment columns."""
import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from conftest import invoke

os.environ.setdefault("HF_HUB_OFFLINE", "1")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from energytools.config import DataConfig, DistillConfig, TrainConfig  # noqa: E402
from energytools.data.transforms import normalize  # noqa: E402
from energytools.deploy import onnx_metadata  # noqa: E402
from energytools.engine import model_meta  # noqa: E402
from energytools.io import sha256_file  # noqa: E402
from energytools.models import create_model, load_model, model_preprocessing, save_checkpoint  # noqa: E402
from energytools.stages.export import export  # noqa: E402
from energytools.stages.report import report  # noqa: E402
from energytools.table import read_metadata, write_parquet  # noqa: E402


@pytest.fixture(scope="module")
def student_run(digits_run, tmp_path_factory):
    """A cnn_tiny student distilled from the digits teacher for one epoch (its config records the teacher)."""
    from energytools.stages.distill import distill

    out = tmp_path_factory.mktemp("student") / "kd"
    distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", method="kd", out=str(out),
                          train=TrainConfig(epochs=1, lr=0.05, seed=0)))
    return out


def digits_checkpoint(path, arch: str, **meta):
    """A checkpoint of ``arch`` with random weights for the digits dataset, as a run records it."""
    data = DataConfig(dataset="digits")
    dataset = data.build("train")
    info = dataset.info
    torch.manual_seed(0)
    save_checkpoint(path, create_model(arch, info.num_classes, info.in_channels, info.image_size),
                    {**model_meta(arch, dataset, data), **meta})
    return path


def validation_batch(count: int):
    val_set = DataConfig(dataset="digits").build("val")
    images, labels, _ = val_set.__getitems__(list(range(count)))
    return normalize(images, val_set.info), val_set.info


def test_export_a_run_checks_it_on_validation_images_and_records_preprocessing(runner, student_run, tmp_path):
    out = tmp_path / "student.onnx"
    result = invoke(runner, "export", student_run, "--format", "onnx", "--out", out, "--check-samples", "40")
    assert result.exit_code == 0, result.output
    assert "check on 40 digits validation images: largest |logit difference|" in result.output
    assert "arg-max agrees on 40/40" in result.output
    meta = onnx_metadata(out)
    checkpoint = student_run / "best.pt"
    info = validation_batch(1)[1]
    assert meta["source_sha256"] == sha256_file(checkpoint) and meta["opset"] == "17"
    assert json.loads(meta["class_names"]) == list(info.classes) and json.loads(meta["mean"]) == list(info.mean)
    assert json.loads(meta["std"]) == list(info.std) and meta["input_dtype"] == "float32"
    assert json.loads(meta["input_shape"]) == ["batch", 1, 8, 8] and meta["energytools_version"]
    # the batch dimension is free: 1 and 7 images both run, and match the checkpoint's model
    model, _ = load_model(checkpoint)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, _ = validation_batch(7)
    for batch in (images[:1], images):
        got = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(batch).numpy(), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"]  # no temporary file left


def test_export_a_timm_student(tmp_path):
    pytest.importorskip("timm")
    checkpoint = digits_checkpoint(tmp_path / "best.pt", "timm:test_resnet")
    out = export(tmp_path, tmp_path / "timm.onnx", check_samples=16)
    meta = onnx_metadata(out)
    assert meta["arch"] == "timm:test_resnet" and meta["source_sha256"] == sha256_file(checkpoint)
    assert json.loads(meta["model_preprocessing"]) is None  # fed the dataset's normalisation, as it was trained
    images, _ = validation_batch(3)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, load_model(checkpoint)[0](images).numpy(), atol=1e-4)


def test_a_student_resized_to_its_weights_input_size_names_the_operator(runner, tmp_path):
    """A real gap of torch's TorchScript exporter: the antialiased resize that feeds a student its
    pretrained weights' input size (--student-normalization weights) has no ONNX mapping."""
    pytest.importorskip("timm")
    preprocessing = model_preprocessing("timm:test_resnet")  # 160x160 from the 8x8 digits
    digits_checkpoint(tmp_path / "best.pt", "timm:test_resnet", preprocessing=preprocessing)
    result = invoke(runner, "export", tmp_path, "--out", tmp_path / "timm.onnx")
    assert result.exit_code == 2
    assert result.output.strip() == ("energytools: error: cannot export to ONNX: operator "
                                     "aten::_upsample_bilinear2d_aa is not supported at opset 17 (try another "
                                     "--opset, or replace that layer)")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp-*"))


def test_bad_inputs_are_one_line(runner, tmp_path, student_run):
    result = invoke(runner, "export", student_run, "--format", "tflite", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "unknown export format 'tflite'; known formats: onnx" in result.output
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = invoke(runner, "export", empty)
    assert result.exit_code == 2 and f"run directory {empty} has no best.pt" in result.output
    assert not list(tmp_path.glob("*.onnx"))


def run_wrapped(code: str, *args) -> subprocess.CompletedProcess:
    """``energytools ARGS`` in a subprocess after ``code`` ran (fault injection through public seams)."""
    script = f"import sys\n{code}\nfrom energytools.cli import main\nsys.argv = ['energytools', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_without_the_extra_one_line_names_it(student_run, tmp_path):
    result = run_wrapped("sys.modules['onnx'] = None", "export", student_run, "--out", tmp_path / "s.onnx")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("energytools: error: export and profile need onnx: "
                                     "pip install 'energytools[export]'")


UNSUPPORTED = """
import torch, torch.nn as nn
from energytools.models import register_model

class Bessel(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(in_channels, 4, 3), nn.Linear(4, num_classes)
    def forward(self, x):
        return self.fc(torch.special.bessel_j0(self.conv(x)).mean((2, 3)))

register_model("bessel_net")(Bessel)
"""


def test_an_operator_onnx_lacks_is_named(tmp_path):
    make = (f"{UNSUPPORTED}\nfrom energytools.config import DataConfig\nfrom energytools.engine import model_meta\n"
            f"from energytools.models import create_model, save_checkpoint\n"
            f"data = DataConfig(dataset='digits'); ds = data.build('train')\n"
            f"save_checkpoint({str(tmp_path / 'best.pt')!r}, create_model('bessel_net', 10, 1), "
            f"model_meta('bessel_net', ds, data))\n")
    result = run_wrapped(make, "export", tmp_path, "--out", tmp_path / "b.onnx")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("energytools: error: cannot export to ONNX: operator aten::special_bessel_j0 "
                                     "is not supported at opset 17 (try another --opset, or replace that layer)")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp-*"))


def independent_macs(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Conv and linear multiply-accumulates from the layers' output shapes (what cnn_tiny is made of)."""
    total = []

    def hook(module, _, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total.append(output.numel() * module.in_channels // module.groups * kh * kw)
        elif isinstance(module, torch.nn.Linear):
            total.append(output.numel() * module.in_features)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return sum(total)


@pytest.fixture(scope="module")
def profiled(student_run, tmp_path_factory):
    """The student exported beside its best.pt, then profiled with its teacher (to Parquet)."""
    export(student_run, student_run / "student.onnx", check_samples=8, overwrite=True)
    out = tmp_path_factory.mktemp("profile") / "profile.parquet"
    from energytools.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["profile", str(student_run), "--out", str(out), "--runs", "3", "--warmup", "1",
                                      "--batch-sizes", "1,4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_profile_rows_for_the_student_and_its_teacher(profiled, student_run, digits_run):
    out, output = profiled
    frame = pl.read_parquet(out)
    assert frame["role"].to_list() == ["student", "teacher"]
    assert frame["checkpoint"].to_list() == [str(student_run / "best.pt"), str(digits_run["teacher"])]
    for row, checkpoint in zip(frame.iter_rows(named=True), (student_run / "best.pt", digits_run["teacher"])):
        model, _ = load_model(checkpoint)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["macs"] == independent_macs(model, torch.zeros(1, 1, 8, 8))
        assert row["checkpoint_mb"] == checkpoint.stat().st_size / 1e6 and row["threads"] == 1
        for column in ("eager_b1_ms", "eager_b4_ms", "eager_b1_iqr_ms"):
            assert row[column] > 0 or column.endswith("iqr_ms")
    student, teacher = frame.row(0, named=True), frame.row(1, named=True)
    assert student["onnx"] == str(student_run / "student.onnx") and student["onnx_b4_ms"] > 0
    assert teacher["onnx"] is None and teacher["onnx_b1_ms"] is None  # no exported file beside it
    summary = json.loads((student_run / "summary.json").read_text())
    assert student["test_acc"] == summary["best_test_acc"] and teacher["test_acc"] is not None
    meta = read_metadata(out)
    assert meta["kind"] == "profile" and meta["protocol"] == {"batch_sizes": [1, 4], "warmup": 1, "runs": 3,
                                                              "threads": 1}
    assert meta["machine"]["cores"] == os.cpu_count() and meta["machine"]["cpu"] and "load_average" in meta["machine"]
    assert "eager b4" in output and "onnx b4" in output and "MACs = FLOPs / 2" in output


def test_profile_bad_inputs(runner, student_run, tmp_path):
    result = invoke(runner, "profile", student_run, "--out", tmp_path / "p.csv")
    assert result.exit_code == 2 and "--out" in result.output and ".parquet or .json" in result.output
    result = invoke(runner, "profile", student_run, "--runs", "0")
    assert result.exit_code == 2 and "--runs must be at least 1" in result.output


def test_report_shows_the_profile_columns_and_accuracy_against_latency(profiled, student_run, tmp_path):
    out, _ = profiled
    page = report([student_run, out], tmp_path / "report.html", thumbnails=False).read_text()
    header = page.split("data-table='comparison'")[1].split("</thead>")[0]
    assert "<th>MMACs / ms b1</th>" in header
    row = pl.read_parquet(out).row(0, named=True)
    body = page.split("data-table='comparison'")[1].split("</table>")[0]
    assert f">{row['macs'] / 1e6:.2f} / {row['eager_b1_ms']:.2f}<" in body
    profile_table = page.split("data-table='profile'")[1].split("</table>")[0]
    assert f">{row['params'] / 1e6:.3f}<" in profile_table and f">{row['onnx_b4_ms']:.2f}<" in profile_table
    assert "data-name='accuracy_latency'" in page and "data-table='profile'" in page
    assert "teacher (teacher)" in page  # the teacher's point and row


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make test installs it)")
def test_profile_section_renders_in_headless_chromium(tmp_path):
    """Twelve fake runs (six configurations) and a profile of each plus the teacher: the comparison
    table still fits the first screen with its new columns, every profile row is shown and plotly
    draws the accuracy-against-latency scatter."""
    from test_report import CHECK_SCRIPT, CONFIGS, fake_run

    runs = []
    for name, method, heda, temps, offset in CONFIGS:
        for seed in (0, 1):
            runs.append(fake_run(tmp_path / "runs" / name / f"seed{seed}", method, seed, 80 + offset + seed,
                                 79.9 + offset, shards=("he-da",) * heda, temperatures=temps))
    rows = [{"role": "student", "run": str(r.name), "arch": "cnn_small", "method": "kd", "test_acc": 80.0,
             "params": 100_000 + i, "macs": 2_000_000, "checkpoint_mb": 0.4, "checkpoint": str(r / "best.pt"),
             "eager_b1_ms": 1.0 + i / 10, "eager_b1_iqr_ms": 0.1, "eager_b64_ms": 20.0 + i,
             "eager_b64_iqr_ms": 1.0, "onnx_b1_ms": 0.5, "onnx_b1_iqr_ms": 0.05, "onnx_b64_ms": 9.0,
             "onnx_b64_iqr_ms": 0.5} for i, r in enumerate(runs)]
    rows.append({**rows[0], "role": "teacher", "run": "teacher (teacher)", "arch": "resnet20", "test_acc": 90.0,
                 "checkpoint": str(tmp_path / "teacher" / "best.pt"), "eager_b1_ms": 6.0})
    profile_file = write_parquet(pl.DataFrame(rows), tmp_path / "profile.parquet", {"kind": "profile"})
    out = report([tmp_path / "runs", profile_file], tmp_path / "report.html", thumbnails=False)
    checked = tmp_path / "checked.html"
    checked.write_text(out.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", f"--user-data-dir={tmp_path / 'browser'}",
           "--virtual-time-budget=5000", "--window-size=1400,900", "--dump-dom", checked.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    check = json.loads(html.unescape(re.search(r'<pre id="check">(.*?)</pre>', dom, re.S).group(1)))
    tables = {t["name"]: t for t in check["tables"]}
    assert tables["comparison"]["right"] <= 1400 and tables["comparison"]["bottom"] <= 900
    assert len(tables["profile"]["rows"]) == 13
    assert not [(t["name"], row["first"]) for t in check["tables"] for row in t["rows"] if not row["shown"]]
    scatter = re.search(r"data-name=\"accuracy_latency\">(.*?)</div>", dom, re.S)
    assert scatter and 'class="main-svg"' in dom.split('data-name="accuracy_latency"')[1].split("data-name=")[0]
    assert "teacher (teacher)" in " ".join(check["texts"])


def test_export_a_hugging_face_student(digits_run, tmp_path):
    """A `hf:DIR` student (transformers' ResNet, its folder's weights and preprocessing) exports and
    matches PyTorch on the run's validation images."""
    pytest.importorskip("transformers")
    import energytools
    from test_byo import NAMES, save_hf_model

    save_hf_model(tmp_path / "hf", NAMES)
    energytools.distill(digits_run["scores"], f"hf:{tmp_path / 'hf'}", tmp_path / "run", method="kd", epochs=1,
                        device="cpu", student_init=str(tmp_path / "hf"))
    out = export(tmp_path / "run", tmp_path / "hf.onnx", check_samples=16)
    meta = onnx_metadata(out)
    assert meta["arch"].startswith("hf:") and meta["source_sha256"] == sha256_file(tmp_path / "run" / "best.pt")
    images, _ = validation_batch(3)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, load_model(tmp_path / "run" / "best.pt")[0](images).numpy(), atol=1e-4)
