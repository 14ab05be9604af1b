"""Planner end to end on the tiny random MusicGen, plus groups, cache and the Fisher tier on a toy LM."""

from __future__ import annotations

import copy
import math
import json

import pytest
import torch
from torch import nn

from kdq.quant import (
    BudgetError,
    GroupError,
    MixedPrecisionPlanner,
    OutputKL,
    Plan,
    PlanError,
    ProfileError,
    RelativeError,
    SensitivityTable,
    SumOfScores,
    apply_plan,
    default_groups,
    model_bytes,
)
from musicgen.plan import calibration_inputs, musicgen_groups, musicgen_score, paper_plan
from musicgen.models.tiny import build_tiny_musicgen

GROUPS = [
    "text_encoder",
    "decoder.model.decoder.layers.0",
    "decoder.model.decoder.layers.1",
    r"re:decoder\.(lm_heads|model\.decoder\.embed_tokens)",
    "audio_encoder.decoder",
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_musicgen(0)


@pytest.fixture(scope="module")
def profiled(tiny):
    model = copy.deepcopy(tiny)
    score = musicgen_score(model, batch=1, frames=8)
    planner = MixedPrecisionPlanner(model, GROUPS, candidates=["fp32", "fp16", "int8", "int4"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = planner.profile(score, progress=False, log=None)
    after = model.state_dict()
    assert before.keys() == after.keys()  # profiling restored every module
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    return model, score, planner, table


def test_profile_table_shape_and_bytes(profiled):
    model, _, planner, table = profiled
    d = table.to_dict()
    assert list(d) == GROUPS and all(list(v) == ["fp32", "fp16", "int8", "int4"] for v in d.values())
    assert table.meta["evaluations"] == planner.evaluations() == 1 + 5 * 3
    for g in GROUPS:
        row = d[g]
        assert row["fp32"]["sensitivity"] == 0.0
        assert row["fp16"]["bytes"] * 2 == row["fp32"]["bytes"]
        assert row["int4"]["bytes"] <= row["int8"]["bytes"] <= row["fp32"]["bytes"]
        assert all(v["sensitivity"] >= -1e-9 for v in row.values())
    # Only Linear/Embedding are quantized: EnCodec's convolutions keep fp32 under int8.
    assert d["audio_encoder.decoder"]["int8"]["bytes"] == d["audio_encoder.decoder"]["fp32"]["bytes"]
    assert d["decoder.model.decoder.layers.0"]["int4"]["sensitivity"] > d["decoder.model.decoder.layers.0"]["fp16"]["sensitivity"]
    assert table.total_bytes("fp32") == model_bytes(model)


def test_solve_apply_generate_end_to_end(profiled, tiny):
    model, score, planner, table = profiled
    paper = paper_plan()
    paper_bytes = model_bytes(apply_plan(copy.deepcopy(tiny), paper))
    plan = planner.solve(table, max_bytes=paper_bytes)
    assert plan.predicted["bytes"] <= paper_bytes
    assert set(plan.assignments) == set(GROUPS)
    back = Plan.from_json(plan.to_json())
    assert back == plan
    report = planner.measure(plan, score)
    assert report["measured_bytes"] == report["predicted_bytes"] == plan.predicted["bytes"]
    # Relative only: these sensitivities are ~1e-9, so an absolute slack of 1e-6 would accept anything.
    assert report["predicted_sensitivity"] > 1e-10
    assert report["measured_sensitivity"] == pytest.approx(report["predicted_sensitivity"], rel=0.25)
    converted = apply_plan(copy.deepcopy(tiny), back)
    assert model_bytes(converted) == plan.predicted["bytes"]
    x = calibration_inputs(tiny, batch=1)
    torch.manual_seed(0)
    audio = converted.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=10, do_sample=True)
    assert audio.ndim == 3 and audio.shape[-1] > 0 and bool(torch.isfinite(audio).all())
    # A quality budget gives the smallest plan under it, and a tighter one is bigger.
    small = planner.solve(table, max_sensitivity=plan.predicted["sensitivity"])
    assert small.predicted["bytes"] <= plan.predicted["bytes"]
    zero = planner.solve(table, max_sensitivity=0.0)
    assert zero.predicted["sensitivity"] <= 1e-12
    smallest = table.rest_bytes + sum(min(table.bytes[g].values()) for g in table.groups)
    with pytest.raises(BudgetError, match=f"smallest reachable size .* is {smallest} bytes"):
        planner.solve(table, max_bytes=smallest - 1)
    assert planner.solve(table, max_bytes=smallest).predicted["bytes"] == smallest


def test_single_group_plans_measure_exactly_their_table_entry(profiled):
    """Every group, the text encoder, the heads/embeddings and EnCodec included: a plan that converts one
    group is what profiling measured for it (sensitivity and bytes), and the numbers mean something:
    a conversion that changes no tensor measures exactly 0, every other one more than 0."""
    model, score, planner, table = profiled
    fp32 = {g: table.bytes[g]["fp32"] for g in GROUPS}
    for g in GROUPS:
        for d in ("fp16", "int8", "int4"):
            rep = planner.measure(Plan({g: d}, predicted={"sensitivity": table.sensitivity[g][d]}), score)
            assert rep["measured_sensitivity"] == pytest.approx(table.sensitivity[g][d], rel=1e-6, abs=1e-18), (g, d)
            assert rep["measured_bytes"] == table.rest_bytes + sum(fp32.values()) - fp32[g] + table.bytes[g][d]
            changes = table.bytes[g][d] != fp32[g] or d == "fp16"
            assert (table.sensitivity[g][d] > 0) == changes, (g, d, table.sensitivity[g][d])
        if g != "audio_encoder.decoder":  # EnCodec's decoder is convolutions and an LSTM: int kinds keep it fp32
            assert table.sensitivity[g]["int4"] > table.sensitivity[g]["int8"] > 0, g


@pytest.mark.parametrize("assignments", [
    {"text_encoder": "int4", "decoder.model.decoder.layers.0": "int4", "decoder.model.decoder.layers.1": "int4"},
    {"text_encoder": "int4", "decoder.model.decoder.layers.1": "int4", "audio_encoder.decoder": "fp16"},
    {g: "fp16" for g in GROUPS},
])
def test_predicted_against_measured_on_plans_without_a_dominant_group(profiled, assignments):
    """The additive model on plans whose groups contribute comparably (1e-8 to 2e-7 each): within 30%."""
    _, score, planner, table = profiled
    predicted = sum(table.sensitivity[g][d] for g, d in assignments.items())
    assert predicted > 5e-8
    rep = planner.measure(Plan(assignments, predicted={"sensitivity": predicted}), score)
    assert rep["measured_sensitivity"] == pytest.approx(predicted, rel=0.3)


def test_scopes_skip_only_forwards_that_cannot_change_the_score(tiny):
    """musicgen_score's scopes against the same score unscoped: equal tables, fewer forwards; a wrong
    scope gives zero sensitivities, which the single-group measurement above would catch."""
    model = copy.deepcopy(tiny)
    x = calibration_inputs(model, batch=1, frames=4)
    calls = {"logits": 0, "audio": 0}

    def logits(m):
        calls["logits"] += 1
        return m(input_ids=x["input_ids"], attention_mask=x["attention_mask"], decoder_input_ids=x["decoder_input_ids"]).logits

    def audio(m):
        calls["audio"] += 1
        return m.audio_encoder.decode(x["audio_codes"], [None]).audio_values

    groups = ["text_encoder", "decoder.model.decoder.layers.0", "audio_encoder.decoder"]
    planner = MixedPrecisionPlanner(model, groups, candidates=["fp32", "fp16", "int4"])

    def run(lm_scope, audio_scope):
        score = SumOfScores([OutputKL(logits, model, scope=lm_scope), RelativeError(audio, model, scope=audio_scope)])
        calls.update(logits=0, audio=0)
        table = planner.profile(score, progress=False, log=None)
        return table, dict(calls)

    free, free_calls = run(None, None)
    scoped, scoped_calls = run(["text_encoder", "decoder", "enc_to_dec_proj"], ["audio_encoder"])
    assert scoped.sensitivity == free.sensitivity
    assert free_calls == {"logits": 1 + 6, "audio": 1 + 6}
    assert scoped_calls == {"logits": 1 + 4, "audio": 1 + 2}  # the baseline, then only what can change
    wrong, _ = run(["audio_encoder"], ["audio_encoder"])
    assert free.sensitivity["text_encoder"]["int4"] > 0 and wrong.sensitivity["text_encoder"]["int4"] == 0.0


def test_paper_plan_applies_to_musicgen(tiny):
    model = apply_plan(copy.deepcopy(tiny), paper_plan())
    assert len(paper_plan().assignments) == 3
    q = model.text_encoder.encoder.block[0].layer[0].SelfAttention.q
    assert q.qweight.dtype == torch.int8
    assert model.text_encoder.shared.qweight is model.text_encoder.encoder.embed_tokens.qweight  # tied, once
    assert model.decoder.lm_heads[0].weight.dtype == torch.float16
    assert model.audio_encoder.decoder.layers[0].conv.bias.dtype == torch.float32
    x = calibration_inputs(tiny, batch=1)
    audio = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=8, do_sample=False)
    assert audio.dtype == torch.float32 and bool(torch.isfinite(audio).all())


def test_cache_resumes_without_new_evaluations(tmp_path, tiny):
    model = copy.deepcopy(tiny)
    calls = []
    base = musicgen_score(model, batch=1, frames=4)

    def score(m):
        calls.append(1)
        return base(m)

    cache = tmp_path / "cache.json"
    planner = MixedPrecisionPlanner(model, ["text_encoder", "decoder"], candidates=["fp32", "int8"])
    first = planner.profile(score, cache=cache, progress=False, log=None)
    assert len(calls) == 3
    data = json.loads(cache.read_text())
    del data["groups"]["decoder"]["int8"]  # as if interrupted before the last evaluation
    cache.write_text(json.dumps(data))
    lines = []
    second = planner.profile(score, cache=cache, progress=False, log=lines.append)
    assert len(calls) == 4 and "= 1 evaluations" in lines[0]
    assert second.to_dict() == first.to_dict()
    assert SensitivityTable.load(cache).to_dict() == first.to_dict()
    other = MixedPrecisionPlanner(build_tiny_musicgen(0, decoder_hidden=64), ["text_encoder"], candidates=["fp32", "int8"])
    with pytest.raises(ProfileError, match="another model"):
        other.profile(score, cache=cache, progress=False, log=None)


def test_groups_errors_and_defaults(tiny):
    with pytest.raises(GroupError, match="did you mean 'text_encoder'"):
        MixedPrecisionPlanner(tiny, ["text_encoderr"])
    with pytest.raises(GroupError, match="overlap"):
        MixedPrecisionPlanner(tiny, ["decoder", "re:decoder\\.lm_heads\\.\\d"])
    with pytest.raises(ValueError, match="fp32"):
        MixedPrecisionPlanner(tiny, ["decoder"], candidates=["int8"])
    groups = default_groups(tiny)
    assert "decoder.model.decoder.layers.1" in groups and "text_encoder.encoder.block.0" in groups
    assert "text_encoder.encoder.embed_tokens" not in groups  # tied to text_encoder.shared
    sub = default_groups(tiny, granularity="sublayer")
    assert "decoder.model.decoder.layers.0.fc1" in sub and "text_encoder.encoder.block.0.layer.1" in sub
    for granularity in ("part", "layer", "sublayer"):
        MixedPrecisionPlanner(tiny, musicgen_groups(tiny, granularity))  # disjoint and resolvable


class _ToyLM(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.head.weight.mul_(6.0)  # peaked distributions, so quantization moves them measurably

    def forward(self, ids):
        h = torch.tanh(self.l1(self.emb(ids)))
        return self.head(torch.tanh(self.l2(h)) + h)


def test_fisher_tier_agrees_with_measured_kl():
    torch.manual_seed(0)
    model = _ToyLM()
    ids = torch.randint(0, 64, (8, 16))
    planner = MixedPrecisionPlanner(model, ["emb", "l1", "l2", "head"], candidates=["fp32", "bf16", "int8", "int4"])
    measured = planner.profile(OutputKL(lambda m: m(ids), model), progress=False, log=None)
    fisher = planner.profile_fisher(lambda m: m(ids), samples=64, progress=False, log=None)
    assert fisher.bytes == measured.bytes
    for g in measured.groups:
        for d in ("int8", "int4"):
            m, f = measured.sensitivity[g][d], fisher.sensitivity[g][d]
            assert m > 0 and 0.4 < f / m < 2.5, (g, d, m, f)


def test_relative_error_score_and_measure_on_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(4, 32)
    score = RelativeError(lambda m: m(x), model)
    assert score(model) == 0.0
    planner = MixedPrecisionPlanner(model, ["0", "2"], candidates=["fp32", "bf16", "int8"])
    table = planner.profile(score, progress=False, log=None)
    assert 0 < table.sensitivity["0"]["int8"] < 1e-3
    plan = planner.solve(table, max_bytes=table.total_bytes("int8"))
    assert set(plan.assignments.values()) <= {"int8", "bf16"}
    report = planner.measure(plan, score)
    assert report["measured_bytes"] == plan.predicted["bytes"]
    assert list(planner.frontier(table, points=8))[-1]["sensitivity"] == 0.0


class _Picky(nn.Module):
    """Its forward breaks when ``lin`` is not stored in fp32 (as code that checks dtypes would)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        if self.lin.weight.dtype != torch.float32:
            raise RuntimeError("picky needs fp32 weights")
        return self.other(self.lin(x))


def test_a_group_whose_conversion_breaks_the_forward_is_infinitely_sensitive():
    """Issue 13 item 10: the error used to end profiling; now it is recorded, warned about, and skipped."""
    model = _Picky()
    x = torch.randn(4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planner = MixedPrecisionPlanner(model, ["lin", "other"], candidates=["fp32", "fp16", "int8"])
    with pytest.warns(UserWarning, match=r"group 'lin' in fp16 broke the model \(RuntimeError: picky needs fp32 weights\)"):
        table = planner.profile(RelativeError(lambda m: m(x), model), progress=False, log=None)
    assert table.sensitivity["lin"]["fp16"] == math.inf
    assert 0 < table.sensitivity["lin"]["int8"] < 1e-3 and 0 < table.sensitivity["other"]["fp16"] < 1e-5
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
    plan = planner.solve(table, max_bytes=table.total_bytes("fp16"))
    assert plan.assignments["lin"] != "fp16"
    assert SensitivityTable.from_json(table.to_json()).sensitivity["lin"]["fp16"] == math.inf


def test_a_cache_that_is_not_utf8_or_not_a_table_names_the_file(tmp_path):
    model = _Picky()
    planner = MixedPrecisionPlanner(model, ["other"], candidates=["fp32", "int8"])
    score = RelativeError(lambda m: m(torch.randn(2, 8, generator=torch.Generator().manual_seed(0))), model)
    cache = tmp_path / "cache.json"
    for content, needle in ((b"\xff\xfe{}", "not UTF-8"), (b"{}", "not a kdq sensitivity table")):
        cache.write_bytes(content)
        with pytest.raises(ProfileError, match=rf"cache='{cache}'.*{needle}"):
            planner.profile(score, cache=cache, progress=False, log=None)


def test_the_planner_refuses_a_converted_model():
    model = apply_plan(_Picky(), Plan({"other": "int8"}))
    with pytest.raises(PlanError, match="already converted"):
        MixedPrecisionPlanner(model, ["lin"])
