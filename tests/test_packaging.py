"""What a user of the package meets first: `kdq --version`, the declared license (more below as they are added).

Runs from an sdist too (it imports no example code).
"""

from __future__ import annotations

import importlib.metadata
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


def test_license_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()  # in the repository and in the sdist
    assert "Apache License" in text and "Version 2.0, January 2004" in text
