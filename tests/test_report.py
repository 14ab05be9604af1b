"""report.py: every section and embedded asset is present, decodes, and says what was skipped."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicgen.report import PAPER, SECTIONS, ReportError, render, write_report

ROOT = Path(__file__).resolve().parents[1]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.audios, self.stack, self.text = [], [], [], [], []
        self.unbalanced = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "audio":
            self.audios.append(a["src"])
        if tag not in ("img", "meta", "br", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.unbalanced.append(tag)
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collect:
    c = _Collect()
    c.feed(page)
    c.close()
    return c


def _results(root: Path) -> dict:
    (root / "samples").mkdir(parents=True)
    prompts = ["a calm organ chorale", "a lively folk tune on fiddle"]
    variants = {}
    for i, name in enumerate(["teacher", "student_base", "student_ce", "student_kd", "student_kd_paper_plan"]):
        files = []
        for j in range(len(prompts)):
            t = np.arange(8000) / 8000
            path = root / "samples" / f"{name}_{j}.wav"
            sf.write(path, 0.3 * np.sin(2 * np.pi * (220 + 40 * i + 10 * j) * t), 8000)
            files.append(str(path.relative_to(root)))
        variants[name] = {"bytes": 4_000_000 // (1 + (i > 3)), "fad": 3.0 + i, "clap": 0.5 - 0.01 * i,
                          "nll": 6.0 - 0.1 * i, "kl_teacher": 0.2 * i, "samples": files,
                          "retention": {"clap": 0.97, "fad": 0.91}}
    variants["student_kd_kdq_plan"] = {"skipped": "planner branch not merged"}
    curve = [{"step": s, "loss": 2.0 / (s + 1), "temperature": 2.0 - s / 20} for s in range(20)]
    (root / "curve_kd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return {
        "preset": "smoke", "command": "python examples/musicgen/reproduce.py --preset smoke --out X",
        "created": "2026-11-25T17:00:00Z", "versions": {"torch": "2.13.0", "kdq": "0.1.0"},
        "prompts": prompts, "variants": variants,
        "headline": {"variant": "student_kd_paper_plan", "baseline": "student_base", "fad": 7.5, "clap": 0.4567,
                     "size_reduction": 0.5123, "retention": 0.9512, "embedder": "clap-mini (proxy)"},
        "training": {"student_kd": "curve_kd.jsonl",
                     "student_ce": [{"step": s, "loss": 3.0 / (s + 1)} for s in range(20)]},
        "planner": {"frontier": [{"bytes": 1_000_000 * b, "sensitivity": 1.0 / b} for b in (1, 2, 3, 4)],
                    "fp32": {"bytes": 4_000_000, "sensitivity": 0.0},
                    "paper_plan": {"bytes": 2_200_000, "sensitivity": 0.3},
                    "kdq_plan": {"bytes": 2_000_000, "sensitivity": 0.05},
                    "sensitivity": {f"decoder.layers.{i}": {"fp16": {"sensitivity": 1e-3 * (i + 1), "bytes": 10},
                                                            "int8": {"sensitivity": 1e-2 * (i + 1), "bytes": 5}}
                                    for i in range(3)}},
        "ort": {"parity_max_abs": 3.2e-7, "rtf": 0.8, "bundle": "bundles/fp32"},
        "stages": {"render": {"wall_s": 3.0, "cached": True}, "distill": {"wall_s": 12.5, "cached": False},
                   "export": {"skipped": "export branch not merged"}},
    }


def test_every_section_and_asset_is_present_and_decodes(tmp_path):
    results = _results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = write_report(tmp_path / "results.json")
    assert out == tmp_path / "report.html"
    page = out.read_text()
    c = _parse(page)
    assert c.sections == list(SECTIONS)
    assert not c.unbalanced and not c.stack
    # three figures, each a real PNG
    assert len(c.imgs) == 3
    for src in c.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # one player per prompt and sampled variant, each the WAV we wrote, inline
    assert len(c.audios) == 2 * 5
    first = base64.b64decode(c.audios[0].split(",", 1)[1])
    assert first == (tmp_path / results["variants"]["teacher"]["samples"][0]).read_bytes()
    assert first[:4] == b"RIFF"
    text = " ".join(c.text)
    for fig in ("7.05", "0.343", "55.0%", "93.0%"):  # the paper's table
        assert fig in text
    for fig in ("0.457", "51.2%", "95.1%", "clap-mini (proxy)"):  # kdq's, beside them
        assert fig in text
    assert "skipped: planner branch not merged" in text
    assert "skipped: export branch not merged" in text
    assert results["command"] in text
    assert "src=\"http" not in page and "src='http" not in page  # self-contained


def test_missing_parts_are_said_not_invented(tmp_path):
    results = {"preset": "smoke", "variants": {"teacher": {"skipped": "no teacher"}},
               "ort": {"skipped": "export not merged"}, "planner": {"skipped": "planner not merged"}}
    page = render(results, tmp_path)
    c = _parse(page)
    assert c.sections == list(SECTIONS)
    assert c.imgs == [] and c.audios == []
    text = " ".join(c.text)
    assert text.count("not drawn") == 3
    assert "planner not merged" in text and "export not merged" in text and "no teacher" in text
    assert str(PAPER["fad"]) in text


def test_bad_results_raise(tmp_path):
    with pytest.raises(ReportError, match="results"):
        render({"preset": "x"}, tmp_path)
    with pytest.raises(ReportError, match="reproduce.py"):
        write_report(tmp_path / "nope.json")


def test_headless_chromium_renders_it(tmp_path):
    """Screenshot with headless Chromium where installed (the parse test above always runs)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the HTML parse test covers structure")
    (tmp_path / "results.json").write_text(json.dumps(_results(tmp_path)))
    page = write_report(tmp_path / "results.json")
    shot = tmp_path / "shot.png"
    # a fresh profile and no background traffic: these machines have no network beyond package registries
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1200
    assert img[..., :3].std() > 0.05  # not a blank page
