import energytools


def test_python_api_runs_each_stage(tmp_path):
    result = energytools.train("cnn_tiny", tmp_path / "teacher", dataset="digits", epochs=1)
    table = energytools.score(teacher=tmp_path / "teacher" / "best.pt", out=tmp_path / "scores.parquet",
                              save_logits=True, temperatures="2,4,6")
    scores, meta = energytools.load_table(table)
    assert meta.rule.temperatures == (2.0, 4.0, 6.0) and scores.height > 1000
    chosen = energytools.select(table, ratio=0.1)
    assert chosen.height == int(0.1 * scores.height)
    shards = energytools.augment(table, tmp_path / "he-da", ratio=0.1, policy="mixup")
    run = energytools.distill(table, "cnn_tiny", tmp_path / "student", method="energy-kd", shards=[shards],
                              cached_logits=True, epochs=1)
    assert run.metrics.height == 1 and result.metrics.height == 1
    import json

    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["augmented_samples"] == chosen.height > 0  # the shards joined the training set
    assert energytools.report(tmp_path, out=tmp_path / "r.html", thumbnails=False).exists()
