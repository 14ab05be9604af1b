"""What a user of the package meets first: `kdq --version`, the README's code, the declared license.

Runs from an sdist too (it imports no example code), so `.ci/check_wheel` exercises it on the wheel.
"""

from __future__ import annotations

import importlib.metadata
import re
import runpy
from pathlib import Path

import pytest

import kdq
from kdq.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdq {kdq.__version__}"
    try:
        assert importlib.metadata.version("kdq") == kdq.__version__  # one version, read from kdq/__init__.py
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kdq is not installed here (run from a source tree)")


def test_readme_python_block_runs_as_written(tmp_path, monkeypatch):
    """Regression: the README's snippet used an undefined `score_fn` (and `model`, logits, `s`, `m`)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "readme.py"
    script.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "plan.json").is_file()
    assert ns["student_logits"].grad is not None
    plan = ns["plan"]
    assert ns["model_bytes"](ns["model"]) == plan.predicted["bytes"] <= plan.model["bytes_fp32"] // 2


def test_license_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()  # in the repository and in the sdist
    assert "Apache License" in text and "Version 2.0, January 2004" in text
