"""HE-DA shards as PNG, JPEG and WebP (`augment --image-format`): bytes per image, and the
accuracy of the quickstart's energy-kd + HE-DA student trained on each, paired over seeds.
Writes its table into docs/benchmarks.md.

    make quickstart   # the table and teacher it reads
    python benchmarks/shard_formats.py --scores runs/quickstart/scores.parquet --out runs/shard-formats

The student is the quickstart's (cnn_tiny, energy-kd with cached logits, 8 epochs) on the
quickstart's 10,000 images plus the shards of its 30% highest-energy samples (CutMix); only the
shards' image encoding differs between the rows. Lossy shards store the teacher's columns of
the decoded images (what the student reads).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl

import energytools
from common import delta_stats, record, record_lines, replace_block
from energytools.data.shards import read_shards, shard_files
from energytools.summaries import half_width, interval_text, markdown_table, mean_std

FORMATS = ("png", "jpeg", "webp")


def shards(scores: Path, out: Path, image_format: str, quality: int) -> dict:
    directory = out / f"he-da-{image_format}"
    if not (directory / "manifest.json").exists():
        energytools.augment(scores, directory, ratio=0.3, policy="cutmix", overwrite=True,
                            image_format=None if image_format == "png" else image_format,
                            quality=None if image_format == "png" else quality)
    rows = read_shards(directory)
    image_bytes = sum(len(image["bytes"]) for image in rows["image"])
    return {"format": image_format, "directory": directory, "images": rows.height,
            "image_bytes": image_bytes / rows.height,
            "file_bytes": sum(f.stat().st_size for f in shard_files(directory)) / rows.height}


def student(scores: Path, shard_dir: Path, out: Path, seed: int, epochs: int) -> float:
    if not (out / "summary.json").exists():
        started = (out / "last.pt").exists()
        energytools.distill(scores, "cnn_tiny", out, method="energy-kd", shards=[str(shard_dir)], cached_logits=True,
                            epochs=epochs, seed=seed, resume=started, overwrite=not started)
    return json.loads((out / "summary.json").read_text())["best_test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, default=Path("runs/quickstart/scores.parquet"))
    parser.add_argument("--out", type=Path, default=Path("runs/shard-formats"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [shards(args.scores, args.out, f, args.quality) for f in FORMATS]
    runs = pl.DataFrame([{"format": s["format"], "seed": seed,
                          "best": student(args.scores, s["directory"], args.out / s["format"] / f"seed{seed}", seed,
                                          args.epochs)}
                         for s in sizes for seed in args.seeds])
    rows = []
    for s in sizes:
        mine = runs.filter(pl.col("format") == s["format"]).sort("seed")
        deltas = (mine["best"] - runs.filter(pl.col("format") == "png").sort("seed")["best"]).to_numpy()
        stats = delta_stats(deltas)
        std = stats["std"] if stats else None
        width = half_width(std, len(deltas))
        rows.append({"format": s["format"], "bytes": f"{s['image_bytes']:.0f}", "file": f"{s['file_bytes']:.0f}",
                     "ratio": f"{s['image_bytes'] / sizes[0]['image_bytes']:.2f}",
                     "acc": mean_std(float(mine["best"].mean()), float(mine["best"].std())),
                     "delta": "—" if s["format"] == "png" else mean_std(float(deltas.mean()), std),
                     "interval": "—" if s["format"] == "png" or width is None
                     else interval_text(deltas.mean() - width, deltas.mean() + width)})
    with open(args.out / "wall.jsonl", "a") as log:
        log.write(json.dumps(record(time.perf_counter() - started)) + "\n")
    records = [json.loads(line) for line in (args.out / "wall.jsonl").read_text().splitlines()]
    body = "\n".join([
        "### HE-DA shards as PNG, JPEG and WebP (`benchmarks/shard_formats.py`)", "",
        *record_lines(records[-1:]), "",
        f"The quickstart's shards (ratio 0.3, CutMix, {sizes[0]['images']} images of 28x28 gray) in each format "
        f"(JPEG and WebP at quality {args.quality}); bytes per image of the encoded images and of the shard files "
        f"(with the other columns); the quickstart's energy-kd + HE-DA student (cnn_tiny, {args.epochs} epochs, "
        f"cached logits) on each, test accuracy of the validation-selected checkpoint over seeds "
        f"{', '.join(map(str, args.seeds))}, Δ paired with PNG on the same seed (95% t-interval).", "",
        markdown_table(pl.DataFrame(rows), {"format": "format", "image bytes": "bytes", "file bytes/image": "file",
                                            "image bytes / PNG's": "ratio", "test acc %": "acc",
                                            "Δ PNG": "delta", "95% CI": "interval"}), ""])
    replace_block(args.doc, "shard-formats", body)
    print(body)


if __name__ == "__main__":
    main()
