"""`make gpu-check` (scripts/gpu_check.py) dry-runs on the CPU, and `make gpu-wheels` keeps what a
device call carries under 64 MiB; the judgements that only a GPU exercises are checked on made-up
counts."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
CHECKS = ["environment", "teacher", "score-cuda-vs-cpu", "decode-on-device", "nccl", "fp16-gradscaler", "sync-per-step",
          "two-ranks-gloo", "resume-mid-epoch", "gpu-tests", "benchmark"]
NEED_CUDA = ["score-cuda-vs-cpu", "decode-on-device", "nccl", "fp16-gradscaler", "sync-per-step", "two-ranks-gloo"]


def load(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_quick_dry_run_reports_every_check_and_skips_the_cuda_ones(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry", "--quick", "--out",
                             str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + log[-3000:]
    lines = [line for line in (out / "gpu-check-summary.txt").read_text().splitlines() if not line.startswith("#")]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in lines}
    assert list(rows) == CHECKS and len(lines) == len(CHECKS)
    assert not [line for line in lines if " | FAIL" in line]
    assert rows["environment"][1] == "PASS" and "torch" in rows["environment"][3]
    assert rows["teacher"][1] == "PASS"
    for name in NEED_CUDA:
        assert rows[name][1].startswith("SKIPPED (no CUDA"), rows[name]
    assert "command lines ran on the cpu" in rows["sync-per-step"][1]  # the device's commands, tried here
    assert all(row[2].endswith(" s") for row in rows.values())
    assert "===== sync-per-step" in log and "sync-count: dkd: exit 0" in log


def test_the_wheelhouse_budget_refuses_more_than_64_mib():
    wheels = load("gpu_wheels")
    assert wheels.check_budget({"polars.whl": 52 * MIB, "small.whl": 3 * MIB}, tree_bytes=2 * MIB) == 57 * MIB
    with pytest.raises(wheels.BudgetError, match=r"come to 65.0 MiB, over the 64 MiB.*pyarrow.whl 55.0 MiB"):
        wheels.check_budget({"pyarrow.whl": 55 * MIB, "numpy.whl": 8 * MIB}, tree_bytes=2 * MIB)
    with pytest.raises(wheels.BudgetError):  # the working tree counts too
        wheels.check_budget({"polars.whl": 60 * MIB}, tree_bytes=4 * MIB)


def test_every_runtime_dependency_is_carried_or_left_out_for_a_reason():
    import importlib.metadata
    import tomllib

    wheels = load("gpu_wheels")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    closure = wheels.dependency_closure([*project["dependencies"], "pytest"], importlib.metadata.requires)
    assert "polars" in wheels.classify(closure) and "torch" not in closure
    with pytest.raises(wheels.BudgetError, match="undecided dependencies: newdep"):
        wheels.classify([*closure, "newdep"])


def test_the_device_installs_only_what_it_lacks_and_says_when_a_wheel_does_not_fit():
    from packaging.tags import Tag

    wheels = load("gpu_wheels")
    manifest = {"carried": {
        "polars": {"version": "2.1.0", "files": ["polars-2.1.0-py3-none-any.whl"],
                   "requires": ["polars-runtime-32==2.1.0", "pyarrow>=7; extra == 'pyarrow'"]},
        "polars-runtime-32": {"version": "2.1.0", "requires": [],
                              "files": ["polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.whl"]},
        "typer": {"version": "0.29.2", "files": ["typer-0.29.2-py3-none-any.whl"], "requires": ["rich>=13.8"]},
        "pyyaml": {"version": "6.0.4", "requires": [], "files": [
            "pyyaml-6.0.4-cp311-cp311-manylinux_2_17_x86_64.whl", "pyyaml-6.0.4-cp312-cp312-manylinux_2_17_x86_64.whl"]},
    }}
    cp312 = [Tag("cp312", "cp312", "manylinux_2_17_x86_64"), Tag("cp312", "abi3", "manylinux_2_17_x86_64"),
             Tag("cp311", "abi3", "manylinux_2_17_x86_64"), Tag("py3", "none", "any")]
    device = {"torch": "2.11.0", "typer": "0.9.0", "rich": "14.0.0", "pyarrow": "21.0.0"}
    wanted = ["torch>=2.6", "polars>=1.0", "typer>=0.12", "pyarrow>=14", "pyyaml>=6", "plotly>=5.20"]
    plan, problems = wheels.plan_install(manifest, device, wanted, cp312)
    assert plan == {"polars": "polars-2.1.0-py3-none-any.whl",
                    "polars-runtime-32": "polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.whl",
                    "typer": "typer-0.29.2-py3-none-any.whl",  # 0.9 is older than pyproject allows
                    "pyyaml": "pyyaml-6.0.4-cp312-cp312-manylinux_2_17_x86_64.whl"}  # rich 14 is new enough
    assert list(problems) == ["plotly"] and "not in the wheelhouse" in problems["plotly"]

    cp313 = [Tag("cp313", "cp313", "manylinux_2_17_x86_64"), Tag("cp313", "abi3", "manylinux_2_17_x86_64"),
             Tag("cp311", "abi3", "manylinux_2_17_x86_64"), Tag("py3", "none", "any")]
    plan, problems = wheels.plan_install(manifest, {**device, "pyyaml": None}, ["pyyaml>=6", "polars"], cp313)
    assert set(plan) == {"polars", "polars-runtime-32"}  # abi3 and pure wheels serve any Python
    assert problems["pyyaml"].startswith("absent; the wheelhouse's pyyaml 6.0.4 has no wheel for this Python "
                                         "(cp313-cp313-manylinux_2_17_x86_64), only for cp311, cp312")
    assert "\n" not in problems["pyyaml"]


def _sync_runs(growth: dict[str, int], control: int) -> list[dict]:
    checks = load("gpu_checks")
    runs = [{"name": "score-views", "length": "short", "syncs": 8}, {"name": "score-views", "length": "long", "syncs": 16}]
    for name in ["train", *checks.SYNC_CONFIGS, checks.SYNC_CONTROL[0]]:
        added = control if name == checks.SYNC_CONTROL[0] else growth.get(name, 0)
        runs += [{"name": name, "length": "short", "syncs": 5, "origins": {}},
                 {"name": name, "length": "long", "syncs": 5 + added, "origins": {"energytools/lookup.py:40": added}}]
    return runs


def test_the_sync_check_passes_only_when_no_count_grows_and_the_control_does():
    checks = load("gpu_checks")
    key = checks.judge_syncs(_sync_runs({}, control=8), steps_added=8)
    assert "dkd +0" in key and "control +8" in key and "score --views +8" in key
    with pytest.raises(checks.Fail, match="grow with the steps in ctkd-ema"):
        checks.judge_syncs(_sync_runs({"ctkd-ema": 8}, control=8), steps_added=8)
    with pytest.raises(checks.Fail, match="the control's count did not grow"):
        checks.judge_syncs(_sync_runs({}, control=0), steps_added=8)
