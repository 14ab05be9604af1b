"""Safe loading only: every model weight kdq or the example loads comes from safetensors, never pickle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# classes whose from_pretrained reads JSON or tokenizer files only, never weights
NO_WEIGHTS = {"AutoTokenizer", "AutoConfig", "ClapProcessor", "AutoProcessor", "PreTrainedTokenizerFast"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            yield node, name


def test_every_weight_load_asks_for_safetensors():
    """Regression (issue 13): some from_pretrained calls did not pass use_safetensors=True, so a folder
    holding only pytorch_model.bin would have been unpickled."""
    offenders = []
    for path in [*ROOT.glob("kdq/**/*.py"), *ROOT.glob("examples/**/*.py")]:
        for node, owner in _calls(path):
            if owner in NO_WEIGHTS or owner.endswith("Embedder"):  # embedders call the safe loaders below
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.from_pretrained")
    assert not offenders, offenders


def test_nothing_unpickles():
    for path in [*ROOT.glob("kdq/**/*.py"), *ROOT.glob("examples/**/*.py")]:
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path
