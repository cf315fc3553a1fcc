"""A teacher's preprocessing is what it was trained with (issue 31): --teacher-input-size, -mean,
-std and -interpolation override the model config field by field; score says what was used and
records it; augment and distill reuse the table's and refuse a contradicting override."""
import io
import os

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import invoke

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (comes with timm)

from energytools.config import DistillConfig, ScoreConfig, resolve  # noqa: E402
from energytools.data import build_dataset  # noqa: E402
from energytools.data.base import DatasetInfo  # noqa: E402
from energytools.errors import UserError  # noqa: E402
from energytools.pipeline import load_recipe  # noqa: E402
from energytools.preprocessing import (describe_preprocessing, resolve_preprocessing, reuse_preprocessing,  # noqa: E402
                                       student_preprocessing)
from energytools.table import TableMeta  # noqa: E402
from energytools.teacher import open_table_teacher, open_teacher  # noqa: E402

ARCH = "timm:test_resnet"  # pretrained_cfg: 160x160, bilinear, mean = std = 0.5
LIMIT = 30


@pytest.fixture
def teacher(tmp_path):
    """A timm test_resnet for CIFAR-10's 10 classes, saved as a bare state dict (a file from elsewhere)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3).eval()
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), path)
    return model, path


def data_args(root):
    return ["--dataset", "cifar10", "--data-root", root, "--limit", LIMIT]


def pixels(dataset, order):
    """uint8 images of ``dataset`` by sample_id in ``order``, as a float [0, 1] NCHW batch."""
    position = {int(s): i for i, s in enumerate(dataset.sample_ids)}
    return torch.stack([torch.from_numpy(dataset.image(position[int(s)])).permute(2, 0, 1)
                        for s in order]).float() / 255


def stored(frame, column="logits"):
    return torch.from_numpy(np.stack(frame[column].to_numpy())).float()


def score_at_data_size(runner, tmp_path, root, path, *extra):
    scores = tmp_path / "scores.parquet"
    result = invoke(runner, "score", "--teacher", path, "--teacher-arch", ARCH, *data_args(root), "--out", scores,
                    "--save-logits", "--teacher-input-size", "data", *extra)
    assert result.exit_code == 0, result.output
    return scores, result.output


def test_data_size_scores_the_models_own_logits_and_is_recorded(runner, tmp_path, cifar_root, teacher):
    model, path = teacher
    scores, output = score_at_data_size(runner, tmp_path, cifar_root, path)
    table = pl.read_parquet(scores)
    x = pixels(build_dataset("cifar10", "train", cifar_root, limit=LIMIT), table["sample_id"].to_list())
    with torch.no_grad():
        own = model((x - 0.5) / 0.5)  # the model called directly, at 32x32, on its own normalisation
        resized = model((F.interpolate(x, size=(160, 160), mode="bilinear", antialias=True).clamp(0, 1) - 0.5) / 0.5)
    torch.testing.assert_close(stored(table), own.half().float(), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(stored(table), resized.half().float(), atol=1e-2)  # the model config's 160 differs

    meta = TableMeta.read(scores)
    recorded = meta.teacher.preprocessing
    assert recorded["input_size"] == [32, 32] and recorded["mean"] == [0.5, 0.5, 0.5]
    assert recorded["sources"] == {"input_size": "user option", "mean": "model config", "std": "model config",
                                   "interpolation": "model config"}
    assert meta.teacher.preprocessing_overrides == {"input_size": "data"}
    assert "teacher input 32x32, the data's own size (user option)" in output
    assert "model config: timm pretrained_cfg of test_resnet" in output and "resized" not in output


def test_the_summary_names_a_large_resize_and_the_option_that_changes_it(runner, tmp_path, cifar_root, teacher):
    _, path = teacher
    result = invoke(runner, "score", "--teacher", path, "--teacher-arch", ARCH, "--dataset", "cifar10",
                    "--data-root", cifar_root, "--limit", 10, "--out", tmp_path / "s.parquet")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "teacher input 160x160 (model config: timm pretrained_cfg of test_resnet), resized from 32x32" in text
    assert "resized 5x per side to 160x160 (25x the pixels" in text and "--teacher-input-size data" in text
    meta = TableMeta.read(tmp_path / "s.parquet")
    assert meta.teacher.preprocessing["input_size"] == [160, 160] and meta.teacher.preprocessing_overrides is None

    # the resnet18 case of the issue, without a model: 32 -> 224 is 7x per side, 49x the pixels
    info = DatasetInfo("c", 10, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    resnet18 = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": [224, 224],
                "interpolation": "bicubic", "source": "timm pretrained_cfg of resnet18"}
    said = describe_preprocessing(resolve_preprocessing(resnet18, {}, info), info)
    assert "7x per side to 224x224 (49x the pixels" in said and "bicubic" in said
    assert "note" not in describe_preprocessing(resolve_preprocessing(resnet18, {"input_size": "data"}, info), info)


def test_a_mean_and_std_override_reaches_the_model(tmp_path, cifar_root, teacher):
    model, path = teacher
    cfg = resolve(ScoreConfig, {"teacher": str(path), "teacher_input_size": 32, "teacher_mean": "0.2,0.3,0.4",
                                "teacher_std": [0.1, 0.2, 0.3]}, "api")
    assert cfg.preprocessing.given() == {"input_size": 32, "mean": [0.2, 0.3, 0.4], "std": [0.1, 0.2, 0.3]}
    dataset = build_dataset("cifar10", "train", cifar_root, limit=8)
    run = open_teacher(path, dataset, ARCH, "cpu", overrides=cfg.preprocessing.given())
    seen = []
    model_inside = run.model.model  # the timm module under the preprocessing wrapper
    model_inside.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = pixels(dataset, dataset.sample_ids)
    logits = run.logits((x * 255).round().to(torch.uint8), dataset.info)
    mean, std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1), torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, model((x - mean) / std), atol=1e-4, rtol=1e-4)
    assert run.record()["preprocessing"]["sources"]["mean"] == "user option"
    assert run.record()["preprocessing_overrides"]["std"] == [0.1, 0.2, 0.3]


def test_augment_and_distill_reuse_the_tables_preprocessing(runner, tmp_path, cifar_root, teacher):
    model, path = teacher
    scores, _ = score_at_data_size(runner, tmp_path, cifar_root, path)
    meta = TableMeta.read(scores)
    table = pl.read_parquet(scores)

    # the teacher that augment and distill open: the table's 32x32, though the model config says 160
    train = meta.data.build("train")
    reopened = open_table_teacher(meta, train, device="cpu")
    x = pixels(train, table["sample_id"].to_list())
    torch.testing.assert_close(reopened.logits((x * 255).round().to(torch.uint8), train.info).half().float(),
                               stored(table), atol=2e-3, rtol=2e-3)

    shards = tmp_path / "he-da"
    result = invoke(runner, "augment", "--scores", scores, "--out", shards, "--ratio", "0.3")
    assert result.exit_code == 0, result.output
    rows = pl.read_parquet(shards / "train-*.parquet")
    augmented = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(row["bytes"])))).permute(2, 0, 1)
                             for row in rows["image"].to_list()]).float() / 255
    with torch.no_grad():
        own = model((augmented - 0.5) / 0.5)
    torch.testing.assert_close(stored(rows), own.half().float(), atol=2e-3, rtol=2e-3)

    # an override that repeats the table's is accepted; one that contradicts it is one line, exit 2
    result = invoke(runner, "distill", "--scores", scores, "--student", "cnn_tiny", "--epochs", 1, "--device", "cpu",
                    "--teacher-input-size", 32, "--teacher-mean", "0.5", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    for stage, args in (("augment", ["--out", tmp_path / "other"]),
                        ("distill", ["--student", "cnn_tiny", "--epochs", 1, "--out", tmp_path / "run2"])):
        result = invoke(runner, stage, "--scores", scores, *args, "--teacher-input-size", 160)
        assert result.exit_code == 2, result.output
        assert "--teacher-input-size 160 contradicts the score table" in result.output
        assert "input size 32,32 (user option)" in result.output
        assert len([line for line in result.output.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "run2" / "last.pt").exists()


def test_reuse_refuses_only_what_contradicts():
    info = DatasetInfo("c", 10, 3, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    # a table of an energytools checkpoint records None: the dataset's own size and normalisation
    assert reuse_preprocessing(None, {"input_size": "data", "mean": [0.5, 0.4, 0.3]}, info) is None
    assert reuse_preprocessing(None, {"interpolation": "bicubic"}, info) is None  # no resize: never used
    with pytest.raises(UserError, match=r"teacher_std 0.5 contradicts .* std 0.2,0.2,0.2 \(dataset\)"):
        reuse_preprocessing(None, {"std": [0.5]}, info)
    recorded = resolve_preprocessing({"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [64, 64],
                                      "interpolation": "bilinear", "source": "cfg"}, {}, info)
    assert reuse_preprocessing(recorded, {"input_size": 64, "interpolation": "bilinear"}, info) is recorded
    with pytest.raises(UserError, match="teacher_interpolation bicubic contradicts"):
        reuse_preprocessing(recorded, {"interpolation": "bicubic"}, info)
    # overriding an energytools checkpoint's preprocessing starts from the dataset's
    mine = resolve_preprocessing(None, {"mean": [0.1, 0.2, 0.3]}, info)
    assert mine["std"] == [0.2, 0.2, 0.2] and mine["input_size"] == [32, 32]
    assert mine["sources"] == {"input_size": "dataset", "mean": "user option", "std": "dataset",
                               "interpolation": "dataset"}
    assert resolve_preprocessing(None, {"input_size": "data"}, info) is None  # restates the dataset's
    with pytest.raises(UserError, match="teacher_mean has 2 values for 3-channel images"):
        resolve_preprocessing(None, {"mean": [0.1, 0.2]}, info)


def test_options_are_spelled_one_way_from_cli_api_and_recipes(tmp_path):
    for value in (32, "32", " Data ", "data"):
        cfg = resolve(ScoreConfig, {"teacher": "t", "teacher_input_size": value})
        assert cfg.preprocessing.teacher_input_size in ("32", "data")
    for bad in ("big", 0, -3, True):
        with pytest.raises(UserError, match="teacher_input_size must be a positive whole number or 'data'"):
            resolve(ScoreConfig, {"teacher": "t", "teacher_input_size": bad})
    with pytest.raises(UserError, match="teacher_std must be positive"):
        resolve(ScoreConfig, {"teacher": "t", "teacher_std": "0,1,1"}).check()
    with pytest.raises(UserError, match="teacher_interpolation must be one of"):
        resolve(ScoreConfig, {"teacher": "t", "teacher_interpolation": "cubic"}).check()
    # a recipe's finished steps stay fresh when none of the new options is set
    from energytools.pipeline import _content

    assert not {"preprocessing", "student_normalization"} & set(_content(DistillConfig(student="s", out="o")))
    assert "preprocessing" not in _content(ScoreConfig(teacher="t"))
    assert _content(resolve(ScoreConfig, {"teacher": "t", "teacher_input_size": "data"}))["preprocessing"][
        "teacher_input_size"] == "data"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "cifar10"\n[teacher]\ncheckpoint = "t.safetensors"\narch = "timm:resnet18"\n'
                      'input_size = "data"\nmean = [0.5, 0.5, 0.5]\n[score]\nteacher_interpolation = "bicubic"\n')
    loaded = load_recipe(recipe)
    assert loaded.score.preprocessing.given() == {"input_size": "data", "mean": [0.5, 0.5, 0.5],
                                                  "interpolation": "bicubic"}


def test_student_normalization_dataset_or_the_weights_own():
    info = DatasetInfo("c", 10, 3, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert resolve(DistillConfig, {"student": "x", "out": "o"}).student_normalization is None  # the dataset's
    assert student_preprocessing(ARCH, "dataset", info) is None and student_preprocessing(ARCH, None, info) is None
    weights = student_preprocessing(ARCH, "weights", info)
    assert weights["mean"] == [0.5] * 3 and weights["std"] == [0.5] * 3 and weights["input_size"] is None
    assert student_preprocessing("resnet8", "weights", info) is None  # energytools' own: the dataset's
    gray = DatasetInfo("g", 10, 1, 28, (0.3,), (0.3,))
    averaged = [(0.485 + 0.456 + 0.406) / 3]  # an RGB model's mean for gray images
    assert student_preprocessing("timm:resnet18", "weights", gray)["mean"] == pytest.approx(averaged)
    with pytest.raises(UserError, match="student_normalization must be one of dataset, weights"):
        resolve(DistillConfig, {"student": "x", "out": "o", "student_normalization": "imagenet"}).check()
