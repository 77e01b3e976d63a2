"""The sum over top-k in GEMM2's epilogue (ops.SUM_TOPK_IN_GEMM2_MIN_M): fp32 atomic adds of each
slot's cast output into its token's row instead of storing ``[slots, K]`` and summing it in torch.

What is asserted against the default (store + torch sum) path, and why:

- top-k <= 2: the same bits. Each slot's value is cast exactly as the store casts it, both paths
  add in fp32 and cast once, and fp32 addition of two values commutes (0 + v = v, too), so the
  order in which the atomics arrive cannot show.
- top-k > 2: the fp32 totals may differ in their rounding (the atomics add in expert order here,
  in any order on a GPU; torch adds in slot order). Each total is within ``(k-1)·u·Σ|v|`` of the
  exact sum (u = 2⁻²⁴), so they differ by at most twice that, plus one ulp of the output dtype
  where the final cast rounds the two totals to neighbouring values (fp16; none for fp32).

Both paths must also pass the float64 reference check, and hold no NaN.
"""

import pytest
import torch
from helpers import make_case, record_launches, record_launches_and_warmups

from moetune import check_close, fused_experts, fused_experts_reference, launch, ops
from moetune.align import moe_align_block_size_torch
from moetune.launch import compile_only
from moetune.ops import poisoned_workspace

SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
WIDE_M = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 4}
F16, F32 = torch.float16, torch.float32

# (M, E, N, K, topk, dtype, quant, static, activation, config_down): each names the edge it covers.
# K = 72 (GEMM2's output width) is not a multiple of BLOCK_SIZE_N: its last tile's columns wrap.
CASES = [
    pytest.param(1, 4, 32, 64, 2, F16, None, False, "silu", None, id="M=1"),
    pytest.param(9, 5, 32, 72, 2, F16, None, False, "silu", None, id="fp16,K%BLOCK_N!=0"),
    pytest.param(11, 6, 32, 40, 3, F16, None, False, "silu", None, id="fp16,topk=3"),
    pytest.param(9, 5, 32, 72, 2, F32, None, False, "silu", None, id="fp32"),
    pytest.param(7, 6, 32, 40, 4, F32, None, False, "silu", None, id="fp32,topk=4"),
    pytest.param(13, 5, 32, 72, 2, F16, "fp8_w8a8", False, "silu", None, id="fp8-dynamic"),
    pytest.param(13, 5, 32, 72, 2, F16, "fp8_w8a8", True, "silu", None, id="fp8-static"),
    pytest.param(9, 5, 32, 72, 4, F16, None, False, "swigluoai", None, id="swigluoai,topk=4"),
    # GEMM2 on its own alignment (BLOCK_SIZE_M 64): slot rows padded to another tile.
    pytest.param(20, 5, 32, 72, 2, F16, None, False, "silu", WIDE_M, id="config_down-BLOCK_M"),
]


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """The keyword arguments of every fused-MoE kernel launch (which still runs)."""
    return record_launches(monkeypatch, run=True)


def _case(M, E, N, K, topk, dtype, quant, static, activation, device):
    case = make_case(M, E, N, K, topk, dtype, device, quant=quant, bias=True,
                     activation=activation)  # fmt: skip
    if static:  # calibrated on this case, as a checkpoint's static scales are
        from moetune.inputs import static_activation_scales

        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    return case


def _run(case, monkeypatch, *, sum_from, config=SMALL, config_down=None) -> torch.Tensor:
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", sum_from)
    with poisoned_workspace():
        return fused_experts(*case.args(), config=config, config_down=config_down, **case.kwargs)


def _keep_gemm2_output(monkeypatch) -> list[torch.Tensor]:
    """GEMM2's output buffer of each op call that follows (the slot rows on the store path)."""
    kept, real = [], ops.invoke_moe_gemm

    def spy(a, b, c, *args, **kwargs):
        real(a, b, c, *args, **kwargs)
        if kwargs["top_k"] == 1:  # GEMM2: its A rows are slots
            kept.append(c)

    monkeypatch.setattr(ops, "invoke_moe_gemm", spy)
    return kept


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at ``|x|`` (one ulp), as fp32; x = m·2^e with m in [0.5, 1)
    has the spacing eps·2^(e-1), down to the subnormals' eps·tiny."""
    info = torch.finfo(x.dtype)
    exponent = torch.frexp(x.float().abs()).exponent
    return (info.eps * torch.pow(2.0, exponent - 1.0)).clamp(min=info.eps * info.tiny)


def _assert_same_sum(summed, stored, slots, topk):
    """The module doc's assertion: the same bits for top-k <= 2, else within the bound."""
    if topk <= 2:
        assert torch.equal(summed, stored)
        return
    M, K = summed.shape
    abs_sum = slots.float().abs().view(M, topk, K).sum(dim=1)
    bound = 2 * (topk - 1) * 2.0**-24 * abs_sum
    if summed.dtype != torch.float32:  # the final cast may round the two totals apart
        bound = bound + _ulp(torch.maximum(summed.abs(), stored.abs()))
    assert bool(((summed.float() - stored.float()).abs() <= bound).all())


@pytest.mark.parametrize(
    ("M", "E", "N", "K", "topk", "dtype", "quant", "static", "activation", "config_down"), CASES
)
def test_sum_in_gemm2_matches_the_stored_sum_and_the_reference(
    M, E, N, K, topk, dtype, quant, static, activation, config_down, device, monkeypatch, launches
):
    case = _case(M, E, N, K, topk, dtype, quant, static, activation, device)
    kept = _keep_gemm2_output(monkeypatch)
    stored = _run(case, monkeypatch, sum_from=None, config_down=config_down)
    assert launches[-1]["SUM_TOPK"] == 0
    launches.clear()
    summed = _run(case, monkeypatch, sum_from=1, config_down=config_down)
    assert [k["SUM_TOPK"] for k in launches] == [0, topk], "GEMM2 did not sum over top-k"
    slots, total = kept
    assert slots.shape == (M * topk, K) and total.shape == (M, K) and total.dtype == torch.float32
    assert summed.dtype == dtype and summed.shape == (M, K)
    assert not torch.isnan(summed).any()
    _assert_same_sum(summed, stored, slots, topk)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    for out in (summed, stored):
        result = check_close(out, ref, dtype=dtype, quant=quant)
        assert result.ok, result


def test_sum_is_off_by_default_and_starts_at_its_limit(device, monkeypatch, launches):
    """None (the default) never sums; an int sums from that many tokens up; top-k = 1 keeps the
    store (nothing to sum). ops.sum_topk_in_gemm2 gives the op's answer."""
    assert ops.SUM_TOPK_IN_GEMM2_MIN_M is None
    for M, topk, limit, sums in [(5, 2, None, False), (4, 2, 5, False), (5, 2, 5, True),
                                 (5, 1, 1, False)]:  # fmt: skip
        case = _case(M, 4, 32, 64, topk, F16, None, False, "silu", device)
        launches.clear()
        out = _run(case, monkeypatch, sum_from=limit)
        assert ops.sum_topk_in_gemm2(M, topk) == sums
        assert launches[-1]["SUM_TOPK"] == (topk if sums else 0), (M, topk, limit)
        ref = fused_experts_reference(*case.args(), **case.kwargs)
        assert check_close(out, ref, dtype=F16).ok


def test_experts_on_another_rank_add_nothing(device, monkeypatch):
    """Blocks of experts mapped to -1 return before adding: a token routed only to them comes out
    exactly zero (the buffer's start), the others as on the store path, bit for bit (top-k 2)."""
    case = make_case(12, 6, 32, 72, 2, F16, device, bias=True)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1], dtype=torch.int32, device=device)
    local = [0, 2, 4]
    case.w1, case.w2 = case.w1[local], case.w2[local]
    for name in ("w1_bias", "w2_bias"):
        case.kwargs[name] = case.kwargs[name][local]
    case.kwargs["expert_map"] = expert_map
    remote = expert_map[case.topk_ids.long()] == -1
    assert bool(remote.any()) and not bool(remote.all())
    stored = _run(case, monkeypatch, sum_from=None)
    summed = _run(case, monkeypatch, sum_from=1)
    assert torch.equal(summed, stored)
    assert bool((summed[remote.all(dim=1)] == 0).all())
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(summed, ref, dtype=F16).ok


def test_padded_slots_and_columns_past_n_add_nothing(device):
    """The launcher on its own, with the token rows a view of a larger buffer: padded slots map
    to the row past the last token and the last tile's columns run past N; both stay as they
    were. The rows hold the stored slot rows summed. A bias (no router weight) gives the padded
    slots' zero operand rows a nonzero output, so an unmasked add would show."""
    M, E, topk, N, K = 9, 4, 2, 40, 32  # BLOCK_SIZE_N 32 does not divide N = 40
    case = make_case(M, E, N // 2, K, topk, F16, device, bias=True)  # w1: [E, N, K]
    routing = moe_align_block_size_torch(case.topk_ids, 16, E, None)
    assert int(routing.num_tokens_post_padded) > M * topk, "no padded slot to test"
    kw = dict(config=SMALL, top_k=topk, compute_dtype=F16, bias=case.kwargs["w1_bias"])
    slots = torch.empty(M * topk, N, dtype=F16, device=device)
    launch.invoke_moe_gemm(case.x, case.w1, slots, routing, **kw)
    full = torch.full((M + 1, N + 8), 1234.0, dtype=torch.float32, device=device)
    full[:M, :N] = 0
    launch.invoke_moe_gemm(case.x, case.w1, full[:M, :N], routing, sum_topk=topk, **kw)
    assert bool((full[M] == 1234.0).all()), "a padded slot was added"
    assert bool((full[:, N:] == 1234.0).all()), "a column past N was added"
    assert torch.equal(full[:M, :N].to(F16), slots.view(M, topk, N).sum(dim=1))


def test_the_launcher_refuses_what_the_sum_cannot_honour(device):
    case = make_case(4, 2, 16, 32, 2, F16, device)
    routing = moe_align_block_size_torch(case.topk_ids, 16, 2, None)
    kw = dict(config=SMALL, top_k=2, compute_dtype=F16, sum_topk=2)
    for bad in (torch.zeros(4, 32, dtype=F16), torch.zeros(8, 32), torch.zeros(4, 16)):
        with pytest.raises(ValueError, match="c must be fp32"):
            launch.invoke_moe_gemm(case.x, case.w1, bad.to(device), routing, **kw)
    with pytest.raises(ValueError, match="no activation"):
        launch.invoke_moe_gemm(case.x, case.w1, torch.zeros(4, 16, device=device), routing,
                               activation="silu", **kw)  # fmt: skip
    with pytest.raises(ValueError, match="whole tokens"):
        launch.invoke_moe_gemm(case.x, case.w1, torch.zeros(2, 32, device=device), routing,
                               **{**kw, "sum_topk": 3})  # fmt: skip


def test_a_slot_left_out_fails_the_check_without_nan(device, monkeypatch):
    """The summed buffer starts at zero, not at the poison: a GEMM2 block that adds nothing leaves
    no NaN, so the reference check must catch it as a wrong value."""
    case = make_case(9, 4, 32, 64, 2, F16, device, bias=True)
    real = ops.invoke_moe_gemm

    def drop_first_block(a, b, c, routing, **kwargs):
        if kwargs.get("sum_topk"):
            expert_ids = routing.expert_ids.clone()
            expert_ids[0] = -1  # as if the block's expert were on another rank
            routing = routing._replace(expert_ids=expert_ids)
        return real(a, b, c, routing, **kwargs)

    monkeypatch.setattr(ops, "invoke_moe_gemm", drop_first_block)
    out = _run(case, monkeypatch, sum_from=1)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(out, ref, dtype=F16)
    assert not result.ok and result.nan_count == 0, result


@pytest.mark.parametrize("quant", [None, "fp8_w8a8"])
def test_compile_only_builds_the_summing_kernel_the_op_launches(quant, device, monkeypatch):
    """Compile processes must build the GEMM2 variant the op then runs (SUM_TOPK included, and
    an fp32 output of the token rows' shape), or every candidate compiles twice."""
    seen = record_launches_and_warmups(monkeypatch)
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", 1)
    case = make_case(16, 4, 32, 64, 2, F16, device, quant=quant, bias=True)
    ops.fused_experts(*case.args(), config=SMALL, **case.kwargs)
    with compile_only():
        ops.fused_experts(*case.args(), config=SMALL, **case.kwargs)
    assert len(seen["warmup"]) == 2 and seen["warmup"] == seen["launch"]
    types, gemm2, c_shape = seen["warmup"][1]
    assert gemm2["SUM_TOPK"] == 2 and (types[4], c_shape) == ("torch.float32", (16, 64))  # c


@pytest.mark.parametrize(
    ("sum_from", "static_max", "topk", "sizes"),
    [
        pytest.param(None, 64, 2, [16], id="off"),
        pytest.param(20, 64, 2, [16, 20], id="above-16"),
        pytest.param(8, 64, 2, [7, 16], id="below-16"),
        pytest.param(1, 64, 2, [16], id="every-M"),
        pytest.param(16, 64, 1, [16], id="topk=1-never-sums"),
    ],
)
def test_compile_inputs_cover_both_sides_of_the_sum_limit(sum_from, static_max, topk, sizes,
                                                          monkeypatch):  # fmt: skip
    from moetune.precompile import compile_inputs
    from moetune.problem import Problem

    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", None)  # no one-token set (test_pdl.py)
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", None)  # nor a sorted-rows set (test_sorted_rows)
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", sum_from)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", static_max)
    sets = compile_inputs(Problem(4, 32, 64, topk, "float16"), "cpu", torch.float8_e4m3fn)
    assert [args[0].shape[0] for args, _ in sets] == sizes


@pytest.mark.parametrize(("sum_from", "sizes"), [(32, [16, 65]), (100, [16, 65, 100])])
def test_compile_inputs_cover_the_sum_limit_beside_the_static_fp8_limit(sum_from, sizes,
                                                                        monkeypatch):  # fmt: skip
    """Static fp8 draws 16 and 65 tokens already: the sum limit adds a size only where neither
    reaches its side of it."""
    from moetune.precompile import compile_inputs
    from moetune.problem import Problem

    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", None)  # no one-token set (test_pdl.py)
    monkeypatch.setattr(ops, "SORTED_AUTO_MIN_M", None)  # nor a sorted-rows set (test_sorted_rows)
    monkeypatch.setattr(ops, "SUM_TOPK_IN_GEMM2_MIN_M", sum_from)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", 64)
    problem = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
    sets = compile_inputs(problem, "cpu", torch.float8_e4m3fn, "static")
    assert [args[0].shape[0] for args, _ in sets] == sizes


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [2, 8])
@pytest.mark.parametrize("quant", [None, "fp8_w8a8"])
def test_sum_in_gemm2_bf16_gpu(topk, quant, device, monkeypatch):
    """bf16 (GPU only) on realistic tiles, with atomics that really race: same bits for top-k 2,
    within the fp32 summation bound plus one bf16 ulp beyond."""
    M, K = 300, 352  # 352: GEMM2's 128-wide tiles wrap
    case = make_case(M, 16, 256, K, topk, torch.bfloat16, device, quant=quant, bias=True)
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8,
              "num_warps": 4, "num_stages": 3}  # fmt: skip
    kept = _keep_gemm2_output(monkeypatch)
    stored = _run(case, monkeypatch, sum_from=None, config=config)
    summed = _run(case, monkeypatch, sum_from=1, config=config)
    _assert_same_sum(summed, stored, kept[0], topk)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(summed, ref, dtype=torch.bfloat16, quant=quant).ok
