import json
import shutil
import subprocess
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import StepRecorder, energytools_command, interrupted
from energytools.config import DataConfig, TrainConfig, TrainStageConfig
from energytools.data.shards import decode_image, read_shards
from energytools.teacher import TeacherRun
from energytools.errors import UserError
from energytools.selection import select_samples
from energytools.stages.augment import AugmentConfig, augment
from energytools.lookup import SampleLookup
from energytools.stages.distill import DistillConfig, distill
from energytools.stages.score import ScoreConfig, score
from energytools.stages.train import train
from energytools.table import load_table, read_metadata


def test_score_table_contract(digits_run):
    frame, meta = load_table(digits_run["scores"])
    assert frame["sample_id"].is_sorted() and frame["sample_id"].n_unique() == frame.height
    from energytools.data import build_dataset

    assert frame["sample_id"].to_list() == sorted(build_dataset("digits", "train").sample_ids.tolist())
    assert (frame["energy_group"] == "low").sum() == int(0.2 * frame.height)
    assert meta.energy_temperature == 4.0 and meta.teacher.arch == "cnn_small"
    assert meta.thresholds["low_max"] < meta.thresholds["high_min"]
    temps = dict(zip(frame["energy_group"], frame["temperature"]))
    assert temps == {"low": 6.0, "mid": 4.0, "high": 2.0}
    assert pq.read_table(digits_run["scores"]).num_rows == frame.height  # plain pyarrow reads it
    assert "logits" in frame.columns and len(frame["logits"][0]) == 10
    assert meta.versions["torch_threads"] == torch.get_num_threads()  # it changes the last bits


def test_shards_record_the_thread_count_they_were_scored_with(digits_run, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not the one thread every augment process scores with
    try:
        out = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "a"), ratio=0.05))
    finally:
        torch.set_num_threads(threads)
    assert read_metadata(next(out.glob("train-*")))["versions"]["torch_threads"] == 1


def test_score_resumes_from_existing_parts(digits_run, tmp_path, monkeypatch):
    import energytools.stages.score as stage

    base = dict(teacher=str(digits_run["teacher"]), part_size=256, batch_size=128)
    clean = score(ScoreConfig(out=str(tmp_path / "clean.parquet"), **base))
    calls = {"n": 0}
    original = stage.write_parquet

    def dying(table, path, *args, **kwargs):
        if str(path).endswith("part-00002.parquet"):
            raise KeyboardInterrupt  # killed while scoring the third part
        calls["n"] += 1
        return original(table, path, *args, **kwargs)

    monkeypatch.setattr(stage, "write_parquet", dying)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        score(ScoreConfig(out=str(out), **base))
    assert not out.exists() and calls["n"] == 2
    monkeypatch.setattr(stage, "write_parquet", original)
    seen, forward = [], TeacherRun.logits
    monkeypatch.setattr(TeacherRun, "logits", lambda *a, **k: seen.append(1) or forward(*a, **k))
    score(ScoreConfig(out=str(out), **base))
    assert out.read_bytes() == clean.read_bytes()
    assert 0 < len(seen) < 11  # only the missing parts were scored (1293 rows = 11 batches of 128)


def test_score_refuses_bad_input(digits_run, tmp_path, cifar_root):
    with pytest.raises(UserError, match="already exists"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(digits_run["scores"])))
    with pytest.raises(UserError, match="low_frac"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "x.parquet"), low_frac=1.2))
    with pytest.raises(UserError, match="< 1"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "x.parquet"), low_frac=0.5,
                          high_frac=0.5))
    with pytest.raises(UserError, match="positive"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "x.parquet"), temperatures="0,4,2"))
    with pytest.raises(UserError, match="10 classes"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "x.parquet"),
                          data=DataConfig(dataset="cifar100", data_root=str(cifar_root))))
    assert not (tmp_path / "x.parquet").exists()


def test_nan_logits_name_the_sample(digits_run, tmp_path, monkeypatch):

    real = TeacherRun.logits

    def poisoned(self, images, info):
        out = real(self, images, info)
        out[3, 0] = float("nan")
        return out

    monkeypatch.setattr(TeacherRun, "logits", poisoned)
    with pytest.raises(UserError, match="NaN/Inf logits, first at sample_id"):
        score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "nan.parquet")))
    assert not (tmp_path / "nan.parquet").exists()


def test_train_resume_gives_the_same_weights(tmp_path, monkeypatch):
    data = DataConfig(dataset="digits", limit=300, eval_limit=100)

    def run(out, resume=False, on_step=None):
        return train(TrainStageConfig(model="cnn_tiny", out=str(tmp_path / out), data=data,
                                      train=TrainConfig(epochs=3, seed=1), resume=resume), on_step=on_step)

    full = run("full")
    interrupted(lambda on_step: run("part", on_step=on_step))  # in the third epoch
    resumed = run("part", resume=True)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics.height == 3 and full.last_test_acc == resumed.last_test_acc
    metrics = pl.read_parquet(tmp_path / "full" / "metrics.parquet")
    assert {"epoch", "loss", "val_acc", "test_acc", "lr", "seconds"} <= set(metrics.columns)


@pytest.mark.parametrize("mode", ["high", "low", "random"])
def test_selection_counts_and_ids(mode):
    table = pl.DataFrame({"sample_id": np.arange(100)[::-1], "label": np.arange(100) % 4,
                          "energy": np.repeat(np.arange(10.0), 10)})
    chosen = select_samples(table, 0.25, mode, seed=3)
    assert chosen.height == 25 and chosen["sample_id"].is_sorted()
    if mode == "high":  # energy 9 and 8 (20 rows), then ties at energy 7 broken by smallest id
        assert set(chosen["sample_id"]) == set(range(0, 25))
    if mode == "low":
        assert set(chosen["sample_id"]) == set(range(80, 100)) | set(range(70, 75))
    if mode == "random":
        assert chosen.equals(select_samples(table, 0.25, mode, seed=3))
    per_class = select_samples(table, 0.2, mode, per_class=True)
    assert per_class.group_by("label").len()["len"].to_list() == [5, 5, 5, 5]


def test_augment_shards(digits_run):
    rows = read_shards(digits_run["shards"])
    frame, _ = load_table(digits_run["scores"])
    selected = set(select_samples(frame, 0.3)["sample_id"].to_list())
    assert rows.height == len(selected) and set(rows["source_id"].to_list()) == selected
    assert set(rows["partner_id"].to_list()) <= selected
    assert not set(rows["sample_id"].to_list()) & set(frame["sample_id"].to_list())
    from energytools.data import build_dataset

    ds = build_dataset("digits", "train")
    position = {int(s): i for i, s in enumerate(ds.sample_ids)}
    for row in rows.head(20).iter_rows(named=True):
        params = json.loads(row["aug_params"])
        top, left, bottom, right = params["box"]
        image = decode_image(row["image"]["bytes"], 1)
        source, partner = ds.image(position[row["source_id"]]), ds.image(position[row["partner_id"]])
        mask = np.zeros(image.shape[:2], bool)
        mask[top:bottom, left:right] = True
        assert (image[mask] == partner[mask]).all() and (image[~mask] == source[~mask]).all()
        assert row["lam"] == pytest.approx(1 - mask.mean(), abs=1e-6)  # the box covers 1 - lam of the area
        assert row["partner_label"] == ds.labels[position[row["partner_id"]]]
    assert set(rows["energy_group"].unique()) <= {"low", "mid", "high"}


def test_augment_is_byte_identical_across_runs_and_workers(digits_run, tmp_path):
    def run(name, workers):
        return augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / name), ratio=0.3,
                                     shard_size=200, workers=workers))

    one, two = run("one", 1), run("two", 2)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert all((one / n).read_bytes() == (digits_run["shards"] / n).read_bytes() for n in files)
    # the same table under another path: the same shards (it is identified by its sha256)
    moved = tmp_path / "elsewhere" / "scores.parquet"
    moved.parent.mkdir()
    shutil.copy(digits_run["scores"], moved)
    three = augment(AugmentConfig(scores=str(moved), out=str(tmp_path / "three"), ratio=0.3, shard_size=200))
    assert all((three / n).read_bytes() == (one / n).read_bytes() for n in files if n.startswith("train-"))


def test_augment_chunks_are_the_shards_scoring_batches(digits_run):
    """A shard assembled from chunks equals the shard built in one go (same teacher batches)."""
    import pyarrow as pa

    from energytools.augment_workers import ShardPlan
    from energytools.augmenter import Augmenter

    cfg = AugmentConfig(scores=str(digits_run["scores"]), ratio=0.3, batch_size=32)
    writer = Augmenter.open(cfg, namespace=0)
    jobs = [(i, 0) for i in range(10, 110)]
    plan = ShardPlan.make(digits_run["root"] / "unused.parquet", jobs, cfg.batch_size)
    assert [len(c) for c in plan.chunks] == [32, 32, 32, 4] and plan.rows == 100
    assert pa.concat_tables([writer.build(c) for c in plan.chunks]).equals(writer.build(jobs))


def test_augment_multi_chunk_shards_identical_across_workers(digits_run, tmp_path, monkeypatch):
    import energytools.augment_workers as stage

    def run(workers):
        return augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / str(workers)), ratio=0.3,
                                     shard_size=100, batch_size=32, workers=workers))

    one = run(1)
    # slow chunk building down (forked workers inherit the patch), so that both processes
    # build several chunks: the worker from the start, this process from the far end
    built_here, build = [], stage.Augmenter.build
    monkeypatch.setattr(stage.Augmenter, "build",
                        lambda self, jobs: (time.sleep(0.5), built_here.append(jobs[0][0]), build(self, jobs))[-1])
    two = run(2)
    shards = sorted(p.name for p in one.glob("train-*"))
    assert len(shards) == 4  # 388 rows in shards of 100, each of up to four chunks
    assert sorted(p.name for p in two.glob("train-*")) == shards
    assert all((two / n).read_bytes() == (one / n).read_bytes() for n in shards)
    assert 0 < len(built_here) < 13 and built_here == sorted(built_here, reverse=True)


def test_augment_spawned_workers_write_the_same_shards(digits_run, tmp_path, monkeypatch):
    """Where workers cannot fork (macOS, Windows) they are spawned and load everything themselves."""
    import energytools.augment_workers as stage

    monkeypatch.setattr(stage, "START_METHOD", "spawn")
    out = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "a"), ratio=0.3, shard_size=200,
                                workers=2))
    names = sorted(p.name for p in digits_run["shards"].glob("train-*"))
    assert names and all((out / n).read_bytes() == (digits_run["shards"] / n).read_bytes() for n in names)


@pytest.mark.parametrize("script,needle", [
    # a script without a main guard: the spawned worker re-runs it and dies
    ("stage.START_METHOD = 'spawn'\n{call}\n", "__main__"),
    # a forked worker killed halfway (as the kernel's OOM killer would)
    ("import os\nparent = os.getpid()\nbuild = stage.Augmenter.build\n"
     "stage.Augmenter.build = lambda self, jobs: os._exit(9) if os.getpid() != parent else build(self, jobs)\n"
     "if __name__ == '__main__':\n    {call}\n", "killed"),
], ids=["spawn", "fork"])
def test_augment_worker_death_is_one_clear_error(digits_run, tmp_path, script, needle):
    """No hang: the stage ends with one error naming the likely cause."""
    import subprocess
    import sys

    call = (f"augment(AugmentConfig(scores={str(digits_run['scores'])!r}, out={str(tmp_path / 'out')!r}, "
            "ratio=1.0, copies=8, workers=2))")  # 10k rows: the worker dies first
    path = tmp_path / "script.py"
    path.write_text("import energytools.augment_workers as stage\n"
                    "from energytools.stages.augment import AugmentConfig, augment\n" + script.format(call=call))
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "an augment worker process died" in result.stderr and needle in result.stderr, result.stderr[-2000:]


def test_augment_bad_input(digits_run, tmp_path):
    for kwargs, match in (({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"policy": "nope"}, "unknown policy"),
                          ({"policy": str(tmp_path / "missing.json")}, "does not exist")):
        with pytest.raises(UserError, match=match):
            augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "x"), **kwargs))
    with pytest.raises(UserError, match="already holds"):
        augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(digits_run["shards"])))
    assert not (tmp_path / "x").exists()


def test_temperatures_reach_the_right_samples():
    ids = np.array([50, 10, 40, 20, 30])  # shuffled, as a table filtered by another tool could be
    temps = np.array([5.0, 1.0, 4.0, 2.0, 3.0], dtype=np.float32)
    lookup = SampleLookup(ids, temperature=temps)
    got = lookup.get("temperature", lookup.positions(torch.tensor([20, 50, 10])), "cpu")
    assert got.tolist() == [2.0, 5.0, 1.0]
    with pytest.raises(UserError, match="sample_id 99"):
        lookup.positions(torch.tensor([99]))


def test_distill_methods_and_temperature_plan(digits_run, tmp_path):
    common = dict(scores=str(digits_run["scores"]), student="cnn_tiny", train=TrainConfig(epochs=1))
    for method, terms in (("ce", {"ce"}), ("kd", {"ce", "kd"}), ("dkd", {"ce", "dkd"}), ("energy-dkd", {"ce", "dkd"})):
        result = distill(DistillConfig(out=str(tmp_path / method), method=method, **common))
        losses = {c.removeprefix("loss_") for c in result.metrics.columns if c.startswith("loss_")}
        assert losses == terms and all(result.metrics[f"loss_{t}"][0] > 0 for t in terms), (method, losses)
    result = distill(DistillConfig(out=str(tmp_path / "ekd"), method="energy-kd", temperatures="2,4,6",
                                   shards=(str(digits_run["shards"]),), cached_logits=True, **common))
    config = json.loads((tmp_path / "ekd" / "config.json").read_text())
    assert config["temperature_plan"]["temperatures"] == {"low": 2.0, "mid": 4.0, "high": 6.0}
    assert config["temperature_plan"]["rederived_from_table_energies"] is True
    assert np.isfinite(result.best_test_acc)
    distill(DistillConfig(out=str(tmp_path / "online"), method="energy-kd", temperature_source="online", **common))


def test_distill_energy_kd_uses_table_temperatures(digits_run, tmp_path, monkeypatch):
    """The T passed to the loss for each sample is the table's temperature of that sample_id."""
    frame, _ = load_table(digits_run["scores"])
    expected = dict(zip(frame["sample_id"].to_list(), frame["temperature"].to_list()))
    recorder = StepRecorder()
    distill(DistillConfig(scores=str(digits_run["scores"]), student="cnn_tiny", out=str(tmp_path / "t"),
                          method="energy-kd", train=TrainConfig(epochs=1, batch_size=256)), on_step=recorder)
    seen = [info.temperature for _, info in recorder.steps]
    ids_seen = [batch.sample_ids for batch in recorder.batches]
    assert seen and len(seen) == len(ids_seen)  # every step was seen, so the loop below checks something
    for ids, temps in zip(ids_seen, seen):
        assert temps.tolist() == [expected[int(i)] for i in ids]
    assert len({t for temps in seen for t in temps.tolist()}) == 3  # all three groups reached the loss


def test_distill_bad_input(digits_run, tmp_path):
    common = dict(scores=str(digits_run["scores"]), student="cnn_tiny", train=TrainConfig(epochs=1))
    with pytest.raises(UserError, match="unknown method"):
        distill(DistillConfig(out=str(tmp_path / "a"), method="fitnet", **common))
    other = tmp_path / "other"
    augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(other), ratio=0.1))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["scores"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another score table"):
        distill(DistillConfig(out=str(tmp_path / "b"), shards=(str(other),), **common))
    nologits = score(ScoreConfig(teacher=str(digits_run["teacher"]), out=str(tmp_path / "nolog.parquet")))
    with pytest.raises(UserError, match="save_logits=True"):
        distill(DistillConfig(out=str(tmp_path / "c"), cached_logits=True,
                              **{**common, "scores": str(nologits)}))


def test_a_users_albumentations_file_is_a_policy(digits_run, tmp_path):
    import albumentations as A

    A.save(A.Compose([A.HorizontalFlip(p=1.0)]), str(tmp_path / "flip.json"))
    out = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / "flip"), ratio=0.05,
                                policy=str(tmp_path / "flip.json")))
    rows = read_shards(out)
    from energytools.data import build_dataset

    ds = build_dataset("digits", "train")
    position = {int(s): i for i, s in enumerate(ds.sample_ids)}
    row = rows.row(0, named=True)
    assert row["aug"] == "flip.json" and row["partner_id"] is None and row["lam"] is None
    assert (decode_image(row["image"]["bytes"], 1) == ds.image(position[row["source_id"]])[:, ::-1]).all()
    assert json.loads(row["aug_params"])["applied"][0][0] == "HorizontalFlip"


@pytest.mark.parametrize("image_format, magic, extension", [("JPG", b"\xff\xd8", "jpg"), ("webp", b"RIFF", "webp")])
def test_augment_lossy_shards_store_the_teacher_columns_of_the_decoded_images(digits_run, tmp_path, image_format,
                                                                              magic, extension):
    from energytools.data import build_dataset
    from energytools.data.shards import shard_dataset
    from energytools.teacher import open_teacher

    out = augment(AugmentConfig(scores=str(digits_run["scores"]), out=str(tmp_path / image_format), ratio=0.3,
                  shard_size=200, image_format=image_format, quality=75))
    rows, png = read_shards(out), read_shards(digits_run["shards"])
    assert all(row["bytes"].startswith(magic) and row["path"].endswith("." + extension) for row in rows["image"])
    assert json.loads((out / "manifest.json").read_text())["config"]["image_format"] == {"JPG": "jpeg"}.get(
        image_format, image_format)  # another spelling is recorded as the canonical name
    assert rows["sample_id"].to_list() != png["sample_id"].to_list()  # another content: other ids
    dataset = build_dataset("digits", "train")
    decoded, frame = shard_dataset(out, dataset.info)
    pixels = np.stack([decoded.image(i) for i in range(len(decoded))])
    assert not (pixels == np.stack([decode_image(r["bytes"], 1) for r in png["image"]])).all()  # lossy
    teacher = open_teacher(digits_run["teacher"], dataset, device="cpu")
    direct = teacher.logits(torch.from_numpy(pixels).permute(0, 3, 1, 2), dataset.info)
    stored = torch.tensor(np.stack(frame["logits"].to_list()), dtype=torch.float32)
    torch.testing.assert_close(stored, direct, atol=2e-2, rtol=2e-3)  # float16 storage


def test_augment_refuses_a_quality_it_cannot_use(digits_run, tmp_path):
    base = {"scores": str(digits_run["scores"]), "ratio": 0.3}
    for options, needle in (({"quality": 80}, "^quality= applies to the lossy formats|^quality applies"),
                            ({"image_format": "webp", "quality": 0}, "must be in 1..100"),
                            ({"image_format": "gif"}, "unknown format 'gif'")):
        with pytest.raises(UserError, match=needle):
            augment(AugmentConfig(out=str(tmp_path / "x"), **base, **options))
        assert not (tmp_path / "x").exists()
    cli = subprocess.run(energytools_command("augment", "--scores", digits_run["scores"], "--out", tmp_path / "x",
                                             "--quality", "80"), capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "--quality applies" in cli.stderr, cli.stderr
