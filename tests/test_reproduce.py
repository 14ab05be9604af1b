"""reproduce.py and the stage runner: cache semantics, --force, argument errors (one line, exit 2, before
any work), errors during a run (one line, exit 1), the size knobs, the smoke preset end to end, and the
paper preset from the command line with the documented small recipe on tiny local checkpoints."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import socket
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicgen.config import ConfigError, override, preset
from musicgen.data.audiofolder import write_metadata
from musicgen.eval.ablation import VARIANT_NAMES
from musicgen.models.tiny import TINY_WORDS, save_tiny_musicgen
from musicgen.pipeline import Pipeline, PipelineError
from musicgen.report import SECTIONS
from musicgen.reproduce import command_for, main, parse, run

#: docs/reproduction.md's small recipe for the paper preset (a few minutes on a CPU with small models)
SMALL_RECIPE = ["--clips", "8", "--clip-seconds", "2", "--steps", "4", "--micro-batch", "2", "--grad-accum", "2",
                "--warmup", "0.25", "--set", "plan.granularity=part", "plan.calibration_clips=2", "eval.prompts=2",
                "eval.seconds=1", "export.device_seconds=1"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """What a user of the paper preset brings: two checkpoint folders and an audiofolder dataset."""
    root = tmp_path_factory.mktemp("user")
    teacher = save_tiny_musicgen(root / "teacher", seed=1, decoder_hidden=64)
    student = save_tiny_musicgen(root / "student", seed=0)
    data = root / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("valid", 9), ("test", 9)):
        (data / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            t = np.arange(24000) / 16000  # 1.5 s at 16 kHz: resampled to the codec's 32 kHz, padded to --clip-seconds
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t) + 0.01 * rng.standard_normal(t.size)
            sf.write(data / split / f"{i}.wav", wave.astype(np.float32), 16000)
            rows.append({"file_name": f"{i}.wav", "text": " ".join(rng.choice(TINY_WORDS[4:], 4))})
        write_metadata(data, split, rows)
    return {"teacher": teacher, "student": student, "data": data, "root": root}


def _paper(user, *more):
    return ["--preset", "paper", "--teacher", str(user["teacher"]), "--student", str(user["student"]),
            "--dataset", str(user["data"]), *more]


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


def _broken(user, name: str) -> Path:
    """A copy of the user's files with one thing wrong (checkpoint folders and the dataset)."""
    root = user["root"] / "broken" / name
    if root.exists():
        return root
    for what in ("teacher", "student", "data"):
        shutil.copytree(user[what], root / what)
    if name == "no_valid_split":
        (root / "data" / "valid" / "metadata.jsonl").unlink()
    elif name == "empty_train":
        (root / "data" / "train" / "metadata.jsonl").write_text("")
    elif name == "no_config":
        (root / "teacher" / "config.json").unlink()
    elif name == "not_musicgen":
        cfg = json.loads((root / "teacher" / "config.json").read_text())
        (root / "teacher" / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    elif name == "pickle_only":
        (root / "teacher" / "model.safetensors").rename(root / "teacher" / "pytorch_model.bin")
    elif name == "no_tokenizer":
        for f in root.glob("student/tokenizer*"):
            f.unlink()
    elif name == "other_codebooks":
        save_tiny_musicgen(root / "teacher", seed=1, codebook_size=1024)
    return root


def _user_args(user, broken: str | None) -> list[str]:
    if broken is None:
        return _paper(user)
    root = _broken(user, broken)
    return _paper({"teacher": root / "teacher", "student": root / "student", "data": root / "data"})


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails the test: argument checks never wait for a hub."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--preset", "paper"], "--dataset"),
    (["--preset", "paper", "--dataset", "/no/such/folder"], "not a folder"),
    (["--set", "distill.train.step=3"], "did you mean 'steps'"),
    (["--set", "distill.train.steps=0"], "steps"),
    (["--set", "eval"], "PATH=VALUE"),
    (["--nproc", "0"], "nproc"),
    (["--preset", "papr"], "invalid choice"),
    (["--steps", "many"], "invalid int value"),
    (["--force", "distil_kd"], "did you mean 'distill_kd'"),
    (["--clips", "8"], "paper preset"),
    (["--warmup", "1.5"], "[0, 1)"),
    (["--warmup", "0.1", "--set", "distill.train.warmup_steps=3"], "not both"),
    (["--set", "eval.prompts=1"], "at least 2"),  # the real-size dry run died in evaluate after 11 minutes
])
def test_argument_errors_exit_2_with_one_line_before_any_work(argv, words, capsys, tmp_path):
    """Regression: the paper preset without --dataset exited 0 with every stage skipped; argparse's
    errors came with a usage block."""
    with pytest.raises(SystemExit) as e:
        parse([*argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("broken, extra, words", [
    ("no_valid_split", [], "readable valid split"),
    ("empty_train", [], "clips in the train and test splits"),
    ("no_config", [], "config.json"),
    ("not_musicgen", [], "model_type='t5'"),
    ("pickle_only", [], "safetensors"),
    ("no_tokenizer", [], "tokenizer"),
    ("other_codebooks", [], "must share the codec"),
    (None, ["--teacher", "nobody/no-such-musicgen"], "local Hugging Face cache"),
    (None, ["--student", "/no/such/checkpoint"], "local Hugging Face cache"),
    (None, ["--clap", "laion/no-such-clap"], "local Hugging Face cache"),
])
def test_paper_preset_arguments_are_checked_offline_before_any_work(user, broken, extra, words, capsys, tmp_path,
                                                                    no_network):
    """Regression: an unreachable hub id took 35 s of retries and ended in a traceback; a bad dataset or
    checkpoint was found only after tokenizing."""
    argv = [*_user_args(user, broken), *extra, "--out", str(tmp_path / "run")]
    capsys.readouterr()  # what making the broken copy printed
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(SystemExit) as e:
        parse(["--preset", "smoke", "--out", str(tmp_path / "taken")])
    assert e.value.code == 2 and "it is a file" in capsys.readouterr().err


def test_debug_shows_the_typed_error(user, tmp_path):
    from musicgen.reproduce import ArgumentError

    with pytest.raises(ArgumentError, match="local Hugging Face cache"):
        parse([*_paper(user), "--teacher", "nobody/none", "--out", str(tmp_path / "run"), "--debug"])


def test_a_hub_id_in_the_local_cache_becomes_its_snapshot_folder(user, tmp_path, monkeypatch, no_network):
    """Hub ids are looked up in huggingface_hub's cache only; the run then loads the snapshot offline."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-musicgen" / "snapshots" / "0123abcd"
    shutil.copytree(user["student"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, p = parse([*_paper(user), "--student", "someone/tiny-musicgen", "--out", str(tmp_path / "run")])
    assert Path(p.student_id) == snapshot and p.teacher_id == str(user["teacher"])


def test_size_knobs_map_onto_the_config(user, tmp_path):
    """Regression: `--preset paper --steps 2` died after tokenizing with `warmup_steps=250 is not allowed`."""
    out = ["--out", str(tmp_path / "run")]
    _, p = parse([*_paper(user), "--steps", "2", *out])
    assert (p.distill.train.steps, p.distill.train.warmup_steps) == (2, 0)  # the paper's 5% share of 2 steps
    _, p = parse([*_paper(user), *SMALL_RECIPE, *out])
    t = p.distill.train
    assert (t.steps, t.warmup_steps, t.micro_batch, t.grad_accum) == (4, 1, 2, 2)
    assert (p.data.max_clips, p.data.clip_seconds, p.plan.granularity, p.eval.prompts) == (8, 2.0, "part", 2)
    _, p = parse([*_paper(user), "--set", "distill.train.steps=40", *out])
    assert p.distill.train.warmup_steps == 2  # still 5%
    _, p = parse([*_paper(user), "--steps", "40", "--set", "distill.train.warmup_steps=3", *out])
    assert p.distill.train.warmup_steps == 3  # said explicitly: kept
    _, p = parse(["--preset", "smoke", "--set", "distill.train.steps=3", "eval.prompts=3", "--steps", "4", *out])
    assert p.distill.train.steps == 4 and p.eval.prompts == 3 and p.name == "smoke"
    _, p = parse(["--preset", "mini", "--clip-seconds", "3", *out])
    assert p.data.clip_seconds == 3.0


def test_the_recorded_command_reproduces_the_preset(user, tmp_path):
    """Regression: a run made with overrides recorded a command without them."""
    out = tmp_path / "run"
    p = override(preset("smoke"), {"distill.train.steps": 3, "eval.prompts": 3, "data.pieces": {"bach": 2},
                                   "plan.candidates": ["fp32", "int8"], "export.enabled": False})
    assert parse(shlex.split(command_for(p, out))[2:])[1] == p
    _, q = parse([*_paper(user), *SMALL_RECIPE, "--set", "data.text_column=text", "--out", str(out)])
    assert parse(shlex.split(command_for(q, out))[2:])[1] == q
    assert command_for(preset("mini"), out) == f"python examples/musicgen/reproduce.py --preset mini --out {out}"


def test_an_error_during_the_run_is_one_line_and_exit_1(user, tmp_path, capsys):
    """A typed error raised by a stage ends the command with one line naming the stage (no traceback)."""
    bad = tmp_path / "data"
    shutil.copytree(user["data"], bad)
    for f in (bad / "train").glob("*.wav"):
        f.write_bytes(b"RIFF not audio")  # the metadata reads fine; the audio fails in the tokens stage
    argv = [*_paper(user), "--dataset", str(bad), *SMALL_RECIPE, "--out", str(tmp_path / "run"), "--no-progress"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reproduce.py: error in stage tokens:") and "items are bad" in err[0]
    from musicgen.data.audiofolder import DatasetError

    with pytest.raises(DatasetError):
        main([*argv, "--debug"])


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
          "clap_mini", "instrument", "evaluate")


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
    # offline, without a CLAP: FAD/KAD only, the model-free embedders first (mel-chroma, its pitch part),
    # then the codec's latents
    assert list(r["embedders"]) == ["mel-chroma", "chroma", "encodec"] and r["variants"]["student_kd"]["fad_embedder"] == "mel-chroma"
    assert r["variants"]["student_kd"]["clap"] is None and r["variants"]["student_kd"]["fad"] is not None


@pytest.mark.slow
def test_paper_preset_from_the_command_line_with_the_small_recipe(user, tmp_path, capsys):
    """docs/reproduction.md's small recipe, as a user types it, on tiny local checkpoints and an audiofolder."""
    out = tmp_path / "paper"
    r = main([*_paper(user), *SMALL_RECIPE, "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert (out / "results.json").is_file() and (out / "report.html").is_file()
    assert r["world"]["source"] == "checkpoints" and r["data"]["counts"] == {"train": 8, "valid": 8, "test": 8}
    assert r["data"]["root"] == str(out / "data" / "data")  # the first 8 clips of each split, copied
    assert r["distill"]["student_kd"]["global_batch"] == 4
    assert set(r["variants"]) == set(VARIANT_NAMES) and set(r["ort"]["device_runs"]) == {"fp32", "paper_plan", "kdq_plan"}
    assert r["config"]["distill"]["train"]["warmup_steps"] == 1
    # quiet under --no-progress; it ends with the ablation, the headline and where the files are
    from musicgen.report import terminal_summary

    assert printed.strip() == terminal_summary(r)
    lines = printed.strip().splitlines()
    assert lines[0].startswith("TOY SIZES") and any(ln.startswith("student_kd_kdq_plan") for ln in lines)
    assert any(ln.startswith("size reduction") for ln in lines)
    assert lines[-2:] == [f"results: {out / 'results.json'}", f"report:  {out / 'report.html'}"]
    # the recorded command is the one typed, and it describes this run
    assert parse(shlex.split(r["command"])[2:])[1].to_dict() == r["config"]


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


def test_the_mini_preset_trains_without_timing_dependent_choices():
    """Reproduction: bf16="auto" times both on the first batch, and three fresh-clone main jobs chose
    bf16 for distill_ce twice and fp32 once, so student_ce's weights and figures changed between runs.
    A preset whose figures are quoted must not let the machine's load choose."""
    from musicgen.config import preset

    p = preset("mini")
    trains = {"distill": p.distill.train, **{k: getattr(p.world, k).train for k in ("codec", "text", "teacher", "student")}}
    assert {k: t.bf16 for k, t in trains.items() if t.bf16 == "auto"} == {}


def test_instrument_judge_trains_on_codec_reconstructions(smoke):
    """Issue 21: a classifier trained on real renders alone scored 0.953 on real valid clips and 0.207 on
    their codec reconstructions, so every model looked at chance. The stage trains on both, reports the
    valid split's real and reconstruction accuracies, and the ablation carries the reconstruction ceiling."""
    out, results = smoke
    stage = json.loads((out / "stages" / "instrument.json").read_text())["result"]
    n_real = sum(1 for line in (out / "render" / "data" / "train" / "metadata.jsonl").read_text().splitlines() if line)
    assert stage["trained_on"].endswith("codec reconstructions")
    assert stage["train_examples"] >= 2 * 2 * n_real - 2  # real + reconstructions, each with a noisy copy
    assert 0.0 <= stage["valid"]["reconstruction"] <= 1.0 and 0.0 <= stage["valid"]["real"] <= 1.0
    assert 0.0 <= results["ceilings"]["instrument_accuracy_reconstruction"] <= 1.0
