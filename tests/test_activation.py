"""The activation kernel against the PyTorch ops it replaces, NaN propagation included."""

import pytest
import torch

from moetune.activation import apply_activation, apply_activation_torch


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize(("T", "N"), [(1, 16), (37, 96), (5, 1500)])  # N > one block of columns
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_matches_torch_ops(activation, T, N, dtype, device):
    x = (torch.randn(T, 2 * N, device=device) * 6).to(dtype)  # past the swiglu clamp at 7
    got = apply_activation(x, activation)
    want = apply_activation_torch(x, activation)
    assert got.dtype == dtype and got.shape == (T, N)
    # GPUs evaluate exp() to within a few ulp, not correctly rounded: one ulp of the output
    # dtype (fp16: 2**-10) may differ; the interpreter (NumPy) matches PyTorch exactly.
    rtol = 2**-10 if dtype == torch.float16 and device == "cuda" else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_nan_poison_survives_the_clamps(activation, device):
    """An unwritten GEMM1 row is NaN; the activation must not turn it into finite values."""
    x = torch.randn(4, 64, device=device, dtype=torch.float16)
    x[1] = float("nan")
    x[2, 3] = float("nan")
    out = apply_activation(x, activation)
    assert out[1].isnan().all()
    assert out[2].isnan().any()
    assert not out[[0, 3]].isnan().any()


def test_unknown_activation_is_refused(device):
    with pytest.raises(ValueError, match="activation must be one of"):
        apply_activation(torch.zeros(2, 8, device=device), "gelu")


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_the_kernel_does_not_fall_back_to_torch_ops(activation, monkeypatch, device):
    """Equal results alone would also pass a wrapper around the PyTorch version: forbid it."""
    from moetune import activation as act_mod

    x = torch.randn(6, 64, device=device, dtype=torch.float16)
    want = apply_activation_torch(x, activation)

    def forbidden(*args, **kwargs):
        raise AssertionError("the activation fell back to PyTorch")

    monkeypatch.setattr(act_mod, "apply_activation_torch", forbidden)
    monkeypatch.setattr(torch.nn.functional, "silu", forbidden)
    monkeypatch.setattr(torch, "sigmoid", forbidden)
    torch.testing.assert_close(apply_activation(x, activation).float(), want.float())
