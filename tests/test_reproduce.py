"""reproduce.py and the stage runner: cache semantics, --force, argument errors, and the smoke preset end to end."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from musicgen.config import ConfigError, preset
from musicgen.eval.ablation import VARIANT_NAMES
from musicgen.pipeline import Pipeline, PipelineError
from musicgen.report import SECTIONS
from musicgen.reproduce import parse, run


def _stage(calls: list, name: str, value):
    def fn(ctx):
        calls.append(name)
        return {"value": value}
    return fn


def test_pipeline_caches_and_redoes_downstream(tmp_path):
    calls = []
    p = Pipeline(tmp_path, progress=False)
    assert p.run("a", {"x": 1}, _stage(calls, "a", 1)) == {"value": 1}
    assert p.run("d", {}, _stage(calls, "d", 4), inputs=("a",)) == {"value": 4}
    assert calls == ["a", "d"]

    # same settings: cached
    q = Pipeline(tmp_path, progress=False)
    q.run("a", {"x": 1}, _stage(calls, "a", 1))
    q.run("d", {}, _stage(calls, "d", 4), inputs=("a",))
    assert calls == ["a", "d"]
    assert q.stages["a"]["cached"] and q.stages["d"]["cached"]

    # changed settings of a redo its dependents; force does too
    r = Pipeline(tmp_path, progress=False)
    r.run("a", {"x": 2}, _stage(calls, "a", 2))
    r.run("d", {}, _stage(calls, "d", 4), inputs=("a",))
    assert calls[-2:] == ["a", "d"]
    s = Pipeline(tmp_path, force={"a"}, progress=False)
    s.run("a", {"x": 2}, _stage(calls, "a", 2))
    s.run("d", {}, _stage(calls, "d", 4), inputs=("a",))
    assert calls[-2:] == ["a", "d"]
    t = Pipeline(tmp_path, progress=False)
    t.run("a", {"x": 2}, _stage(calls, "a", 2))
    t.run("d", {}, _stage(calls, "d", 4), inputs=("a",))
    assert calls[-2:] == ["a", "d"] and len(calls) == 6  # nothing re-ran

    # speed-only settings (threads, checkpoint cadence) do not change a key
    u = Pipeline(tmp_path, progress=False)
    assert u.key("a", {"x": 2, "threads": 1}, ()) == u.key("a", {"x": 2, "threads": 8}, ())


def test_a_failing_stage_stops_the_run_and_records_nothing(tmp_path):
    def boom(ctx):
        raise RuntimeError("export failed")

    p = Pipeline(tmp_path, progress=False)
    with pytest.raises(RuntimeError, match="export failed"):
        p.run("export", {}, boom)
    assert not (tmp_path / "stages" / "export.json").exists()
    with pytest.raises(PipelineError, match="have not run"):
        p.run("evaluate", {}, lambda c: {}, inputs=("export",))


def test_interrupted_stage_resumes_but_a_changed_one_starts_clean(tmp_path):
    seen = []

    def killed(ctx):
        seen.append(ctx.resume)
        (ctx.folder / "checkpoint").write_text("partial work")
        raise KeyboardInterrupt  # killed mid-stage: no result recorded

    p = Pipeline(tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        p.run("distill", {"steps": 3}, killed)

    def again(ctx):
        return {"resumed": ctx.resume, "kept": (ctx.folder / "checkpoint").exists()}

    same = Pipeline(tmp_path, progress=False).run("distill", {"steps": 3}, again)  # same key: its partial work is its own
    changed = Pipeline(tmp_path, progress=False).run("distill", {"steps": 4}, again)  # other inputs: start clean
    assert seen == [False] and same == {"resumed": True, "kept": True} and changed == {"resumed": False, "kept": False}


def test_force_redoes_a_finished_stage_from_an_empty_folder(tmp_path):
    """Regression: --force STAGE reopened the finished run (resumed_from 3, wall 0 s), and a folder made
    with another world size made the forced run fail; a forced stage now starts from nothing."""
    def work(ctx):
        had = sorted(f.name for f in ctx.folder.iterdir() if f.name != ".stage")
        (ctx.folder / "checkpoints").mkdir()
        (ctx.folder / "checkpoints" / "made-by-2-processes").write_text("x")
        return {"resumed": ctx.resume, "found": had}

    Pipeline(tmp_path, progress=False).run("distill_kd", {"steps": 3}, work)
    calls = []
    forced = Pipeline(tmp_path, force={"distill_kd"}, progress=False)
    assert forced.run("distill_kd", {"steps": 3}, work) == {"resumed": False, "found": []}
    forced.run("plan", {}, _stage(calls, "plan", 1), inputs=("distill_kd",))
    assert calls == ["plan"]  # and what depends on it runs again


def test_runner_never_deletes_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "my_notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not made by this pipeline"):
        Pipeline(tmp_path, progress=False).run("export", {}, lambda c: {})
    assert (tmp_path / "export" / "my_notes.txt").read_text() == "mine"


def test_unknown_preset_and_bad_overrides_name_the_choices():
    with pytest.raises(ConfigError, match="smoke"):
        preset("smok")


@pytest.mark.parametrize("argv, words", [
    (["--preset", "paper"], "--dataset"),
    (["--preset", "paper", "--dataset", "/no/such/folder"], "not a folder"),
    (["--set", "distill.train.step=3"], "did you mean 'steps'"),
    (["--set", "distill.train.steps=0"], "steps"),
    (["--set", "eval"], "PATH=VALUE"),
    (["--nproc", "0"], "nproc"),
])
def test_argument_errors_exit_2_with_one_line_before_any_work(argv, words, capsys, tmp_path):
    """Regression: the paper preset without --dataset exited 0 with every stage skipped."""
    with pytest.raises(SystemExit) as e:
        parse([*argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1]
    assert not (tmp_path / "run").exists()


def test_overrides_change_the_preset():
    args, p = parse(["--preset", "smoke", "--set", "distill.train.steps=3", "eval.prompts=1", "--steps", "4"])
    assert p.distill.train.steps == 4 and p.eval.prompts == 1 and p.name == "smoke"
    _, q = parse(["--preset", "paper", "--dataset", ".", "--teacher", "T", "--student", "S"])
    assert (q.data.root, q.teacher_id, q.student_id) == (".", "T", "S")


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
    return out, run(preset("smoke"), out, progress=False)


def _finite_numbers(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        yield where, obj


STAGES = ("render", "codec", "text", "tokens", "teacher", "student_base", "distill_ce", "distill_kd", "plan", "export",
          "clap_mini", "evaluate")


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_cached(smoke):
    out, results = smoke
    saved = json.loads((out / "results.json").read_text())  # strict JSON: no NaN or Infinity
    assert saved["preset"] == "smoke" and saved["command"]
    assert saved["world"]["source"] == "built"
    # every stage ran, every figure is a finite number
    assert set(saved["stages"]) == set(STAGES)
    assert set(saved["variants"]) == set(VARIANT_NAMES)
    for name, v in saved["variants"].items():
        for key in ("bytes", "fad", "clap", "nll", "nll_cb0", "kl_teacher"):
            assert isinstance(v[key], (int, float)) and math.isfinite(v[key]), (name, key, v.get(key))
        assert v["bytes"] > 0 and v["nll"] > 0 and v["kl_teacher"] >= 0
        for wav in v["samples"]:
            assert (out / wav).read_bytes()[:4] == b"RIFF"
    assert saved["variants"]["teacher"]["kl_teacher"] == 0.0
    assert saved["variants"]["student_kd"]["kl_teacher"] > 0
    # quantized variants are really smaller; kdq's plan is no larger than the paper's
    v = saved["variants"]
    assert v["student_kd_paper_plan"]["bytes"] < v["student_kd"]["bytes"]
    assert v["student_kd_kdq_plan"]["bytes"] <= v["student_kd_paper_plan"]["bytes"]
    for key in ("fad", "clap", "size_reduction", "retention"):
        assert math.isfinite(saved["headline"][key])
    # ORT: every bundle exported, parity with PyTorch, a device run of each
    ort = saved["ort"]
    assert ort["parity_max_abs"] < 1e-4 and ort["graph_parity_max_abs"] < 1e-4 and ort["rtf"] > 0
    assert set(ort["device_runs"]) == set(ort["bundle_bytes"]) == {"fp32", "paper_plan", "kdq_plan"}
    assert all(r["rtf"] > 0 for r in ort["device_runs"].values())
    for where, x in _finite_numbers({k: saved[k] for k in ("variants", "headline", "ort", "planner")}):
        assert math.isfinite(x), where
    # training curves; versions
    curve = [json.loads(ln) for ln in (out / saved["training"]["student_kd"]).read_text().splitlines()]
    assert len(curve) == saved["config"]["distill"]["train"]["steps"] and "temperature" in curve[0]
    assert saved["versions"]["torch"]
    # the report: every section, the figures, one player per prompt and variant
    html = (out / "report.html").read_text()
    p = _Sections()
    p.feed(html)
    assert p.ids == list(SECTIONS)
    assert p.imgs >= 1
    assert p.audios == len(saved["prompts"]) * len(VARIANT_NAMES)
    for fig in ("7.05", "0.343"):
        assert fig in html

    # a second run redoes nothing
    again = run(preset("smoke"), out, progress=False)
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]
    assert again["variants"]["student_kd"] == results["variants"]["student_kd"]


@pytest.mark.slow
def test_paper_preset_code_path_on_local_checkpoints(smoke, tmp_path):
    """The paper preset (checkpoints by path, a user's audiofolder dataset, tokens encoded here)."""
    from musicgen.config import override

    out = smoke[0]
    p = override(preset("paper"), {
        "data.root": str(out / "render" / "data"), "data.clip_seconds": 2.0,
        "teacher_id": str(out / "teacher" / "model"), "student_id": str(out / "student_base" / "model"),
        "distill.train": {"steps": 3, "micro_batch": 2, "grad_accum": 2, "warmup_steps": 1, "checkpoint_every": 3,
                          "bf16": "off"},
        "plan": {"granularity": "part", "candidates": ["fp32", "int8"], "calibration_clips": 2},
        "export.enabled": False,
        "eval": {"prompts": 2, "seconds": 0.2, "clap_mini_steps": 0, "max_eval_clips": 4, "batch": 2},
    })
    r = run(p, tmp_path / "paper", progress=False)
    assert r["preset"] == "paper" and r["world"]["source"] == "checkpoints"
    assert r["data"]["source"] == "user dataset"
    assert (tmp_path / "paper" / "tokens" / "train.safetensors").exists()  # encoded here, not the world's
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
    rows = {r["model"]: r for r in diagnose(out, ["teacher", "student_base", str(out / "distill_kd" / "model")])}
    assert rows["teacher"]["kl_teacher"] == 0.0 and rows["student_base"]["kl_teacher"] > 0
    for r in rows.values():
        assert r["split"] == "valid" and r["clips"] > 0 and r["nll"] > 0
        assert abs(r["caption_gain"]) < r["nll"]  # a difference of two NLLs on the same codes


def test_world_recipe_keys_the_world_stages(tmp_path):
    """Changing the mini world's recipe must redo its stages (and so everything after them)."""
    from musicgen.config import override
    from musicgen.world import recipe_digest

    base = preset("mini")
    assert recipe_digest(override(base, {"world.teacher.train.steps": 100})) != recipe_digest(base)
    assert recipe_digest(override(base, {"threads": 1, "world.codec.train.checkpoint_every": 7})) == recipe_digest(base)
    pipe = Pipeline(tmp_path, progress=False)
    a = pipe.key("teacher", {"lm": base.world.teacher}, ())
    b = pipe.key("teacher", {"lm": override(base, {"world.teacher.train.lr": 1e-4}).world.teacher}, ())
    assert a != b


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


def test_presets_round_trip_through_json():
    from musicgen.config import Preset

    for name in ("smoke", "mini", "paper"):
        p = preset(name)
        assert Preset.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ConfigError, match="did you mean 'distill'"):
        Preset.from_dict({**preset("smoke").to_dict(), "distil": {}})


@pytest.mark.slow
def test_the_main_job_starts_from_a_shipped_world(smoke, tmp_path, monkeypatch):
    """The mini preset's path: a published world (the local hub) is verified and used, nothing of it retrained."""
    import musicgen.world as w
    from musicgen.config import override
    from musicgen.pipeline import Pipeline
    from musicgen.world import build_world, publish

    out = smoke[0]
    monkeypatch.setattr(w, "HUB", tmp_path / "hub")
    built = build_world(preset("smoke"), Pipeline(out, progress=False))  # cached: the smoke run's world
    publish(preset("smoke"), built, command="pytest")
    p = override(preset("smoke"), {"hub": "smoke", "export.enabled": False, "eval.clap_mini_steps": 0})
    r = run(p, tmp_path / "from_hub", progress=False)
    assert r["world"]["source"] == "hub" and "codec" not in r["stages"] and "teacher" not in r["stages"]
    assert set(r["stages"]) >= {"hub", "render", "tokens", "distill_kd", "plan", "evaluate"}
    assert r["world"]["teacher"] == str(tmp_path / "hub" / "smoke" / "teacher")
    # the shipped (fp16-stored) student_base is the smoke run's student_base to fp16 precision
    a, b = r["variants"]["student_base"]["nll"], smoke[1]["variants"]["student_base"]["nll"]
    assert a == pytest.approx(b, rel=1e-2)
