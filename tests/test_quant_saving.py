"""save_quantized / load_quantized: exact round trips (plain module, tiny transformers model), and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdq.quant import ModelFolderError, Plan, PlanError, apply_plan, load_quantized, model_fingerprint, save_quantized
from kdq.quant.saving import PLAN_FILE, WEIGHTS_FILE

PLAN = {"emb": "int4", "mid.0": "int8", "mid.1": "fp16", "mid.2": "bf16", "conv": "int8"}


class _Net(nn.Module):
    """Tied embedding/head, a LayerNorm, a Conv1d (kept fp32 under int8) and a non-persistent buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        self.mid = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 32))
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("pos", torch.linspace(0, 1, 32), persistent=False)

    def forward(self, ids):
        h = self.mid(self.emb(ids) + self.pos)
        return self.head(self.conv(h.transpose(1, 2)).transpose(1, 2).float())


def _quantized(seed: int = 0):
    model = _Net(seed)
    plan = Plan(PLAN, model={"fingerprint": model_fingerprint(model)})
    return apply_plan(model, plan).eval()


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]


def test_plain_module_round_trip_is_exact(tmp_path):
    model = _quantized()
    ids = torch.tensor([[1, 5, 9, 0], [3, 3, 49, 2]])
    folder = save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in folder.iterdir()) == sorted([PLAN_FILE, WEIGHTS_FILE])  # no config: not transformers
    back = load_quantized(folder, build=_Net)
    _same_state(model, back)
    assert back.emb.qweight is back.head.qweight  # the tie survives (saved once)
    assert back.mid[2].weight.dtype == torch.bfloat16 and back.conv.weight.dtype == torch.float32
    assert torch.equal(back(ids), model(ids))
    assert not back.training


def test_transformers_model_round_trip_and_plain_from_pretrained_refuses(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    plan = Plan({"model.embed_tokens": "int8", "model.layers.0": "int4", "model.layers.1.mlp": "fp16"},
                model={"fingerprint": model_fingerprint(model)})
    apply_plan(model, plan)
    ids = torch.tensor([[1, 7, 3, 60, 2]])
    with torch.no_grad():
        want = model(ids).logits
    folder = save_quantized(model, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "kdq" and config["architectures"] == ["LlamaForCausalLM"]
    # The ordinary path must not load random layers: there is nothing under the names it reads.
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    back = load_quantized(folder)  # class and config from config.json
    _same_state(model, back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)


def test_refusals(tmp_path):
    with pytest.raises(ModelFolderError, match="not converted by kdq.quant.apply_plan"):
        save_quantized(_Net(), tmp_path / "a")
    # A folder where from_pretrained would find float weights: refused, the user's file untouched.
    user = tmp_path / "b"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"the user's weights")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors"):
        save_quantized(_quantized(), user)
    assert (user / "model.safetensors").read_bytes() == b"the user's weights" and len(list(user.iterdir())) == 1
    with pytest.raises(ModelFolderError, match="not a kdq quantized model"):
        load_quantized(user, build=_Net)
    folder = save_quantized(_quantized(), tmp_path / "c")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_quantized(folder)
    with pytest.raises(PlanError, match="different model"):  # the fingerprint: another architecture
        load_quantized(folder, build=lambda: nn.Sequential(nn.Linear(2, 2)))


def test_mixed_and_corrupt_folders_are_refused(tmp_path):
    folder = save_quantized(_quantized(), tmp_path / "q")
    other = Plan({"emb": "int8"}).save(tmp_path / "other.json")
    good_plan = (folder / PLAN_FILE).read_bytes()
    (folder / PLAN_FILE).write_bytes(other.read_bytes())
    with pytest.raises(ModelFolderError, match="mixes two saves"):
        load_quantized(folder, build=_Net)
    (folder / PLAN_FILE).write_bytes(good_plan)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="not a readable safetensors file"):
        load_quantized(folder, build=_Net)


def test_tensors_that_do_not_fit_the_built_model_are_refused(tmp_path):
    # Same plan without a fingerprint, and a build() with a wider layer: caught by the tensor check.
    model = apply_plan(_Net(), Plan(PLAN))
    folder = save_quantized(model, tmp_path / "q")

    def wider():
        net = _Net()
        net.mid[0] = nn.Linear(32, 64, bias=False)
        return net

    with pytest.raises(ModelFolderError, match=r"mid\.0\.bias"):
        load_quantized(folder, build=wider)
