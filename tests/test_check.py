"""The checker must fail on NaN, unwritten rows, and one bad row hidden in a large tensor."""

import math

import pytest
import torch

from moetune.check import check_close, tolerance


def _pair(rows=256, cols=64):
    ref = torch.randn(rows, cols, dtype=torch.float64)
    return ref.to(torch.float16), ref


def test_exact_output_passes():
    out, ref = _pair()
    r = check_close(out, ref, dtype=torch.float16)
    assert r.ok and r.reason == "" and r.rel_err < tolerance(torch.float16)


def test_single_nan_fails():
    out, ref = _pair()
    out[17, 3] = float("nan")
    r = check_close(out, ref, dtype=torch.float16)
    assert not r.ok and r.nan_count == 1 and "NaN" in r.reason


def test_unwritten_row_fails_with_poison_count():
    out, ref = _pair()
    out[5] = float("nan")
    r = check_close(out, ref, dtype=torch.float16)
    assert not r.ok and r.poison_rows == 1


def test_non_nan_poison_value_is_detected():
    out, ref = _pair()
    out[9] = -7.0
    r = check_close(out, ref, dtype=torch.float16, poison=-7.0)
    assert not r.ok and r.poison_rows == 1


def test_one_wrong_row_cannot_hide_in_the_tensor_norm():
    out, ref = _pair(rows=4096)
    out[123] = (ref[123] * 1.1).to(out.dtype)  # 10% off on one row of 4096
    r = check_close(out, ref, dtype=torch.float16)
    assert r.rel_err < tolerance(torch.float16), "the whole-tensor norm alone would pass it"
    assert not r.ok and r.worst_row == 123


def test_zero_reference_rows_need_zero_output():
    out, ref = _pair()
    ref[7] = 0.0
    out[7] = 0.0
    assert check_close(out, ref, dtype=torch.float16).ok
    out[7] = 0.5
    assert not check_close(out, ref, dtype=torch.float16).ok


@pytest.mark.parametrize(
    ("dtype", "quant", "bound"),
    [
        (torch.float32, None, 1e-4),
        (torch.float16, None, 2e-3),
        (torch.bfloat16, None, 1.6e-2),
        (torch.float16, "fp8_w8a8", 4e-2),
        (torch.bfloat16, "int8_w8a8", 2e-2),
        (torch.float16, "int8_w8a16", 2e-3),
    ],
)
def test_tolerances_are_the_documented_ones(dtype, quant, bound):
    assert math.isclose(tolerance(dtype, quant), bound)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        check_close(torch.zeros(2, 3), torch.zeros(3, 2), dtype=torch.float32)


def test_the_reference_takes_every_argument_of_the_op():
    """``Reference(*args, **kw)`` with the op's own keywords: none may raise a TypeError."""
    import inspect

    from moetune.ops import fused_experts
    from moetune.reference import Reference

    op = set(inspect.signature(fused_experts).parameters)
    ref = set(inspect.signature(Reference.__init__).parameters)
    assert op - ref == set()
