"""Training checkpoints: exact round trip, atomic replacement, checksums, falling back past corruption."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from musicgen.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _tensors(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _save(folder, model, opt, step, keep=3):
    return save_checkpoint(folder, step=step, tensors=_tensors(model), optimizer=opt, state={"log": {"a": [step]}}, keep=keep)


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model, opt = _setup()
    _save(tmp_path, model, opt, 3)
    model2, opt2 = _setup(seed=1)
    state = load_checkpoint(tmp_path, tensors=_tensors(model2), optimizer=opt2)
    assert state["step"] == 3 and state["log"] == {"a": [3]}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in s1:
        for name in s1[pid]:
            assert torch.equal(torch.as_tensor(s1[pid][name]), torch.as_tensor(s2[pid][name]))
    assert load_checkpoint(tmp_path / "none", tensors=_tensors(model2), optimizer=opt2) is None


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt = _setup()
    _save(tmp_path, model, opt, 1)
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError):
        _save(tmp_path, model, opt, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000001"]  # nothing half-written left
    assert load_checkpoint(tmp_path, tensors=_tensors(model), optimizer=opt)["step"] == 1


def test_mismatched_checkpoint_is_named(tmp_path):
    model, opt = _setup()
    _save(tmp_path, model, opt, 1)
    other = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="does not fit this run"):
        load_checkpoint(tmp_path, tensors=dict(other.named_parameters()), optimizer=torch.optim.AdamW(other.parameters()))


def _corrupt(path, how):
    if how == "truncate weights":
        data = (path / "weights.safetensors").read_bytes()
        (path / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "flip a bit in tensor data":
        data = bytearray((path / "weights.safetensors").read_bytes())
        data[-3] ^= 0x10
        (path / "weights.safetensors").write_bytes(bytes(data))
    elif how == "truncate state.json":
        (path / "state.json").write_text((path / "state.json").read_text()[:20])
    elif how == "delete the folder":
        import shutil

        shutil.rmtree(path)


@pytest.mark.parametrize("how", ["truncate weights", "flip a bit in tensor data", "truncate state.json", "delete the folder"])
def test_a_corrupt_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
    """Regression: a torn or corrupted checkpoint ended a resumable run with a raw error, and flipped bits
    in tensor data resumed silently with other weights."""
    model, opt = _setup()
    _save(tmp_path, model, opt, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _save(tmp_path, model, opt, 2)
    _corrupt(tmp_path / "step-00000002", how)
    fresh, fresh_opt = _setup(seed=5)
    with pytest.warns(UserWarning, match="step-00000002"):
        state = load_checkpoint(tmp_path, tensors=_tensors(fresh), optimizer=fresh_opt)
    assert state["step"] == 1
    ref, _ = _setup()
    for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)  # step 1's weights, exactly


def test_unreadable_latest_json_and_no_intact_checkpoint(tmp_path):
    model, opt = _setup()
    _save(tmp_path, model, opt, 1)
    (tmp_path / "latest.json").write_text('{"step": ')  # truncated
    assert load_checkpoint(tmp_path, tensors=_tensors(model), optimizer=opt)["step"] == 1
    _corrupt(tmp_path / "step-00000001", "truncate weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=f"no intact checkpoint in {tmp_path}"):
            load_checkpoint(tmp_path, tensors=_tensors(model), optimizer=opt)
    assert json.loads((tmp_path / "step-00000001" / "checksums.json").read_text())  # nothing was deleted


def test_keeps_the_last_checkpoints_and_sweeps_stale_temporaries(tmp_path):
    model, opt = _setup()
    (tmp_path / ".step-00000009.x.tmp").mkdir(parents=True)
    for step in (1, 2, 3):
        _save(tmp_path, model, opt, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
