"""Collection: tests that import the MusicGen example run only where the example is importable.

The example (``examples/musicgen``, imported as the package ``musicgen``) lives in the repository, not
in the wheel or the sdist. In a clone, pytest's ``pythonpath`` setting makes it importable and every
test runs (a clone where it cannot be found is an error, not a quiet skip). In an unpacked sdist,
test files that import ``musicgen`` are not collected, and the end of the report says which.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLE = importlib.util.find_spec("musicgen") is not None


def _imports_example(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n.split(".")[0] == "musicgen" for n in names):
            return True
    return False


NEEDS_EXAMPLE = sorted(p.name for p in HERE.glob("test_*.py") if _imports_example(p))


def pytest_configure(config: pytest.Config) -> None:
    if not EXAMPLE and (HERE.parent / "examples" / "musicgen").is_dir():
        raise pytest.UsageError("examples/musicgen is here but not importable as `musicgen`: run pytest from the "
                                "repository root (pyproject.toml puts examples/ on the path)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not EXAMPLE and collection_path.parent == HERE and collection_path.name in NEEDS_EXAMPLE:
        return True
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    if not EXAMPLE:
        terminalreporter.write_line(f"examples/musicgen is not here (an sdist): {len(NEEDS_EXAMPLE)} test files that "
                                    f"need it were not collected: {', '.join(NEEDS_EXAMPLE)}")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """(model folder, bundle folder, export report): the tiny random MusicGen and its fp32 ONNX bundle,
    exported once per session and shared by the runtime and device-run tests. Treat it as read-only:
    copy the bundle before writing into it."""
    from musicgen.bundle.build import export_bundle
    from musicgen.models.tiny import save_tiny_musicgen

    root = tmp_path_factory.mktemp("tiny_musicgen")
    model_dir = save_tiny_musicgen(root / "model")
    report = export_bundle(str(model_dir), root / "bundle", progress=False)
    return model_dir, root / "bundle", report
