"""Hostile inputs built here: each is refused or shown as text, and its payload never runs.

A payload would create a marker file (``touch MARKER``); every test checks it never appears.
"""
import builtins
import io
import json
import os
import pickle
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import invoke
from energytools.errors import UserError
from energytools.models import create_model, load_checkpoint, load_model, save_checkpoint


class Payload:
    """Pickles as a call: unpickling it runs ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker):
    return {"os.system": Payload(os.system, f"touch {marker}"),
            "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            "subprocess.call": Payload(subprocess.call, ["touch", str(marker)])}


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("energytools: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call"])
def test_checkpoint_with_a_payload_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pt"
    torch.save({"model": create_model("cnn_tiny", 10, 1).state_dict(), "epoch": payloads(marker)[kind]}, path)
    with pytest.raises(UserError, match=r"refusing checkpoint .*hostile\.pt: loading it would run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_legacy_pickle_checkpoint_with_a_payload_is_refused(tmp_path):
    """Not torch's zip format: a bare pickle, as torch wrote before 1.6."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "hostile.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": payloads(marker)["os.system"]}, handle, protocol=2)
    with pytest.raises(UserError, match="refusing checkpoint .*posix.system"):
        load_model(path, arch="cnn_tiny", num_classes=10, in_channels=1)
    assert not marker.exists()


@pytest.mark.parametrize("with_dataset", [False, True])
def test_score_refuses_a_hostile_teacher_in_one_line_and_writes_nothing(runner, tmp_path, with_dataset):
    """The reported case: `energytools score --teacher FILE` ran the payload, then scored."""
    marker = tmp_path / "MARKER"
    teacher = tmp_path / "hostile.pt"
    model = create_model("cnn_small", 10, 1, 8)
    meta = {"arch": "cnn_small", "num_classes": 10, "in_channels": 1, "image_size": 8,
            "data": {"dataset": "digits"}, "run": payloads(marker)["os.system"]}
    torch.save({"model": model.state_dict(), "energytools": meta}, teacher)
    before = set(tmp_path.rglob("*"))
    args = ["score", "--teacher", teacher, "--out", tmp_path / "s.parquet"] + (["--dataset", "digits"] * with_dataset)
    result = invoke(runner, *args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert str(teacher) in line and "would run code" in line
    assert not marker.exists()
    assert set(tmp_path.rglob("*")) == before


def test_energytools_checkpoints_need_no_allowed_globals(tmp_path, digits_run):
    """torch.load(weights_only=True) with nothing allow-listed reads what energytools writes."""
    model = create_model("cnn_tiny", 10, 1)
    meta = {"arch": "cnn_tiny", "num_classes": np.int64(10), "in_channels": 1, "mean": (0.5,),
            "root": tmp_path, "version": torch.__version__}
    save_checkpoint(tmp_path / "m.pt", model, meta, best=np.float64(0.5), rows=[{"loss": np.float32(1.5)}])
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["energytools"]["num_classes"] == 10 and type(state["energytools"]["num_classes"]) is int
    assert state["energytools"]["root"] == str(tmp_path) and type(state["best"]) is float
    # a real training run's files, with optimizer state and the metrics rows used to resume
    for name in ("best.pt", "last.pt"):
        state = torch.load(digits_run["root"] / "teacher" / name, weights_only=True)
        assert set(state["model"]) == set(create_model("cnn_small", 10, 1, 8).state_dict())
    assert state["optimizer"]["state"] and state["metrics"][-1]["epoch"] == state["epoch"]


def test_checkpoints_from_earlier_energytools_still_load(tmp_path):
    """Before, the metadata kept torch.__version__ as torch's own str subclass."""
    model = create_model("cnn_tiny", 10, 1)
    meta = {"arch": "cnn_tiny", "num_classes": 10, "in_channels": 1, "versions": {"torch": torch.__version__}}
    torch.save({"model": model.state_dict(), "energytools": meta, "epoch": 1}, tmp_path / "last.pt")
    loaded, loaded_meta = load_model(tmp_path / "last.pt")
    assert loaded_meta["versions"]["torch"] == str(torch.__version__)


@pytest.mark.parametrize("best_acc", [torch.tensor(75.31), 75.31, np.float64(75.31)],
                         ids=["tensor", "float", "numpy"])
def test_mdistiller_checkpoint_still_loads(tmp_path, best_acc):
    """mdistiller's layout: model, optimizer, epoch (int) and best_acc (a tensor, or a number)."""
    model = create_model("resnet8", 100, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 240,
                "best_acc": best_acc}, tmp_path / "resnet8_cifar100.pth")
    loaded, meta = load_model(tmp_path / "resnet8_cifar100.pth", arch="resnet8", num_classes=100, in_channels=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert float(load_checkpoint(tmp_path / "resnet8_cifar100.pth")["best_acc"]) == pytest.approx(75.31)


def test_mdistiller_teacher_scores_cifar100_from_the_cli(runner, tmp_path, cifar_root):
    model = create_model("resnet8", 100, 3)
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": torch.tensor(70.0)}, tmp_path / "t.pth")
    result = invoke(runner, "score", "--teacher", tmp_path / "t.pth", "--teacher-arch", "resnet8", "--dataset",
                    "cifar100", "--data-root", cifar_root, "--out", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.output
    assert pq.read_metadata(tmp_path / "s.parquet").num_rows == 400


def test_torchvision_weights_file_still_loads(tmp_path):
    """A torchvision weights file is a bare state dict (an OrderedDict of tensors)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    loaded, meta = load_model(tmp_path / "resnet18-f37072fd.pth", arch="resnet18", num_classes=10, in_channels=3)
    assert meta["arch"] == "resnet18" and len(meta["sha256"]) == 64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_safetensors_checkpoints_are_written_and_read(tmp_path):
    model = create_model("cnn_tiny", 10, 1)
    meta = {"arch": "cnn_tiny", "num_classes": 10, "in_channels": 1, "image_size": 28}
    save_checkpoint(tmp_path / "m.safetensors", model, meta, epoch=3, val_acc=np.float64(91.5))
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "m.safetensors")) == set(model.state_dict())  # plain safetensors
    loaded, loaded_meta = load_model(tmp_path / "m.safetensors")
    assert loaded_meta["arch"] == "cnn_tiny" and load_checkpoint(tmp_path / "m.safetensors")["val_acc"] == 91.5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="cannot read checkpoint .*bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


# --- CIFAR dataset files -----------------------------------------------------------------

def test_cifar_batch_with_a_payload_is_refused(cifar_root, tmp_path):
    from energytools.config import DataConfig

    marker = tmp_path / "MARKER"
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as handle:
        pickle.dump({b"data": np.zeros((20, 3072), np.uint8), b"labels": payloads(marker)["os.system"]}, handle)
    with pytest.raises(UserError, match=r"refusing CIFAR file .*data_batch_3: it names posix\.system"):
        DataConfig(dataset="cifar10", data_root=str(cifar_root)).build("train")
    assert not marker.exists()


def test_cifar_batch_with_an_object_array_is_refused(cifar_root):
    from energytools.config import DataConfig

    with open(cifar_root / "cifar-100-python" / "test", "wb") as handle:
        pickle.dump({b"data": np.array([b"x", 1], dtype=object), b"fine_labels": [0, 1]}, handle)
    with pytest.raises(UserError, match="refusing CIFAR file .*test: it holds an array of Python objects"):
        DataConfig(dataset="cifar100", data_root=str(cifar_root)).build("test")


class Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's ``str`` (BINSTRING), as the files from cs.toronto.edu hold."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write((pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256
                    else pickle.BINSTRING + len(data).to_bytes(4, "little")) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def test_cifar_file_as_published_loads(tmp_path):
    """The published files: Python 2 pickles of numpy 1.x arrays (numpy.core.multiarray)."""
    from energytools.data.loaders import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["test_batch", "batches.meta"]:
        content = ({b"label_names": [b"airplane", b"cat"] + [b"c%d" % i for i in range(8)], b"num_vis": 3072}
                   if name == "batches.meta" else
                   {b"batch_label": b"testing batch 1 of 1", b"labels": [i % 10 for i in range(20)],
                    b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
                    b"filenames": [b"img_%d.png" % i for i in range(20)]})
        buffer = io.BytesIO()
        Python2Pickler(buffer, protocol=2).dump(content)
        (folder / name).write_bytes(buffer.getvalue().replace(b"numpy._core", b"numpy.core"))
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    info, images, labels, _ = load_cifar10(tmp_path, "test")
    assert info.classes[:2] == ("airplane", "cat") and len(images) == 20 and labels.tolist()[:3] == [0, 1, 2]


# --- augmentation policy files -------------------------------------------------------------

def _outsider_transform(marker):
    """A transform class from outside albumentations: it lands in albumentations' registry."""
    import albumentations as A

    class Outsider(A.ImageOnlyTransform):
        def __init__(self, p: float = 1.0):
            super().__init__(p=p)
            marker.touch()

        def apply(self, img, **params):
            return img

        def get_transform_init_args_names(self):
            return ()

    return Outsider


def _pipeline(inner: dict) -> dict:
    """``inner`` nested in Compose > OneOf, as albumentations.save writes it."""
    return {"__version__": "2.0.8", "transform": {
        "__class_fullname__": "Compose", "p": 1.0, "transforms": [
            {"__class_fullname__": "HorizontalFlip", "p": 0.5},
            {"__class_fullname__": "OneOf", "p": 1.0, "transforms": [
                {"__class_fullname__": "Blur", "p": 1.0}, inner]}]}}


@pytest.mark.parametrize("inner,named", [
    ({"__class_fullname__": "os.system", "p": 1.0}, "os.system"),
    ({"__class_fullname__": "Lambda", "__name__": "payload", "p": 1.0}, "Lambda"),
    ({"__class_fullname__": "test_security.Outsider", "p": 1.0}, "test_security.Outsider"),
], ids=["unregistered", "lambda", "registered-outsider"])
def test_policy_file_naming_anything_but_albumentations_is_refused(tmp_path, inner, named):
    from albumentations.core.serialization import SERIALIZABLE_REGISTRY
    from energytools.policies import make_policy

    marker = tmp_path / "MARKER"
    outsider = _outsider_transform(marker)
    SERIALIZABLE_REGISTRY["test_security.Outsider"] = outsider  # as if its package were imported
    try:
        path = tmp_path / "policy.json"
        path.write_text(json.dumps(_pipeline(inner)))
        with pytest.raises(UserError, match=rf"refusing policy file .*policy\.json: '{re.escape(named)}' is not an "
                                            "albumentations transform"):
            make_policy(str(path))
    finally:
        del SERIALIZABLE_REGISTRY["test_security.Outsider"]
    assert not marker.exists()


def test_yaml_policy_with_a_python_tag_is_refused(tmp_path):
    from energytools.policies import make_policy

    marker = tmp_path / "MARKER"
    path = tmp_path / "policy.yaml"
    path.write_text(f"transform: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="cannot read albumentations pipeline .*policy.yaml"):
        make_policy(str(path))
    assert not marker.exists()


def test_albumentations_policy_files_still_load(tmp_path):
    import albumentations as A
    from energytools.policies import make_policy

    pipeline = A.Compose([A.OneOf([A.HorizontalFlip(p=1), A.SomeOf([A.Blur(p=1), A.Sharpen(p=1)], n=1)], p=1)])
    for suffix, fmt in ((".json", "json"), (".yaml", "yaml")):
        A.save(pipeline, str(tmp_path / f"p{suffix}"), data_format=fmt)
        policy = make_policy(str(tmp_path / f"p{suffix}"))
        out = policy(np.random.default_rng(0), 0, lambda i: np.zeros((8, 8, 3), np.uint8), 1)
        assert out.image.shape == (8, 8, 3) and out.params["applied"]


def test_augment_refuses_a_hostile_policy_in_one_line(runner, digits_run, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(_pipeline({"__class_fullname__": "builtins.eval", "p": 1.0})))
    before = set(tmp_path.rglob("*"))
    result = invoke(runner, "augment", "--scores", digits_run["scores"], "--policy", path, "--out", tmp_path / "a")
    assert result.exit_code == 2, result.output
    assert str(path) in one_error_line(result) and "builtins.eval" in result.stderr
    assert set(tmp_path.rglob("*")) == before


# --- names from data in the report and the console -----------------------------------------

HOSTILE = "<img src=x onerror=document.body.setAttribute('data-pwned','1')>"


@pytest.fixture(scope="module")
def hostile_folder_run(tmp_path_factory):
    """An imagefolder with a class folder named like an HTML tag, scored by a tiny teacher."""
    from PIL import Image

    from energytools.config import DataConfig
    from energytools.config import TrainConfig, TrainStageConfig
    from energytools.stages.score import ScoreConfig, score
    from energytools.stages.train import train

    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c, name in enumerate(["cat", HOSTILE]):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (8, 8, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / split / name / f"{i}.png")
    data = DataConfig(dataset="imagefolder", data_root=str(root / "data"), image_size=8)
    train(TrainStageConfig(model="cnn_tiny", out=str(root / "teacher"), data=data,
                           train=TrainConfig(epochs=1, batch_size=8, seed=0)))
    scores = score(ScoreConfig(teacher=str(root / "teacher" / "best.pt"), out=str(root / "scores.parquet")))
    return {"root": root, "scores": scores}


def test_class_folder_named_like_a_tag_is_text_in_the_report(hostile_folder_run, tmp_path):
    from energytools.stages.report import build_report, discover, report

    sections = build_report(discover([hostile_folder_run["scores"]]), thumbnails=False)
    figures = sections[0][1]
    escaped = "0 " + HOSTILE.replace("<", "&lt;").replace(">", "&gt;")  # "<" sorts before "cat"
    assert list(figures["class_groups"].data[0].x) == [escaped, "1 cat"]
    assert f"<td>{escaped}</td>" in figures["class_table"] and "<td>1 cat</td>" in figures["class_table"]
    assert "<img src=x" not in figures["class_table"]
    out = report([hostile_folder_run["scores"]], tmp_path / "report.html")
    assert "<img src=x" not in out.read_text()


def test_names_from_table_metadata_are_text_in_the_report(digits_run, tmp_path):
    """A score table is input too: its metadata (teacher arch, name) must not become markup."""
    from energytools.stages.report import report
    from energytools.table import METADATA_KEY

    table = pq.read_table(digits_run["scores"])
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["teacher"]["arch"] = HOSTILE
    meta["dataset"]["classes"] = [HOSTILE] * 10
    hostile = tmp_path / f"{HOSTILE.replace('/', '')}.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), hostile)
    html = report([hostile], tmp_path / "report.html", thumbnails=False).read_text()
    assert "<img src=x" not in html and "teacher &lt;img src=x onerror=" in html


def test_run_names_are_text_in_the_report(tmp_path):
    import polars as pl

    from energytools.stages.report import Inputs, run_parts
    from energytools.table import write_parquet

    run = tmp_path / "<b onmouseover=alert(1)>kd"
    run.mkdir()
    write_parquet(pl.DataFrame({"epoch": [1], "val_acc": [50.0], "test_acc": [49.0]}), run / "metrics.parquet",
                  {"kind": "metrics"})
    (run / "summary.json").write_text(json.dumps({"method": "<i>kd</i>", "best_test_acc": 49.0,
                                                  "last_test_acc": 49.0, "seconds": 1.0}))
    parts, intro = run_parts(Inputs(runs=[run]), {}, {})
    assert parts["curves"].data[0].name == "&lt;b onmouseover=alert(1)&gt;kd val_acc"
    comparison = parts["comparison"]
    assert "<td>&lt;b onmouseover=alert(1)&gt;kd</td><td>&lt;i&gt;kd&lt;/i&gt;</td>" in comparison
    assert "<b onmouseover" not in comparison + intro and "<i>kd" not in comparison + intro


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_hostile_class_name_renders_as_text_in_a_browser(hostile_folder_run, tmp_path):
    """In the page plotly.js draws, the name shows literally and its onerror never runs."""
    from energytools.stages.report import report

    out = report([hostile_folder_run["scores"]], tmp_path / "report.html", thumbnails=False)
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'class="main-svg"' in dom  # plotly drew the figures
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]  # the handler never ran
    assert not re.search(r"<img[^>]*onerror", dom)
    assert "&lt;img src=x onerror=document.body.setAttribute('data-pwned','1')&gt;" in dom  # shown as text


def test_console_prints_names_literally(runner, tmp_path):
    """Rich markup in an output path ("[/]" used to crash the final message) prints as it is."""
    out = tmp_path / "[/]run [bold red]:warning:"
    result = invoke(runner, "train", "--model", "cnn_tiny", "--dataset", "digits", "--limit", "100", "--epochs", "1",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert f"done: {out}: best.pt" in " ".join(result.stderr.split())
