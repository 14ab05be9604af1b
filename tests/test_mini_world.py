"""The mini-world stage runner at toy size: products load, stages are cached, reruns and resumes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("music21")
pytest.importorskip("fluidsynth")

from musicgen.codec import CodecConfig  # noqa: E402
from musicgen.data import RenderConfig  # noqa: E402
from musicgen.lm import DecoderConfig, TrainConfig  # noqa: E402
from musicgen.text import TextConfig  # noqa: E402
from musicgen.world import SMOKE, STAGES, WorldError, WorldPreset, get_preset, run_world, stage_keys, world_paths  # noqa: E402

TOY = WorldPreset(
    name="toy",
    render=RenderConfig(pieces={"bach": 2, "folk": 2}, clip_seconds=1.0, clips_per_render=2, renders_per_piece=1,
                        max_render_seconds=4.0, fractions=(0.0, 0.25), workers=1),
    codec=CodecConfig(num_filters=2, hidden_size=8, codebook_size=16, steps=6, warmup_ae_steps=2, batch_size=2,
                      crop_seconds=0.2, lr_warmup=2, kmeans_clips=2, mel_ffts=(128,), checkpoint_every=3),
    text=TextConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, pretrain_steps=2, batch_size=2),
    teacher=DecoderConfig(hidden=32, layers=2, heads=2, ffn=64),
    student=DecoderConfig(hidden=16, layers=1, heads=2, ffn=32),
    teacher_train=TrainConfig(steps=4, batch_size=2, warmup=1, checkpoint_every=2, log_every=2),
    student_train=TrainConfig(steps=4, batch_size=2, warmup=1, checkpoint_every=2, log_every=2),
    eval_clips=2,
    generate=1,
    generate_seconds=0.2,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, run_world(TOY, out, progress=False)


def test_all_stages_run_and_products_load(world):
    from transformers import AutoTokenizer, EncodecModel, MusicgenForConditionalGeneration

    from musicgen.lm import TokenDataset

    out, summary = world
    assert set(summary["stages"]) == set(STAGES) and not any(s["cached"] for s in summary["stages"].values())
    paths = world_paths(out)
    teacher = MusicgenForConditionalGeneration.from_pretrained(paths["teacher"])
    student = MusicgenForConditionalGeneration.from_pretrained(paths["student"])
    assert summary["stages"]["teacher"]["decoder_params"] > 3 * summary["stages"]["student"]["decoder_params"]
    # Teacher and student share the frozen text encoder and the codec.
    for a, b in zip(teacher.text_encoder.state_dict().values(), student.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    codec = EncodecModel.from_pretrained(paths["codec"])
    for k, v in codec.state_dict().items():
        assert torch.equal(v, student.audio_encoder.state_dict()[k]), k
    assert codec.config.frame_rate == 50 and student.config.decoder.num_codebooks == 4
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    test = TokenDataset.load(paths["tokens_test"])
    assert len(test) == summary["stages"]["tokens"]["clips"]["test"] > 0
    assert tok.decode(test.input_ids[0], skip_special_tokens=True).split()[0] == test.captions[0].lower().split()[0]
    nll = summary["stages"]["student"]["test_nll"]
    assert len(nll["nll_per_codebook"]) == 4 and nll["nll"] > 0
    assert (out / "student" / "samples" / "clip_0.wav").exists() and (out / "codec" / "spectrograms.png").exists()
    assert json.loads(paths["summary"].read_text())["preset"] == "toy"


def test_second_run_is_cached_and_config_change_reruns_only_dependants(world):
    out, _ = world
    again = run_world(TOY, out, progress=False)
    assert all(s["cached"] for s in again["stages"].values())
    changed = replace(TOY, student_train=replace(TOY.student_train, steps=5))
    keys_a, keys_b = stage_keys(TOY), stage_keys(changed)
    assert [s for s in STAGES if keys_a[s] != keys_b[s]] == ["student"]
    third = run_world(changed, out, progress=False)
    assert [s for s in STAGES if not third["stages"][s]["cached"]] == ["student"]
    assert third["stages"]["student"]["steps"] == 5
    text_change = replace(changed, text=replace(TOY.text, pretrain_steps=3))
    changed_keys = stage_keys(text_change)
    assert [s for s in STAGES if changed_keys[s] != keys_b[s]] == ["text", "tokens", "teacher", "student"]


def test_interrupted_stage_resumes_from_its_checkpoint(world):
    out, _ = world
    run_world(TOY, out, progress=False, stages=("student",))  # back to TOY's student
    (out / "student" / "manifest.json").unlink()  # as if killed after the last checkpoint
    resumed = run_world(TOY, out, progress=False, stages=("student",))
    st = resumed["stages"]["student"]
    assert not st["cached"] and st["steps"] == TOY.student_train.steps
    # Nothing was retrained: the training curve is the checkpoint's, not a new one.
    assert len(st["curve"]) == TOY.student_train.steps // TOY.student_train.log_every


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(WorldError, match="preset"):
        get_preset("mnii")
    with pytest.raises(WorldError, match="stages"):
        run_world(TOY, tmp_path, stages=("teachr",), progress=False)
    with pytest.raises(WorldError, match="needs stage .render"):
        run_world(TOY, tmp_path / "fresh", stages=("tokens",), progress=False)


def test_presets_are_valid_and_smoke_is_small():
    for p in (SMOKE, get_preset("mini")):
        p.render.validate()
        p.codec.validate()
        assert json.loads(json.dumps(p.to_json()))["name"] == p.name
    assert sum(SMOKE.render.pieces.values()) <= 8 and SMOKE.codec.steps <= 50
