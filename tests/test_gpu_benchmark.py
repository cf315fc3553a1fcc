"""benchmarks/gpu.py measures score and distill on CUDA; its CPU fallback keeps it tested here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_the_cpu_fallback(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["score"]["stage_images_per_s"] > 0
    assert figures["distill_kd_cached_views"]["stage_images_per_s"] > 0
    amp = figures["amp_energy_error"]
    assert 0 < amp["max_abs"] < 1 and 0 <= amp["group_flips"] <= figures["samples"]
    assert figures["float32_bare_energy_agrees"] < 1e-3  # the bare loop scores what the stage scored
