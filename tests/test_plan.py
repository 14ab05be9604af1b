"""Plan: precedence, JSON round-trip, errors, atomic save."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
from torch import nn

from kdq.quant import DTYPES, Plan, PlanError, apply_plan, explain_plan, model_fingerprint
from kdq.quant.plan import GroupRecord

# ---------------------------------------------------------------------------- precedence, by example


def test_contract_example():
    plan = Plan(assignments={"text_encoder": "int8", "decoder": "fp16", "audio_encoder": "fp32"})
    assert plan.default == "fp32"
    names = ["text_encoder", "text_encoder.encoder.block.0.q", "decoder.lm_heads.0", "audio_encoder.decoder", "enc_to_dec_proj", ""]
    assert plan.resolve(names) == {
        "text_encoder": "int8",
        "text_encoder.encoder.block.0.q": "int8",
        "decoder.lm_heads.0": "fp16",
        "audio_encoder.decoder": "fp32",
        "enc_to_dec_proj": "fp32",
        "": "fp32",
    }
    assert plan.dtype_for("decoder") == "fp16"
    assert plan.winning_rule("enc_to_dec_proj") is None


def test_deeper_name_beats_shallower_and_prefix_is_by_component():
    plan = Plan({"decoder": "fp16", "decoder.lm_heads": "fp32", "decoder.lm_heads.2": "int8"})
    assert plan.dtype_for("decoder.layers.3.fc1") == "fp16"
    assert plan.dtype_for("decoder.lm_heads.0") == "fp32"
    assert plan.dtype_for("decoder.lm_heads.2") == "int8"
    assert plan.dtype_for("decoder.lm_heads.20") == "fp32"  # '2' is not a prefix of '20'
    assert plan.dtype_for("decoder_extra") == "fp32"


def test_pattern_root_depth_decides_against_names():
    plan = Plan({"decoder": "fp16", r"re:.*embed_tokens\.\d+": "int8"})
    assert plan.dtype_for("decoder.model.decoder.embed_tokens.3") == "int8"
    assert plan.winning_rule("decoder.model.decoder.embed_tokens.3") == r"re:.*embed_tokens\.\d+"
    assert plan.dtype_for("decoder.model.decoder.layers.0") == "fp16"
    # A greedy pattern is rooted at the shallowest module it matches, so a deeper name still wins.
    plan = Plan({"re:decoder.*": "fp16", "decoder.layers.0": "int8"})
    assert plan.dtype_for("decoder.layers.0.fc1") == "int8"
    assert plan.dtype_for("decoder.layers.1.fc1") == "fp16"


def test_equal_depth_name_beats_pattern_and_earlier_pattern_wins():
    plan = Plan({"re:dec.*": "bf16", "re:decoder": "int8", "decoder": "fp16"})
    assert plan.dtype_for("decoder.x") == "fp16"
    plan = Plan({"re:dec.*": "bf16", "re:decoder": "int8"})
    assert plan.dtype_for("decoder.x") == "bf16"
    plan = Plan({"re:decoder": "int8", "re:dec.*": "bf16"})
    assert plan.dtype_for("decoder.x") == "int8"


# ---------------------------------------------------------------------------- precedence, as a property
_seg = st.sampled_from(["a", "b", "c", "0", "1", "ab"])
_name = st.lists(_seg, min_size=1, max_size=4).map(".".join)
_pattern = st.sampled_from([r"a", r"a\..*", r".*\.0", r"b|c", r".*b", r"a\.\d", r"[ab]\.[01]"]).map(lambda p: "re:" + p)
_dtype = st.sampled_from(DTYPES)


def _reference_winner(plan_items: list[tuple[str, str]], module: str):
    """Brute force of the documented precedence: every covering rule, with its root depth."""
    parts = module.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    covering = []
    for order, (rule, _) in enumerate(plan_items):
        if rule.startswith("re:"):
            roots = [i for i, p in enumerate(prefixes) if re.fullmatch(rule[3:], p)]
            if roots:
                covering.append((roots[0] + 1, 0, -order, rule))
        elif rule in prefixes:
            covering.append((prefixes.index(rule) + 1, 1, -order, rule))
    if not covering:
        return None, covering
    best = max(covering)
    return best[3], covering


@settings(max_examples=60, deadline=None)
@given(
    rules=st.dictionaries(st.one_of(_name, _pattern), _dtype, max_size=6),
    modules=st.lists(_name, min_size=1, max_size=10),
)
def test_exactly_one_winning_rule(rules, modules):
    plan = Plan(rules)
    items = list(rules.items())
    for m in modules:
        want, covering = _reference_winner(items, m)
        got = plan.winning_rule(m)
        assert got == want
        keys = [c[:3] for c in covering]
        assert len(keys) == len(set(keys))  # the precedence key is a strict total order: one winner
        assert plan.dtype_for(m) == (rules[got] if got is not None else plan.default)


# ---------------------------------------------------------------------------- JSON
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.dictionaries(st.one_of(_name, _pattern), _dtype, max_size=5),
    default=_dtype,
    groups=st.dictionaries(
        _name,
        st.builds(GroupRecord, dtype=_dtype, sensitivity=st.one_of(st.none(), _finite),
                  bytes=st.one_of(st.none(), st.integers(0, 2**40)), reason=st.text(max_size=20)),
        max_size=3,
    ),
    predicted=st.fixed_dictionaries({"bytes": st.integers(0, 2**40), "sensitivity": _finite}),
    meta=st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), _finite), max_size=3),
)
def test_json_round_trip_is_exact(rules, default, groups, predicted, meta):
    plan = Plan(rules, default=default, groups=groups, predicted=predicted, model={"fingerprint": "sha256:x"}, meta=meta)
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert list(back.assignments) == list(rules)


def test_save_is_atomic_and_loads(tmp_path):
    plan = Plan({"decoder": "fp16"}, meta={"note": "x"})
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert Plan.load(path) == plan
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp file left behind
    Plan({"decoder": "int8"}).save(path)  # overwrite in place
    assert Plan.load(path).assignments == {"decoder": "int8"}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"schema": "kdq.plan/9", "assignments": {}}', "kdq.plan/1"),
        ('{"schema": "kdq.plan/1"}', "no 'assignments'"),
        ('{"schema": "kdq.plan/1", "assignments": {"decoder": "int7"}}', "int8"),
        ('{"schema": "kdq.plan/1", "assignments": {"re:(": "fp16"}}', "regular expression"),
        ('{"schema": "kdq.plan/1", "assignments": {"": "fp16"}}', "non-empty"),
        ('{"schema": "kdq.plan/1", "assignments": {}, "extra": 1}', "unknown keys"),
        ('{"schema": "kdq.plan/1", "assignments": {}, "groups": {"a": {"dtype": "fp16", "bytes": 1.5}}}', "integer"),
        ('{"schema": "kdq.plan/1", "assignments": [["a", "fp16"]]}', "dict"),
    ],
)
def test_malformed_plans_raise_plan_error(text, needle):
    with pytest.raises(PlanError, match=re.escape(needle)):
        Plan.from_json(text)


def test_unknown_dtype_lists_close_match():
    with pytest.raises(ValueError, match=r"did you mean 'fp16'"):
        Plan({"decoder": "fp61"})


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- models


class _Toy(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, 4))

    def forward(self, ids):
        return self.body(self.emb(ids))


def test_plan_for_another_model_is_refused():
    plan = Plan({"body": "int8"}, model={"fingerprint": model_fingerprint(_Toy(8))})
    apply_plan(_Toy(8), plan)  # same architecture: fine
    with pytest.raises(PlanError, match="different model"):
        apply_plan(_Toy(16), plan)


def test_rule_naming_no_module_is_refused_with_close_matches():
    with pytest.raises(PlanError, match=r"did you mean 'body'"):
        apply_plan(_Toy(), Plan({"bodyy": "int8"}))
    with pytest.raises(PlanError, match="matches no module"):
        apply_plan(_Toy(), Plan({"re:head.*": "int8"}))


def test_explain_names_the_rule_per_module():
    import io

    buf = io.StringIO()
    rows = explain_plan(_Toy(), Plan({"body": "fp16", "body.2": "int8"}), file=buf)
    assert ("body.0", "fp16", "fp16", "body") in rows
    assert ("body.1", "fp16", "fp16", "body") in rows
    assert ("body.2", "int8", "int8", "body.2") in rows
    assert ("emb", "fp32", "fp32", "(default)") in rows
    rows = explain_plan(_Toy(), Plan({"body": "int8"}), file=False)
    assert ("body.1", "int8", "fp32", "body") in rows  # LayerNorm: int8 is weight-only for Linear/Embedding
    assert "body.2" in buf.getvalue() and "(default)" in buf.getvalue()


def test_json_file_is_readable():
    data = json.loads(Plan({"decoder": "fp16"}).to_json())
    assert data["schema"] == "kdq.plan/1" and data["assignments"] == {"decoder": "fp16"}


# ---------------------------------------------------------------------------- without torch
_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json, tempfile, pathlib
import kdq._io, kdq.dtypes, kdq.quant.plan, kdq.export.atomic
from kdq.quant import DTYPES, Plan, PlanError
from kdq.dtypes import TABLE
assert DTYPES == tuple(TABLE) and TABLE["int8"].modules == ("Linear", "Embedding")
d = pathlib.Path(tempfile.mkdtemp())
p = Plan({"decoder": "fp16", "re:.*heads\\\\.\\\\d+": "int8"})
assert Plan.load(p.save(d / "plan.json")) == p
p.check_rules(["decoder", "decoder.heads.0"])
try:
    p.check_rules(["decoderr"])
except PlanError as e:
    assert "did you mean 'decoderr'" in str(e), e
else:
    raise SystemExit("no PlanError")
kdq.export.atomic.write_text_atomic(d / "x.txt", "y")
assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("ok")
"""


def test_plan_dtype_table_and_io_import_without_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---------------------------------------------------------------------------- hostile patterns
_HOSTILE = r"re:(\w+\.?)*X"  # backtracks exponentially in re: 5 s at 36 characters, x2 per character
_LONG = ".".join(["decoder", "model", "decoder", "layers", "11", "self_attn", "q_proj"] * 3)  # 137 characters
_HOSTILE_RUN = f"""
import sys
sys.modules["torch"] = None
from kdq.quant.plan import Plan
from kdq.quant import PlanError
p = Plan({{{_HOSTILE!r}: "int8", "decoder": "fp16", r"re:(a|a)*b": "int4", r"re:(.*)*Y": "bf16"}})
names = [{_LONG!r}[:i] for i in range(1, {len(_LONG)}) if {_LONG!r}[i] == "."] + [{_LONG!r}]
assert set(p.resolve(names).values()) == {{"fp16"}}
assert p.unused_rules(names) == [{_HOSTILE!r}, r"re:(a|a)*b", r"re:(.*)*Y"]
try:
    p.check_rules(names)
except PlanError as e:
    assert "matches no module" in str(e)
print("ok")
"""


def test_a_catastrophic_pattern_resolves_in_linear_time():
    """Issue 13 item 8: the reproduction, on names four times longer, under a time limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        res = subprocess.run([sys.executable, "-c", _HOSTILE_RUN], capture_output=True, text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving {_HOSTILE!r} against a {len(_LONG)}-character name took more than 20 s")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---------------------------------------------------------------------------- the matcher against re
_atom = st.sampled_from(["a", "b", "0", r"\.", ".", r"\d", r"\w", "[ab]", "[^a.]", "[0-9b]", r"\W", "(?:)"])


def _regexes():
    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
            inner.map(lambda x: f"({x})"),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "*?", "+?", "{2}", "{0,2}", "{1,3}?", "{2,}"])).map(
                lambda t: f"(?:{t[0]}){t[1]}"
            ),
        )

    core = st.recursive(_atom, extend, max_leaves=8)
    return st.tuples(st.sampled_from(["", "^", r"\A"]), core, st.sampled_from(["", "$", r"\Z"])).map("".join)


@settings(max_examples=300, deadline=None)
@given(pattern=_regexes(), names=st.lists(st.lists(st.text("ab0_.", min_size=1, max_size=3), min_size=1, max_size=4).map(".".join), min_size=1, max_size=6))
def test_name_matcher_equals_re_fullmatch_on_every_prefix(pattern, names):
    from kdq.quant.pattern import NameMatcher

    m = NameMatcher(pattern)
    ref = re.compile(pattern)
    for name in names:
        assert m.fullmatch(name) == (ref.fullmatch(name) is not None), (pattern, name)
        parts = name.split(".")
        prefixes = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        want = [k for k, prefix in enumerate(prefixes, start=1) if prefix and ref.fullmatch(prefix)]
        assert list(m.match_depths(name)) == want, (pattern, name)


@pytest.mark.parametrize(
    "pattern, needle",
    [
        (r"(a)\1", "not supported"),
        (r"a(?=b)", "not supported"),
        (r"(?i)decoder", "flags"),
        (r"a++", "not supported"),
        (r"\bdecoder", "word boundaries"),
        (r"(a{100}){1000}", "too large"),
        (r"(", "missing"),
    ],
)
def test_unsupported_patterns_are_plan_errors(pattern, needle):
    with pytest.raises(PlanError, match=needle):
        Plan({"re:" + pattern: "int8"})


# ---------------------------------------------------------------------------- apply_plan: all or nothing
class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: (v, v.dtype, v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_untouched(model, snap):
    modules, tensors, values = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for k, (t, dtype, ptr) in tensors.items():
        assert now[k] is t and now[k].dtype == dtype and now[k].data_ptr() == ptr, k
        assert torch.equal(now[k].detach(), values[k]), k
    for _, m in model.named_modules():
        assert not m._forward_pre_hooks and "_kdq_compute" not in m.__dict__ and getattr(m, "_kdq_cast_hook", None) is None
    assert not hasattr(model, "_kdq_plan")


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_apply_plan_that_fails_midway_leaves_the_model_exactly_as_it_was(monkeypatch, fail_at):
    """Issue 13 item 6: an error while converting undoes every conversion, hook and compute mark."""
    from kdq.quant.dtypes import Int4Linear

    model = _Mixed()
    ids = torch.tensor([[1, 2, 3]])
    before_out = model(ids)
    snap = _snapshot(model)
    calls = []
    real = Int4Linear.from_float.__func__

    def flaky(cls, linear, memo=None):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("conversion failed")
        return real(cls, linear, memo)

    monkeypatch.setattr(Int4Linear, "from_float", classmethod(flaky))
    plan = Plan({"emb": "fp16", "body.0": "int4", "body.1": "bf16", "body.2": "int4", "body.3": "int4", "head": "int8"})
    with pytest.raises(RuntimeError, match="conversion failed"):
        apply_plan(model, plan)
    _assert_untouched(model, snap)
    assert torch.equal(model(ids), before_out)
    monkeypatch.undo()
    apply_plan(model, plan)  # and the same model converts cleanly afterwards
    assert isinstance(model.body[3], Int4Linear) and model.emb.weight.dtype == torch.float16


def test_apply_plan_validates_everything_before_converting():
    model = _Mixed()
    snap = _snapshot(model)
    for plan in (Plan({"body.0": "fp16", "bodyy": "int8"}), Plan({"emb": "int8"}, model={"fingerprint": "sha256:0"})):
        with pytest.raises(PlanError):
            apply_plan(model, plan)
        _assert_untouched(model, snap)


@pytest.mark.parametrize("first, second", [
    ({"body": "int4"}, {"body": "fp16"}),   # int4 scales used to drift to fp32 under the fp16 plan
    ({"body": "int8"}, {"body": "fp16"}),   # the fp16 rule used to leave Int8Linear in place
    ({"emb": "fp16"}, {"emb": "fp16"}),     # even the same plan: converting twice is not defined
    ({}, {"head": "int8"}),                 # an all-fp32 plan marks the model as converted too
])
def test_a_second_plan_over_a_converted_model_is_refused(first, second):
    model = apply_plan(_Mixed(), Plan(first))
    snap = _snapshot(model)
    with pytest.raises(PlanError, match="already converted"):
        apply_plan(model, Plan(second))
    modules, tensors, _ = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(model.state_dict(keep_vars=True)[k] is t for k, (t, _, _) in tensors.items())


def test_a_plan_file_that_is_not_utf8_names_the_file(tmp_path):
    """Issue 13 item 10: a non-UTF-8 plan file raised a raw UnicodeDecodeError."""
    path = tmp_path / "latin1.json"
    path.write_bytes('{"schema": "kdq.plan/1", "assignments": {"décodeur": "fp16"}}'.encode("latin-1"))
    with pytest.raises(PlanError, match=rf"{re.escape(str(path))}.*not UTF-8 text \(byte 43 is 0xe9\)"):
        Plan.load(path)
    path.write_text("{broken")
    with pytest.raises(PlanError, match=rf"{re.escape(str(path))}.*not valid JSON"):
        Plan.load(path)
    with pytest.raises(PlanError, match="is a folder"):
        Plan.load(tmp_path)
