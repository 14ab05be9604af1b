"""report.py: every section and embedded asset is present, decodes, and says what was skipped; toy and
stand-in runs carry a banner; paper figures stand beside kdq's only where comparable; one panel per loss;
the scatter has a legend, not overlapping labels; the audio wraps to the page; the command appears once."""

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

from musicgen.report import (PAPER, SECTIONS, ReportError, curve_panels, headline_rows, measured_scatter, render,
                             run_scale, terminal_summary, write_report)

ROOT = Path(__file__).resolve().parents[1]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.audios, self.stack, self.text = [], [], [], [], []
        self.unbalanced, self.classes, self.prompts = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.classes += [(tag, a["class"])] if a.get("class") else []
        if a.get("class") == "prompt":
            self.prompts.append(0)
        if tag == "audio" and self.prompts:
            self.prompts[-1] += 1
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
                          "fad_embedder": "encodec", "clap_embedder": "clap-mini-proxy",
                          "retention": {"clap": 0.97, "fad": 0.91}}
    variants["student_kd_kdq_plan"] = {"skipped": "planner branch not merged"}
    curve = [{"step": s, "loss": 2.0 / (s + 1), "temperature": 2.0 - s / 20} for s in range(20)]
    (root / "curve_kd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return {
        "preset": "smoke", "command": "python examples/musicgen/reproduce.py --preset smoke --out X",
        "created": "2026-11-25T17:00:00Z", "versions": {"torch": "2.13.0", "kdq": "0.1.0"},
        "out": str(root), "world": {"source": "built"},
        "prompts": prompts, "variants": variants,
        "embedders": {"encodec": "encodec", "clap-mini-proxy": "clap-mini (proxy)"},
        "headline": {"variant": "student_kd_paper_plan", "baseline": "student_base", "fad": 7.5, "clap": 0.4567,
                     "size_reduction": 0.5123, "retention": 0.9512, "retention_parts": {"clap": 0.97, "fad": 0.91}},
        "training": {"student_kd": "curve_kd.jsonl",
                     "student_ce": [{"step": s, "loss": 3.0 / (s + 1)} for s in range(20)],
                     "teacher (CE pretraining)": [{"step": s, "loss": 7.0 - s / 10} for s in range(40)]},
        "config": {"distill": {"ce_weight": 1.0}},
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
    assert text.count(results["command"]) == 1  # once, at the top (not once per headline row)
    assert "src=\"http" not in page and "src='http" not in page  # self-contained
    # the audio wraps: one block per prompt holding every sampled variant's player, no wide table
    assert c.prompts == [5, 5]
    assert ("table", "audio") not in c.classes and ("div", "players") in c.classes


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


def _at_scale(results: dict, *, preset: str, source: str, student_bytes: int, fad: str, clap: str) -> dict:
    results = {**results, "preset": preset, "world": {"source": source}}
    results["variants"] = {k: {**v, "fad_embedder": fad, "clap_embedder": clap} for k, v in results["variants"].items()}
    results["variants"]["student_base"]["bytes"] = student_bytes
    return results


def test_toy_and_stand_in_runs_carry_a_banner_and_compare_nothing_with_the_paper(tmp_path):
    """Regression: the smoke report read as if kdq beat the paper (CLAP 0.399 against 0.343) with only a grey
    footnote; now the page opens with a banner and no paper figure stands beside a toy figure."""
    smoke = _results(tmp_path)
    tiny_checkpoints = _at_scale(smoke, preset="paper", source="checkpoints", student_bytes=4_000_000,
                                 fad="vggish", clap="clap")
    mini = _at_scale(smoke, preset="mini", source="hub", student_bytes=18_000_000, fad="encodec", clap="clap-mini-proxy")
    for results, kind, words in ((smoke, "toy", "TOY SIZES"), (tiny_checkpoints, "toy", "4.00 MB"),
                                 (mini, "stand-in", "STAND-IN MODELS")):
        assert run_scale(results)[0] == kind
        c = _parse(render(results, tmp_path))
        assert ("p", "banner") in c.classes
        assert words in " ".join(c.text) and words in terminal_summary(results)
        rows = headline_rows(results)
        assert [r["compared"] for r in rows] == [False] * 4 and all(kind in r["why"] for r in rows)
    text = " ".join(_parse(render(smoke, tmp_path)).text)
    assert text.count("not compared") == 4


def test_paper_figures_stand_beside_kdq_only_with_the_paper_embedder(tmp_path):
    base = _results(tmp_path)
    same = _at_scale(base, preset="paper", source="checkpoints", student_bytes=2_350_000_000, fad="vggish", clap="clap")
    other = _at_scale(base, preset="paper", source="checkpoints", student_bytes=2_350_000_000, fad="encodec",
                      clap="clap-mini-proxy")
    assert run_scale(same) == ("real", "")
    c = _parse(render(same, tmp_path))
    assert ("p", "banner") not in c.classes and "TOY" not in " ".join(c.text)
    rows = {r["figure"].split()[0]: r for r in headline_rows(same)}
    assert all(r["compared"] for r in rows.values())
    assert rows["FAD"]["paper"] == "7.05 (VGGish, assumed)" and rows["FAD"]["kdq"] == "7.50 (vggish)"
    assert rows["CLAP"]["kdq"] == "0.457 (clap)"
    rows = {r["figure"].split()[0]: r for r in headline_rows(other)}
    assert not rows["FAD"]["compared"] and "encodec" in rows["FAD"]["why"] and "VGGish" in rows["FAD"]["why"]
    assert not rows["CLAP"]["compared"] and "clap-mini (proxy)" in rows["CLAP"]["kdq"]
    assert rows["size"]["compared"] and rows["retention"]["compared"]
    summary = terminal_summary(other)
    assert "55.0%" in summary and "not compared: embedder encodec" in summary


def test_different_losses_never_share_an_axis():
    """Regression: CE pretraining, CE fine-tuning and the KD loss were drawn on one axis."""
    names = ["student_ce", "student_kd", "teacher (CE pretraining)", "student_base (CE pretraining)", "codec"]
    panels = curve_panels(names)
    assert panels == {"pretraining": ["teacher (CE pretraining)", "student_base (CE pretraining)"],
                      "student_ce": ["student_ce"], "student_kd": ["student_kd"], "codec": ["codec"]}


def test_measured_scatter_names_variants_in_a_legend_not_overlapping_labels(tmp_path):
    """Regression: labels of variants with equal bytes were drawn on top of each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _results(tmp_path)["variants"]
    fig, ax = plt.subplots()
    drawn = measured_scatter(ax, variants)
    assert drawn == ["teacher", "student_base", "student_ce", "student_kd", "student_kd_paper_plan"]
    assert len(ax.texts) == 0  # no labels at the points
    assert [t.get_text() for t in ax.get_legend().get_texts()] == drawn
    assert "clap-mini-proxy" in ax.get_ylabel()
    no_clap = {k: {**v, "clap": None} for k, v in variants.items()}
    ax2 = fig.add_subplot(2, 1, 2)
    assert measured_scatter(ax2, no_clap) == drawn and ax2.get_ylabel().startswith("FAD")  # FAD where no CLAP
    plt.close(fig)


def test_terminal_summary_is_the_ablation_the_headline_and_the_paths(tmp_path):
    results = _results(tmp_path)
    lines = terminal_summary(results).splitlines()
    header = next(ln for ln in lines if ln.startswith("variant"))
    assert header.split()[:4] == ["variant", "bytes", "FAD", "(encodec)"] and "KL to teacher" in header
    for name in ("teacher", "student_kd_paper_plan"):
        assert any(ln.split()[0] == name for ln in lines)
    assert any("skipped: planner branch not merged" in ln for ln in lines)
    assert any(ln.startswith("FAD (lower is better)") for ln in lines)
    assert lines[-2:] == [f"results: {tmp_path / 'results.json'}", f"report:  {tmp_path / 'report.html'}"]


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
    results = _results(tmp_path)
    results["prompts"] = results["prompts"] * 3  # all seven variants, more prompts: more players than fit one row
    for name in ("student_base_paper_plan", "student_kd_kdq_plan"):
        results["variants"][name] = dict(results["variants"]["student_kd_paper_plan"])
    for v in results["variants"].values():
        v["samples"] = v.get("samples", []) * 3
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = write_report(tmp_path / "results.json")
    shot = tmp_path / "shot.png"
    # a fresh profile and no background traffic: these machines have no network beyond package registries
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,3000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[0] >= 2800 and img.shape[1] == 1400
    assert img.std() > 0.05  # not a blank page
    # nothing overflows the 1400 px page: the body is centred with white margins, and a table wider than
    # the page (the old audio table) drew into the right-hand margin
    assert img[:, -60:].min() > 0.97, "something is drawn in the page's right margin"
    # the toy banner (#fff3cd) is on screen
    banner = (np.abs(img - np.array([0xFF, 0xF3, 0xCD]) / 255).max(axis=-1) < 0.02)
    assert banner.sum() > 10_000


def test_main_renders_intervals_and_paired_comparisons(tmp_path, capsys):
    from musicgen.report import main

    results = _results(tmp_path)
    kd = results["variants"]["student_kd"]
    kd.update({"fad_embedder": "mel-chroma", "fad_mel-chroma": 6.0, "fad_mel-chroma_ci": [5.5, 6.75],
               "key_accuracy": 0.25, "key_accuracy_ci": [0.125, 0.375]})
    results["ceilings"] = {"key_accuracy": 0.54, "key_accuracy_chance": 1 / 24}
    results["comparisons"] = {
        "student_kd - student_ce": {"a": "student_kd", "b": "student_ce", "question": "distillation against CE",
                                    "nll": {"estimate": -0.04, "low": -0.07, "high": -0.01, "within_noise": False},
                                    "key_accuracy": {"estimate": 0.02, "low": -0.05, "high": 0.09, "within_noise": True}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = main([str(tmp_path / "results.json"), "--out", str(tmp_path / "r.html")])
    assert out == tmp_path / "r.html" and capsys.readouterr().out.strip() == str(out)
    text = " ".join(" ".join(_parse(out.read_text()).text).split())
    assert "6.000 [5.500, 6.750]" in text and "0.250 [0.125, 0.375]" in text  # the intervals beside the figures
    assert "Paired comparisons" in text and "distillation against CE" in text
    assert "-0.04 [-0.07, -0.01]" in text and "+0.02 [-0.05, 0.09] within noise" in text
    assert "key accuracy of the real test clips 0.540 (chance 0.042)" in text


def test_audio_embeds_a_spread_of_prompts_not_all(tmp_path, monkeypatch):
    import musicgen.report as report

    results = _results(tmp_path)
    monkeypatch.setattr(report, "AUDIO_PROMPTS", 1)
    page = report.render(results, tmp_path)
    c = _parse(page)
    assert c.prompts == [5]  # one prompt's players, not every prompt's (150 x 7 made a 90 MB page)
    assert "1 of 2 prompts; every clip is on disk" in " ".join(c.text)
