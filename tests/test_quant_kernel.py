"""The Triton fp8 activation quantization gives the same bits as the PyTorch version the
reference uses, for every scale mode, both e4m3 dialects and the rounding corner cases."""

import pytest
import torch

from moetune import ops, quant_kernel
from moetune.quant import quantize_activation
from moetune.quant_kernel import quantize_activation_fast

NVIDIA = torch.cuda.is_available() and torch.version.hip is None
FP8 = [
    torch.float8_e4m3fn,
    pytest.param(torch.float8_e4m3fnuz, marks=pytest.mark.skipif(
        NVIDIA, reason="e4m3fnuz is AMD's format: Triton cannot compile it for NVIDIA GPUs")),
]  # fmt: skip
MODES = {
    "dynamic-tensor": {},
    "dynamic-token": {"per_token": True},
    "dynamic-group": {"group_k": 128},
    "dynamic-group-48": {"group_k": 48},  # a group narrower than its power-of-two tile
    "static-tensor": {"scale": "tensor"},
    "static-token": {"scale": "token"},
}


def _kw(mode: str, T: int, device: str) -> dict:
    kw = dict(MODES[mode])
    if kw.get("scale") == "tensor":
        kw["scale"] = torch.tensor([0.013], device=device)
    elif kw.get("scale") == "token":
        kw["scale"] = torch.rand(T, 1, device=device) * 0.05 + 1e-3
    return kw


@pytest.mark.parametrize("qdtype", FP8, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("mode", list(MODES))
# 3000: ragged group/chunk; 37 and 300 rows: the group kernel's last 4- and 16-row programs
# are ragged
@pytest.mark.parametrize(("T", "K"), [(1, 64), (37, 2048), (5, 3000), (70, 384), (300, 2048)])
@pytest.mark.parametrize("rows_kernel", [True, False], ids=["rows", "row-group"])
def test_same_bits_as_the_reference_quantization(qdtype, mode, T, K, rows_kernel, device,
                                                 monkeypatch):  # fmt: skip
    if not rows_kernel and "group_k" not in MODES[mode] and "per_token" not in MODES[mode]:
        pytest.skip("GROUP_ROWS_KERNEL only changes dynamic per-group and per-token scales")
    if not rows_kernel and T == 300 and device == "cpu":  # 37 rows cover its ragged programs
        pytest.skip("one program per row and group: 300 rows take minutes in the interpreter")
    monkeypatch.setattr(quant_kernel, "GROUP_ROWS_KERNEL", rows_kernel)
    x = (torch.randn(T, K, device=device) * 3).to(torch.float16)
    x[0, :7] = 0.0
    kw = _kw(mode, T, device)
    got, got_scale = quantize_activation_fast(x, qdtype, **kw)
    want, want_scale = quantize_activation(x, qdtype, **kw)
    assert got.dtype == qdtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_scale.reshape(want_scale.shape), want_scale)


@pytest.mark.parametrize("qdtype", FP8, ids=["e4m3fn", "e4m3fnuz"])
def test_rounding_ties_powers_of_two_and_subnormals(qdtype, device):
    """Every fp8 value, the midpoints between neighbours (ties go to even), values just under
    a power of two (rounding up crosses a binade) and past the largest value (saturate)."""
    grid = torch.arange(256, dtype=torch.uint8, device=device).view(qdtype).float()
    grid = torch.unique(grid[torch.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.tensor([126.5, 127.9, 0.0155, 7.99, 239.9, 250.0, 500.0, 1e-5], device=device)
    x = torch.cat([grid, mids, near, -near]).reshape(1, -1)
    one = torch.tensor([1.0], device=device)
    got, _ = quantize_activation_fast(x, qdtype, scale=one)
    want, _ = quantize_activation(x, qdtype, scale=one)
    assert torch.equal(got.float(), want.float())


def _both_with_nans(mode: str, device: str) -> tuple[tuple, tuple]:
    """The kernel's and PyTorch's ``(q, scale)`` of fp16 rows where row 2 is all NaN and row 4
    has one NaN (column 17)."""
    T, K = 6, 256
    x = (torch.randn(T, K, device=device) * 3).to(torch.float16)
    x[2] = float("nan")
    x[4, 17] = float("nan")
    kw = _kw(mode, T, device)
    return (quantize_activation_fast(x, torch.float8_e4m3fn, **kw),
            quantize_activation(x, torch.float8_e4m3fn, **kw))  # fmt: skip


@pytest.mark.gpu  # the interpreter casts a NaN fp32 to fp8 as 384 (its own cast, not Triton's)
@pytest.mark.parametrize("mode", list(MODES))
def test_nan_rows_stay_nan(mode, device):
    """A NaN-poisoned (unwritten) row must stay NaN after quantization, as PyTorch's clamp
    keeps it; ±qmax instead would hand the check finite garbage. NaN exactly where PyTorch has it
    (with a dynamic per-tensor scale that is every value) and the same bits elsewhere."""
    (got, _), (want, _) = _both_with_nans(mode, device)
    g, w = got.float(), want.float()
    assert g[2].isnan().all() and g[4, 17].isnan()
    assert torch.equal(g.isnan(), w.isnan())
    assert torch.equal(g.nan_to_num(), w.nan_to_num())


@pytest.mark.parametrize("mode", ["dynamic-tensor", "dynamic-token", "dynamic-group"])
def test_a_nan_makes_its_dynamic_scale_nan(mode, device):
    """As PyTorch's amax: a NaN anywhere in a row (group; the tensor) makes that row's (group's;
    the tensor's) scale NaN, and only that one. This part runs in the interpreter too (the fp8
    values need a GPU)."""
    (_, got), (_, want) = _both_with_nans(mode, device)
    got = got.reshape(want.shape)
    assert want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_int8_takes_the_pytorch_path(device):
    x = torch.randn(4, 32, device=device)
    got, s = quantize_activation_fast(x, torch.int8, per_token=True)
    want, ws = quantize_activation(x, torch.int8, per_token=True)
    assert torch.equal(got, want) and torch.equal(s, ws)


def test_bad_static_scale_shape_is_refused(device):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="activation scale must have shape"):
        quantize_activation_fast(x, torch.float8_e4m3fn, scale=torch.ones(3, device=device))


def test_the_op_quantizes_with_the_kernel_version():
    assert ops.quantize_activation is quantize_activation_fast


@pytest.mark.parametrize("mode", list(MODES))
def test_fp8_goes_through_the_kernels_not_the_pytorch_version(mode, monkeypatch, device):
    """Equal bits alone would also pass a wrapper around the PyTorch version: forbid it."""
    from moetune import quant, quant_kernel

    x = torch.randn(8, 256, device=device)
    kw = _kw(mode, 8, device)
    want, _ = quantize_activation(x, torch.float8_e4m3fn, **kw)

    def forbidden(*args, **kwargs):
        raise AssertionError("fp8 quantization fell back to PyTorch")

    monkeypatch.setattr(quant, "quantize_activation", forbidden)
    monkeypatch.setattr(quant_kernel, "quantize_activation", forbidden)
    got, _ = quantize_activation_fast(x, torch.float8_e4m3fn, **kw)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
