"""The shared quantization helpers: vLLM's scale shapes and bounded round-trip error."""

import pytest
import torch

from moetune.quant import (
    dequantize_activation,
    dequantize_weight,
    quant_max,
    quantize_activation,
    quantize_weight,
)


@pytest.mark.parametrize(
    ("quant", "per_channel", "block", "scale_shape", "max_rel"),
    [
        ("fp8_w8a8", False, None, (3,), 2**-4),  # e4m3: 3 mantissa bits, half-step 2⁻⁴
        ("fp8_w8a8", True, None, (3, 40), 2**-4),
        ("fp8_w8a8", False, (16, 32), (3, 3, 3), 2**-4),
        ("int8_w8a8", False, None, (3,), None),
        ("int8_w8a16", False, None, (3, 40), None),
    ],
)
def test_weight_scales_have_vllm_shapes(quant, per_channel, block, scale_shape, max_rel):
    w = torch.randn(3, 40, 72)
    q, s = quantize_weight(w, quant, per_channel=per_channel, block_shape=block)
    assert tuple(s.shape) == scale_shape
    assert q.shape == w.shape
    back = dequantize_weight(q, s, block)
    err = (back - w.double()).abs()
    if max_rel is not None:  # fp8: relative error per element (normal range)
        big = w.abs() > 0.1
        assert torch.all(err[big] <= max_rel * w.double().abs()[big] * 1.0001)
    else:  # int8: half a step of amax/127
        step = w.abs().amax() / 127
        assert float(err.max()) <= float(step) / 2 * 1.0001


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.int8])
@pytest.mark.parametrize(("per_token", "group_k"), [(False, None), (True, None), (False, 16)])
def test_activation_round_trip(qdtype, per_token, group_k):
    x = torch.randn(9, 40) * 3
    q, s = quantize_activation(x, qdtype, per_token=per_token, group_k=group_k)
    expected = {(False, None): (1,), (True, None): (9, 1), (False, 16): (9, 3)}[
        (per_token, group_k)
    ]
    assert tuple(s.shape) == expected and q.dtype == qdtype
    assert float(q.float().abs().max()) <= quant_max(qdtype)
    back = dequantize_activation(q, s, group_k)
    rel = (back - x.double()).norm() / x.double().norm()
    assert rel < (0.05 if qdtype != torch.int8 else 0.02)


def test_static_scale_is_used_and_clamps():
    x = torch.tensor([[1.0, -1000.0]])
    q, s = quantize_activation(x, torch.float8_e4m3fn, scale=torch.tensor([1.0]))
    assert float(s) == 1.0
    assert q.float().tolist() == [[1.0, -448.0]]  # saturates at the fp8 maximum
