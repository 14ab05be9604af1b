"""reproduce.py: stage cache semantics, and the smoke preset end to end (results.json + report.html)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from musicgen.reproduce import VARIANT_NAMES, Pipeline, ReproduceError, Skip, _preset, reproduce
from musicgen.report import SECTIONS


def test_pipeline_caches_skips_and_redoes_downstream(tmp_path):
    calls = []

    def stage(name, value):
        def fn():
            calls.append(name)
            return {"value": value}
        return fn

    def skipped():
        calls.append("b")
        raise Skip("piece X is not merged")

    p = Pipeline(tmp_path)
    assert p.run("a", {"x": 1}, stage("a", 1)) == {"value": 1}
    assert p.run("b", {}, skipped, after=("a",)) == {"skipped": "piece X is not merged"}
    assert p.run("c", {}, stage("c", 3), after=("b",)) == {"skipped": "needs stage 'b', which was skipped"}
    assert p.run("d", {}, stage("d", 4), after=("a",)) == {"value": 4}
    assert calls == ["a", "b", "d"]
    assert p.stages["c"]["skipped"] and not p.stages["a"].get("skipped")

    # same settings: cached (skipped stages are retried: their dependency may have landed since)
    q = Pipeline(tmp_path)
    q.run("a", {"x": 1}, stage("a", 1))
    q.run("b", {}, skipped, after=("a",))
    q.run("d", {}, stage("d", 4), after=("a",))
    assert calls == ["a", "b", "d", "b"]
    assert q.stages["a"]["cached"] and q.stages["d"]["cached"]

    # changed settings of a redo its dependents; --force does too
    r = Pipeline(tmp_path)
    r.run("a", {"x": 2}, stage("a", 2))
    r.run("d", {}, stage("d", 4), after=("a",))
    assert calls[-2:] == ["a", "d"]
    s = Pipeline(tmp_path, force={"a"})
    s.run("a", {"x": 2}, stage("a", 2))
    s.run("d", {}, stage("d", 4), after=("a",))
    assert calls[-2:] == ["a", "d"]
    t = Pipeline(tmp_path)
    t.run("a", {"x": 2}, stage("a", 2))
    t.run("d", {}, stage("d", 4), after=("a",))
    assert calls[-2:] == ["a", "d"] and len(calls) == 8  # nothing re-ran


def test_unknown_preset_names_the_choices():
    with pytest.raises(ReproduceError, match="smoke"):
        _preset("smok")


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.audios = [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.ids += [a["id"]] if tag == "section" else []
        self.imgs += tag == "img" and a["src"].startswith("data:image/png;base64,")
        self.audios += tag == "audio" and a["src"].startswith("data:audio/wav;base64,")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    return out, reproduce("smoke", out, progress=False)


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_cached(smoke):
    out, results = smoke
    saved = json.loads((out / "results.json").read_text())  # strict JSON: no NaN or Infinity
    assert saved["preset"] == "smoke" and saved["command"]
    assert set(saved["variants"]) == set(VARIANT_NAMES)
    ran = {n: v for n, v in saved["variants"].items() if not v.get("skipped")}
    for name, v in saved["variants"].items():
        assert v.get("skipped") or {"bytes", "fad", "clap", "nll", "kl_teacher"} <= set(v), name
    for name, v in ran.items():
        assert isinstance(v["bytes"], int) and v["bytes"] > 0
        assert v["nll"] > 0 and v["kl_teacher"] >= 0
        for wav in v["samples"]:
            assert (out / wav).read_bytes()[:4] == b"RIFF"
    assert saved["variants"]["teacher"]["kl_teacher"] == 0.0
    # quantized variants are really smaller; kdq's plan is no larger than the paper's
    if "student_kd_paper_plan" in ran:
        assert ran["student_kd_paper_plan"]["bytes"] < ran["student_kd"]["bytes"]
    if "student_kd_kdq_plan" in ran:
        assert ran["student_kd_kdq_plan"]["bytes"] <= ran["student_kd_paper_plan"]["bytes"]
    # ORT: parity recorded for the fp32 bundle, or the reason it was skipped
    ort = saved["ort"]
    assert ort.get("skipped") or (ort["parity_max_abs"] < 1e-4 and ort["rtf"] > 0)
    # stages with wall times; training curves; versions
    for stage in ("data", "world", "tokens", "distill_ce", "distill_kd", "plan", "export", "evaluate"):
        assert stage in saved["stages"] and "wall_s" in saved["stages"][stage]
    curve = [json.loads(ln) for ln in (out / saved["training"]["student_kd"]).read_text().splitlines()]
    assert len(curve) == saved["config"]["distill"]["steps"] and "temperature" in curve[0]
    assert saved["versions"]["torch"]
    # the report: every section, the figures, one player per prompt and variant with samples
    html = (out / "report.html").read_text()
    p = _Sections()
    p.feed(html)
    assert p.ids == list(SECTIONS)
    assert p.imgs >= 1
    assert p.audios == len(saved["prompts"]) * len(ran)
    for fig in ("7.05", "0.343"):
        assert fig in html

    # a second run redoes nothing
    again = reproduce("smoke", out, progress=False)
    assert all(s["cached"] or s.get("skipped") for s in again["stages"].values()), again["stages"]
    assert again["variants"]["student_kd"] == results["variants"]["student_kd"]


@pytest.mark.slow
def test_paper_preset_code_path_on_local_checkpoints(smoke, tmp_path):
    """The paper preset (checkpoints by path, a user's audiofolder dataset, tokens encoded here)."""
    world = smoke[0] / "world"
    overrides = {
        "data": {"dataset": str(world / "render" / "data"), "clip_seconds": 2.0},
        "world": {"teacher_id": str(world / "teacher" / "model"), "student_id": str(world / "student" / "model")},
        "distill": {"steps": 3, "micro_batch": 2, "grad_accum": 2, "warmup_steps": 1, "checkpoint_every": 3,
                    "bf16": "off"},
        "plan": {"granularity": "part", "candidates": ["fp32", "int8"], "calibration_clips": 2},
        "export": {"enabled": False},
        "evaluate": {"prompts": 2, "seconds": 0.2, "clap_mini_steps": 0, "max_eval_clips": 4},
    }
    r = reproduce("paper", tmp_path / "paper", overrides=overrides, progress=False)
    assert r["preset"] == "paper" and r["stand_in"] is None
    assert r["data"]["source"] == "user dataset"
    assert (tmp_path / "paper" / "tokens" / "train" / "codes.safetensors").exists()  # encoded here, not the world's
    assert r["distill"]["student_kd"]["global_batch"] == 4
    kd = r["variants"]["student_kd_kdq_plan"]
    assert kd["bytes"] < r["variants"]["student_kd"]["bytes"] and kd["nll"] > 0
    assert r["ort"] == {"skipped": "export disabled in this preset"}
    assert r["embedders"] == {"encodec": "encodec"}  # offline, without a CLAP: FAD only
    assert r["variants"]["student_kd"]["clap"] is None and r["variants"]["student_kd"]["fad"] is not None


@pytest.mark.slow
def test_diagnose_reports_held_in_figures(smoke):
    from musicgen.diagnose import diagnose

    out = smoke[0]
    rows = {r["model"]: r for r in diagnose(out, ["teacher", "student_base", str(out / "student_kd" / "model")])}
    assert rows["teacher"]["kl_teacher"] == 0.0 and rows["student_base"]["kl_teacher"] > 0
    for r in rows.values():
        assert r["split"] == "valid" and r["clips"] > 0 and r["nll"] > 0
        assert abs(r["caption_gain"]) < r["nll"]  # a difference of two NLLs on the same codes


def test_world_recipe_keys_the_world_stage(monkeypatch):
    """Changing the mini world's recipe must redo the world stage (and so everything after it)."""
    import dataclasses

    import musicgen.world as world
    from musicgen.reproduce import _world_recipe

    base = _world_recipe({}, "mini")
    assert base is not None and "threads" not in json.dumps(base)
    longer = dataclasses.replace(world.MINI, teacher_train=dataclasses.replace(world.MINI.teacher_train, steps=1))
    monkeypatch.setitem(world.PRESETS, "mini", longer)
    assert _world_recipe({}, "mini") != base
    faster = dataclasses.replace(world.MINI, threads=1)
    monkeypatch.setitem(world.PRESETS, "mini", faster)
    assert _world_recipe({}, "mini") == base  # thread counts change speed, not products
    assert _world_recipe({}, "paper") is None


def test_interrupted_stage_resumes_but_a_changed_one_starts_clean(tmp_path):
    seen = []

    def killed():
        seen.append(p.resuming)
        raise KeyboardInterrupt  # killed mid-stage: no result recorded

    p = Pipeline(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        p.run("distill", {"steps": 3}, killed)
    p = Pipeline(tmp_path)
    again = p.run("distill", {"steps": 3}, lambda: {"resumed": p.resuming})  # same key: its partial work is its own
    p = Pipeline(tmp_path)
    changed = p.run("distill", {"steps": 4}, lambda: {"resumed": p.resuming})  # other inputs: start clean
    assert seen == [False] and again == {"resumed": True} and changed == {"resumed": False}


def test_distill_stage_started_fresh_discards_a_finished_run(smoke, tmp_path):
    """A retrained teacher must not meet the old student_kd's checkpoints (they would be reopened as done)."""
    from musicgen.reproduce import stage_distill

    out, results = smoke
    world, cfg = results["world"], {**results["config"]["distill"], "steps": 2, "checkpoint_every": 1}
    tokens = {"paths": results["world"]["tokens"]}
    first = stage_distill("ce", cfg, world, tokens, tmp_path, progress=False)
    assert first["summary"]["resumed_from"] == 0
    again = stage_distill("ce", cfg, world, tokens, tmp_path, progress=False)
    assert again["summary"]["resumed_from"] == 2  # reopened: the resume path
    fresh = stage_distill("ce", cfg, world, tokens, tmp_path, progress=False, fresh=True)
    assert fresh["summary"]["resumed_from"] == 0


def test_flush_denormals_holds_only_while_main_runs():
    import sys

    from musicgen import flush_denormals

    @flush_denormals
    def main():
        return sys.float_info.min / 2 == 0.0  # a subnormal flushed to zero

    assert main() is True
    assert sys.float_info.min / 2 > 0.0  # restored: other code (hypothesis, users) sees IEEE floats

    @flush_denormals
    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails()
    assert sys.float_info.min / 2 > 0.0
