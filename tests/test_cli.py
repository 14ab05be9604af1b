"""``kdq plan show`` and ``kdq plan size`` on a saved tiny MusicGen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdq.cli import main
from kdq.quant import Plan, apply_plan, model_bytes, model_fingerprint
from musicgen.plan import paper_plan
from musicgen.models.tiny import build_tiny_musicgen, save_tiny_musicgen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_musicgen(tmp_path_factory.mktemp("tiny_mg"), seed=0)


@pytest.fixture()
def plan_file(tmp_path):
    plan = paper_plan()
    plan.model["fingerprint"] = model_fingerprint(build_tiny_musicgen(0))
    return plan.save(tmp_path / "paper.json")


def test_show_without_model_lists_rules(plan_file, capsys):
    assert main(["plan", "show", str(plan_file)]) == 0
    out = capsys.readouterr().out
    for rule, dtype in paper_plan().assignments.items():
        assert any(line.split()[:2] == [rule, dtype] for line in out.splitlines())


def test_show_with_model_explains_every_module(plan_file, model_dir, capsys):
    assert main(["plan", "show", str(plan_file), "--model", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith(("text_encoder.", "decoder.", "audio_encoder."))}
    assert rows["text_encoder.encoder.block.0.layer.0.SelfAttention.q"] == ["int8", "int8", "text_encoder"]
    assert rows["text_encoder.encoder.block.0.layer.0.layer_norm"] == ["int8", "fp32", "text_encoder"]
    assert rows["text_encoder.encoder.embed_tokens"] == ["int8", "int8", "(tied", "to", "text_encoder.shared)"]
    assert rows["decoder.lm_heads.3"] == ["fp16", "fp16", "decoder"]
    assert rows["audio_encoder.decoder.layers.1.lstm"] == ["fp32", "fp32", "audio_encoder"]


def test_size_report_matches_apply(plan_file, model_dir, capsys):
    assert main(["plan", "size", str(plan_file), "--model", str(model_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    real = build_tiny_musicgen(0)
    assert rep["fp32_bytes"] == model_bytes(real)
    apply_plan(real, Plan.load(plan_file))
    assert rep["plan_bytes"] == model_bytes(real)
    assert rep["parts"]["decoder"]["plan_bytes"] * 2 == rep["parts"]["decoder"]["fp32_bytes"]
    assert rep["parts"]["audio_encoder"]["plan_bytes"] == rep["parts"]["audio_encoder"]["fp32_bytes"]
    assert sum(v["plan_bytes"] for v in rep["parts"].values()) == rep["plan_bytes"]
    assert main(["plan", "size", str(plan_file), "--model", str(model_dir)]) == 0
    assert "smaller" in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "kdq.plan/1", "assignments": {"decoder": "fp12"}}')
    assert main(["plan", "show", str(bad)]) == 2
    assert "fp16" in capsys.readouterr().err
    assert main(["plan", "size", str(bad), "--model", str(tmp_path / "none")]) == 2
    other = Plan({"decoder": "fp16"}, model={"fingerprint": "sha256:0"}).save(tmp_path / "other.json")
    assert main(["plan", "show", str(other), "--model", str(model_dir)]) == 2
    assert "different model" in capsys.readouterr().err


def test_module_entry_point(plan_file):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'examples'}"}
    res = subprocess.run([sys.executable, "-m", "kdq.cli", "plan", "show", str(plan_file)], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "text_encoder" in res.stdout


def test_make_plan_example_writes_a_measured_plan(model_dir, tmp_path, capsys):
    from musicgen.plan import main as make_plan

    out = tmp_path / "plan.json"
    assert make_plan(["--model", str(model_dir), "--out", str(out), "--granularity", "part",
                      "--candidates", "fp32,fp16,int8", "--batch", "1", "--frames", "4"]) == 0
    plan = Plan.load(out)
    assert set(plan.assignments) == {"text_encoder", "decoder", "audio_encoder"}
    assert plan.meta["measured"]["bytes"] == plan.predicted["bytes"] <= plan.meta["paper_plan"]["bytes"]
    assert "paper plan" in capsys.readouterr().out


def _env():
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'examples'}"}


def test_show_all_adds_the_modules_that_hold_no_tensors(plan_file, model_dir, capsys):
    def rows(extra):
        assert main(["plan", "show", str(plan_file), "--model", str(model_dir), *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        table = lines[next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["module", "dtype"]) + 1 :]
        return {ln.split()[0]: ln.split()[1:] for ln in table if ln.startswith(("text_encoder", "decoder", "audio_encoder"))}

    some, every = rows([]), rows(["--all"])
    assert set(some) < set(every) and all(every[k] == v for k, v in some.items())
    assert "decoder.model.decoder.layers.0" not in some  # a layer holds no tensors itself
    assert every["decoder.model.decoder.layers.0"] == ["fp16", "-", "decoder"]
    assert every["text_encoder.encoder.block.0"] == ["int8", "-", "text_encoder"]


def test_installed_console_script(plan_file, tmp_path):
    script = Path(sys.executable).with_name("kdq")
    if not script.is_file():
        pytest.skip(f"no installed kdq console script next to {sys.executable}")
    res = subprocess.run([str(script), "plan", "show", str(plan_file)], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0 and any(ln.split()[:2] == ["decoder", "fp16"] for ln in res.stdout.splitlines())
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "kdq.plan/1", "assignments": {"decoder": "fp12"}}')
    res = subprocess.run([str(script), "plan", "show", str(bad)], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("kdq: error:") and "'fp16'" in res.stderr
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0 and "plan" in res.stdout


def test_show_on_a_hostile_plan_stays_fast(model_dir, tmp_path):
    """Issue 13 item 8: a pattern that backtracks exponentially in `re`, against every module name."""
    hostile = Plan({r"re:(\w+\.?)*X": "int8", "decoder": "fp16"}).save(tmp_path / "hostile.json")
    cmd = [sys.executable, "-m", "kdq.cli", "plan", "show", str(hostile), "--model", str(model_dir), "--all"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("kdq plan show on a hostile plan did not finish in 120 s")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rules that set no module: ['re:(\\\\w+\\\\.?)*X']" in res.stdout
