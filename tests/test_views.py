"""Per-view teacher caches (issue 16): views drawn from the train transform at score time,
replayed exactly by distill without the teacher, top-k logits, per-view temperatures, the
crop regimes, and the engine's host synchronisation."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import StepRecorder, interrupted, invoke, write_idx
from energytools.config import DataConfig, DistillConfig, ScoreConfig, TrainConfig, TrainStageConfig
from energytools.data import build_dataset
from energytools.data.views import (TrainTransform, choose_views, crop_flip, draw_views, render, resized_crop,
                                    uniform)
from energytools.errors import UserError
from energytools.table import TableMeta, load_table


def _fashion_files(root, n_train=300, n_test=60):
    """Fashion-MNIST's idx format; class c has a bright band at rows 2c..2c+3 and a mark at the
    left, so crops and flips change the teacher's logits."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 4, :] += 150
            images[i, 10:14, 1 + c:4 + c] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """A teacher on Fashion-MNIST-format data trained with pad-2 crops, and two tables with 4
    views per sample: full float16 logits and top-3."""
    import energytools

    base = tmp_path_factory.mktemp("views")
    root = _fashion_files(base / "fm")
    energytools.train("cnn_small", base / "teacher", dataset="fashion-mnist", data_root=str(root), crop_pad=2,
                      epochs=4, lr=0.1)
    teacher = base / "teacher" / "best.pt"
    full = energytools.score(teacher, base / "views.parquet", views=4, seed=3, batch_size=64)
    top = energytools.score(teacher, base / "top3.parquet", views=4, seed=3, top_k=3)
    return {"base": base, "root": root, "teacher": teacher, "full": full, "top": top}


# --- drawing and rendering views ---------------------------------------------------------------

def test_a_view_is_a_pure_function_of_its_key():
    transform = TrainTransform("pad-crop", 28, True, 4)
    ids, views = np.arange(1000), np.arange(1000) % 7
    a = draw_views(transform, 5, ids, views)
    b = draw_views(transform, 5, ids[::-1], views[::-1])  # order and batch do not matter
    assert (a.top == b.top[::-1]).all() and (a.flip == b.flip[::-1]).all()
    one = draw_views(transform, 5, ids[17], views[17])
    assert (int(one.top), int(one.left), bool(one.flip)) == (a.top[17], a.left[17], a.flip[17])
    assert a.top.min() == 0 and a.top.max() == 8 and a.left.min() == 0 and a.left.max() == 8
    assert 0.45 < a.flip.mean() < 0.55
    other = draw_views(transform, 6, ids, views)
    assert (other.top != a.top).mean() > 0.8  # another seed, other views
    assert abs(uniform(1, 2, np.arange(100_000)).mean() - 0.5) < 0.005
    chosen = choose_views(0, 3, np.arange(10_000), 4)
    assert set(np.unique(chosen)) == {0, 1, 2, 3} and (chosen == choose_views(0, 3, np.arange(10_000), 4)).all()
    assert (chosen != choose_views(0, 4, np.arange(10_000), 4)).mean() > 0.6  # a new choice every epoch


def test_crop_flip_is_pad_crop_then_mirror():
    transform = TrainTransform("pad-crop", 6, True, 2)
    images = torch.randint(0, 255, (20, 3, 6, 6), dtype=torch.uint8)
    params = draw_views(transform, 0, np.arange(20), 0)
    out = crop_flip(images, params, transform)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(20):
        expected = padded[i, :, params.top[i]:params.top[i] + 6, params.left[i]:params.left[i] + 6]
        assert torch.equal(out[i], expected.flip(-1) if params.flip[i] else expected)
    assert out.stride() == (36 * 3, 36, 6, 1)  # NCHW strides, whatever the gather made
    gray = crop_flip(images[:, :1].contiguous(), params, transform)
    assert gray.stride() == (36, 36, 6, 1)  # not the (36, 1, 6, 1) that also counts as contiguous for C = 1


def test_train_augment_crops_as_before():
    """The batched crop of the random (non-replayed) path draws and cuts exactly what the old
    per-sample loop did, so runs from before keep their numbers."""
    from energytools.data.base import DatasetInfo
    from energytools.data.transforms import train_augment

    info = DatasetInfo("c", 10, 3, 8, (0.5,) * 3, (0.2,) * 3, train_flip=True, train_crop_pad=3)
    images = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    out, flipped = train_augment(images, info, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)  # the old code, verbatim
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3))
    offsets = torch.randint(0, 7, (16, 2), generator=generator)
    old = torch.stack([padded[i, :, y:y + 8, x:x + 8] for i, (y, x) in enumerate(offsets.tolist())])
    old_flipped = torch.rand(16, generator=generator) < 0.5
    old[old_flipped] = old[old_flipped].flip(-1)
    assert torch.equal(out, old) and torch.equal(flipped, old_flipped)
    assert out.stride() == old.stride()  # the memory format picks the conv kernel, hence the last bits
    gray = DatasetInfo("g", 10, 1, 8, (0.5,), (0.2,), train_flip=False, train_crop_pad=2)
    assert train_augment(images[:, :1], gray, torch.Generator())[0].stride() == (64, 64, 8, 1)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("crop_pad,flip", [(3, True), (0, True), (2, False)])
def test_the_augmentation_drawn_on_the_cpu_applies_on_any_device_with_the_same_bytes(crop_pad, flip):
    """The loop draws crops and flips on the CPU generator (the draws of before) and applies
    them after the copy to the device: the same bytes, strides and flips as train_augment, and
    no data-dependent shape or host read, so a GPU applies them without waiting."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from energytools.data.base import DatasetInfo
    from energytools.data.transforms import apply_augment, draw_augment, train_augment

    info = DatasetInfo("c", 10, 3, 8, (0.5,) * 3, (0.2,) * 3, train_flip=flip, train_crop_pad=crop_pad)
    images = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    expected, flipped = train_augment(images, info, torch.Generator().manual_seed(4))
    for device in _devices():
        draw = draw_augment(16, info, torch.Generator().manual_seed(4))
        out = apply_augment(images.to(device), info, draw)
        assert out.device.type == device and torch.equal(out.cpu(), expected), device
        assert out.stride() == expected.stride() and torch.equal(draw.flipped, flipped)
    draw = draw_augment(16, info, torch.Generator().manual_seed(4))
    assert draw.any_flipped == flip  # 16 fair coins: some land heads
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # boolean indexing or .item() would raise here
        assert apply_augment(mode.from_tensor(images), info, draw).shape == images.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs cuda")
def test_with_workers_a_training_batch_is_pinned_once(tmp_path, monkeypatch):
    """The workers' batch is pinned by the DataLoader and goes to the GPU as it is: the main thread
    pins no image batch (before: the batch augmented on the CPU after the workers was pinned again)."""
    import threading

    from energytools.stages.train import train

    pinned_here, pin = [], torch.Tensor.pin_memory

    def noting(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread() and self.dim() == 4:
            pinned_here.append(tuple(self.shape))
        return pin(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", noting)
    train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"),
                           data=DataConfig(dataset="digits", limit=200, eval_limit=60, crop_pad=2),
                           train=TrainConfig(epochs=1, batch_size=32, num_workers=1, device="cuda")))
    assert pinned_here == []


def test_resized_crop_boxes_and_pixels_follow_torchvision():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    transform = TrainTransform("resized-crop", 16)
    heights, widths = np.array([40, 60, 23, 300]), np.array([50, 31, 200, 41])
    ids = np.arange(4000)
    params = draw_views(transform, 0, ids, 0, heights[ids % 4], widths[ids % 4])
    H, W = heights[ids % 4], widths[ids % 4]
    assert (params.top >= 0).all() and (params.left >= 0).all()
    assert (params.top + params.height <= H).all() and (params.left + params.width <= W).all()
    area = params.height * params.width / (H * W)
    assert area.min() >= 0.05 and area.max() <= 1.0 and area.mean() < 0.7  # scale (0.08, 1) up to rounding
    ratio = params.width / params.height
    tried = area < 1  # not the centre fallback
    assert (ratio[tried] > 0.6).all() and (ratio[tried] < 1.6).all()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    for i in range(0, 40, 4):  # the pixels: torchvision's resized_crop of the same box, then the flip
        mine = resized_crop(image, params, i, 16)
        theirs = TF.resized_crop(image, int(params.top[i]), int(params.left[i]), int(params.height[i]),
                                 int(params.width[i]), [16, 16], InterpolationMode.BILINEAR, antialias=True)
        if params.flip[i]:
            theirs = TF.hflip(theirs)
        assert np.array_equal(mine, np.asarray(theirs))


def _imagefolder(root, sizes=((40, 50), (64, 48), (33, 90))):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(9):
                h, w = sizes[i % len(sizes)]
                array = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                array[:, : w // 3, c] = 250
                Image.fromarray(array).save(folder / f"{i}.png")
    return root


def test_imagefolder_trains_with_random_resized_crops_and_evaluates_with_a_centre_crop(tmp_path, monkeypatch):
    import torchvision.transforms as T

    root = _imagefolder(tmp_path / "data")
    test = build_dataset("imagefolder", "test", root, image_size=16)
    train = build_dataset("imagefolder", "train", root, image_size=16)
    assert train.info.train_transform == TrainTransform("resized-crop", 16)
    reference = T.Compose([T.Resize(round(16 / 0.875)), T.CenterCrop(16)])  # 18 -> 16, as 256 -> 224
    monkeypatch.setenv("ENERGYTOOLS_IMAGE_DECODER", "pil")
    with_pil = build_dataset("imagefolder", "test", root, image_size=16)
    for i in range(len(test)):
        with Image.open(root / test.path(i)) as image:
            expected = np.asarray(reference(image.convert("RGB")))
        assert np.array_equal(with_pil[i][0].permute(1, 2, 0).numpy(), expected)  # torchvision's PIL transform
        # torchvision's decoder and uint8 resize (the default): the same box, pixels within one level
        assert np.abs(test[i][0].permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max() <= 1
    two = np.broadcast_to(np.arange(2), (len(train), 2))
    images, flips, labels, ids = render(train, np.arange(len(train)), two, 0)
    assert images.shape == (len(train), 2, 3, 16, 16) and labels.tolist() == train.labels.tolist()
    assert not torch.equal(images[:, 0], images[:, 1])
    again = render(train, np.arange(len(train))[::-1].copy(), two, 0)[0]
    assert torch.equal(again.flip(0), images)  # any order, the same pixels
    with pytest.raises(UserError, match="RandomResizedCrop"):
        build_dataset("imagefolder", "train", root, image_size=16, crop_pad=2)


# --- score --views --------------------------------------------------------------------------------

def test_score_views_metadata_and_columns(crop_run):
    frame, meta = load_table(crop_run["full"])
    assert meta.has_views and meta.views.count == 4 and meta.views.seed == 3 and meta.views.top_k is None
    assert TrainTransform.from_dict(meta.views.transform) == TrainTransform("pad-crop", 28, True, 2)
    assert meta.views.description == "pad-2 crop to 28 + flip"
    raw = json.loads(pq.read_schema(crop_run["full"]).metadata[b"energytools"])
    assert meta.to_json() == raw and TableMeta.from_json(raw, "x", meta.columns) == meta
    table = pq.read_table(crop_run["full"])
    assert str(table.schema.field("view_logits").type).count("list") == 2
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["view_energy"]) == 4 and len(row["view_logits"]) == 4 and len(row["view_logits"][0]) == 10
    # the clean-image row is what it was without views
    plain, _ = load_table(energytools_score(crop_run, "plain.parquet"))
    for column in ("energy", "energy_group", "temperature", "pred"):
        assert frame[column].to_list() == plain[column].to_list()


def energytools_score(run, name, **kwargs):
    import energytools

    path = run["base"] / name
    if not path.exists():
        energytools.score(run["teacher"], path, **kwargs)
    return path


def test_stored_view_logits_are_the_teacher_on_the_rendered_view(crop_run):
    from energytools.energy import energy
    from energytools.models import load_model
    from energytools.view_logits import read_views

    frame, meta = load_table(crop_run["full"])
    train = DataConfig(dataset="fashion-mnist", data_root=str(crop_run["root"]), crop_pad=2).build("train")
    teacher, _ = load_model(crop_run["teacher"])
    stored = read_views(crop_run["full"], meta, 10)
    order = np.argsort(train.sample_ids)
    assert (train.sample_ids[order] == frame["sample_id"].to_numpy()).all()
    index = order[:40]
    views = np.broadcast_to(np.arange(4), (40, 4))
    images = render(train, index, views, seed=3)[0].flatten(0, 1)
    from energytools.data.transforms import normalize

    with torch.no_grad():
        logits = teacher(normalize(images, train.info)).view(40, 4, 10)
    torch.testing.assert_close(torch.from_numpy(stored["view_logits"][:40]).float(), logits, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(stored["view_energy"][:40]), energy(logits.flatten(0, 1)).view(40, 4),
                               atol=1e-4, rtol=1e-5)
    assert (np.ptp(stored["view_energy"], axis=1) > 1e-3).mean() > 0.5  # the views differ, so the test can tell


# --- distill replays the views -----------------------------------------------------------------

@pytest.mark.parametrize("table", ["full", "top"])
def test_distill_replays_each_view_exactly_without_the_teacher(crop_run, tmp_path, monkeypatch, table):
    import energytools.stages.distill as stage
    from energytools.data.transforms import normalize
    from energytools.models import load_model
    from energytools.view_logits import topk_expand

    absent = str(tmp_path / "no-teacher.pt")  # every route to the teacher opens this file: it is not there
    with pytest.raises(UserError, match="no-teacher.pt"):  # the control: a run that needs the teacher fails
        stage.distill(DistillConfig(scores=str(crop_run[table]), student="cnn_tiny", out=str(tmp_path / "online"),
                                    method="kd", teacher=absent, train=TrainConfig(epochs=1)))
    recorder = StepRecorder()
    stage.distill(DistillConfig(scores=str(crop_run[table]), student="cnn_tiny", out=str(tmp_path / "d"),
                                method="kd", cached_logits=True, teacher=absent,
                                train=TrainConfig(epochs=2, batch_size=64, seed=5)), on_step=recorder)
    steps, batches = recorder.steps, recorder.batches
    train = DataConfig(dataset="fashion-mnist", data_root=str(crop_run["root"]), crop_pad=2).build("train")
    position = {int(s): i for i, s in enumerate(train.sample_ids)}
    teacher, _ = load_model(crop_run["teacher"])
    assert len(steps) == len(batches) == 2 * math.ceil(len(train) / 64)
    for (images, info), batch in zip(steps, batches):
        ids = batch.sample_ids.numpy()
        assert torch.equal(batch.views, torch.from_numpy(choose_views(5, batch.epoch, ids, 4)))
        expected = render(train, np.array([position[i] for i in ids]), batch.views.numpy(), seed=3)[0][:, 0]
        assert torch.equal(images, normalize(expected, train.info))  # the exact pixels score saw
        with torch.no_grad():
            direct = teacher(images)
        if table == "full":
            torch.testing.assert_close(info.teacher_logits, direct, atol=2e-2, rtol=2e-3)
        else:  # the 3 largest logits are the teacher's; the rest share the tail's mass
            top = direct.topk(3, dim=1)
            torch.testing.assert_close(info.teacher_logits.gather(1, top.indices), top.values, atol=2e-2, rtol=2e-3)
            assert torch.equal(info.teacher_logits.topk(3, dim=1).indices.sort(1).values, top.indices.sort(1).values)
    views = torch.cat([b.views for b in batches])
    assert set(views.tolist()) == {0, 1, 2, 3}
    assert topk_expand  # imported for the reader


def test_replay_is_the_same_with_workers_and_after_resume(crop_run, tmp_path, monkeypatch):
    from energytools.stages.distill import distill

    def run(out, workers=0, resume=False, on_step=None):
        return distill(DistillConfig(scores=str(crop_run["full"]), student="cnn_tiny", out=str(tmp_path / out),
                                     method="energy-kd", cached_logits=True, temperature_source="views",
                                     resume=resume, train=TrainConfig(epochs=3, batch_size=64, seed=1,
                                                                      num_workers=workers)), on_step=on_step)

    def weights(out):
        return torch.load(tmp_path / out / "last.pt", weights_only=True)["model"]

    run("zero")
    run("two", workers=2)
    interrupted(lambda on_step: run("resumed", on_step=on_step))  # in the third epoch
    run("resumed", resume=True)
    a, b, c = weights("zero"), weights("two"), weights("resumed")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_views_temperatures_come_from_each_views_energy(crop_run, tmp_path, monkeypatch):
    from energytools.stages.distill import distill
    from energytools.temperatures import fit_view_groups
    from energytools.view_logits import read_views

    frame, meta = load_table(crop_run["full"])
    energies = read_views(crop_run["full"], meta, 10)["view_energy"]
    fitted, temps, _ = fit_view_groups(meta.rule, energies, frame["sample_id"].to_numpy())
    assert (temps == 6.0).sum() == int(0.2 * temps.size) and (temps == 2.0).sum() == int(0.2 * temps.size)
    expected = {(int(s), v): temps[i, v] for i, s in enumerate(frame["sample_id"]) for v in range(4)}
    recorder = StepRecorder()
    distill(DistillConfig(scores=str(crop_run["full"]), student="cnn_tiny", out=str(tmp_path / "d"),
                          method="energy-kd", cached_logits=True, temperature_source="views",
                          train=TrainConfig(epochs=1, batch_size=64)), on_step=recorder)
    steps, batches = recorder.steps, recorder.batches
    differs = 0
    clean = dict(zip(frame["sample_id"].to_list(), frame["temperature"].to_list()))
    for (_, info), batch in zip(steps, batches):
        for k, (sample_id, view) in enumerate(zip(batch.sample_ids.tolist(), batch.views.tolist())):
            assert info.temperature[k].item() == expected[(sample_id, view)]
            differs += expected[(sample_id, view)] != clean[sample_id]
    assert differs > 0  # a view's group is not always its clean image's
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["temperature_plan"]["view_thresholds"] == fitted.thresholds
    assert config["replayed_views"]["count"] == 4


def test_online_teacher_with_view_temperatures_replays_views_too(crop_run, tmp_path, monkeypatch):
    from energytools.stages.distill import distill

    recorder = StepRecorder()
    distill(DistillConfig(scores=str(crop_run["full"]), student="cnn_tiny", out=str(tmp_path / "d"),
                          method="energy-kd", temperature_source="views", train=TrainConfig(epochs=1, batch_size=128)), on_step=recorder)
    batches = recorder.batches
    assert all(b.views is not None for b in batches)


# --- refusals -----------------------------------------------------------------------------------

def _with_views_meta(source, target, change):
    table = pq.read_table(source)
    raw = json.loads(table.schema.metadata[b"energytools"])
    change(raw)
    pq.write_table(table.replace_schema_metadata({b"energytools": json.dumps(raw).encode()}), target)
    return target


@pytest.mark.parametrize("change,needle", [
    (lambda raw: raw["views"]["transform"].update(pad=4), "holds views of pad-4 crop to 28 + flip, but fashion-mnist "
                                                          "trains with pad-2 crop to 28 + flip"),
    (lambda raw: raw["views"]["transform"].update(kind="flip"), "holds views of flip"),
    (lambda raw: raw["views"].update(count=5), "column 'view_energy' does not hold 5 values in every row"),
])
def test_a_table_whose_views_do_not_match_is_refused_with_one_line(crop_run, tmp_path, runner, change, needle):
    path = _with_views_meta(crop_run["full"], tmp_path / "variant.parquet", change)
    result = invoke(runner, "distill", "--scores", path, "--student", "cnn_tiny", "--out", tmp_path / "d",
                    "--cached-logits", "--method", "kd")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "d").exists()


def test_cached_logits_on_a_cropping_dataset_need_views(crop_run, tmp_path, runner):
    plain = energytools_score(crop_run, "logits.parquet", save_logits=True)
    result = invoke(runner, "distill", "--scores", plain, "--student", "cnn_tiny", "--out", tmp_path / "d",
                    "--cached-logits", "--method", "kd")
    assert result.exit_code == 2 and "re-score with --views K" in result.stderr
    result = invoke(runner, "distill", "--scores", plain, "--student", "cnn_tiny", "--out", tmp_path / "e",
                    "--temperature-source", "views")
    assert result.exit_code == 2 and "needs a table scored with --views K" in result.stderr
    result = invoke(runner, "score", "--teacher", crop_run["teacher"], "--out", tmp_path / "s.parquet", "--views", "2",
                    "--top-k", "10")
    assert result.exit_code == 2 and "smaller than the 10 classes" in result.stderr
    result = invoke(runner, "score", "--teacher", crop_run["teacher"], "--out", tmp_path / "s.parquet", "--top-k", "3")
    assert result.exit_code == 2 and "needs --views K" in result.stderr


# --- top-k -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes,k,scale", [(100, 10, 3.0), (1000, 10, 2.0), (1000, 50, 4.0), (10, 3, 5.0)])
def test_topk_reconstruction_error_is_bounded(classes, k, scale):
    """At T = T_E the rebuilt softmax keeps the top-k probabilities and the tail mass exactly, so
    KL(p || rebuilt) <= P_tail * log(C - k); the rebuilt energy is the true energy."""
    from energytools.energy import energy
    from energytools.view_logits import topk_compress, topk_expand

    generator = torch.Generator().manual_seed(classes + k)
    logits = torch.randn(512, classes, generator=generator) * scale
    logits[torch.arange(512), torch.randint(0, classes, (512,), generator=generator)] += 3 * scale  # a winner
    index, value, fill = topk_compress(logits, k, 4.0)
    rebuilt = topk_expand(torch.from_numpy(index), torch.from_numpy(value), torch.from_numpy(fill), classes)
    assert index.dtype == np.int16
    torch.testing.assert_close(energy(rebuilt, 4.0), energy(logits, 4.0), atol=5e-3 * scale, rtol=1e-3)
    log_p = torch.log_softmax(logits / 4, dim=1)
    log_q = torch.log_softmax(rebuilt / 4, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    tail = 1 - log_p.exp().gather(1, logits.topk(k, dim=1).indices).sum(1)
    bound = tail * math.log(classes - k) + 2e-3  # + float16 rounding of the kept logits
    assert (kl <= bound).all(), (kl - bound).max()
    assert kl.mean() < 0.5 * (tail * math.log(classes - k)).mean() + 1e-3  # well inside it on average


def test_topk_table_rebuilds_the_view_energy(crop_run):
    from energytools.energy import energy
    from energytools.view_logits import read_views, topk_expand

    _, meta = load_table(crop_run["top"])
    assert meta.views.top_k == 3
    stored = read_views(crop_run["top"], meta, 10)
    assert stored["view_topk_index"].dtype == np.int16 and stored["view_topk_logit"].shape[1:] == (4, 3)
    rebuilt = topk_expand(torch.from_numpy(stored["view_topk_index"].reshape(-1, 3)),
                          torch.from_numpy(stored["view_topk_logit"].reshape(-1, 3)),
                          torch.from_numpy(stored["view_fill"].reshape(-1)), 10)
    torch.testing.assert_close(energy(rebuilt, meta.energy_temperature),
                               torch.from_numpy(stored["view_energy"].reshape(-1)), atol=2e-2, rtol=1e-3)


# --- imagefolder end to end -------------------------------------------------------------------------

def test_imagefolder_cached_views_replay_the_resized_crops(tmp_path, monkeypatch):
    import energytools
    from energytools.data.transforms import normalize

    root = _imagefolder(tmp_path / "data")
    energytools.train("cnn_tiny", tmp_path / "t", dataset="imagefolder", data_root=str(root), image_size=16, epochs=1,
                      batch_size=8)
    table = energytools.score(tmp_path / "t" / "best.pt", tmp_path / "s.parquet", views=3, num_workers=2)
    _, meta = load_table(table)
    assert meta.views.transform["kind"] == "resized-crop" and "RandomResizedCrop(16" in meta.views.description
    recorder = StepRecorder()
    energytools.distill(table, "cnn_tiny", tmp_path / "d", method="kd", cached_logits=True, epochs=1, batch_size=8, on_step=recorder)
    steps, batches = recorder.steps, recorder.batches
    train = build_dataset("imagefolder", "train", root, image_size=16)
    position = {int(s): i for i, s in enumerate(train.sample_ids)}
    for (images, _), batch in zip(steps, batches):
        expected = render(train, np.array([position[i] for i in batch.sample_ids.tolist()]), batch.views.numpy(), 0)
        assert torch.equal(images, normalize(expected[0][:, 0], train.info))


# --- the crop option, the engine, precision --------------------------------------------------------

def test_fashion_mnist_crop_option_from_cli_and_recipe(tmp_path, runner):
    import tomllib

    from energytools.pipeline import load_recipe

    result = invoke(runner, "train", "--model", "cnn_tiny", "--dataset", "fashion-mnist", "--crop-pad", "2",
                    "--out", tmp_path / "t", "--print-config")
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["data"]["crop_pad"] == 2
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "fashion-mnist"\ncrop_pad = 2\n[teacher]\nmodel = "cnn_tiny"\n'
                      '[score]\nviews = 4\ntop_k = 3\n')
    loaded = load_recipe(recipe)
    assert loaded.data.crop_pad == 2 and loaded.score.views == 4 and loaded.score.top_k == 3
    root = _fashion_files(tmp_path / "fm", 100, 20)
    info = DataConfig(dataset="fashion-mnist", data_root=str(root), crop_pad=2).build("train").info
    assert info.train_transform == TrainTransform("pad-crop", 28, True, 2)
    assert DataConfig(dataset="fashion-mnist", data_root=str(root)).build("train").info.train_transform.kind == "flip"


def _count_host_reads(monkeypatch):
    reads = {"n": 0}
    for name in ("item", "__float__", "__bool__", "tolist", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("sync_every", [0, 4])
def test_training_reads_the_loss_from_the_device_once_per_epoch(tmp_path, monkeypatch, sync_every):
    """No host read per step: the reads of an epoch do not grow with its steps (digits: no flip,
    so the augmentation makes no read either)."""
    from energytools.stages.train import train

    def reads_for(batch_size, out):
        reads = _count_host_reads(monkeypatch)
        train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / out), data=DataConfig(dataset="digits", limit=320,
                                                                                          eval_limit=50),
                               train=TrainConfig(epochs=1, batch_size=batch_size, sync_every=sync_every,
                                                 channels_last=True)))
        monkeypatch.undo()
        return reads["n"]

    few, many = reads_for(64, "few"), reads_for(16, "many")  # 5 steps, 20 steps
    if sync_every == 0:
        assert few == many and few <= 12  # a handful per run, whatever the number of steps
    else:
        assert many - few == 20 // 4 - 5 // 4


def test_divergence_is_still_one_clear_error(tmp_path):
    from energytools.stages.train import train

    with pytest.raises(UserError, match="training diverged at epoch 1"):
        train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"),
                               data=DataConfig(dataset="digits", limit=200, eval_limit=50),
                               train=TrainConfig(epochs=1, lr=1e6, sync_every=2)))


def test_float32_exact_turns_tf32_off_on_cuda_and_restores_it():
    from energytools.engine import float32_exact

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with float32_exact(torch.device("cuda")):  # only flags: no CUDA device needed to check them
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with float32_exact(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    assert ScoreConfig(teacher="t").amp is False  # float32 energies unless autocast is asked for


@pytest.mark.parametrize("workers", [0, 2])
def test_the_random_path_draws_what_a_loader_made_every_epoch_drew(tmp_path, monkeypatch, workers):
    """One loader for the run (persistent workers) must not change a run without views: each
    epoch's order and flips are those of the loader the engine made every epoch before."""
    from energytools.data.base import collate
    from energytools.data.transforms import train_augment
    from energytools.stages.train import train

    root = _fashion_files(tmp_path / "fm", 200, 20)
    data = DataConfig(dataset="fashion-mnist", data_root=str(root))
    recorder = StepRecorder()
    train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / "t"), data=data,
                           train=TrainConfig(epochs=3, batch_size=32, seed=4, num_workers=workers)), on_step=recorder)
    batches = recorder.batches
    train_set = data.build("train")
    expected = []
    for epoch in range(3):
        generator = torch.Generator().manual_seed(4 * 1_000_003 + epoch * 1_009)
        loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, generator=generator,
                                             num_workers=workers, collate_fn=collate)
        for images, _labels, ids in loader:
            expected.append((ids, train_augment(images, train_set.info, generator)[1]))
    assert len(batches) == len(expected)
    for batch, (ids, flipped) in zip(batches, expected):
        assert torch.equal(batch.sample_ids, ids) and torch.equal(batch.flipped, flipped)


def test_online_he_da_takes_high_energy_views_by_view_energy(crop_run, tmp_path, monkeypatch):
    from energytools.stages.distill import distill
    from energytools.temperatures import fit_view_groups
    from energytools.view_logits import read_views

    frame, meta = load_table(crop_run["full"])
    energies = read_views(crop_run["full"], meta, 10)["view_energy"]
    _, _, high = fit_view_groups(meta.rule, energies, frame["sample_id"].to_numpy())
    expected = {(int(s), v): bool(high[i, v]) for i, s in enumerate(frame["sample_id"]) for v in range(4)}
    recorder = StepRecorder()
    distill(DistillConfig(scores=str(crop_run["full"]), student="cnn_tiny", out=str(tmp_path / "d"), method="kd",
                          cached_logits=True, temperature_source="views", he_da="online",
                          train=TrainConfig(epochs=1, batch_size=64)), on_step=recorder)
    masks, batches = [info.high for _, info in recorder.steps], recorder.batches
    assert len(masks) == len(batches) > 0
    for mask, batch in zip(masks, batches):
        assert mask.tolist() == [expected[(s, v)] for s, v in zip(batch.sample_ids.tolist(), batch.views.tolist())]


# --- HE-DA shards replay their views too ------------------------------------------------------------

def shards_of(run, table: str):
    """HE-DA shards of a 4-view table: augment scores the table's views of every new image."""
    import energytools

    out = run["base"] / f"he-da-{table}"
    if not (out / "manifest.json").exists():
        energytools.augment(run[table], out, ratio=0.3, seed=2, shard_size=50)
    return out


@pytest.fixture(scope="module")
def crop_shards(crop_run):
    return shards_of(crop_run, "full")


def test_shards_store_the_teacher_on_their_own_views(crop_run, crop_shards):
    from energytools.data.base import ArrayImages, ImageSet
    from energytools.data.shards import shard_dataset
    from energytools.data.transforms import normalize
    from energytools.models import load_model

    train = DataConfig(dataset="fashion-mnist", data_root=str(crop_run["root"]), crop_pad=2).build("train")
    shard_set, rows = shard_dataset(crop_shards, train.info)
    assert rows.height == round(0.3 * load_table(crop_run["full"])[0].height) > 0
    assert {"view_energy", "view_logits"} <= set(rows.columns)
    assert (rows["sample_id"].to_numpy() >= 1 << 62).all()  # the shard's own ids key its views
    views = np.broadcast_to(np.arange(4), (rows.height, 4))
    images = render(shard_set, np.arange(rows.height), views, seed=3)[0].flatten(0, 1)
    teacher, _ = load_model(crop_run["teacher"])
    with torch.no_grad():
        direct = teacher(normalize(images, train.info)).view(rows.height, 4, 10)
    stored = torch.tensor(np.array(rows["view_logits"].to_list(), dtype=np.float32))
    torch.testing.assert_close(stored, direct, atol=2e-2, rtol=2e-3)
    assert isinstance(shard_set.images, ArrayImages) and isinstance(shard_set, ImageSet)


@pytest.mark.parametrize("table", ["full", "top"])
def test_cached_views_train_on_shards_without_the_teacher(crop_run, tmp_path, monkeypatch, table):
    import energytools.stages.distill as stage
    from energytools.models import load_model

    shards = shards_of(crop_run, table)  # made before the teacher is fenced off
    recorder = StepRecorder()
    stage.distill(DistillConfig(scores=str(crop_run[table]), student="cnn_tiny", out=str(tmp_path / "d"),
                                method="kd", cached_logits=True, shards=[str(shards)],
                                teacher=str(tmp_path / "no-teacher.pt"),  # the teacher is never opened
                                train=TrainConfig(epochs=1, batch_size=64, seed=5)), on_step=recorder)
    steps, batches = recorder.steps, recorder.batches
    teacher, _ = load_model(crop_run["teacher"])
    ids = torch.cat([b.sample_ids for b in batches])
    shard_rows = json.loads((shards / "manifest.json").read_text())["rows"]
    assert len(ids) == load_table(crop_run[table])[0].height + shard_rows and (ids >= 1 << 62).sum() == shard_rows
    for (images, info), _batch in zip(steps, batches):  # shard rows too: the logits of the view trained on
        with torch.no_grad():
            direct = teacher(images)
        if table == "full":
            torch.testing.assert_close(info.teacher_logits, direct, atol=2e-2, rtol=2e-3)
        else:
            top = direct.topk(3, dim=1)
            torch.testing.assert_close(info.teacher_logits.gather(1, top.indices), top.values, atol=2e-2, rtol=2e-3)


def test_shard_views_take_the_dataset_views_thresholds(crop_run, crop_shards, tmp_path, monkeypatch):
    from energytools.data.shards import read_shards
    from energytools.stages.distill import distill
    from energytools.temperatures import fit_view_groups
    from energytools.view_logits import read_views

    frame, meta = load_table(crop_run["full"])
    fitted, _, _ = fit_view_groups(meta.rule, read_views(crop_run["full"], meta, 10)["view_energy"],
                                   frame["sample_id"].to_numpy())
    shard_energy = dict(zip(read_shards(crop_shards)["sample_id"].to_list(),
                            read_shards(crop_shards)["view_energy"].to_list()))
    recorder = StepRecorder()
    distill(DistillConfig(scores=str(crop_run["full"]), student="cnn_tiny", out=str(tmp_path / "d"),
                          method="energy-kd", cached_logits=True, temperature_source="views",
                          shards=[str(crop_shards)], train=TrainConfig(epochs=1, batch_size=64)), on_step=recorder)
    steps, batches = recorder.steps, recorder.batches
    seen = set()
    for (_, info), batch in zip(steps, batches):
        for k, (sample_id, view) in enumerate(zip(batch.sample_ids.tolist(), batch.views.tolist())):
            if sample_id in shard_energy:
                _, temps = fitted.assign(np.array([shard_energy[sample_id][view]]), np.array([sample_id]))
                assert info.temperature[k].item() == pytest.approx(temps[0])
                seen.add(float(temps[0]))
    assert len(seen) >= 2  # the shard's views fall in more than one group


def test_shards_without_views_are_refused_with_one_line(crop_run, crop_shards, tmp_path, runner):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(crop_shards, old)
    for path in old.glob("train-*.parquet"):
        table = pq.read_table(path)
        keep = [n for n in table.column_names if not n.startswith("view_")]
        pq.write_table(table.select(keep).replace_schema_metadata(table.schema.metadata), path)
    result = invoke(runner, "distill", "--scores", crop_run["full"], "--student", "cnn_tiny", "--out", tmp_path / "d",
                    "--method", "kd", "--cached-logits", "--shards", old)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "hold no per-view logits" in lines[0], result.output


def test_view_shards_are_compressed_and_the_same_bytes_with_workers(crop_run, tmp_path):
    import energytools

    one = energytools.augment(crop_run["full"], tmp_path / "one", ratio=0.3, seed=2, shard_size=50)
    two = energytools.augment(crop_run["full"], tmp_path / "two", ratio=0.3, seed=2, shard_size=50, workers=2)
    files = sorted(one.glob("train-*.parquet"))
    assert len(files) == 2
    for path in files:
        assert path.read_bytes() == (two / path.name).read_bytes()
        group = pq.ParquetFile(path).metadata.row_group(0)
        codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
        assert codecs.pop("image.bytes") == "UNCOMPRESSED"  # PNG already is
        assert codecs["view_logits.list.element.list.element"] == "ZSTD"
        assert set(codecs.values()) == {"ZSTD"}, codecs
