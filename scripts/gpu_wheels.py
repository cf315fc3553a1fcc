"""`make gpu-wheels`: the wheels that `make gpu-check` installs on a borrowed GPU machine, which
has no network and its own torch, into .gpu-wheels/ (git-ignored; carried to the device).

    python scripts/gpu_wheels.py [--dest .gpu-wheels] [--python 3.11 --python 3.12]

A device call carries the working tree and the carried paths, 64 MiB in all. polars' compiled
part alone is 51 MiB and pyarrow's wheel 55 MiB a Python version, so not everything fits: every
runtime dependency of energytools (pyproject.toml) and pytest, with their own dependencies, is
either carried (CARRIED) or left out for a stated reason (LEFT_OUT); one in neither stops the
build, so a new dependency gets decided. The device image holds the left-out ones (its package
list: docs/gpu.md); the check installs only what the device lacks (:func:`plan_install`).

Versions are pinned to the ones installed where this runs (as `pip freeze` gives them); binary
wheels are fetched for each ``--python`` (the device was seen with 3.12, this project's venv is
3.11). The build writes manifest.json beside the wheels: name, version, files, requirements.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
#: what one device call carries: the working tree plus the carried paths
LIMIT_BYTES = 64 * MIB
#: the device has its own: never carried, never installed over
DEVICE_OWN = {"torch", "torchvision"}
MANYLINUX = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

CARRIED = {
    "polars": "the device has none",
    "polars-runtime-32": "polars' compiled part (abi3: one wheel serves every Python); 51 MiB",
    "typer": "small; the CLI", "rich": "small; typer's console", "markdown-it-py": "small; rich",
    "mdurl": "small; rich", "pygments": "small; rich and pytest", "shellingham": "small; typer",
    "annotated-doc": "small; typer", "safetensors": "small; checkpoints", "pyyaml": "small; policy files",
    "pytest": "small; the GPU tests", "iniconfig": "small; pytest", "pluggy": "small; pytest",
    "packaging": "small; pytest", "typing-extensions": "small",
}
LEFT_OUT = {
    "pyarrow": "55 MiB a Python version: polars and pyarrow do not fit together; the device image has it",
    "numpy": "17 MiB a Python version; the device image has it",
    "pillow": "7 MiB a Python version; the device image has it",
    **dict.fromkeys(("scikit-learn", "scipy", "joblib", "threadpoolctl", "narwhals", "cloudpickle"),
                    "the digits dataset only (one test); 50 MiB; the device image has scikit-learn"),
    **dict.fromkeys(("albumentations", "albucore", "opencv-python-headless", "stringzilla", "simsimd"),
                    "`augment` only, which the check does not run; its compiled wheels are 16 MiB for two Pythons"),
    **dict.fromkeys(("pydantic", "pydantic-core", "annotated-types", "typing-inspection"),
                    "typer declares it, energytools' commands never import it; 5 MiB for two Pythons"),
    "plotly": "`report` only, which the check does not run; 9 MiB",
}


class BudgetError(Exception):
    """The wheelhouse and the working tree do not fit in one device call."""


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_budget(wheel_bytes: dict[str, int], tree_bytes: int, limit: int = LIMIT_BYTES) -> int:
    """The bytes one device call would carry (``wheel_bytes``: file name -> size, plus the working
    tree's ``tree_bytes``); :class:`BudgetError` naming the largest wheels when over ``limit``."""
    total = sum(wheel_bytes.values()) + tree_bytes
    if total >= limit:
        largest = sorted(wheel_bytes.items(), key=lambda item: -item[1])[:3]
        raise BudgetError(f"the wheelhouse ({sum(wheel_bytes.values()) / MIB:.1f} MiB) and the working tree "
                          f"({tree_bytes / MIB:.1f} MiB) come to {total / MIB:.1f} MiB, over the "
                          f"{limit / MIB:.0f} MiB a device call carries; largest: "
                          + ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in largest))
    return total


def dependency_closure(roots: list[str], requires) -> dict[str, list[str]]:
    """Every distribution that ``roots`` (requirement strings) need, by canonical name, with its
    own requirement strings: ``requires(name)`` gives them (importlib.metadata.requires). Markers
    are evaluated here, without extras; the device's own (torch, torchvision) are not followed."""
    from packaging.requirements import Requirement

    found: dict[str, list[str]] = {}
    todo = [Requirement(text) for text in roots]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in DEVICE_OWN or name in found:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found[name] = list(requires(name) or [])
        todo.extend(Requirement(text) for text in found[name])
    return found


def classify(names) -> list[str]:
    """The carried names among ``names``; :class:`BudgetError` for one neither carried nor left out."""
    undecided = sorted(set(names) - set(CARRIED) - set(LEFT_OUT))
    if undecided:
        raise BudgetError(f"undecided dependencies: {', '.join(undecided)}: add each to CARRIED or LEFT_OUT in "
                          f"{Path(__file__).name} (with its size and why)")
    return sorted(name for name in names if name in CARRIED)


def plan_install(manifest: dict | None, installed: dict[str, str], wanted: list[str],
                 tags: list) -> tuple[dict[str, str], dict[str, str]]:
    """What to install from the wheelhouse so that ``wanted`` (requirement strings) holds here:
    ``({name: wheel file}, {name: why it stays missing})``. A distribution installed at a
    version the requirement accepts is left alone (the device's own packages win); one absent or
    too old comes from the wheelhouse, and so, in turn, do its requirements that are not met.
    ``installed``: canonical name -> version; ``tags``: this interpreter's wheel tags, most
    specific first (``list(packaging.tags.sys_tags())``)."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    carried = (manifest or {}).get("carried", {})
    accepted = set(tags)
    plan: dict[str, str] = {}
    problems: dict[str, str] = {}
    todo = [Requirement(text) for text in wanted]
    while todo:
        requirement = todo.pop(0)
        name = canonical(requirement.name)
        if name in DEVICE_OWN or name in plan or name in problems:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        have = installed.get(name)
        if have is not None and requirement.specifier.contains(have, prereleases=True):
            continue
        state = "absent" if have is None else f"{have} here, {requirement} needed"
        entry = carried.get(name)
        if entry is None:
            problems[name] = f"{state}; not in the wheelhouse" + (f" ({LEFT_OUT[name]})" if name in LEFT_OUT else "")
            continue
        if not requirement.specifier.contains(entry["version"], prereleases=True):
            problems[name] = f"{state}; the wheelhouse has {entry['version']}"
            continue
        fitting = [file for file in entry["files"] if accepted & set(parse_wheel_filename(file)[3])]
        if not fitting:
            offered = sorted({tag.interpreter for file in entry["files"] for tag in parse_wheel_filename(file)[3]})
            problems[name] = (f"{state}; the wheelhouse's {name} {entry['version']} has no wheel for this Python "
                              f"({tags[0] if tags else '?'}), only for {', '.join(offered)}: rebuild it with "
                              "`make gpu-wheels` for this version")
            continue
        plan[name] = fitting[0]
        todo.extend(Requirement(text) for text in entry["requires"])
    return plan, problems


def working_tree_bytes(root: Path = ROOT) -> int:
    """What a device call carries of the repository: tracked files and untracked, not-ignored ones."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
    return sum((root / name).stat().st_size for name in listing.split("\0") if name and (root / name).is_file())


def download(pins: dict[str, str], pythons: list[str], dest: Path) -> None:
    """``pip download`` of ``pins`` (name -> version), binary wheels for each Python version."""
    platforms = [arg for platform in MANYLINUX for arg in ("--platform", platform)]
    for python in pythons:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        *platforms, "--python-version", python, "--implementation", "cp", "--dest", str(dest),
                        *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)


def build(dest: Path, pythons: list[str]) -> int:
    import importlib.metadata as metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    closure = dependency_closure([*project["dependencies"], "pytest"], metadata.requires)
    carried = classify(closure)
    pins = {name: metadata.version(name) for name in carried}
    if dest.exists():
        shutil.rmtree(dest)  # one version of each: two stop the device's install
    dest.mkdir(parents=True)
    download(pins, pythons, dest)
    from packaging.utils import parse_wheel_filename

    files: dict[str, list[str]] = {name: [] for name in carried}
    for wheel in sorted(dest.glob("*.whl")):
        files[canonical(parse_wheel_filename(wheel.name)[0])].append(wheel.name)
    write_manifest(dest, {"pythons": pythons, "carried": {
        name: {"version": pins[name], "files": files[name], "requires": closure[name], "why": CARRIED[name]}
        for name in carried}, "left_out": {name: LEFT_OUT[name] for name in sorted(closure) if name in LEFT_OUT}})
    sizes = {path.name: path.stat().st_size for path in dest.iterdir()}
    tree = working_tree_bytes()
    try:
        total = check_budget(sizes, tree)
    except BudgetError as exc:
        print(f"gpu-wheels: error: {exc}", file=sys.stderr)
        return 1
    print(f"gpu-wheels: {dest}: {len(sizes) - 1} wheels, {sum(sizes.values()) / MIB:.1f} MiB; with the working tree "
          f"({tree / MIB:.1f} MiB) a device call carries {total / MIB:.1f} MiB of {LIMIT_BYTES / MIB:.0f}")
    reasons: dict[str, list[str]] = {}
    for name in sorted(closure):
        if name in LEFT_OUT:
            reasons.setdefault(LEFT_OUT[name], []).append(name)
    print("gpu-wheels: left out: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items()))
    return 0


def write_manifest(dest: Path, manifest: dict) -> None:
    tmp = dest / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(dest / "manifest.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--python", action="append", help="a Python version to fetch binary wheels for "
                        "(repeatable; default 3.11 and 3.12)")
    args = parser.parse_args()
    return build(args.dest, args.python or ["3.11", "3.12"])


if __name__ == "__main__":
    sys.exit(main())
