"""In-memory training splits held as normalised float NCHW on the device (--in-memory-gib): the
same draws and the same weights as converting every batch, resumes included; files and shards
keep the per-batch path."""
import pytest
import torch

from energytools.config import DataConfig, DistillConfig, TrainConfig, TrainStageConfig
from energytools.data.resident import can_reside, resident_bytes
from energytools.engine.loaders import TrainLoader
from energytools.distributed import context
from energytools.stages.distill import distill
from energytools.stages.train import train


def weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["digits", "fashion-mnist", "cifar10-crops"])
def data(request, fashion_root, cifar_root):
    """No augmentation (digits), flips (Fashion-MNIST's layout), pad-2 crops and flips of three channels."""
    return {"digits": DataConfig(dataset="digits", limit=600),
            "fashion-mnist": DataConfig(dataset="fashion-mnist", data_root=str(fashion_root)),
            "cifar10-crops": DataConfig(dataset="cifar10", data_root=str(cifar_root))}[request.param]


def test_a_resident_split_trains_to_the_weights_of_per_batch_conversion(data, tmp_path):
    runs = {}
    for budget in (0.0, 2.0):
        out = tmp_path / f"gib{budget}"
        train(TrainStageConfig(model="cnn_tiny", out=str(out), data=data,
                               train=TrainConfig(epochs=2, lr=0.05, batch_size=16, seed=3, in_memory_gib=budget)))
        runs[budget] = weights(out)
    assert same(runs[0.0], runs[2.0])


def test_the_loader_holds_the_split_only_when_it_fits(data):
    dataset = data.build("train")
    cfg = TrainConfig()
    loader = TrainLoader(dataset, cfg, torch.device("cpu"), context())
    assert loader.resident is not None and tuple(loader.resident.store.shape[1:]) == (
        dataset.info.in_channels, *(dataset.info.image_size + 2 * dataset.info.train_crop_pad,) * 2)
    assert loader.resident.store.dtype == torch.float32
    assert resident_bytes(dataset) == loader.resident.store.numel() * 4
    assert not can_reside(dataset, resident_bytes(dataset) / 2 ** 30 * 0.99)  # over the budget
    assert TrainLoader(dataset, TrainConfig(in_memory_gib=0), torch.device("cpu"), context()).resident is None
    assert TrainLoader(dataset, TrainConfig(num_workers=1), torch.device("cpu"), context()).resident is None
    batch = loader.resident.fetch([2, 0])  # indices, labels and sample ids, as the dataset's own batch has them
    assert torch.equal(batch[0], torch.tensor([2, 0])) and torch.equal(batch[1], torch.as_tensor(dataset.labels[[2, 0]]))
    assert torch.equal(batch[2], torch.as_tensor(dataset.sample_ids[[2, 0]]))


def test_image_files_keep_the_per_batch_path(tmp_path):
    from energytools.data import ImageSet

    folder = tmp_path / "folder"
    for label in ("a", "b"):
        (folder / "train" / label).mkdir(parents=True)
        for i in range(3):
            from PIL import Image

            Image.new("L", (8, 8), color=40 * i).save(folder / "train" / label / f"{i}.png")
    files = DataConfig(dataset="imagefolder", data_root=str(folder), image_size=8).build("train")
    assert isinstance(files, ImageSet) and not can_reside(files, 2.0)


def test_a_resumed_distill_gives_the_same_weights_with_the_split_resident(digits_run, tmp_path):
    """A run stopped after its first epoch and resumed ends where an uninterrupted one does; with
    --num-workers the split is not made resident (a DataLoader with workers draws as before)."""
    def run(out, epochs=2, resume=False, **train_options):
        distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(out), method="kd",
                              cached_logits=True, resume=resume,
                              train=TrainConfig(epochs=epochs, seed=1, **train_options)))
        return weights(out)

    plain = run(tmp_path / "converted", in_memory_gib=0)
    assert same(run(tmp_path / "resident"), plain)
    run(tmp_path / "resumed", epochs=1)
    assert same(run(tmp_path / "resumed", epochs=2, resume=True), plain)
