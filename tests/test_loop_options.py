"""The loop's speed options and the decoder profile: same greedy output as the defaults, honest sums."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from musicgen.bundle.profiling import aggregate, category  # noqa: E402
from musicgen.bundle.runtime import GenerationArgError, MusicgenOnnx  # noqa: E402

PROMPT = "calm piano chorale"


def _codes(rt: MusicgenOnnx, n: int = 14) -> np.ndarray:
    ids, mask = rt.tokenize([PROMPT])
    return rt.generate_codes(rt.encode_text(ids, mask), mask, max_new_tokens=n, guidance_scale=3.0)


@pytest.mark.parametrize("kwargs", [
    {"session_config": {"session.intra_op.allow_spinning": "0"}},
    {"session_config": {"session.set_denormal_as_zero": "1"}},
    {"graph_optimization": "disable"},
    {"graph_optimization": "basic"},
    {"io_binding": True, "low_memory": True},
])
def test_session_options_keep_greedy_codes(tiny_bundle, kwargs):
    bundle = tiny_bundle[1]
    reference = _codes(MusicgenOnnx(bundle, threads=1, io_binding=False))
    got = _codes(MusicgenOnnx(bundle, threads=1, **kwargs))
    np.testing.assert_array_equal(got, reference)


def test_bad_graph_optimization_is_typed(tiny_bundle):
    with pytest.raises(GenerationArgError, match="graph_optimization"):
        MusicgenOnnx(tiny_bundle[1], graph_optimization="max")


def _ev(name, ts, dur, op=None, params=0, inputs=2):
    if op is None:
        return {"cat": "Session", "name": name, "ts": ts, "dur": dur, "args": {}}
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "parameter_size": str(params), "input_type_shape": [{"float": [1]}] * inputs}}


def test_aggregate_drops_the_first_run_and_splits_the_if():
    events = [
        _ev("model_run", 0, 100), _ev("/If", 1, 90, "If"), _ev("/layers.0/fc1/MatMul", 2, 80, "MatMul", 4096),
        # the cached run: 1000 us, of which If 900 (MatMul 400 + 300 attention + 100 concat inside)
        _ev("model_run", 1000, 1000), _ev("/use_cache_branch/If", 1050, 900, "If"),
        _ev("/layers.0/fc1/MatMul", 1060, 250, "MatMul", 4096), _ev("/layers.1/fc1/MatMul", 1320, 150, "MatMul", 0, 1),
        _ev("/layers.0/self_attn/MatMul", 1480, 300, "MatMul", 0), _ev("/layers.0/Concat", 1790, 100, "Concat"),
    ]
    r = aggregate(events)
    assert r["cached_runs"] == 1 and r["model_run_ms_per_step"] == 1.0
    cats = {c["category"]: c["ms_per_step"] for c in r["by_category"]}
    assert cats == {"weight matmul": 0.4, "attention (scores, softmax, values)": 0.3, "KV cache concat": 0.1,
                    "If (own)": 0.1, "run overhead": 0.1}
    assert sum(cats.values()) == pytest.approx(r["model_run_ms_per_step"])
    assert r["top_nodes"][0] == {"node": "/layers.*/fc1/MatMul", "op": "MatMul", "ms_per_step": 0.4, "share": 0.4}
    with pytest.raises(ValueError):
        aggregate(events[:3])


def test_category_tells_projections_from_attention():
    assert category("MatMul", 8) == "weight matmul"
    assert category("MatMul", 0, inputs_listed=1) == "weight matmul"  # an outer-scope weight (merged decoder)
    assert category("MatMul", 0) == category("FusedMatMul", 0) == "attention (scores, softmax, values)"
    assert category("MatMulNBits", 8) == "weight matmul"
    assert category("SomethingNew", 0) == "other"


def test_profile_of_a_real_decoder_adds_up(tiny_bundle, tmp_path):
    import onnxruntime as ort

    rt = MusicgenOnnx(tiny_bundle[1], threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "decoder")
    rt.sessions["decoder_model_merged"] = ort.InferenceSession(str(rt.files["decoder_model_merged"]), opts,
                                                               providers=["CPUExecutionProvider"])
    n = 12
    _codes(rt, n)
    events = json.loads(open(rt.sessions["decoder_model_merged"].end_profiling()).read())
    r = aggregate(events)
    assert r["cached_runs"] == n - 1
    cats = {c["category"]: c["ms_per_step"] for c in r["by_category"]}
    assert sum(cats.values()) == pytest.approx(r["model_run_ms_per_step"], rel=1e-2)
    assert cats["weight matmul"] > 0 and cats["KV cache concat"] > 0
    assert {o["op"] for o in r["by_op"]} >= {"MatMul", "Softmax", "Concat"}


def test_int4_block_size_reaches_matmulnbits(tiny_bundle, tmp_path):
    import onnx

    from kdq.quant import Plan
    from musicgen.bundle.build import BundleError, export_bundle

    plan = Plan({"text_encoder": "fp32", "decoder": "int4", "audio_encoder": "fp32"})
    report = export_bundle(str(tiny_bundle[0]), tmp_path / "b64", plan=plan, progress=False, int4_block_size=64)
    assert report["int4_block_size"] == 64
    m = onnx.load(str(tmp_path / "b64" / report["parts"]["decoder_model_merged"]["file"]))
    blocks, stack = set(), [m.graph]  # MatMulNBits nodes sit inside the merged decoder's If branches
    while stack:
        g = stack.pop()
        for n in g.node:
            blocks |= {a.i for a in n.attribute if n.op_type == "MatMulNBits" and a.name == "block_size"}
            stack += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert blocks == {64}
    rt = MusicgenOnnx(tmp_path / "b64", threads=1)
    assert _codes(rt).shape[1] == 4
    with pytest.raises(BundleError, match="int4_block_size"):
        export_bundle(str(tiny_bundle[0]), tmp_path / "bad", plan=plan, progress=False, int4_block_size=48)
