"""Training checkpoints: exact round trip, atomic replacement, clear errors."""

from __future__ import annotations

import pytest
import torch

from musicgen.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _setup()
    gen = torch.Generator().manual_seed(7)
    gen_draw = torch.rand(1, generator=gen)  # advance the generator
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, generator=gen, state={"step": 3, "log": {"a": [1]}})
    expected_next = torch.rand(4, generator=gen)
    model2, opt2 = _setup(seed=1)
    gen2 = torch.Generator().manual_seed(0)
    state = load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2, generator=gen2)
    assert state == {"step": 3, "log": {"a": [1]}} and gen_draw.shape == (1,)
    assert torch.equal(torch.rand(4, generator=gen2), expected_next)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in s1:
        for name in s1[pid]:
            assert torch.equal(torch.as_tensor(s1[pid][name]), torch.as_tensor(s2[pid][name]))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt = _setup()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, state={"step": 1})
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, state={"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no half-written folder left behind
    assert load_checkpoint(tmp_path / "ck", model=model, optimizer=opt)["step"] == 1


def test_mismatched_or_missing_checkpoint_is_named(tmp_path):
    model, opt = _setup()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, state={})
    other = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "ck", model=other)
    (tmp_path / "ck" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_checkpoint(tmp_path / "ck", model=model)
