"""kdq.export generic part: export with dynamic axes, validation, atomic writes, decoder merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kdq.errors import KdqError  # noqa: E402
from kdq.export import (  # noqa: E402
    OnnxExportError,
    OnnxParityError,
    OnnxValidationError,
    atomic_path,
    export_onnx,
    merge_decoders,
    validate_onnx,
)


class Tiny(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, ids, scale):
        return self.norm(self.block(self.emb(ids))) * scale, ids.sum(-1)


AXES = {"ids": {0: "batch", 1: "seq"}, "scale": {0: "batch"}, "y": {0: "batch", 1: "seq"}, "total": {0: "batch"}}


def _feed(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 11, (b, s), generator=g), "scale": torch.rand(b, 1, 1, generator=g)}


def test_positional_inputs_as_torch_onnx_export_takes_them(tmp_path):
    """Regression: `export_onnx(m, (x,), path)`, torch.onnx.export's convention, failed."""
    m = Tiny().eval()
    ids, scale = _feed(2, 3).values()
    path = export_onnx(m, (ids, scale), tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_0", "input_1"]
    assert [o.name for o in sess.get_outputs()] == ["output_0", "output_1"]
    got = sess.run(None, {"input_0": ids.numpy(), "input_1": scale.numpy()})
    with torch.no_grad():
        ref = m(ids, scale)
    np.testing.assert_allclose(got[0], ref[0].numpy(), atol=1e-5)
    named = export_onnx(m, (ids, scale), tmp_path / "n.onnx", input_names=["ids", "scale"],
                        output_names=["y", "total"], dynamic_axes=AXES)
    validate_onnx(named, m, [_feed(3, 5, seed=1)], output_names=["y", "total"])  # other shapes: axes declared
    one = export_onnx(nn.Linear(4, 2), torch.randn(3, 4), tmp_path / "one.onnx")  # a bare tensor, too
    assert [i.name for i in ort.InferenceSession(str(one), providers=["CPUExecutionProvider"]).get_inputs()] == ["input_0"]
    with pytest.raises(OnnxExportError, match="input_names"):
        export_onnx(m, (ids, scale), tmp_path / "x.onnx", input_names=["ids"])
    with pytest.raises(OnnxExportError, match="keyword arguments"):
        export_onnx(m, (ids, {"scale": scale}), tmp_path / "x.onnx")
    with pytest.raises(OnnxExportError, match="mapping's own keys"):
        export_onnx(m, _feed(2, 3), tmp_path / "x.onnx", input_names=["a", "b"])
    assert not (tmp_path / "x.onnx").exists()


def test_export_validates_on_other_shapes(tmp_path):
    m = Tiny()
    path = export_onnx(m, _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=AXES)
    rep = validate_onnx(path, m, [_feed(5, 7, 1), _feed(1, 1, 2)], output_names=["y", "total"], atol=1e-5)
    assert set(rep.max_diff) == {"y", "total"} and rep.max_diff["y"] < 1e-5
    assert rep.shapes[0]["ids"] == [5, 7]


def test_export_puts_wrapper_in_eval_and_restores_flags(tmp_path):
    m = Tiny(dropout=0.5).train()  # exported in training mode, dropout would make parity fail
    path = export_onnx(m, _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=AXES)
    assert all(mod.training for mod in m.modules())  # flags restored
    m.eval()
    validate_onnx(path, m, [_feed(3, 4, 1)], output_names=["y", "total"], atol=1e-5)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Dropout" not in ops


def test_baked_axis_is_reported_as_shape_error(tmp_path):
    m = Tiny()
    axes = {k: v for k, v in AXES.items() if k not in ("ids", "y")}  # seq and batch of ids left static
    path = export_onnx(m, _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=axes)
    with pytest.raises(Exception) as err:
        validate_onnx(path, m, [_feed(2, 5, 1)], output_names=["y", "total"])
    # ORT refuses the input shape, or (if it runs) the shapes differ: either way it fails loudly
    assert isinstance(err.value, (OnnxValidationError, ort.capi.onnxruntime_pybind11_state.InvalidArgument))


def test_parity_error_reports_max_diff_and_tolerance(tmp_path):
    m = Tiny()
    path = export_onnx(m, _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=AXES)

    def shifted(ids, scale):
        y, total = m(ids, scale)
        return y + 1e-3, total

    with pytest.raises(OnnxParityError) as err:
        validate_onnx(path, shifted, [_feed(3, 4, 1)], output_names=["y", "total"], atol=1e-4, rtol=0.0)
    e = err.value
    assert isinstance(e, KdqError) and isinstance(e, ValueError)
    assert e.output == "y" and e.atol == 1e-4 and abs(e.max_diff - 1e-3) < 1e-5
    assert "0.001" in str(e) and "atol=0.0001" in str(e)
    # the same reference passes with a tolerance above the shift
    validate_onnx(path, shifted, [_feed(3, 4, 1)], output_names=["y", "total"], atol=2e-3, rtol=0.0)


def test_wrong_output_names_and_bad_axes_key(tmp_path):
    m = Tiny()
    path = export_onnx(m, _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=AXES)
    with pytest.raises(OnnxValidationError, match="outputs"):
        validate_onnx(path, m, [_feed(2, 3)], output_names=["logits", "total"])
    with pytest.raises(OnnxExportError, match="dynamic_axes"):
        export_onnx(m, _feed(2, 3), tmp_path / "n.onnx", output_names=["y", "total"], dynamic_axes={"idz": {0: "b"}})
    assert not (tmp_path / "n.onnx").exists()


def test_failed_export_leaves_no_file_and_keeps_old_one(tmp_path):
    class Broken(nn.Module):
        def forward(self, ids, scale):
            raise RuntimeError("boom")

    target = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), _feed(2, 3), target, output_names=["y", "total"], dynamic_axes=AXES)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        export_onnx(Broken(), _feed(2, 3), target, output_names=["y", "total"], dynamic_axes=AXES)
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists()
    assert target.read_text() == "one"
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        tmp.write_text("two")
        raise KeyError("x")
    assert target.read_text() == "one" and len(list(target.parent.iterdir())) == 1


class Step(nn.Module):
    """A toy cached decoder: shared weights, a cache that grows, a passthrough cross state."""

    def __init__(self, with_past: bool):
        super().__init__()
        torch.manual_seed(1)
        self.with_past = with_past
        self.proj = nn.Linear(4, 4)
        self.cross = nn.Linear(4, 4)

    def forward(self, x, enc, past_self, past_cross):
        h = self.proj(x)
        cross = past_cross if self.with_past else self.cross(enc)
        new_self = torch.cat([past_self, h], 1) if self.with_past else h
        logits = new_self.sum(1, keepdim=True) + cross.mean(1, keepdim=True)
        return logits, new_self, cross


def test_merge_decoders_matches_both_branches_and_shares_weights(tmp_path):
    outs = ["logits", "present.self", "present.cross"]
    axes = {"x": {1: "seq"}, "enc": {1: "enc_len"}, "past_self": {1: "past"}, "past_cross": {1: "enc_len_out"},
            "present.self": {1: "present_len"}, "present.cross": {1: "enc_len_out"}}
    x, enc = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    empty = torch.zeros(2, 0, 4)
    a = export_onnx(Step(False), {"x": x, "enc": enc, "past_self": empty, "past_cross": torch.zeros(2, 5, 4)},
                    tmp_path / "a.onnx", output_names=outs, dynamic_axes=axes)
    b = export_onnx(Step(True), {"x": x[:, :1], "enc": enc, "past_self": torch.randn(2, 3, 4), "past_cross": torch.randn(2, 5, 4)},
                    tmp_path / "b.onnx", output_names=outs, dynamic_axes=axes)
    merged = merge_decoders(onnx.load(str(a)), onnx.load(str(b)))
    n_weights = sum(int(np.prod(t.dims)) for t in merged.graph.initializer if len(t.dims) == 2)
    assert n_weights == 2 * 16  # proj and cross weights, stored once although both graphs hold proj
    sess = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    for flag, module, feed in [
        (False, Step(False), {"x": torch.randn(2, 4, 4), "enc": torch.randn(2, 6, 4), "past_self": torch.zeros(2, 0, 4), "past_cross": torch.zeros(2, 0, 4)}),
        (True, Step(True), {"x": torch.randn(2, 1, 4), "enc": torch.randn(2, 6, 4), "past_self": torch.randn(2, 7, 4), "past_cross": torch.randn(2, 6, 4)}),
    ]:
        got = sess.run(None, {**{k: v.numpy() for k, v in feed.items()}, "use_cache_branch": np.array([flag])})
        with torch.no_grad():
            ref = module(*feed.values())
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r.numpy(), atol=1e-6)


class Branchy(nn.Module):
    """A data-dependent branch: traced, the graph keeps only the branch the example took."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_branch_is_surfaced_and_caught_by_validation(tmp_path):
    from kdq.export import TraceWarning

    m = Branchy()
    with pytest.warns(TraceWarning, match="validate_onnx on inputs that take the others") as rec:
        path = export_onnx(m, {"x": torch.ones(2, 3)}, tmp_path / "b.onnx", output_names=["y"],
                           dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert sum(issubclass(w.category, TraceWarning) for w in rec) == 1  # once, not once per trace site call
    validate_onnx(path, m, [{"x": torch.ones(4, 3)}], output_names=["y"])  # the same branch: fine
    with pytest.raises(OnnxParityError):
        validate_onnx(path, m, [{"x": -3 * torch.ones(4, 3)}], output_names=["y"])  # the other branch: caught


def test_plain_export_emits_no_trace_warning(tmp_path):
    import warnings

    from kdq.export import TraceWarning

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        export_onnx(Tiny(), _feed(2, 3), tmp_path / "m.onnx", output_names=["y", "total"], dynamic_axes=AXES)
    assert not [w for w in rec if issubclass(w.category, TraceWarning)]
