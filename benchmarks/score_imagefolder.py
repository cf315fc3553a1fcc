"""`energytools score` on a JPEG image folder against a bare loop that decodes with the same
decoder, at 0 and 2 DataLoader workers; and the PIL decoder it replaced. Writes its table into
docs/benchmarks.md.

    python benchmarks/score_imagefolder.py [--images 2000] [--size 256] [--repeats 3]

The folder: --images synthetic photographs-like JPEGs (smooth gradients plus noise, quality 90)
of --size px in two class folders (train/ and val/), read at 64 px (Resize 73 + CenterCrop 64,
energytools' evaluation transform) by a random-weight resnet8 teacher. The bare loop reads the
same files in the same order: bytes -> torchvision.io.decode_image (RGB) -> antialiased uint8
resize -> centre crop -> normalise -> forward, in batches of 256, in this process (0 workers)
or in a DataLoader with 2 workers. The stage does everything it does for real (dataset listing,
fingerprint, statistics, Parquet parts, the table). Runs alternate; the fastest of each counts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import record, record_lines, replace_block
from energytools.config import DataConfig, ScoreConfig
from energytools.data.base import center_crop_geometry
from energytools.data.decode import decode, resize_crop
from energytools.data.transforms import normalize
from energytools.engine import model_meta
from energytools.models import create_model, load_model, save_checkpoint
from energytools.stages.score import score
from energytools.summaries import markdown_table

SIZE, RESIZE = 64, 73


def write_folder(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(images):
        split = "val" if i % 10 == 0 else "train"
        folder = root / split / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 1, 3)
        pixels = np.stack([255 * (a * xx + (1 - a) * yy), 255 * (b * yy), 255 * (c * xx * yy)], -1)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


class Decoded(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = decode(self.paths[i].read_bytes(), 3)
        height, width = image.shape[1:]
        return torch.from_numpy(resize_crop(image, *center_crop_geometry(width, height, SIZE, RESIZE))).permute(2, 0, 1)


def bare_loop(paths: list[Path], model, info, workers: int, batch_size: int) -> None:
    loader = torch.utils.data.DataLoader(Decoded(paths), batch_size=batch_size, num_workers=workers)
    with torch.no_grad():
        for images in loader:
            model(normalize(images, info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    write_folder(work / "images", args.images, args.size)
    data = DataConfig(dataset="imagefolder", data_root=str(work / "images"), image_size=SIZE)
    dataset = data.build("train")
    torch.manual_seed(0)
    save_checkpoint(work / "teacher.pt", create_model("resnet8", dataset.info.num_classes, 3, SIZE),
                    model_meta("resnet8", dataset, data))
    model, _ = load_model(work / "teacher.pt")
    model.eval()
    paths = [Path(dataset.images.root) / dataset.path(i) for i in range(len(dataset))]
    times: dict[str, list[float]] = {}

    def timed(name: str, fn, *fn_args, **fn_kwargs) -> None:
        began = time.perf_counter()
        fn(*fn_args, **fn_kwargs)
        times.setdefault(name, []).append(time.perf_counter() - began)

    def stage(out: str, workers: int) -> None:
        score(ScoreConfig(teacher=str(work / "teacher.pt"), out=str(work / out), data=data,
                          batch_size=args.batch_size, num_workers=workers, device="cpu"))

    bare_loop(paths[:args.batch_size], model, dataset.info, 0, args.batch_size)  # warm-up: kernels, imports
    for repeat in range(args.repeats):
        for workers in (0, 2):
            timed(f"bare {workers}", bare_loop, paths, model, dataset.info, workers, args.batch_size)
            timed(f"score {workers}", stage, f"s{workers}-{repeat}.parquet", workers)
        os.environ["ENERGYTOOLS_IMAGE_DECODER"] = "pil"
        timed("score 0 (PIL decoder)", stage, f"pil-{repeat}.parquet", 0)
        del os.environ["ENERGYTOOLS_IMAGE_DECODER"]
    best = {name: min(values) for name, values in times.items()}
    rows = [{"run": name, "workers": name.split()[1], "seconds": f"{best[name]:.2f}",
             "images/s": f"{len(paths) / best[name]:.0f}",
             "ratio": f"{best[name] / best['bare ' + name.split()[1]]:.3f}"}
            for name in ("bare 0", "score 0", "score 0 (PIL decoder)", "bare 2", "score 2")]
    body = "\n".join([
        "### Scoring a JPEG image folder (`benchmarks/score_imagefolder.py`)", "",
        *record_lines([record(time.perf_counter() - started)]), "",
        f"{len(paths)} JPEGs of {args.size}x{args.size} (quality 90) read at {SIZE} px (Resize {RESIZE} + CenterCrop "
        f"{SIZE}) by a random-weight resnet8, batch {args.batch_size}, on the CPU; fastest of {args.repeats} "
        "alternated runs each. `ratio` is the run's time over the bare loop's at the same workers (the bare loop "
        "decodes with the same torchvision decoder and resize; target: at most 1.05). The PIL row is the stage "
        "with ENERGYTOOLS_IMAGE_DECODER=pil, the decoder energytools used before.", "",
        markdown_table(__import__("polars").DataFrame(rows), {"run": "run", "workers": "workers", "seconds": "seconds",
                                                              "images/s": "images/s", "ratio": "ratio"}), ""])
    replace_block(args.doc, "score-imagefolder", body)
    print(body)


if __name__ == "__main__":
    main()
