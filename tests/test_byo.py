"""Bring your own teacher and data: timm models, Hugging Face folders and Parquet datasets."""
import io
import json
import os
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import invoke

# nothing may come from the Hub: a stray download fails at once instead of hanging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

datasets = pytest.importorskip("datasets")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402  (comes with timm)

datasets.disable_progress_bars()

from energytools.data import DATASETS, DatasetInfo, build_dataset  # noqa: E402
from energytools.models.preprocessed import Preprocessed  # noqa: E402
from energytools.errors import UserError  # noqa: E402
from energytools.models import adapt_to_dataset, create_model, load_model, model_preprocessing  # noqa: E402
from energytools.table import TableMeta  # noqa: E402

NAMES = ["ring", "bar", "dot"]


def images_for(labels, size, mode, seed):
    """Images whose class shows as a bright horizontal band (learnable, and distinct per class)."""
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        array = rng.integers(0, 60, (size, size, 3 if mode == "RGB" else 1))
        array[label * size // 3:(label + 1) * size // 3] += 150
        out.append(Image.fromarray(array.astype(np.uint8).squeeze(-1) if mode == "L" else array.astype(np.uint8)))
    return out


def write_hf_split(path, count, seed, size=16, mode="RGB", names=NAMES):
    """One Parquet file as `datasets` writes it: Image and ClassLabel features in the schema metadata."""
    labels = [i % len(names) for i in range(count)]
    ds = datasets.Dataset.from_dict({"image": images_for(labels, size, mode, seed), "label": labels})
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=names))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


@pytest.fixture
def parquet_root(tmp_path):
    """Train in two shards (row order over sorted files is the canonical order), test in one."""
    root = tmp_path / "pq"
    write_hf_split(root / "data" / "train-00001-of-00002.parquet", 30, seed=1)
    write_hf_split(root / "data" / "train-00000-of-00002.parquet", 30, seed=0)
    write_hf_split(root / "data" / "test-00000-of-00001.parquet", 15, seed=2)
    return root


def pixels(dataset, order):
    """uint8 images of ``dataset`` by sample_id in ``order``, as a float [0, 1] NCHW batch."""
    position = {int(s): i for i, s in enumerate(dataset.sample_ids)}
    return torch.stack([torch.from_numpy(dataset.image(position[int(s)])).permute(2, 0, 1)
                        for s in order]).float() / 255


def build_info(channels, size, classes=()):
    return DatasetInfo("t", 3, channels, size, (0.3,) * channels, (0.4,) * channels, classes=tuple(classes))


# --- Parquet datasets ----------------------------------------------------------------------


def test_classlabel_names_order_and_ids(parquet_root):
    info, images, labels, ids = DATASETS["parquet"](parquet_root, "train")
    assert info.classes == tuple(NAMES) and info.num_classes == 3 and info.in_channels == 3 and info.image_size == 16
    # canonical order: rows of the sorted files, so train-00000 (seed 0) comes first whatever was written first
    assert ids is None and len(images) == 60 and labels.tolist() == [i % 3 for i in range(30)] * 2
    assert np.array_equal(images.load(0), np.asarray(images_for([0], 16, "RGB", seed=0)[0]))
    assert np.array_equal(images.load(30), np.asarray(images_for([0], 16, "RGB", seed=1)[0]))
    train = build_dataset("parquet", "train", parquet_root)
    val = build_dataset("parquet", "val", parquet_root)
    assert sorted(np.concatenate([train.sample_ids, val.sample_ids]).tolist()) == list(range(60))
    assert len(build_dataset("parquet", "test", parquet_root)) == 15
    limited = build_dataset("parquet", "train", parquet_root, limit=12)
    assert len(limited) == 12 and np.bincount(limited.labels).tolist() == [4, 4, 4]
    again = build_dataset("parquet", "train", parquet_root, limit=12)
    assert limited.fingerprint() == again.fingerprint() and limited.fingerprint() != train.fingerprint()


def test_gray_images_without_classlabel_and_resizing(tmp_path):
    root = tmp_path / "plain"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    from io import BytesIO

    def write(path, sizes, labels):
        blobs = []
        for (w, h), label in zip(sizes, labels):
            buffer = BytesIO()
            images_for([label], max(w, h), "L", seed=label)[0].resize((w, h)).save(buffer, format="PNG")
            blobs.append({"bytes": buffer.getvalue(), "path": None})
        pq.write_table(pa.table({"img": pa.array(blobs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                 "label": pa.array(labels, pa.int64())}), path)

    write(root / "train" / "0.parquet", [(12, 12)] * 6 + [(20, 10)] * 3, [0, 1, 4] * 3)
    write(root / "test" / "0.parquet", [(12, 12)] * 3, [0, 1, 4])
    with pytest.raises(UserError, match="image_size=N"):
        build_dataset("parquet", "test", root)
    test = build_dataset("parquet", "test", root, image_size=8)
    # no ClassLabel: the labels as text, up to the largest one
    assert test.info.classes == ("0", "1", "2", "3", "4") and test.info.in_channels == 1
    assert test.image(0).shape == (8, 8, 1)


@pytest.mark.parametrize("damage,needle", [
    ("file", "cannot read Parquet file"),
    ("image", "cannot decode the image in row 1 of"),
    ("label", "label 7, but there are 3 classes"),
    ("string labels", "label column 'label' is string, not integer"),  # in a file after the first
    ("names", "differ from the first train file's"),
])
def test_bad_parquet_is_refused_with_one_line(runner, tmp_path, parquet_root, damage, needle):
    bad = parquet_root / "data" / "test-00000-of-00001.parquet"
    if damage == "file":
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "names":  # the same label numbers meaning other classes
        write_hf_split(bad, 15, seed=2, names=tuple(reversed(NAMES)))
    elif damage == "string labels":
        table = pq.read_table(bad)
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                        pa.array([str(v) for v in table.column("label").to_pylist()])), bad)
    else:
        table = pq.read_table(bad)
        rows = table.to_pylist()
        if damage == "image":
            rows[1]["image"]["bytes"] = b"\x89PNG not really"
        else:
            rows[2]["label"] = 7
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    result = invoke(runner, "train", "--model", "cnn_tiny", "--out", tmp_path / "t", "--dataset", "parquet",
                    "--data-root", parquet_root, "--epochs", "1")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and str(bad) in lines[0], result.stderr
    assert not (tmp_path / "t").exists()


def test_missing_split_names_the_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data/train-"):
        build_dataset("parquet", "train", tmp_path / "empty")


# --- timm ----------------------------------------------------------------------------------


def test_timm_models_by_name_and_their_preprocessing():
    model = create_model("timm:test_resnet", 7, 1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)  # channels and classes adapt
    expected = timm.data.resolve_model_data_config(timm.create_model("test_resnet", pretrained=False))
    got = model_preprocessing("timm:test_resnet")
    assert (got["mean"], got["std"], got["input_size"], got["interpolation"]) == (
        list(expected["mean"]), list(expected["std"]), list(expected["input_size"][1:]), expected["interpolation"])
    assert model_preprocessing("timm:resnet18.tv_in1k")["interpolation"] == "bilinear"
    assert model_preprocessing("resnet8") is None
    with pytest.raises(UserError, match="timm:nope"):
        create_model("timm:nope", 10)


def test_gray_input_averages_an_rgb_preprocessing():
    info = build_info(channels=1, size=8)
    wrapped = Preprocessed(torch.nn.Identity(), info, {"mean": [0.2, 0.4, 0.6], "std": [0.1, 0.2, 0.3],
                                                       "input_size": [8, 8], "interpolation": "bicubic"})
    x = torch.rand(1, 1, 8, 8)
    normalised = (x - info.mean[0]) / info.std[0]
    torch.testing.assert_close(wrapped(normalised), (x - 0.4) / 0.2)


def test_timm_teacher_file_and_parquet_data_through_the_cli(runner, tmp_path, parquet_root):
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=3).eval()
    weights = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), weights)
    scores, shards, run = tmp_path / "scores.parquet", tmp_path / "he-da", tmp_path / "student"
    data = ["--dataset", "parquet", "--data-root", parquet_root]

    result = invoke(runner, "score", "--teacher", weights, "--teacher-arch", "timm:test_resnet", *data,
                    "--out", scores, "--save-logits")
    assert result.exit_code == 0, result.output
    meta = TableMeta.read(scores)
    assert meta.teacher.arch == "timm:test_resnet"
    recorded = dict(meta.teacher.preprocessing)  # the model config's, and where each field came from
    assert recorded.pop("sources") == dict.fromkeys(("input_size", "mean", "std", "interpolation"), "model config")
    assert recorded == model_preprocessing("timm:test_resnet")
    assert meta.data.dataset == "parquet"

    # the stored logits are the model's own forward on its own preprocessing: 160x160, mean/std 0.5
    table = pl.read_parquet(scores)
    train = build_dataset("parquet", "train", parquet_root)

    def own_logits(x):
        with torch.no_grad():
            return teacher((F.interpolate(x, size=(160, 160), mode="bilinear", antialias=True).clamp(0, 1) - 0.5) / 0.5)

    x = pixels(train, table["sample_id"].to_list())
    with torch.no_grad():
        naive = teacher((x - torch.tensor(train.info.mean).view(1, -1, 1, 1))
                        / torch.tensor(train.info.std).view(1, -1, 1, 1))
    stored = torch.from_numpy(np.stack(table["logits"].to_numpy())).float()
    torch.testing.assert_close(stored, own_logits(x).half().float(), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(stored, naive.half().float(), atol=1e-2)  # the dataset's statistics differ

    result = invoke(runner, "augment", "--scores", scores, "--out", shards, "--ratio", "0.3")
    assert result.exit_code == 0, result.output
    shard_rows = pl.read_parquet(shards / "train-*.parquet")
    assert 0 < shard_rows.height <= 0.3 * table.height + 1
    # augment scores its images with the same preprocessing
    augmented = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(row["bytes"])))).permute(2, 0, 1)
                             for row in shard_rows["image"].to_list()]).float() / 255
    torch.testing.assert_close(torch.from_numpy(np.stack(shard_rows["logits"].to_numpy())).float(),
                               own_logits(augmented).half().float(), atol=2e-3, rtol=2e-3)

    result = invoke(runner, "distill", "--scores", scores, "--shards", shards, "--student", "cnn_tiny",
                    "--epochs", "1", "--out", run)
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["augmented_samples"] == shard_rows.height and 0 <= summary["last_test_acc"] <= 100

    result = invoke(runner, "report", scores, shards, run, "--out", tmp_path / "report.html", "--no-images")
    assert result.exit_code == 0, result.output
    assert "timm:test_resnet" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("teacher,needle", [("broken.safetensors", "cannot read checkpoint"),
                                             ("teacher.safetensors", "does not record its dataset: pass --dataset")])
def test_weights_files_from_elsewhere_fail_with_one_line(runner, tmp_path, teacher, needle):
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=3).state_dict(),
              tmp_path / "teacher.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = invoke(runner, "score", "--teacher", tmp_path / teacher, "--teacher-arch", "timm:test_resnet",
                    "--out", tmp_path / "s.parquet", *(["--dataset", "digits"] if teacher.startswith("broken") else []))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr


# --- Hugging Face models -------------------------------------------------------------------


def save_hf_model(directory, names, channels=3, seed=0):
    """A tiny ResNet image classifier with random weights and a processor, as save_pretrained writes them."""
    config = transformers.ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=len(names), id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3], resample=3).save_pretrained(directory)
    return model


def test_hf_folder_loads_offline_with_its_class_names(tmp_path):
    hf_model = save_hf_model(tmp_path / "hf", NAMES)
    model, meta = load_model(tmp_path / "hf")
    assert meta["arch"] == f"hf:{tmp_path / 'hf'}" and meta["class_names"] == NAMES and model.class_names == NAMES
    assert meta["num_classes"] == 3 and meta["in_channels"] == 3 and len(meta["sha256"]) == 64
    assert meta["preprocessing"] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "input_size": [24, 24],
                                     "interpolation": "bicubic",
                                     "source": str(tmp_path / "hf" / "preprocessor_config.json")}
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(pixel_values=x).logits)
    # the same weights as a file with the folder as the architecture
    again, file_meta = load_model(tmp_path / "hf" / "model.safetensors", arch=f"hf:{tmp_path / 'hf'}",
                                  num_classes=3, in_channels=3)
    with torch.no_grad():
        torch.testing.assert_close(again(x), hf_model(pixel_values=x).logits)
    assert file_meta["class_names"] == NAMES and file_meta["preprocessing"] == meta["preprocessing"]
    # as a student: the folder's architecture for other data, random weights
    student = create_model(f"hf:{tmp_path / 'hf'}", 5, 1).eval()
    assert student(torch.randn(2, 1, 16, 16)).shape == (2, 5) and student.class_names is None


def test_hf_teacher_scores_parquet_data_and_class_order_is_checked(runner, tmp_path, parquet_root):
    hf_model = save_hf_model(tmp_path / "hf", NAMES)
    scores = tmp_path / "scores.parquet"
    result = invoke(runner, "score", "--teacher", tmp_path / "hf", "--dataset", "parquet", "--data-root", parquet_root,
                    "--out", scores, "--save-logits")
    assert result.exit_code == 0, result.output
    meta = TableMeta.read(scores)
    assert meta.teacher.class_names == NAMES and meta.teacher.arch.startswith("hf:")
    table = pl.read_parquet(scores)
    x = pixels(build_dataset("parquet", "train", parquet_root), table["sample_id"].to_list())
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        own = hf_model(pixel_values=(F.interpolate(x, size=(24, 24), mode="bicubic", antialias=True).clamp(0, 1)
                                     - mean) / std).logits
    torch.testing.assert_close(torch.from_numpy(np.stack(table["logits"].to_numpy())).float(), own.half().float(),
                               atol=2e-3, rtol=2e-3)

    save_hf_model(tmp_path / "swapped", list(reversed(NAMES)))
    result = invoke(runner, "score", "--teacher", tmp_path / "swapped", "--dataset", "parquet", "--data-root",
                    parquet_root, "--out", tmp_path / "swapped.parquet")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "orders its classes" in lines[0], result.stderr
    assert not (tmp_path / "swapped.parquet").exists()


def test_hf_student_starts_from_its_folders_weights(digits_run, tmp_path):
    """A Hugging Face folder as a pretrained student (`--student hf:DIR --student-init DIR`): the body's
    tensors are the folder's, the 3-class head is re-initialised for the data's 10 classes and the RGB
    stem adapted to gray; the run records what it loaded and the file's sha256."""
    import energytools
    from energytools.models import load_checkpoint

    hf_model = save_hf_model(tmp_path / "hf", NAMES)
    energytools.distill(digits_run["scores"], f"hf:{tmp_path / 'hf'}", tmp_path / "run", method="kd", epochs=1,
                        lr=1e-12, device="cpu", student_init=str(tmp_path / "hf"))  # lr ~0: the weights stay
    record = json.loads((tmp_path / "run" / "config.json").read_text())["student_init_weights"]
    assert record["reinitialised"] == ["model.classifier.1.weight", "model.classifier.1.bias"]
    assert record["adapted_input_channels"] == ["model.resnet.embedder.embedder.convolution.weight 3->1"]
    assert len(record["loaded"]) > 20 and not record["ignored"] and len(record["sha256"]) == 64
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    body = "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"
    torch.testing.assert_close(trained[f"model.{body}"], hf_model.state_dict()[body], atol=1e-6, rtol=0)
    assert trained["model.classifier.1.weight"].shape == (10, 16)


def test_class_names_in_another_language_are_not_an_error():
    info = build_info(3, 8, classes=NAMES)
    model = torch.nn.Identity()
    assert adapt_to_dataset(model, {"class_names": ["anneau", "barre", "point"]}, info) is model
    with pytest.raises(UserError, match="orders its classes"):
        adapt_to_dataset(model, {"class_names": ["dot", "bar", "ring"]}, info)


def test_missing_transformers_is_one_clear_error(monkeypatch, tmp_path):
    save_hf_model(tmp_path / "hf", NAMES)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    with pytest.raises(UserError, match=r"pip install 'energytools\[hf\]'"):
        load_model(tmp_path / "hf")


def test_models_command_mentions_other_libraries(runner):
    result = invoke(runner, "models")
    assert result.exit_code == 0 and "timm:<name>" in result.output and "hf:<dir>" in result.output


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_a_shard_directory_is_a_hugging_face_dataset(digits_run, tmp_path, image_format):
    """load_dataset reads the directory as it is (images decoded, labels named), WebP shards
    (`augment --image-format webp`) too, and a glob over it reads the shards alone."""
    import datasets
    import polars as pl

    from energytools.data.shards import read_shards
    from energytools.stages.augment import AugmentConfig, augment

    shards = digits_run["shards"] if image_format == "png" else augment(AugmentConfig(
        scores=str(digits_run["scores"]), out=str(tmp_path / "webp"), ratio=0.3, image_format="webp"))
    rows = read_shards(shards)
    loaded = datasets.load_dataset(str(shards), cache_dir=str(shards.parent / "hf-cache"))
    train = loaded["train"]
    assert list(loaded) == ["train"] and train.num_rows == rows.height
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["label"].names == [str(d) for d in range(10)]
    first = train[0]
    assert first["image"].size == (8, 8) and first["sample_id"] == rows["sample_id"][0]
    assert first["image"].format == image_format.upper()
    assert pl.read_parquet(shards / "*.parquet").height == rows.height  # nothing but shards matches


@pytest.mark.parametrize("remove, needle", [
    ("config.json", "missing config.json"),
    ("model.safetensors", "missing the weights (model.safetensors or pytorch_model.bin)"),
    ("everything", "holds neither config.json nor the weights"),
])
def test_a_model_folder_says_which_file_it_lacks(runner, tmp_path, remove, needle):
    save_hf_model(tmp_path / "hf", NAMES)
    for file in (tmp_path / "hf").iterdir():
        if remove in (file.name, "everything"):
            file.unlink()
    result = invoke(runner, "score", "--teacher", tmp_path / "hf", "--dataset", "digits", "--out", tmp_path / "s.parquet")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert "does not exist" not in lines[0] and not (tmp_path / "s.parquet").exists()
