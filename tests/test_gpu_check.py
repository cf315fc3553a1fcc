"""`make gpu-wheels` keeps what a device call carries under 64 MiB, and the device installs from
it only what it lacks."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def load(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


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
