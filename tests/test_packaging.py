"""What a user of the package meets first: the declared license (more below as they are added).

Runs from an sdist too (it imports no example code).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()  # in the repository and in the sdist
    assert "Apache License" in text and "Version 2.0, January 2004" in text
