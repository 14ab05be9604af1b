"""The ablation's judges: paired comparisons that tell a better variant from noise, and datasets
whose captions name no key or instrument (a user's own data)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("musicgen")

from musicgen.eval.ablation import Judges, ablation_note  # noqa: E402
from musicgen.eval.music import MelChromaEmbedder  # noqa: E402

SR = 8000
C_MAJOR = (60, 64, 67)  # a C major triad


def _chord(pitches, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * 440 * 2 ** ((p - 69) / 12) * t + rng.uniform(0, 6.28)) for p in pitches)
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _judges(captions, n: int = 12) -> tuple[Judges, list[np.ndarray]]:
    reference = [_chord(C_MAJOR, seed=i) for i in range(n)]
    return Judges([MelChromaEmbedder()], reference, captions, SR, None, n_boot=100, seed=0), reference


def test_paired_comparison_tells_a_better_variant_and_says_within_noise_for_equals():
    captions = ["A slow chorale in C major played on piano."] * 12
    judges, _ = _judges(captions)
    good = [_chord(C_MAJOR, seed=100 + i) for i in range(12)]
    good2 = [_chord(C_MAJOR, seed=200 + i) for i in range(12)]
    bad = [np.random.default_rng(i).standard_normal(SR).astype(np.float32) * 0.2 for i in range(12)]
    rows, items = {}, {}
    for name, audio in (("good", good), ("good2", good2), ("bad", bad)):
        rows[name], items[name] = judges.score(audio, captions)
    assert rows["good"]["fad_mel-chroma"] < rows["bad"]["fad_mel-chroma"]
    lo, hi = rows["good"]["fad_mel-chroma_ci"]
    assert lo < hi
    assert rows["good"]["key_accuracy"] == 1.0 and rows["bad"]["key_accuracy"] < 0.5
    assert "instrument_accuracy" not in rows["good"]  # no classifier: nothing scored, nothing invented
    # dynamics: held chords against the same chords plucked (fast decays), ceiling from the reference
    assert 0 <= judges.ceilings["frame_std"] < 0.5 and rows["good"]["frame_std_ci"][0] <= rows["good"]["frame_std"]

    better = judges.compare(items["good"], items["bad"])
    assert better["fad_mel-chroma"]["estimate"] < 0 and not better["fad_mel-chroma"]["within_noise"]
    assert better["key_accuracy"]["low"] > 0
    same = judges.compare(items["good"], items["good2"])
    assert same["key_accuracy"]["within_noise"]

    comparisons = {"good - bad": {"a": "good", "b": "bad", "question": "q", **better},
                   "good - good2": {"a": "good", "b": "good2", "question": "q", **same}}
    variants = {"student_kd_kdq_plan": {"bytes": 1}, "student_kd_paper_plan": {"bytes": 2}}
    note = ablation_note(variants, comparisons)
    assert "(good better)" in note and "within noise" in note


def test_frame_std_comparison_says_which_is_more_dynamic_not_which_is_better():
    captions = ["A slow chorale in C major played on piano."] * 12
    judges, _ = _judges(captions)
    held = [_chord(C_MAJOR, seed=100 + i) for i in range(12)]
    env = np.exp(-(np.arange(SR) / SR % 0.25) * 20.0).astype(np.float32)
    plucked = [_chord(C_MAJOR, seed=300 + i) * env for i in range(12)]
    (rh, ih), (rp, ip) = judges.score(held, captions), judges.score(plucked, captions)
    assert rp["frame_std"] > rh["frame_std"] + 0.2
    c = judges.compare(ip, ih)
    assert c["frame_std"]["low"] > 0
    note = ablation_note({"student_kd_kdq_plan": {"bytes": 1}, "student_kd_paper_plan": {"bytes": 2}},
                         {"plucked - held": {"a": "plucked", "b": "held", "question": "q", **c}})
    assert "(plucked more dynamic)" in note


def test_captions_without_keys_skip_key_accuracy():
    judges, ref = _judges(["a song"] * 6, n=6)
    assert "key_accuracy" not in judges.ceilings and "instrument_accuracy" not in judges.ceilings
    row, items = judges.score(ref, ["a song"] * 6)
    assert "key_accuracy" not in row and "key_accuracy" not in items
    assert np.isfinite(row["fad"]) and row["fad_embedder"] == "mel-chroma"
