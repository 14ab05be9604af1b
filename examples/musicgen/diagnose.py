"""Teacher-forced figures of model folders on a held-in split, for choosing recipes without the test split.

::

    python examples/musicgen/diagnose.py --run runs/mini MODEL_DIR [MODEL_DIR ...]   # valid split
    python examples/musicgen/diagnose.py --run runs/mini teacher student_base runs/mini/distill_kd/model

Per model, one JSON line: NLL (nats per token, all codebooks and the first), forward KL to the run's
teacher, and the caption gain: NLL with every clip's caption swapped for another clip's minus NLL with
its own, i.e. how much the model uses the text (0 = it ignores it). ``teacher`` and ``student_base``
name the run's models. Reads the run's token files; never the test split unless asked for with
``--split test``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from musicgen import flush_denormals


def diagnose(run: str | Path, models: list[str], *, split: str = "valid") -> list[dict]:
    """The figures above for each model (a folder, ``teacher`` or ``student_base``)."""
    from musicgen.data.tokens import TokenDataset
    from musicgen.eval.heldout import heldout
    from musicgen.files import read_json
    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    results = read_json(Path(run) / "results.json")
    ds = TokenDataset.load(Path(run) / "tokens" / f"{split}.safetensors")
    other = torch.roll(torch.arange(len(ds)), len(ds) // 2).tolist()  # a different clip's caption
    swapped = TokenDataset(ds.codes, [ds.captions[i] for i in other])
    named = {"teacher": results["world"]["teacher"], "student_base": results["world"]["student_base"]}
    teacher = load_musicgen(named["teacher"])
    tok = load_tokenizer(named["teacher"])
    rows = []
    for name in models:
        model = load_musicgen(named.get(name, name))
        own = heldout(model, tok, ds, teacher=None if name == "teacher" else teacher)
        swap = heldout(model, tok, swapped)
        rows.append({"model": name, "split": split, "clips": len(ds), "nll": round(own["nll"], 4),
                     "nll_cb0": round(own["nll_cb0"], 4), "kl_teacher": round(own["kl_teacher"], 4),
                     "caption_gain": round(swap["nll"] - own["nll"], 4),
                     "caption_gain_cb0": round(swap["nll_cb0"] - own["nll_cb0"], 4)})
    return rows


@flush_denormals
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a reproduce.py output folder")
    ap.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    ap.add_argument("models", nargs="+", help="model folders, or teacher / student_base")
    a = ap.parse_args(argv)
    for row in diagnose(a.run, a.models, split=a.split):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
