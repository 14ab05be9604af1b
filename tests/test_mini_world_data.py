"""The offline music renderer: captions, split by piece, determinism, failures counted."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("fluidsynth")

from musicgen.config import ConfigError, RenderConfig  # noqa: E402
from musicgen.data.audiofolder import load_audio, read_split  # noqa: E402
from musicgen.data.render import SPLITS, make_caption, render_dataset, select_pieces  # noqa: E402

CFG = RenderConfig(
    pieces={"bach": 4, "folk": 3}, clip_seconds=1.0, clips_per_render=2, renders_per_piece=1,
    max_render_seconds=4.0, fractions=(0.25, 0.25), workers=1,
)
SEED = 3


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return out, render_dataset(CFG, out, seed=SEED, progress=False)


def _digest(root) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for clip in read_split(root, split):
            h.update(clip.text.encode())
            h.update(clip.path.read_bytes())
    return h.hexdigest()


def test_splits_are_by_piece_and_cover_sources(rendered):
    root, stats = rendered
    pieces = {s: {c.meta["piece"] for c in read_split(root, s)} for s in SPLITS}
    assert not pieces["train"] & pieces["test"] and not pieces["train"] & pieces["valid"]
    assert not pieces["valid"] & pieces["test"]
    assert pieces["test"], "each source with two or more pieces gives the test split a piece"
    assert stats["pieces_rendered"] + stats["failures"] == stats["pieces_selected"] == 7
    assert stats["clips"] == sum(len(read_split(root, s)) for s in SPLITS)


def test_clips_have_audio_and_captions_that_describe_them(rendered):
    root, stats = rendered
    clips = read_split(root, "train")
    for clip in clips:
        audio = load_audio(clip.path, CFG.sample_rate)
        assert audio.shape == (int(CFG.clip_seconds * CFG.sample_rate),)
        assert 0.01 < float(np.sqrt(np.mean(audio**2))) < 0.5
        text = clip.text.lower()
        assert clip.meta["instrument"] in text and clip.meta["key"].lower() in text
        assert clip.meta["tempo"] in text
        # the score's notes that sound in the clip, clip-relative, transposed like the audio
        notes = clip.meta["notes"]
        assert notes and all(0 <= on < off <= CFG.clip_seconds + 1e-6 and 0 <= p < 128 for p, on, off in notes)
    assert stats["caption_vocabulary"] == len(stats["caption_words"]) > 10


def test_rendering_is_deterministic_and_independent_of_workers(rendered, tmp_path):
    root, _ = rendered
    again = tmp_path / "again"
    stats = render_dataset(RenderConfig(**{**CFG.__dict__, "workers": 2}), again, seed=SEED, progress=False)
    assert _digest(again) == _digest(root)
    assert json.loads((again / "stats.json").read_text())["clips"] == stats["clips"]


def test_more_renders_keep_the_first_ones_and_give_each_its_own_instrument(rendered, tmp_path):
    """The world renders more of each piece than the main job: render r must not depend on how many
    are made (the main job's data is then a part of the world's), and a piece's renders use distinct
    instruments (the instrument is not confounded with the piece)."""
    root, _ = rendered
    more = tmp_path / "more"
    render_dataset(RenderConfig(**{**CFG.__dict__, "renders_per_piece": 3}), more, seed=SEED, progress=False)
    for split in SPLITS:
        first = {c.path.name: c for c in read_split(root, split)}
        all_ = read_split(more, split)
        again = {c.path.name: c for c in all_ if c.meta["render"] == 0}
        assert again.keys() == first.keys()
        for name, clip in first.items():
            assert again[name].text == clip.text and again[name].path.read_bytes() == clip.path.read_bytes()
        by_piece: dict[str, set] = {}
        for c in all_:
            by_piece.setdefault(c.meta["piece"], set()).add((c.meta["render"], c.meta["instrument"]))
        for renders in by_piece.values():
            assert len({r for r, _ in renders}) == len({i for _, i in renders}) == len(renders)
    assert max(len(v) for v in by_piece.values()) == 3


def test_other_seed_changes_the_choice():
    a = [p.key for p in select_pieces(CFG, seed=SEED)]
    b = [p.key for p in select_pieces(CFG, seed=SEED + 1)]
    assert a != b and len(a) == len(b)


def test_bad_pieces_fail_is_counted_not_fatal(tmp_path, monkeypatch):
    import musicgen.data.render as data

    real = data.select_pieces

    def with_broken(cfg, *, seed):
        pieces = real(cfg, seed=seed)
        return [data.Piece("broken/none.abc", "folk", str(tmp_path / "missing.abc"), "train"), *pieces[:1]]

    monkeypatch.setattr(data, "select_pieces", with_broken)
    stats = render_dataset(CFG, tmp_path / "out", seed=SEED, progress=False)
    assert stats["failures"] == 1 and stats["failure_list"][0]["piece"] == "broken/none.abc"
    assert stats["pieces_rendered"] == 1


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="did you mean 'bach'"):
        RenderConfig(pieces={"bahc": 1})
    with pytest.raises(ConfigError, match="fractions"):
        RenderConfig(fractions=(0.6, 0.5))
    with pytest.raises(ConfigError, match="workers=0"):
        RenderConfig(workers=0)


def test_caption_phrasings_all_name_the_facts():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        c = make_caption(rng=rng, style="folk reel", tempo="lively", key="D major", instrument="flute",
                         texture="a single melody line")
        seen.add(c)
        for fact in ("folk reel", "lively", "D major", "flute"):
            assert fact.lower() in c.lower()
    assert len(seen) >= 3
