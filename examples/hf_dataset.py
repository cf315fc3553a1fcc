"""A Hugging Face `datasets` image dataset, as Parquet, through score -> augment -> distill.

Writes a small dataset of striped 16x16 images (three named classes: the stripes' direction)
with `datasets`, in the layout `push_to_hub` and the Hub use (DIR/data/train-*.parquet,
DIR/data/test-*.parquet), then trains a small teacher on it and distills a student. Any
dataset saved that way works the same: `--dataset parquet --data-root DIR`; the ClassLabel
names become the class names.

    python examples/hf_dataset.py runs/hf-dataset
"""
import sys
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, Image

import energytools
from energytools.config import DataConfig

CLASSES = ["horizontal", "vertical", "diagonal"]


def striped(label: int, rng: np.random.Generator) -> PIL.Image.Image:
    """A 16x16 RGB image with noisy stripes whose direction is the class."""
    rows, cols = np.indices((16, 16))
    phase = (rows, cols, rows + cols)[label] + rng.integers(0, 4)
    image = rng.integers(0, 80, (16, 16, 3)) + 150 * (phase % 4 < 2)[..., None]
    return PIL.Image.fromarray(image.astype(np.uint8))


def write_split(path: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(count)]
    dataset = Dataset.from_dict({"image": [striped(label, rng) for label in labels], "label": labels})
    dataset = dataset.cast_column("image", Image()).cast_column("label", ClassLabel(names=CLASSES))
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/hf-dataset")
    root = out / "stripes"
    write_split(root / "data" / "train-00000-of-00001.parquet", 240, seed=0)
    write_split(root / "data" / "test-00000-of-00001.parquet", 60, seed=1)
    data = {"dataset": "parquet", "data_root": str(root)}
    print("classes:", DataConfig(**data).build("train").info.classes)
    energytools.train("cnn_tiny", out / "teacher", epochs=3, overwrite=True, **data)
    table = energytools.score(out / "teacher" / "best.pt", out / "scores.parquet", overwrite=True, **data)
    shards = energytools.augment(table, out / "he-da", ratio=0.3, overwrite=True)
    energytools.distill(table, "cnn_tiny", out / "student", method="energy-kd", shards=[shards], epochs=5,
                        overwrite=True)
