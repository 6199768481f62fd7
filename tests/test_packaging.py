"""Packaging: a non-editable wheel installs working CLIs, with converters/ and bench/ inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    # Sub-packages of ecospa_deploy that are themselves mapped elsewhere don't live in its folder.
    assert found <= listed, f"folders with __init__.py missing from pyproject packages: {found - listed}"
    assert not {"converters", "bench"} & listed


def test_bench_results_hold_data_only_and_stay_out_of_the_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "results/**" in cfg["exclude-package-data"]["ecospa_deploy.bench"]
    scripts = list((ROOT / "bench" / "results").rglob("*.py"))
    assert not scripts, f"scripts belong in bench/, not among the results: {scripts}"


@pytest.mark.slow
def test_non_editable_wheel_has_working_clis(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(ROOT)], check=True, timeout=300)
    wheel = next(wheel_dir.glob("ecospa_deploy-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    names = {p.name for p in target.iterdir()}
    assert "converters" not in names and "bench" not in names, "generic top-level names leaked"
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = ("import ecospa_deploy, ecospa_deploy.converters, ecospa_deploy.bench; "
             "print(ecospa_deploy.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    for script in ("ecospa", "ecospa-serve", "ecospa-prune", "ecospa-bench", "ecospa-convert"):
        res = subprocess.run([sys.executable, str(target / "bin" / script), "--help"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{script}: {res.stderr}"
        assert "usage" in res.stdout
