"""The op rejects wrong shapes and dtypes with a ValueError that names the argument."""

import pytest
import torch
from helpers import make_case

from moetune import fused_experts, fused_experts_reference


def _base(device):
    return make_case(4, 4, 16, 32, 2, torch.float16, device)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: setattr(c, "x", c.x[:, :-1]), "w1 must have shape"),
        (lambda c: setattr(c, "x", c.x.to(torch.int32)), "hidden_states dtype"),
        (lambda c: setattr(c, "w2", c.w2[:, :, :-1]), "w2 must have shape"),
        (lambda c: setattr(c, "w1", c.w1[:, :-1]), "2N"),
        (lambda c: setattr(c, "topk_ids", c.topk_ids.float()), "topk_ids must be int"),
        (lambda c: setattr(c, "topk_weights", c.topk_weights[:, :1]), "topk_weights must have"),
        (lambda c: setattr(c, "w1", c.w1.float()), "w1 and w2 must have hidden_states' dtype"),
        (lambda c: c.kwargs.update(w1_bias=torch.zeros(4, 3)), "w1_bias must have shape"),
        (lambda c: c.kwargs.update(w2_bias=torch.zeros(3, 32)), "w2_bias must have shape"),
        (lambda c: c.kwargs.update(quant="fp4"), "quant must be"),
        (lambda c: c.kwargs.update(w1_scale=torch.ones(4)), "w1_scale given but quant is None"),
        (lambda c: c.kwargs.update(activation="gelu"), "activation"),
        (lambda c: c.kwargs.update(block_shape=[16, 16]), "block_shape"),
    ],
)
@pytest.mark.parametrize("fn", [fused_experts, fused_experts_reference])
def test_bad_arguments_are_named(mutate, match, fn, device):
    case = _base(device)
    mutate(case)
    with pytest.raises(ValueError, match=match):
        fn(*case.args(), **case.kwargs)


@pytest.mark.parametrize(
    ("quant", "kw", "match"),
    [
        ("fp8_w8a8", {"w1_scale": torch.ones(3)}, "w1_scale must have shape"),
        ("fp8_w8a8", {"a1_scale": torch.ones(2, 2)}, "a1_scale must have shape"),
        ("int8_w8a16", {"w2_scale": torch.ones(4)}, "w2_scale must have shape"),
    ],
)
def test_bad_scales_are_named(quant, kw, match, device):
    case = make_case(4, 4, 16, 32, 2, torch.float16, device, quant=quant)
    case.kwargs.update({k: v.to(device) for k, v in kw.items()})
    with pytest.raises(ValueError, match=match):
        fused_experts(*case.args(), **case.kwargs)


def test_quantized_weights_need_the_quantized_dtype(device):
    case = make_case(4, 4, 16, 32, 2, torch.float16, device, quant="fp8_w8a8")
    case.w1 = case.w1.to(torch.float16)
    with pytest.raises(ValueError, match="w1 must be"):
        fused_experts(*case.args(), **case.kwargs)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}, "GROUP_SIZE_M"),
        ({"BLOCK_SIZE_M": 24, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1},
         "power of two"),
        ({"BLOCK_SIZE_M": 8, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}, ">= 16"),
        ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "foo": 1},
         "unknown keys"),
    ],
)  # fmt: skip
def test_bad_configs_are_named(config, match, device):
    case = _base(device)
    with pytest.raises(ValueError, match=match):
        fused_experts(*case.args(), config=config, **case.kwargs)


def test_block_k_tile_must_divide_scale_group(device):
    case = make_case(4, 4, 16, 64, 2, torch.float16, device, quant="fp8_w8a8", block_shape=(32, 32))
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    with pytest.raises(ValueError, match="must divide block_k"):
        fused_experts(*case.args(), config=cfg, **case.kwargs)


def test_block_k_clamp_follows_vllms_launch_rule():
    """vLLM caps BLOCK_SIZE_K at min(block_n, block_k) at launch; lookup and verify share it."""
    from moetune.launch import clamp_block_k

    cfg = {"BLOCK_SIZE_K": 256}
    assert clamp_block_k(cfg, (64, 128)) == 256 and cfg["BLOCK_SIZE_K"] == 64
    assert clamp_block_k(cfg, (128, 128)) is None and cfg["BLOCK_SIZE_K"] == 64
    assert clamp_block_k(cfg, None) is None
