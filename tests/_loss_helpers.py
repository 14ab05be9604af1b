"""Shared test helpers for the loss tests: the dtype tolerance table and logits makers."""

from __future__ import annotations

import torch

#: Tolerances keyed by the dtype of the tensors compared. Values are always computed in float32
#: (float64 for float64 inputs); gradients come back in the input dtype.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 3e-5, "rtol": 3e-4},
    torch.float16: {"atol": 2e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 3e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, **TOL[actual.dtype])


def logits(shape, *, seed: int, scale: float = 3.0, dtype=torch.float32, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(grad)


def random_mask(shape, *, seed: int, p: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > p
