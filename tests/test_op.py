"""The op against the float64 reference, in the interpreter on CPU and on a GPU when present."""

import pytest
import torch
from conftest import DTYPES
from helpers import make_case

from moetune import check_close, fused_experts, fused_experts_reference, fused_moe
from moetune.ops import poisoned_workspace, softmax_topk

SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
GROUPED = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 4}
WIDE_M = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8}

# (M, E, N, K, topk, config): each shape names the edge it covers.
SHAPES = [
    pytest.param(1, 4, 32, 64, 2, SMALL, id="M=1"),
    pytest.param(7, 4, 32, 64, 2, WIDE_M, id="M<BLOCK_SIZE_M"),
    pytest.param(33, 7, 48, 80, 2, SMALL, id="prime-E,non-pow2-N-K"),
    pytest.param(20, 5, 32, 72, 1, SMALL, id="topk=1,K%BLOCK_K!=0"),
    pytest.param(9, 4, 16, 48, 4, SMALL, id="topk=E"),
    pytest.param(3, 16, 32, 64, 2, SMALL, id="experts-without-tokens"),
    pytest.param(40, 6, 40, 56, 3, GROUPED, id="GROUP_SIZE_M>1,many-M-blocks"),
]


def _run_and_check(case, dtype, config, config_down=None):
    with poisoned_workspace():
        out = fused_experts(*case.args(), config=config, config_down=config_down, **case.kwargs)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    result = check_close(out, ref, dtype=dtype, quant=case.kwargs.get("quant"))
    assert result.ok, result
    assert out.dtype == dtype and out.shape == case.x.shape
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "E", "N", "K", "topk", "config"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_unquantized_matches_reference(M, E, N, K, topk, config, dtype, bias, device):
    case = make_case(M, E, N, K, topk, dtype, device, bias=bias)
    _run_and_check(case, dtype, config)


QUANT_MODES = [
    pytest.param("int8_w8a16", False, None, id="int8_w8a16"),
    pytest.param("fp8_w8a8", False, None, id="fp8-tensor"),
    pytest.param("fp8_w8a8", True, None, id="fp8-channel"),
    pytest.param("fp8_w8a8", False, (32, 32), id="fp8-block"),
    pytest.param("int8_w8a8", False, None, id="int8-tensor"),
    pytest.param("int8_w8a8", True, None, id="int8-channel"),
    pytest.param("int8_w8a8", False, (32, 32), id="int8-block"),
]


@pytest.mark.parametrize(("quant", "per_channel", "block_shape"), QUANT_MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_quant_modes_match_reference(quant, per_channel, block_shape, bias, activation, device):
    # Non-power-of-two N and K (not multiples of the 32 block) so partial scale groups occur.
    dtype = torch.float16
    case = make_case(
        19, 5, 40, 72, 2, dtype, device, quant=quant, per_channel=per_channel,
        block_shape=block_shape, bias=bias, activation=activation,
    )  # fmt: skip
    _run_and_check(case, dtype, SMALL)


@pytest.mark.gpu
@pytest.mark.parametrize(("quant", "per_channel", "block_shape"), QUANT_MODES)
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_quant_modes_bf16_gpu(quant, per_channel, block_shape, activation, device):
    case = make_case(
        77, 8, 192, 320, 2, torch.bfloat16, device, quant=quant, per_channel=per_channel,
        block_shape=(64, 64) if block_shape else None, bias=True, activation=activation,
    )  # fmt: skip
    _run_and_check(case, torch.bfloat16, WIDE_M)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.version.hip is None,
    reason="e4m3fnuz is the MI300X/MI325X dialect: NVIDIA GPUs cannot compile it",
)
def test_fp8_e4m3fnuz_dialect(device):
    """The MI300X/MI325X fp8 dialect (max 240) goes through the same kernel path."""
    case = make_case(
        13, 4, 32, 64, 2, torch.float16, device, quant="fp8_w8a8", bias=True,
        fp8_dtype=torch.float8_e4m3fnuz,
    )  # fmt: skip
    assert case.w1.dtype == torch.float8_e4m3fnuz
    _run_and_check(case, torch.float16, SMALL)


def test_static_activation_scales(device):
    """Given a1/a2 scales, activations are quantized with them instead of their amax."""
    case = make_case(11, 4, 32, 64, 2, torch.float16, device, quant="fp8_w8a8", bias=True)
    case.kwargs["a1_scale"] = torch.tensor([0.02], device=device)
    case.kwargs["a2_scale"] = torch.tensor([0.01], device=device)
    out, _ = _run_and_check(case, torch.float16, SMALL)
    dynamic = fused_experts(*case.args(), config=SMALL, **{
        k: v for k, v in case.kwargs.items() if k not in ("a1_scale", "a2_scale")})  # fmt: skip
    assert not torch.equal(out, dynamic), "static scales were ignored"


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_fused_activation_quantization_changes_no_bit(activation, monkeypatch, device):
    """ops.FUSE_ACTIVATION_QUANT (activation + static fp8 scale in one launch, the default)
    gives the two steps' output bit for bit, passes the reference check, and really takes the
    fused path."""
    from moetune import activation as act_mod
    from moetune import ops

    case = make_case(13, 4, 32, 64, 2, torch.float16, device, quant="fp8_w8a8", bias=True,
                     activation=activation)  # fmt: skip
    case.kwargs["a1_scale"] = torch.tensor([0.02], device=device)
    case.kwargs["a2_scale"] = torch.tensor([0.01], device=device)
    monkeypatch.setattr(ops, "FUSE_GEMM1_ACTIVATION", False)  # that fusion: test_fused_gemm1
    monkeypatch.setattr(ops, "FUSE_ACTIVATION_QUANT", False)
    two_steps, _ = _run_and_check(case, torch.float16, SMALL)
    calls = []
    fused = act_mod.apply_activation_quantized
    monkeypatch.setattr(ops, "apply_activation_quantized",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))  # fmt: skip
    monkeypatch.setattr(ops, "FUSE_ACTIVATION_QUANT", True)
    one_launch, _ = _run_and_check(case, torch.float16, SMALL)
    assert calls, "the fused path was not taken"
    assert torch.equal(one_launch, two_steps)


@pytest.mark.parametrize("dtype", [torch.float16])
def test_skewed_routing(dtype, device):
    """Most slots on one expert: many M-blocks of one expert, most experts empty."""
    case = make_case(50, 8, 32, 64, 2, dtype, device, bias=True, skew="one-hot")
    _run_and_check(case, dtype, SMALL)


def test_expert_map_other_rank_writes_zeros(device):
    """Experts mapped to -1 live on another rank: their slots contribute exactly zero."""
    dtype = torch.float16
    E_global, E_local = 6, 3
    case = make_case(12, E_global, 32, 64, 2, dtype, device, bias=True)
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1], dtype=torch.int32, device=device)
    local = [0, 2, 4]
    case.w1, case.w2 = case.w1[local], case.w2[local]
    case.kwargs["w1_bias"] = case.kwargs["w1_bias"][local]
    case.kwargs["w2_bias"] = case.kwargs["w2_bias"][local]
    case.kwargs["expert_map"] = expert_map
    out, _ = _run_and_check(case, dtype, SMALL)
    # A token routed only to remote experts must come out exactly zero, not NaN or stale.
    remote_only = (expert_map[case.topk_ids.long()] == -1).all(dim=1)
    if remote_only.any():
        assert torch.all(out[remote_only] == 0)
    assert E_local == case.w1.shape[0]


def test_default_config_is_used(device):
    case = make_case(9, 4, 32, 64, 2, torch.float16, device)
    out = fused_experts(*case.args(), **case.kwargs)
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok


def test_fused_moe_routes_with_softmax_topk(device):
    dtype = torch.float16
    case = make_case(10, 6, 32, 64, 3, dtype, device)
    gating = torch.randn(10, 6, device=device)
    out = fused_moe(case.x, case.w1, case.w2, gating, 3, config=SMALL)
    weights, ids = softmax_topk(gating, 3, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(10, device=device))
    ref = fused_experts_reference(case.x, case.w1, case.w2, weights, ids)
    assert check_close(out, ref, dtype=dtype).ok


def test_results_depend_on_inputs(device):
    """Guards against a kernel that writes something plausible but ignores its inputs."""
    case = make_case(8, 4, 32, 64, 2, torch.float32, device, bias=True)
    a = fused_experts(*case.args(), config=SMALL, **case.kwargs)
    case.x = case.x.clone()
    case.x[3] += 1.0
    b = fused_experts(*case.args(), config=SMALL, **case.kwargs)
    changed = (a - b).abs().sum(dim=1) > 0
    assert changed.tolist() == [i == 3 for i in range(8)]


@pytest.mark.gpu
def test_64bit_offsets(device):
    """Slot index × row stride above 2³¹ must not wrap (offsets are int64 in the kernel)."""
    M, E, N, K, topk = 40000, 8, 7168, 512, 8  # GEMM1 output: 320000 × 14336 > 2³¹ elements
    case = make_case(M, E, N, K, topk, torch.bfloat16, device)
    cfg = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
           "num_warps": 8, "num_stages": 3}  # fmt: skip
    with poisoned_workspace():
        out = fused_experts(*case.args(), config=cfg)
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device=device)  # the last rows sit past 2³¹
    ref = fused_experts_reference(case.x[rows], case.w1, case.w2, case.topk_weights[rows],
                                  case.topk_ids[rows])  # fmt: skip
    result = check_close(out[rows], ref, dtype=torch.bfloat16)
    assert result.ok, result


@pytest.mark.gpu
@pytest.mark.parametrize("config_down", [None, SMALL], ids=["one-config", "down-other-BLOCK_M"])
def test_op_captures_in_cuda_graph(config_down, device):
    """Routing metadata needs no host sync, so the whole op replays from a CUDA graph (also with
    a second alignment for a down config of another BLOCK_SIZE_M)."""
    case = make_case(64, 8, 128, 256, 2, torch.bfloat16, device, bias=True)
    kw = dict(config=WIDE_M, config_down=config_down, **case.kwargs)
    fused_experts(*case.args(), **kw)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = fused_experts(*case.args(), **kw)
    case.x.copy_(torch.randn_like(case.x))
    graph.replay()
    torch.cuda.synchronize()
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.bfloat16).ok


# (up config, down config): the down GEMM (w2: N_out = K, K_in = N) tuned apart from the up one.
SPLIT = [
    pytest.param(SMALL, GROUPED, id="same-BLOCK_M"),
    pytest.param(SMALL, WIDE_M, id="down-wider-BLOCK_M"),
    pytest.param(WIDE_M, GROUPED, id="down-narrower-BLOCK_M"),
]


@pytest.mark.parametrize(("config", "config_down"), SPLIT)
@pytest.mark.parametrize(
    ("quant", "block_shape"),
    [pytest.param(None, None, id="fp16"), pytest.param("fp8_w8a8", (32, 32), id="fp8-block")],
)
def test_config_down_matches_reference(config, config_down, quant, block_shape, device):
    """Each GEMM pads every expert's slots to its own BLOCK_SIZE_M: a down config of another
    BLOCK_SIZE_M run on the up GEMM's alignment would mix experts within one M tile."""
    case = make_case(37, 6, 48, 80, 2, torch.float16, device, quant=quant,
                     block_shape=block_shape, bias=True)  # fmt: skip
    if block_shape is not None:  # a K tile may not straddle two scale groups
        config, config_down = ({**c, "BLOCK_SIZE_K": 32} for c in (config, config_down))
    _run_and_check(case, torch.float16, config, config_down)


def _spy(monkeypatch):
    """Record (BLOCK_SIZE_M of each alignment, config of each GEMM launch) of the next op call."""
    from moetune import ops

    aligned, launched = [], []
    align, launch = ops.moe_align_block_size, ops.invoke_moe_gemm

    def spy_align(topk_ids, block_m, *a, **kw):
        aligned.append(block_m)
        return align(topk_ids, block_m, *a, **kw)

    def spy_launch(*a, config, **kw):
        launched.append(config)
        return launch(*a, config=config, **kw)

    monkeypatch.setattr(ops, "moe_align_block_size", spy_align)
    monkeypatch.setattr(ops, "invoke_moe_gemm", spy_launch)
    return aligned, launched


@pytest.mark.parametrize(
    ("config", "config_down", "aligned", "launched"),
    [
        pytest.param(SMALL, None, [16], [SMALL, SMALL], id="config-for-both"),
        pytest.param(SMALL, GROUPED, [16], [SMALL, GROUPED], id="same-BLOCK_M-one-alignment"),
        pytest.param(SMALL, WIDE_M, [16, 64], [SMALL, WIDE_M], id="other-BLOCK_M-two"),
    ],
)
def test_config_down_goes_to_the_second_launch(config, config_down, aligned, launched, device,
                                               monkeypatch):  # fmt: skip
    """Two GEMM launches whatever the configs; a second alignment only when BLOCK_SIZE_M differs."""
    case = make_case(9, 4, 32, 64, 2, torch.float16, device)
    seen_aligned, seen_launched = _spy(monkeypatch)
    fused_experts(*case.args(), config=config, config_down=config_down, **case.kwargs)
    assert seen_aligned == aligned
    assert seen_launched == launched


def test_lookup_feeds_each_gemm_its_table(device, tmp_path, monkeypatch):
    """With no config the up GEMM reads the main table and the down GEMM the ``_down`` table."""
    from moetune import lookup
    from moetune.tables import gemm_suffix, table_filename, write_table

    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(lookup, "_current_device_name", lambda: "cpu_interpreter")
    full = {"num_warps": 4, "num_stages": 2}
    for gemm, cfg in (("up", SMALL), ("down", WIDE_M)):
        name = table_filename(4, 32, "cpu_interpreter", suffix=gemm_suffix(gemm))
        write_table(tmp_path / name, {1: {**cfg, **full}}, triton_version="3.6.0")
    case = make_case(9, 4, 32, 64, 2, torch.float16, device)
    aligned, launched = _spy(monkeypatch)
    with poisoned_workspace():
        out = fused_experts(*case.args(), **case.kwargs)
    assert launched == [{**SMALL, **full}, {**WIDE_M, **full}]
    assert aligned == [16, 64]
    ref = fused_experts_reference(*case.args(), **case.kwargs)
    assert check_close(out, ref, dtype=torch.float16).ok
