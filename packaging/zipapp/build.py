"""Build ``sidestep.pyz``: sidestep and its pure-Python dependencies in one executable file.

For devices without pip (a home router): copy the file over and run ``python3 sidestep.pyz run
--config /etc/sidestep/config.toml``. Python cannot import compiled extension modules from
inside a zip archive, so dependencies that ship them (``cryptography`` and its ``cffi``) are left
out and must come from the device's own packages (OpenWrt: ``python3-cryptography``; Debian:
``python3-cryptography``). The script says which ones it left out.

The dependencies are copied from the Python environment that runs this script (the project's
``.venv`` after ``make test`` or ``make run``), so no network access is needed::

    .venv/bin/python packaging/zipapp/build.py --out dist/sidestep.pyz

The archive starts with ``#!/usr/bin/env python3`` and is marked executable.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
#: suffixes of files Python cannot import from a zip archive
COMPILED = (".so", ".pyd", ".dylib")
MAIN = "proxy.cli:main"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(project: str = "sidestep") -> list[md.Distribution]:
    """``project``'s runtime dependencies, recursively, as installed here (extras excluded)."""
    env = {"extra": ""}
    seen: dict[str, md.Distribution] = {}
    todo = [project]
    while todo:
        name = _normal(todo.pop())
        if name in seen:
            continue
        dist = md.distribution(name)
        seen[name] = dist
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
                continue
            todo.append(req.name)
    del seen[_normal(project)]
    return sorted(seen.values(), key=lambda d: _normal(d.metadata["Name"]))


def is_compiled(dist: md.Distribution) -> bool:
    return any(str(f).endswith(COMPILED) for f in dist.files or ())


def _owned_by_compiled(dist: md.Distribution, compiled: set[str]) -> bool:
    """True when ``dist`` is only needed by a compiled distribution (cffi's pycparser)."""
    users = [
        d
        for d in md.distributions()
        if any(
            _normal(Requirement(r).name) == _normal(dist.metadata["Name"]) for r in d.requires or ()
        )
    ]
    return bool(users) and all(_normal(u.metadata["Name"]) in compiled for u in users)


def copy_distribution(dist: md.Distribution, into: Path) -> None:
    """Copy the importable files of ``dist`` (not its metadata or scripts) into ``into``."""
    for entry in dist.files or ():
        parts = Path(str(entry)).parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info")) or parts[0] == "..":
            continue
        if "__pycache__" in parts or str(entry).endswith(".pyc"):
            continue
        source = Path(str(dist.locate_file(entry)))
        if source.is_file():
            target = into.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def build(out: Path) -> list[str]:
    """Write the archive to ``out``; returns the names of the dependencies left out."""
    closure = runtime_closure()
    compiled = {_normal(d.metadata["Name"]) for d in closure if is_compiled(d)}
    left_out = sorted(
        d.metadata["Name"]
        for d in closure
        if _normal(d.metadata["Name"]) in compiled or _owned_by_compiled(d, compiled)
    )
    skip = {_normal(n) for n in left_out}
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        shutil.copytree(
            ROOT / "proxy", stage / "proxy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for dist in closure:
            if _normal(dist.metadata["Name"]) not in skip:
                copy_distribution(dist, stage)
        out.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(
            stage, out, interpreter="/usr/bin/env python3", main=MAIN, compressed=True
        )
    return left_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "sidestep.pyz")
    args = parser.parse_args(argv)
    left_out = build(args.out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    if left_out:
        print(
            "not included (compiled; install them from the system's packages): "
            + ", ".join(left_out)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
