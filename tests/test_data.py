import numpy as np
import pytest
from PIL import Image

from energytools.data import build_dataset, long_tail_counts
from energytools.data.subsets import carve_validation, stratified_limit
from energytools.data.synthetic import write_image_folder
from energytools.errors import UserError


def test_fashion_mnist_reads_idx_from_data_root(fashion_root):
    train = build_dataset("fashion-mnist", "train", fashion_root)
    val = build_dataset("fashion-mnist", "val", fashion_root)
    test = build_dataset("fashion-mnist", "test", fashion_root)
    assert len(train) + len(val) == 300 and len(test) == 60
    assert not set(train.sample_ids) & set(val.sample_ids)
    image, label, sample_id = train[0]
    assert image.shape == (1, 28, 28) and image.dtype.__str__() == "torch.uint8"
    # the bright band of class c sits at rows 2c..2c+4: the loader kept pixels and labels aligned
    assert image[0, 2 * label:2 * label + 4].float().mean() > 150


def test_cifar_formats(cifar_root):
    c10 = build_dataset("cifar10", "test", cifar_root)
    c100 = build_dataset("cifar100", "train", cifar_root)
    assert len(c10) == 20 and c10.info.num_classes == 10 and c10[0][0].shape == (3, 32, 32)
    assert c100.info.num_classes == 100 and c100.info.train_crop_pad == 4


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    test = build_dataset("imagefolder", "test", tmp_path, image_size=32)
    assert len(test) == 6 and test.info.classes == ("cat", "dog")
    assert test[0][0].shape == (3, 32, 32) and test.path(0) == "val/cat/0.png"
    (tmp_path / "val" / "dog" / "bad.png").write_bytes(b"not an image")
    broken = build_dataset("imagefolder", "test", tmp_path, image_size=32)
    with pytest.raises(UserError, match="bad.png"):
        [broken[i] for i in range(len(broken))]


def test_imagefolder_reads_as_torchvision_does_and_skips_what_is_not_an_image(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    train = tmp_path / "train"
    (train / "cat" / "._0.png").write_bytes(b"\0\5\26\7 macOS resource fork")  # AppleDouble beside the image
    (train / "__MACOSX").mkdir()
    (train / ".ipynb_checkpoints").mkdir()
    (train / "dog" / "more").mkdir()  # a subfolder: torchvision's ImageFolder reads it too
    Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(train / "dog" / "more" / "wide.png")  # 16-bit gray
    test = build_dataset("imagefolder", "train", tmp_path, image_size=16)
    assert test.info.classes == ("cat", "dog")
    assert sorted(test.images.paths) == ["train/cat/0.png", "train/dog/0.png", "train/dog/more/wide.png"]
    wide = test.images.paths.index("train/dog/more/wide.png")
    assert int(test.images.load(wide).max()) == 30000 >> 8  # scaled to 8 bits, not clipped to 255
    lone = tmp_path / "lone"
    for split in ("train", "val"):
        (lone / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(lone / split / "cat" / "0.png")
    with pytest.raises(UserError, match="has 1 class; a classifier needs at least two"):
        build_dataset("imagefolder", "train", lone, image_size=16)
    (train / "bird").mkdir()  # an empty class would still take a label and shift the others
    with pytest.raises(UserError, match="class folder .*bird holds no images"):
        build_dataset("imagefolder", "train", tmp_path, image_size=16)
    (train / "bird").rmdir()
    (train / "cat" / "1.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match="cannot read image .*1.png"):
        build_dataset("imagefolder", "train", tmp_path, image_size=16).fingerprint()


def test_digits_ids_are_canonical():
    train, test = build_dataset("digits", "train"), build_dataset("digits", "test")
    assert (test.sample_ids % 5 == 0).all() and not (train.sample_ids % 5 == 0).any()


def test_long_tail_counts_follow_the_cifar_lt_formula():
    counts = long_tail_counts(np.full(10, 5400), 100)
    expected = [int(np.floor(5400 * 100 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert counts.tolist() == expected and counts[0] == 5400 and counts[-1] == 54


def test_long_tail_dataset(fashion_root):
    full = build_dataset("fashion-mnist", "train", fashion_root)
    lt = build_dataset("fashion-mnist", "train", fashion_root, imbalance_factor=10)
    per_class = np.bincount(lt.labels, minlength=10)
    assert per_class.tolist() == long_tail_counts(np.bincount(full.labels, minlength=10), 10).tolist()
    assert set(lt.sample_ids) <= set(full.sample_ids)


def test_limit_is_stratified_exact_and_keeps_ids(fashion_root):
    full = build_dataset("fashion-mnist", "train", fashion_root)
    sub = build_dataset("fashion-mnist", "train", fashion_root, limit=101)
    assert len(sub) == 101
    assert np.abs(np.bincount(sub.labels, minlength=10) - 10.1).max() < 1
    position = {s: i for i, s in enumerate(full.sample_ids)}
    for i in range(0, 101, 17):  # same id -> same image and label as in the full set
        assert (sub.image(i) == full.image(position[sub.sample_ids[i]])).all()
    assert (stratified_limit(np.arange(30) % 3, 3, 10) == stratified_limit(np.arange(30) % 3, 3, 10)).all()


def test_validation_carve_is_fixed_and_stratified():
    labels = np.arange(1000) % 10
    train, val = carve_validation(labels, 10)
    assert len(val) == 100 and np.bincount(labels[val]).tolist() == [10] * 10
    assert (carve_validation(labels, 10)[1] == val).all()


@pytest.mark.parametrize("kwargs,match", [({"limit": 0}, "^limit must be positive"), ({"imbalance_factor": 0.5}, "imbalance"),
                                          ({"split": "dev"}, "split")])
def test_bad_dataset_options(fashion_root, kwargs, match):
    split = kwargs.pop("split", "train")
    with pytest.raises(UserError, match=match):
        build_dataset("fashion-mnist", split, fashion_root, **kwargs)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset("mnist-pro")


def test_batched_fetch_equals_stacking_items(fashion_root):
    """Same values and the same strides: the memory format picks the conv kernel, so a batch
    laid out differently gives logits that differ in the last bits."""
    import torch

    dataset = build_dataset("fashion-mnist", "train", fashion_root)
    indices = [5, 0, 17, 3]
    batched = dataset.__getitems__(indices)
    stacked = torch.utils.data.default_collate([dataset[i] for i in indices])
    for got, want in zip(batched, stacked):
        assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype


@pytest.mark.parametrize("crop_pad,skip", [(0, 0), (0, 3), (2, 0), (2, 3)])
def test_train_loader_without_workers_hands_out_what_its_dataloader_would(fashion_root, crop_pad, skip):
    """Without workers the training loader fetches batches itself (no DataLoader iterator per
    step): the batches, and every generator's state between them, stay those of the DataLoader,
    with the loop's flips drawn between batches, with views, and in a resumed epoch that skips
    its first batches."""
    import torch

    from energytools.config import DataConfig, TrainConfig
    from energytools.data.transforms import train_augment
    from energytools.data.views import FreshViews
    from energytools.distributed import context
    from energytools.engine.loaders import TrainLoader

    train_set = DataConfig(dataset="fashion-mnist", data_root=str(fashion_root), crop_pad=crop_pad).build("train")
    assert train_set.info.train_flip  # the loop draws flips from the loader's generator between batches
    cfg = TrainConfig(batch_size=32, seed=3, in_memory_gib=0)  # batches of images (tests/test_resident.py: resident)
    views = FreshViews(train_set.info.train_transform, cfg.seed) if crop_pad else None
    loader = TrainLoader(train_set, cfg, torch.device("cpu"), context(), views)

    def one_epoch(batches):
        loader.start_epoch(1)
        resumed = []
        if skip:  # the DataLoader skips through the same batch sampler; the loader's own path calls back
            loader.resume_at(skip, lambda: resumed.append(loader.generator.get_state()))
        seen = []
        for batch in batches:
            flipped = train_augment(batch[0], train_set.info, loader.generator)[1] if views is None else None
            seen.append([*batch, flipped, loader.generator.get_state(), torch.get_rng_state()])
        return seen, resumed

    (ours, resumed), (dataloader, _) = one_epoch(loader), one_epoch(loader.loader)
    assert len(ours) == len(dataloader) == len(loader) - skip > 1
    assert len(resumed) == (1 if skip else 0)
    for mine, theirs in zip(ours, dataloader):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert (a is None and b is None) or torch.equal(a, b)


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


DECODED_KINDS = {"jpeg": ("RGB", "JPEG"), "jpeg gray": ("L", "JPEG"), "png": ("RGB", "PNG"), "png palette": ("P", "PNG"),
                 "png alpha": ("RGBA", "PNG"), "png gray alpha": ("LA", "PNG"), "webp": ("RGB", "WEBP")}


@pytest.mark.parametrize("kind", list(DECODED_KINDS))
def test_the_torchvision_decoder_gives_pils_pixels_to_one_level(kind):
    """The stated tolerance (energytools.data.decode): decoded as it is, the same bytes; resized,
    no pixel more than one level from PIL's."""
    from energytools.data.base import as_array, convert_mode, decode_square, resize_center_crop, to_array

    yy, xx = np.mgrid[0:61, 0:83]
    noisy = np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    smooth = np.stack([(xx * 3) % 256, (yy * 4) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    mode, image_format = DECODED_KINDS[kind]
    for pixels in (noisy, smooth):
        data = _encoded(Image.fromarray(pixels).convert(mode), image_format)
        for channels in (1, 3):
            for size, resize in ((None, None), (32, None), (32, 37)):
                import io

                with Image.open(io.BytesIO(data)) as image:
                    pil = (as_array(resize_center_crop(convert_mode(image, channels), size, resize)) if resize
                           else to_array(image, channels, size))
                fast = decode_square(data, channels, size, resize)
                assert fast.shape == pil.shape and fast.dtype == np.uint8
                difference = np.abs(fast.astype(int) - pil.astype(int))
                assert difference.max() <= (0 if size is None else 1), (channels, size, resize)
                assert decode_square(data, channels, size, resize, decoder="pil") is None


def test_an_image_folder_scores_the_same_by_either_decoder(tmp_path, monkeypatch):
    """JPEGs, a WebP and a BMP (PIL reads it either way) scored by a trained teacher: the
    energies agree to 1e-2 (observed: a few 1e-3) and the predictions match."""
    import polars as pl

    import energytools

    def formats(i):  # a BMP and a WebP in each class, JPEGs otherwise
        return (("bmp", "BMP"), ("webp", "WEBP"))[i % 2] if i < 2 else ("jpg", "JPEG")

    write_image_folder(tmp_path / "images", {"train": 24, "val": 8}, (40, 52), np.random.default_rng(0), formats)
    data = {"dataset": "imagefolder", "data_root": str(tmp_path / "images"), "image_size": 32}
    energytools.train("cnn_tiny", tmp_path / "teacher", epochs=2, **data)
    tables = {}
    for decoder in ("pil", "auto"):
        monkeypatch.setenv("ENERGYTOOLS_IMAGE_DECODER", decoder)
        tables[decoder] = pl.read_parquet(energytools.score(tmp_path / "teacher" / "best.pt",
                                                            tmp_path / f"{decoder}.parquet"))
        assert energytools.load_table(tmp_path / f"{decoder}.parquet")[1].versions["image_decoder"] == decoder
    pil, auto = tables["pil"], tables["auto"]
    assert pil["sample_id"].to_list() == auto["sample_id"].to_list()
    assert np.abs(pil["energy"].to_numpy() - auto["energy"].to_numpy()).max() < 1e-2
    assert (pil["pred"] == auto["pred"]).all()


def test_decoding_on_the_device_gives_the_default_table_on_the_cpu(tmp_path):
    """score --decode-on-device: the workers read bytes, the batch's JPEGs are decoded, resized
    and cropped in the main process on --device; on the CPU every column is the default path's.
    An RGB folder of JPEGs of three sizes and a PNG (read the default way) scored by its own
    teacher, and the same files without class folders read as a gray digits teacher's data
    (PIL's luma, the resize and centre crop of new data)."""
    import polars as pl

    import energytools

    def formats(i):  # a PNG in each class, JPEGs otherwise
        return ("png", "PNG") if i == 1 else ("jpg", "JPEG")

    root = tmp_path / "images"
    write_image_folder(root, {"train": 12, "val": 4}, (30, 41), np.random.default_rng(0), formats)
    for i in range(3):  # other sizes and aspect ratios: each its own resize on the device
        pixels = np.random.default_rng(i).integers(0, 255, (24 + 9 * i, 19 + 5 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / "dark" / f"x{i}.jpg")
    flat = tmp_path / "new"
    flat.mkdir()
    for path in (root / "train").rglob("*.*"):
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    energytools.train("cnn_tiny", tmp_path / "rgb", epochs=1, dataset="imagefolder", data_root=str(root),
                      image_size=16)
    energytools.train("cnn_tiny", tmp_path / "gray", epochs=1, dataset="digits", limit=200)
    for teacher, data in ((tmp_path / "rgb", {}), (tmp_path / "gray", {"dataset": "imagefolder",
                                                                        "data_root": str(flat)})):
        tables = {on: pl.read_parquet(energytools.score(teacher / "best.pt", tmp_path / f"{teacher.name}-{on}.parquet",
                                                        batch_size=8, save_logits=True, decode_on_device=on,
                                                        num_workers=1, **data))
                  for on in (False, True)}
        assert tables[False].height >= 24  # the train split's files (a tenth may be carved for validation)
        assert tables[False].equals(tables[True]), teacher.name


def test_decoding_on_the_device_is_refused_where_it_cannot_apply(tmp_path):
    import subprocess

    from conftest import energytools_command

    import energytools

    energytools.train("cnn_tiny", tmp_path / "digits", dataset="digits", limit=200, epochs=1)
    write_image_folder(tmp_path / "images", {"train": 4, "val": 2}, (12, 12), np.random.default_rng(0))
    energytools.train("cnn_tiny", tmp_path / "files", dataset="imagefolder", data_root=str(tmp_path / "images"),
                      image_size=8, epochs=1)
    for teacher, extra, says in ((tmp_path / "digits", [], "held in memory"),
                                 (tmp_path / "files", ["--views", 2], "--views")):
        result = subprocess.run(energytools_command("score", "--teacher", teacher / "best.pt", "--decode-on-device",
                                                    "--out", tmp_path / "t.parquet", *extra),
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--decode-on-device" in result.stderr and says in result.stderr, result.stderr
        assert not (tmp_path / "t.parquet").exists()


def test_score_decodes_files_in_workers_by_default_and_writes_the_same_table(tmp_path, monkeypatch):
    """Without --num-workers, image files are read by one worker per CPU (none for data held in
    memory; shared by the ranks of a host); the table is byte for byte the one of 0 workers."""
    import energytools
    from energytools.config import DataConfig
    from energytools.engine import default_workers
    from energytools.threads import available_cpus

    write_image_folder(tmp_path / "images", {"train": 20, "val": 4}, (20, 20), np.random.default_rng(1))
    data = {"dataset": "imagefolder", "data_root": str(tmp_path / "images"), "image_size": 16}
    files = DataConfig(**data).build("train")
    assert default_workers(DataConfig(dataset="digits").build("train")) == 0
    assert default_workers(files) == min(8, available_cpus())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * available_cpus()))
    assert default_workers(files) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    energytools.train("cnn_tiny", tmp_path / "teacher", epochs=1, **data)
    teacher = tmp_path / "teacher" / "best.pt"
    default = energytools.score(teacher, tmp_path / "default.parquet", batch_size=8)
    none = energytools.score(teacher, tmp_path / "none.parquet", batch_size=8, num_workers=0)
    assert default.read_bytes() == none.read_bytes()


def test_a_bad_decoder_choice_is_one_line(tmp_path):
    import subprocess

    from conftest import energytools_command

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / cls / "0.jpg")
    result = subprocess.run(energytools_command("train", "--dataset", "imagefolder", "--data-root", tmp_path,
                                                "--image-size", 8, "--model", "cnn_tiny", "--out", tmp_path / "t"),
                            capture_output=True, text=True,
                            env={**__import__("os").environ, "ENERGYTOOLS_IMAGE_DECODER": "fast"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "ENERGYTOOLS_IMAGE_DECODER='fast'" in result.stderr
