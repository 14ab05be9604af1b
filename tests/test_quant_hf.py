"""Issue 23 item 5: a planned transformers model through save_pretrained / from_pretrained (kdq/quant/hf.py).

The reproduction: ``apply_plan(m, Plan(default="int8")); m.save_pretrained(d);
AutoModelForCausalLM.from_pretrained(d)`` loaded with the int8 layers newly initialised (a warning only;
logits off by 0.46 on this tiny Llama). Now plain ``from_pretrained`` raises, with kdq's quantizer
registered (a clear ModelFolderError naming load_quantized) and without it (transformers alone: a size
mismatch on the placeholders), and ``load_quantized`` restores exactly what was saved.
"""

from __future__ import annotations

import json

import pytest
import torch

from kdq.quant import ModelFolderError, Plan, apply_plan, load_quantized, model_fingerprint

transformers = pytest.importorskip("transformers")


def _llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.tensor([[1, 7, 3, 60, 2], [5, 5, 9, 0, 63]])


def _saved(tmp_path, plan_rules=None, *, default="int8", tie=False):
    model = _llama(tie)
    plan = Plan(plan_rules or {}, default=default, model={"fingerprint": model_fingerprint(model)})
    apply_plan(model, plan)
    with torch.no_grad():
        want = model(IDS).logits
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    return model, folder, want


def test_plain_from_pretrained_of_a_planned_model_fails_loudly(tmp_path, monkeypatch):
    _, folder, _ = _saved(tmp_path)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "kdq" and qc["format"] == "kdq.hf/1" and Plan.from_json(qc["plan"]).default == "int8"
    # kdq registered (this process applied a plan): a clear error naming the loader.
    with pytest.raises(ModelFolderError, match=r"kdq\.quant\.load_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    # transformers alone (kdq never imported): it skips the unknown quant_method, then the
    # placeholders' shapes cannot fit the float layers. Before the fix this loaded random layers.
    from transformers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "kdq")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "kdq")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_load_quantized_restores_a_save_pretrained_folder_exactly(tmp_path, tie):
    # equal-depth patterns: the earlier wins, so the order must survive config.json (sorted keys would swap it)
    rules = {"model.layers.0": "int4", "model.layers.1.mlp": "fp16", "re:model\\.layers\\.1\\.self_attn\\..*": "fp32",
             "re:.*self_attn\\.[qk]_proj": "bf16"}
    model, folder, want = _saved(tmp_path, rules, tie=tie)
    back = load_quantized(folder)
    assert type(back) is type(model) and not back.training
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert back._kdq_plan.to_json() == model._kdq_plan.to_json()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, want)
    if tie:
        assert back.lm_head.qweight is back.model.embed_tokens.qweight
    # the restored model saves the same way again
    back.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "again")(IDS).logits, want)


def test_a_save_pretrained_folder_with_a_foreign_plan_is_refused(tmp_path):
    _, folder, _ = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["plan"] = Plan(default="int4").to_json()
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="mixes two saves"):
        load_quantized(folder)


def test_quantization_config_in_from_pretrained_is_refused_with_the_fix(tmp_path):
    from kdq.quant.hf import register

    config_cls, _ = register()
    float_dir = tmp_path / "float"
    _llama(False).save_pretrained(float_dir)
    with pytest.raises(ModelFolderError, match="apply_plan"):
        transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config_cls(plan=Plan().to_json()))
