import json
from pathlib import Path

import pytest
import torch

from energytools.errors import UserError
from energytools.models import MODELS, create_model, load_model, save_checkpoint

KEYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mdistiller_state_dict_keys.json"
# in a CI clone, shared/ sits beside the clone as well
KEYS = KEYS if KEYS.exists() else Path(__file__).resolve().parents[1].parent / "shared" / "data" / KEYS.name


@pytest.mark.skipif(not KEYS.exists(), reason="shared/data/mdistiller_state_dict_keys.json not present")
@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2"])
def test_state_dict_keys_match_mdistiller(name):
    expected = json.loads(KEYS.read_text())[name]
    got = [[k, list(v.shape)] for k, v in create_model(name, 100, 3).state_dict().items()]
    assert got == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_on_28x28_gray_and_32x32_rgb(name):
    for channels, size in ((1, 28), (3, 32)):
        model = create_model(name, 10, channels, size).eval()
        with torch.no_grad():
            assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_mdistiller_style_checkpoint_loads_strictly(tmp_path):
    model = create_model("resnet8", 100, 3)
    torch.save({"model": model.state_dict(), "best_acc": 1.0}, tmp_path / "ckpt.pth")
    loaded, meta = load_model(tmp_path / "ckpt.pth", arch="resnet8", num_classes=100, in_channels=3)
    assert meta["arch"] == "resnet8"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="10 classes"):
        load_model(tmp_path / "ckpt.pth", arch="resnet8", num_classes=10, in_channels=3)


def test_energytools_checkpoint_records_its_architecture(tmp_path):
    model = create_model("cnn_tiny", 10, 1)
    save_checkpoint(tmp_path / "m.pt", model, {"arch": "cnn_tiny", "num_classes": 10, "in_channels": 1})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta["num_classes"] == 10 and len(meta["sha256"]) == 64


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model"):
        create_model("resnet9000", 10)
