"""The mini world at toy size: every stage runs and its products load, caching, reruns, resume, the hub."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("music21")
pytest.importorskip("fluidsynth")

from musicgen.config import (  # noqa: E402
    CodecConfig, DecoderConfig, LMConfig, Preset, RenderConfig, TextConfig, TrainConfig, WorldConfig, override, preset,
)
from musicgen.pipeline import Pipeline  # noqa: E402
from musicgen.world import WorldError, build_world, publish, verify_hub  # noqa: E402


def _train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, micro_batch=2, warmup_steps=1, checkpoint_every=2, **kw)


TOY = Preset(
    name="toy",
    data=RenderConfig(pieces={"bach": 2, "folk": 2}, clip_seconds=1.0, clips_per_render=2, renders_per_piece=1,
                      max_render_seconds=4.0, fractions=(0.0, 0.25), workers=1),
    world=WorldConfig(
        codec=CodecConfig(num_filters=2, hidden_size=8, codebook_size=16, warmup_ae_steps=2, crop_seconds=0.2,
                          kmeans_clips=2, mel_ffts=(128,), eval_clips=2, train=_train(6, lr=2e-3)),
        text=TextConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, train=_train(2)),
        teacher=LMConfig(DecoderConfig(hidden=32, layers=2, heads=2, ffn=64), _train(4)),
        student=LMConfig(DecoderConfig(hidden=16, layers=1, heads=2, ffn=32), _train(4)),
        samples=1, sample_seconds=0.2,
    ),
)
STAGES = ("render", "codec", "text", "tokens", "teacher", "student_base")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    pipe = Pipeline(out, progress=False)
    return out, build_world(TOY, pipe), pipe


def test_all_stages_run_and_products_load(world):
    from transformers import AutoTokenizer, EncodecModel, MusicgenForConditionalGeneration

    from musicgen.data.tokens import TokenDataset

    out, results, pipe = world
    assert set(pipe.stages) == set(STAGES) and not any(s["cached"] for s in pipe.stages.values())
    teacher = MusicgenForConditionalGeneration.from_pretrained(results["teacher"]["model"])
    student = MusicgenForConditionalGeneration.from_pretrained(results["student_base"]["model"])
    assert results["teacher"]["decoder_params"] > 3 * results["student_base"]["decoder_params"]
    # Teacher and student share the frozen text encoder and the codec.
    for a, b in zip(teacher.text_encoder.state_dict().values(), student.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    codec = EncodecModel.from_pretrained(results["codec"]["model"])
    for k, v in codec.state_dict().items():
        assert torch.equal(v, student.audio_encoder.state_dict()[k]), k
    assert codec.config.frame_rate == 50 and student.config.decoder.num_codebooks == 4
    tok = AutoTokenizer.from_pretrained(results["teacher"]["model"])
    test = TokenDataset.load(results["tokens"]["paths"]["test"])
    assert len(test) == results["tokens"]["counts"]["test"] > 0
    ids = tok(test.captions[:1])["input_ids"][0]
    assert tok.decode(ids, skip_special_tokens=True).split()[0] == test.captions[0].lower().split()[0]
    nll = results["student_base"]["held_out"]["test"]
    assert len(nll["nll_per_codebook"]) == 4 and nll["nll"] > 0
    assert (out / "student_base" / "samples" / "0.wav").exists() and (out / "codec" / "spectrograms.png").exists()
    held = results["codec"]["held_out"]
    assert {"log_mel_l1", "chroma_corr", "chroma_corr_shuffled", "perplexity", "usage"} <= set(held)


def test_second_run_is_cached_and_a_changed_recipe_reruns_only_dependants(world):
    out, _, _ = world
    again = Pipeline(out, progress=False)
    build_world(TOY, again)
    assert all(s["cached"] for s in again.stages.values())
    changed = Pipeline(out, progress=False)
    build_world(override(TOY, {"world.student.train.steps": 5}), changed)
    assert [s for s in STAGES if not changed.stages[s]["cached"]] == ["student_base"]
    assert changed.results["student_base"]["train"]["steps_done"] == 5
    text = Pipeline(out, progress=False)
    build_world(override(TOY, {"world.student.train.steps": 5, "world.text.mask_prob": 0.2}), text)
    assert [s for s in STAGES if not text.stages[s]["cached"]] == ["text", "teacher", "student_base"]


def test_interrupted_stage_resumes_from_its_checkpoint(world):
    out, _, _ = world
    build_world(TOY, Pipeline(out, progress=False))  # back to TOY's student
    (out / "stages" / "student_base.json").unlink()  # as if killed after the last checkpoint
    pipe = Pipeline(out, progress=False)
    build_world(TOY, pipe)
    st = pipe.results["student_base"]
    assert not pipe.stages["student_base"]["cached"]
    assert st["train"]["resumed_from"] == TOY.world.student.train.steps  # nothing was retrained


def test_the_world_trains_on_more_renders_of_each_piece_than_the_main_job_renders():
    from musicgen.config import ConfigError
    from musicgen.world import recipe_digest, world_data

    more = override(TOY, {"world.renders_per_piece": 3})
    assert world_data(TOY) == TOY.data  # None: the preset's data
    assert world_data(more).renders_per_piece == 3 and more.data.renders_per_piece == 1
    assert world_data(more) == RenderConfig(**{**TOY.data.__dict__, "renders_per_piece": 3})
    assert recipe_digest(more) != recipe_digest(TOY)  # the hub records it
    with pytest.raises(ConfigError, match="renders_per_piece"):
        WorldConfig(renders_per_piece=0)
    mini = preset("mini")
    assert world_data(mini).renders_per_piece > mini.data.renders_per_piece


def test_presets_are_valid_and_smoke_is_small():
    smoke = preset("smoke")
    assert sum(smoke.data.pieces.values()) <= 8 and smoke.world.codec.train.steps <= 50
    assert preset("mini").world is not None and preset("paper").world is None


def test_published_hub_is_verified_before_use(world, tmp_path, monkeypatch):
    import musicgen.world as w

    out, results, _ = world
    monkeypatch.setattr(w, "HUB", tmp_path / "hub")
    folder = publish(TOY, results, command="pytest")
    card = json.loads((folder / "card.json").read_text())
    assert set(card["sha256"]) >= {"codec/model.safetensors", "teacher/README.md", "student_base/config.json"}
    found = verify_hub(TOY)
    from musicgen.models.musicgen import load_musicgen

    model = load_musicgen(found["folders"]["student_base"])
    assert next(model.decoder.parameters()).dtype == torch.float32  # stored in fp16, loaded as fp32
    # a file that does not match its checksum, or a preset whose recipe changed, is refused
    with pytest.raises(WorldError, match="recipe"):
        verify_hub(override(TOY, {"world.teacher.train.lr": 1e-4}))
    with open(folder / "teacher" / "model.safetensors", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(WorldError, match="SHA-256"):
        verify_hub(TOY)
    # publishing again replaces only a folder it wrote itself
    (tmp_path / "hub" / "other").mkdir()
    (tmp_path / "hub" / "other" / "mine.txt").write_text("x")
    with pytest.raises(WorldError, match="not a hub folder"):
        publish(override(TOY, {"name": "other"}), results, command="pytest")


def test_the_shipped_mini_hub_matches_its_recipe_and_loads():
    """The local hub committed under examples/musicgen/hub/mini: every file's SHA-256 and the mini
    preset's recipe digest match card.json, and each product loads with from_pretrained (fp16
    storage, fp32 in memory) with the shapes the preset says."""
    from transformers import EncodecModel, MusicgenForConditionalGeneration

    from musicgen.config import preset

    p = preset("mini")
    found = verify_hub(p)
    card = found["card"]
    assert card["figures"]["codec"]["chroma_corr"] >= 0.6  # a codec that keeps pitch (docs/mini_world.md)
    codec = EncodecModel.from_pretrained(found["folders"]["codec"], use_safetensors=True)
    assert codec.config.codebook_size == p.world.codec.codebook_size and codec.dtype == torch.float32
    teacher = MusicgenForConditionalGeneration.from_pretrained(found["folders"]["teacher"], use_safetensors=True)
    assert teacher.config.decoder.hidden_size == p.world.teacher.decoder.hidden
    nll = card["figures"]
    assert nll["student_base"]["held_out"]["test"]["nll"] - nll["teacher"]["held_out"]["test"]["nll"] >= 0.3
