"""Plans in ONNX: node -> module mapping, int8/int4/fp16 per group, conformance, MusicGen bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kdq.export import (  # noqa: E402
    PlanConformanceError,
    PlanExportError,
    apply_plan_onnx,
    check_conformance,
    export_onnx,
    merge_decoders,
    node_modules,
)
from kdq.export.precision import module_of  # noqa: E402
from kdq.quant import Plan  # noqa: E402


def _text_inputs(tok, prompts):
    """input_ids and attention_mask only (tokenizers saved by transformers 5 add token_type_ids in 4.5x)."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 64)
        self.layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.norm = nn.LayerNorm(64)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.norm(self.mlp(h) + h)


@pytest.fixture(scope="module")
def net_graph(tmp_path_factory):
    net = Net().eval()
    path = export_onnx(net, {"ids": torch.randint(0, 50, (2, 5))}, tmp_path_factory.mktemp("g") / "net.onnx",
                       output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}})
    return net, onnx.load(str(path))


def _names(net):
    return [n for n, _ in net.named_modules()]


def _snr(ref, got):
    return 10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum())


def _run(model, ids):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0].astype(np.float64)


def test_module_of_handles_modulelist_sequential_and_prefix():
    names = {"emb", "layers", "layers.0", "layers.1", "mlp", "mlp.0", "mlp.2", "a", "a.decoder", "a.decoder.layers.3"}
    assert module_of("/layers.1/MatMul", names) == "layers.1"
    assert module_of("/mlp/mlp.2/MatMul", names) == "mlp.2"  # Sequential repeats its own name
    assert module_of("/mlp/Relu", names) == "mlp"
    assert module_of("/Add_3", names) == ""
    assert module_of("/unknown/x/MatMul", names) == ""

    class G:  # a minimal stand-in for a ModelProto
        class graph:  # noqa: N801
            node = [type("N", (), {"name": "/decoder/layers.3/conv/Conv", "attribute": []})()]

    assert node_modules(G, names, prefix="a") == {"/decoder/layers.3/conv/Conv": "a.decoder.layers.3"}


def test_node_modules_of_a_real_export(net_graph):
    net, g = net_graph
    mods = node_modules(g, _names(net))
    by_op = {(n.op_type, mods[n.name]) for n in g.graph.node}
    assert ("Gather", "emb") in by_op and ("MatMul", "layers.0") in by_op and ("MatMul", "mlp.2") in by_op
    assert ("LayerNormalization", "norm") in by_op


@pytest.mark.parametrize(
    "assignments, floor_db",
    [
        ({"emb": "int8", "layers": "int8", "mlp": "int8"}, 25.0),
        ({"layers": "fp16", "mlp": "fp16", "norm": "fp16"}, 50.0),
        ({"layers.0": "int4", "mlp": "fp16", "layers.1": "int8"}, 12.0),
        ({"re:mlp\\.\\d": "int8", "emb": "int4"}, 20.0),
    ],
)
def test_plan_applies_conforms_runs_and_stays_close(net_graph, assignments, floor_db):
    net, g = net_graph
    plan = Plan(assignments)
    out, rep = apply_plan_onnx(g, plan, _names(net))
    assert rep.violations == []
    mods = node_modules(out, _names(net))
    # every weighted node carries exactly what the plan resolves for its module
    ids = np.random.default_rng(0).integers(0, 50, (3, 9))
    with torch.no_grad():
        ref = net(torch.from_numpy(ids)).numpy().astype(np.float64)
    assert _snr(ref, _run(out, ids)) > floor_db
    ops = {n.op_type for n in out.graph.node}
    want = set(plan.resolve([m for m in mods.values() if m]).values())
    assert ("MatMulInteger" in ops) == ("int8" in want and any(v == "int8" for k, v in assignments.items() if k != "emb"))
    assert ("MatMulNBits" in ops) == any(v == "int4" and k != "emb" for k, v in assignments.items())
    assert sum(rep.nodes.values()) == 5  # emb + 2 layers + 2 mlp linears


def test_conformance_detects_graphs_that_do_not_carry_the_plan(net_graph):
    net, g = net_graph
    fp32 = check_conformance(g, Plan({"mlp": "fp16", "emb": "int8"}), _names(net))
    bad = {(v[2], v[3], v[4]) for v in fp32.violations}
    assert ("mlp.0", "fp16", "fp32") in bad and ("emb", "int8", "fp32") in bad
    int8, _ = apply_plan_onnx(g, Plan({"layers": "int8"}), _names(net))
    rep = check_conformance(int8, Plan({"layers": "fp16"}), _names(net))
    assert sorted(v[2] for v in rep.violations if v[1] == "MatMulInteger") == ["layers.0", "layers.1"]
    assert {v[4] for v in rep.violations if v[1] == "MatMulInteger"} == {"int8"}
    assert {v[4] for v in rep.violations if v[1] == "Add" and v[2] == "layers.0"} == {"fp32"}  # the bias add too
    assert check_conformance(int8, Plan({"layers": "int8"}), _names(net)).violations == []


def test_bf16_and_unsupported_ops_are_typed_errors(net_graph, tmp_path):
    net, g = net_graph
    with pytest.raises(PlanExportError, match="no bf16 kernels"):
        apply_plan_onnx(g, Plan({"mlp": "bf16"}), _names(net))

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(4, 4, 4, stride=2)
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.up(x), self.lin(x[:, 0])  # a Linear on 2-D input exports as Gemm

    path = export_onnx(Up().eval(), {"x": torch.randn(1, 4, 8)}, tmp_path / "up.onnx", output_names=["y", "z"],
                       dynamic_axes={"x": {0: "b"}})
    # int8 means what it means in kdq.quant (kdq.dtypes.TABLE): Linear/Embedding int8, convolutions fp32
    out, rep = apply_plan_onnx(onnx.load(str(path)), Plan({"up": "int8", "lin": "int8"}), ["", "up", "lin"])
    assert rep.violations == [] and rep.kept_by_op_type == {"ConvTranspose(int8->fp32)": 1}
    assert {n.op_type for n in out.graph.node} >= {"ConvTranspose", "MatMulInteger"}
    # ONNX has no 4-bit Gemm: the table says so, and the export refuses rather than ship fp32 as int4
    with pytest.raises(PlanConformanceError, match="Gemm") as err:
        apply_plan_onnx(onnx.load(str(path)), Plan({"lin": "int4"}), ["", "up", "lin"])
    assert err.value.violations[0][1:] == ("Gemm", "lin", "int4", "fp32")


class Step(nn.Module):
    def __init__(self, with_past: bool):
        super().__init__()
        torch.manual_seed(3)
        self.with_past = with_past
        self.proj = nn.Linear(32, 32)

    def forward(self, x, past):
        h = self.proj(x)
        new = torch.cat([past, h], 1) if self.with_past else h
        return new.sum(1, keepdim=True), new


def test_quantize_unmerged_then_merge(tmp_path):
    axes = {"x": {1: "s"}, "past": {1: "p"}, "new": {1: "n"}}
    graphs = []
    for with_past in (False, True):
        p = export_onnx(Step(with_past).eval(), {"x": torch.randn(1, 3, 32), "past": torch.randn(1, 2, 32)},
                        tmp_path / f"s{int(with_past)}.onnx", output_names=["y", "new"], dynamic_axes=axes)
        graphs.append(onnx.load(str(p)))
    plan, names = Plan({"proj": "int8"}), ["", "proj"]
    quantized = [apply_plan_onnx(gr, plan, names)[0] for gr in graphs]
    merged = merge_decoders(*quantized)
    assert check_conformance(merged, plan, names).violations == []  # walks both If branches
    int8_weights = [t for t in merged.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 1  # quantized once per graph, identical, stored once
    # the trap: quantizing a merged fp32 file changes nothing (weights sit outside the branches)
    from onnxruntime.quantization import quantize_dynamic

    fp32_merged = merge_decoders(*graphs)
    onnx.save(fp32_merged, tmp_path / "m.onnx")
    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "mq.onnx"))
    rep = check_conformance(onnx.load(str(tmp_path / "mq.onnx")), plan, names)
    assert rep.violations and all(v[4] == "fp32" for v in rep.violations)


# --- the MusicGen bundle under a plan -------------------------------------------------------------

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def paper_bundle(tmp_path_factory):
    from musicgen.export import main
    from musicgen.plan import paper_plan
    from musicgen.models.tiny import save_tiny_musicgen

    root = tmp_path_factory.mktemp("paper")
    model_dir = save_tiny_musicgen(root / "model")
    plan_file = paper_plan().save(root / "plan.json")
    assert main(["--model", str(model_dir), "--out", str(root / "bundle"), "--plan", str(plan_file)]) == 0
    return model_dir, root / "bundle"


def test_paper_plan_bundle_layout_conformance_and_parity(paper_bundle):
    _, bundle = paper_bundle
    files = sorted(p.name for p in (bundle / "onnx").iterdir())
    assert files == ["decoder_model_merged_fp16.onnx", "encodec_decode.onnx", "text_encoder_quantized.onnx"]
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["transformers.js_config"]["dtype"] == {"text_encoder": "q8", "decoder_model_merged": "fp16", "encodec_decode": "fp32"}
    rep = json.loads((bundle / "export_report.json").read_text())
    parts = rep["parts"]
    assert rep["plan"]["assignments"] == {"text_encoder": "int8", "decoder": "fp16", "audio_encoder": "fp32"}
    for part in parts.values():
        assert part["conformance"]["conforms"] is True
    assert set(parts["decoder_model_merged"]["conformance"]["weighted_nodes"]) == {"fp16"}
    assert parts["decoder_model_merged"]["conformance_cached_step"]["conforms"] is True
    assert set(parts["text_encoder"]["conformance"]["weighted_nodes"]) == {"int8"}
    dec = parts["decoder_model_merged"]["parity"]
    assert dec["cached_step"]["snr_db_and_max_abs_diff"]["logits"]["snr_db"] > 40  # fp16 (69 dB on 5.24, 46 on 4.57)
    assert parts["text_encoder"]["parity"]["snr_db_and_max_abs_diff"]["last_hidden_state"]["snr_db"] > 25  # int8
    assert parts["encodec_decode"]["parity"]["max_abs_diff"]["audio_values"] < 1e-4  # fp32, strict
    sess = ort.InferenceSession(str(bundle / "onnx/decoder_model_merged_fp16.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    # the KV cache is fp16; tensors crossing parts stay fp32 (transformers.js does not cast between parts)
    assert types["encoder_hidden_states"] == "tensor(float)" and types["past_key_values.0.decoder.key"] == "tensor(float16)"
    assert {o.name: o.type for o in sess.get_outputs()}["logits"] == "tensor(float)"
    assert cfg["transformers.js_config"]["kv_cache_dtype"] == {"fp16": "float16"}
    assert parts["decoder_model_merged"]["kv_cache_dtype"] == "float16"
    assert parts["decoder_model_merged"]["bytes"] < 0.6 * parts["decoder_model_merged"]["planned_weight_bytes_fp32"]["fp16"] + 200_000


def test_paper_plan_bundle_generates_close_to_fp32(paper_bundle):
    from musicgen.bundle.runtime import MusicgenOnnx
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model_dir, bundle = paper_bundle
    model = MusicgenForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = ["bright guitar duet"]
    with torch.no_grad():
        ref = model.generate(**_text_inputs(tok, prompt), do_sample=False, guidance_scale=3.0, max_new_tokens=16).numpy()
    audio = MusicgenOnnx(bundle).generate(prompt, max_new_tokens=16, guidance_scale=3.0)
    assert audio.dtype == np.float32 and audio.shape == ref.shape
    assert _snr(ref.astype(np.float64), audio.astype(np.float64)) > 10


def test_layer_granularity_plan_bundle(tmp_path):
    """A plan finer than parts (per layer, mixed dtypes inside the decoder) exports and conforms."""
    from musicgen.bundle.build import export_bundle
    from musicgen.bundle.runtime import MusicgenOnnx
    from musicgen.models.tiny import save_tiny_musicgen

    model_dir = save_tiny_musicgen(tmp_path / "model")
    dec = "decoder.model.decoder"
    plan = Plan({
        "text_encoder.encoder.block.0": "int8",
        f"{dec}.layers.0": "int8",
        f"{dec}.layers.1": "fp16",
        "decoder.lm_heads": "int4",
    })
    plan.save(tmp_path / "plan.json")
    report = export_bundle(str(model_dir), tmp_path / "bundle", plan=Plan.load(tmp_path / "plan.json"), progress=False)
    d = report["parts"]["decoder_model_merged"]
    assert d["mixed"] is True and d["kv_cache_dtype"] == "float32"
    assert set(d["conformance"]["weighted_nodes"]) == {"fp32", "int8", "fp16", "int4"}  # embeddings stay fp32
    assert d["conformance"]["conforms"] and d["conformance_cached_step"]["conforms"]
    t = report["parts"]["text_encoder"]
    assert set(t["conformance"]["weighted_nodes"]) == {"int8", "fp32"} and t["conformance"]["conforms"]
    assert report["parts"]["encodec_decode"]["dtype"] == "fp32"
    audio = MusicgenOnnx(tmp_path / "bundle").generate(["slow organ chords"], max_new_tokens=12)
    assert audio.shape == (1, 1, 9 * 640) and np.isfinite(audio).all()
