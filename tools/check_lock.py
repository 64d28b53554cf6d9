"""Fail when requirements.lock no longer fits pyproject.toml, or the environment strays from the lock.

Two checks, run by CI after installing from the lock:
1. Every requirement of pyproject.toml (the core dependencies and every locked extra) names a package
   the lock pins, at a version its range accepts. A range edited in pyproject without refreshing the
   lock fails here with the package named.
2. Every distribution installed in this environment is pinned in the lock at exactly the installed
   version. A new dependency (or a transitive one) that slipped in unpinned fails here.

    python tools/check_lock.py
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Extras that are not in the lock, and why. Anything else in pyproject must be locked.
UNLOCKED_EXTRAS = {
    # torch-fidelity needs torchvision, and the index has no CPU build of torchvision: resolving it
    # replaces the pinned torch with a newer CUDA one. Users who want Inception FID install it on
    # their GPU machine; emaki's own offline evaluation does not need it.
    "eval",
}
# Tools that come with every venv and that pip freeze leaves out.
ENVIRONMENT_TOOLS = {"pip", "setuptools", "wheel", "emaki"}


def read_lock(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"error: {path.name}: '{line}' is not pinned with ==")
        pins[canonicalize_name(name)] = Version(version)
    return pins


def pyproject_requirements(path: Path) -> list[tuple[str, Requirement]]:
    project = tomllib.loads(path.read_text())["project"]
    found = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra not in UNLOCKED_EXTRAS:
            found += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return found


def lock_misfits(pyproject: Path, pins: dict[str, Version]) -> list[str]:
    """Requirements of `pyproject` that the lock does not pin, or pins outside their range."""
    problems: list[str] = []
    for where, req in pyproject_requirements(pyproject):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"pyproject {where} needs {req}, which requirements.lock does not pin")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"pyproject {where} needs {req}, but requirements.lock pins {req.name}=={pinned}")
    return problems


def environment_misfits(pins: dict[str, Version]) -> list[str]:
    """Installed distributions that the lock does not pin at exactly their version."""
    problems: list[str] = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ENVIRONMENT_TOOLS:
            continue
        installed = Version(dist.version)
        pinned = pins.get(name)
        # The lock drops local tags (+cpu): compare public versions.
        if pinned is None:
            problems.append(f"{name}=={installed} is installed but not pinned in requirements.lock")
        elif Version(installed.public) != pinned:
            problems.append(f"{name}=={installed} is installed but requirements.lock pins {pinned}")
    return problems


def main() -> int:
    pins = read_lock(ROOT / "requirements.lock")
    problems = lock_misfits(ROOT / "pyproject.toml", pins) + environment_misfits(pins)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        print("refresh the lock with: bash tools/lock.sh", file=sys.stderr)
        return 1
    print(f"requirements.lock: {len(pins)} pins fit pyproject.toml and this environment")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
