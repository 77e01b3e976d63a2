"""random_moe_inputs: shapes, scale shapes, statistics and routing of every check's inputs."""

import pytest
import torch

from moetune import check_close, fused_experts, fused_experts_reference
from moetune import inputs as inputs_mod
from moetune.inputs import random_moe_inputs
from moetune.ops import poisoned_workspace
from moetune.problem import Problem
from moetune.quant import quant_max

E, N, K, TOPK, M = 5, 24, 40, 2, 7  # prime E, N and K not multiples of the 16/32 blocks

# (quant, per_channel, block_shape, w1 scale shape, w2 scale shape): vLLM's shapes (DESIGN §2).
QUANT_SHAPES = [
    pytest.param("fp8_w8a8", False, None, (E,), (E,), id="fp8-tensor"),
    pytest.param("fp8_w8a8", True, None, (E, 2 * N), (E, K), id="fp8-channel"),
    pytest.param("fp8_w8a8", False, (16, 16), (E, 3, 3), (E, 3, 2), id="fp8-block-partial"),
    pytest.param("int8_w8a8", False, None, (E,), (E,), id="int8-tensor"),
    pytest.param("int8_w8a8", False, (16, 16), (E, 3, 3), (E, 3, 2), id="int8-block"),
    pytest.param("int8_w8a16", False, None, (E, 2 * N), (E, K), id="int8_w8a16-channel"),
]


def _problem(**kw) -> Problem:
    base = dict(E=E, N=N, K=K, topk=TOPK, dtype="float16")
    base.update(kw)
    return Problem(**base)


def test_unquantized_shapes_dtypes_and_kwargs(device):
    args, kw = random_moe_inputs(_problem(dtype="float32"), M, device, seed=1)
    x, w1, w2, tw, ids = args
    assert x.shape == (M, K) and x.dtype == torch.float32
    assert w1.shape == (E, 2 * N, K) and w2.shape == (E, K, N)
    assert w1.dtype == w2.dtype == torch.float32
    assert tw.shape == ids.shape == (M, TOPK)
    assert tw.dtype == torch.float32 and ids.dtype == torch.int32
    assert set(kw) == {
        "activation", "w1_bias", "w2_bias", "quant", "w1_scale", "w2_scale",
        "per_channel_quant", "block_shape",
    }  # fmt: skip
    assert kw["quant"] is None and kw["w1_scale"] is None and kw["w1_bias"] is None
    assert kw["activation"] == "silu" and kw["per_channel_quant"] is False


@pytest.mark.parametrize(("quant", "per_channel", "block", "s1_shape", "s2_shape"), QUANT_SHAPES)
def test_quantized_weights_and_scale_shapes(quant, per_channel, block, s1_shape, s2_shape, device):
    p = _problem(quant=quant, per_channel=per_channel, block_shape=block)
    args, kw = random_moe_inputs(p, M, device, seed=2)
    _, w1, w2, _, _ = args
    qdtype = torch.int8 if quant.startswith("int8") else torch.float8_e4m3fn
    assert w1.dtype == w2.dtype == qdtype
    assert tuple(kw["w1_scale"].shape) == s1_shape and tuple(kw["w2_scale"].shape) == s2_shape
    assert kw["quant"] == quant and kw["per_channel_quant"] is per_channel
    assert kw["block_shape"] == (list(block) if block else None)
    assert bool((kw["w1_scale"] > 0).all()) and bool((kw["w2_scale"] > 0).all())


def test_fp8_dtype_is_the_platforms(device):
    p = _problem(quant="fp8_w8a8")
    (_, w1, w2, _, _), _ = random_moe_inputs(p, M, device, fp8_dtype=torch.float8_e4m3fnuz)
    assert w1.dtype == w2.dtype == torch.float8_e4m3fnuz
    # Each expert's amax lands on the format's max: 240 for e4m3fnuz, not e4m3fn's 448.
    assert float(w1.float().abs().amax()) == quant_max(torch.float8_e4m3fnuz) == 240.0


def test_weights_scaled_by_fan_in_and_never_zero(device):
    big = Problem(E=3, N=64, K=256, topk=2, dtype="float32")
    (x, w1, w2, tw, _), _ = random_moe_inputs(big, 16, device, seed=3)
    assert abs(float(w1.std()) * 256**0.5 - 1.0) < 0.05  # N(0, 1/K)
    assert abs(float(w2.std()) * 64**0.5 - 1.0) < 0.05  # N(0, 1/N)
    assert abs(float(x.std()) - 1.0) < 0.1
    for t in (x, w1, w2, tw):
        assert bool(torch.isfinite(t).all())
        assert bool((t.flatten(1).abs().amax(dim=1) > 0).all()), "an all-zero row hides bugs"


def test_bias_only_when_the_problem_has_it(device):
    p = _problem(bias=True, activation="swigluoai")
    _, kw = random_moe_inputs(p, M, device, seed=4)
    assert kw["w1_bias"].shape == (E, 2 * N) and kw["w2_bias"].shape == (E, K)
    assert kw["w1_bias"].dtype == torch.float16 and kw["activation"] == "swigluoai"
    assert float(kw["w1_bias"].abs().mean()) > 0.3  # comparable to the GEMM outputs


def test_router_weights_are_softmax_topk_below_one(device):
    (_, _, _, tw, ids), _ = random_moe_inputs(_problem(topk=3), 64, device, seed=5)
    assert bool(((tw > 0) & (tw < 1)).all()), "a router weight of 1 hides its misplacement"
    assert bool((tw[:, :-1] >= tw[:, 1:]).all())  # top-k order
    assert bool((tw.sum(dim=1) < 0.999).all())  # part of one softmax over E, not renormalized
    assert bool(((ids >= 0) & (ids < E)).all())
    assert all(len(set(row.tolist())) == 3 for row in ids), "an expert repeated within a token"


def test_one_hot_skew_sends_every_token_to_expert_zero(device):
    p = Problem(E=16, N=16, K=32, topk=2, dtype="float16")
    (_, _, _, _, ids), _ = random_moe_inputs(p, 32, device, seed=6, skew="one-hot")
    assert bool((ids[:, 0] == 0).all()) and bool((ids[:, 1] == 1).all())
    (_, _, _, _, ids_u), _ = random_moe_inputs(p, 32, device, seed=6)
    assert len(set(ids_u.flatten().tolist())) > 4


def test_seed_reproduces_and_differs(device):
    p = _problem(quant="fp8_w8a8", block_shape=(16, 16), bias=True)
    a, ka = random_moe_inputs(p, M, device, seed=7)
    b, kb = random_moe_inputs(p, M, device, seed=7)
    c, _ = random_moe_inputs(p, M, device, seed=8)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.float(), tb.float())
    assert torch.equal(ka["w1_scale"], kb["w1_scale"]) and torch.equal(ka["w2_bias"], kb["w2_bias"])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1].float(), c[1].float())


def test_chunked_generation_quantizes_each_expert_on_its_own(device, monkeypatch):
    """Weights are drawn a few experts at a time; every expert must be written and scaled."""
    monkeypatch.setattr(inputs_mod, "_CHUNK_ELEMENTS", 1)  # one expert per chunk
    p = _problem(quant="fp8_w8a8")
    (_, w1, w2, _, _), kw = random_moe_inputs(p, M, device, seed=9)
    for w, s in ((w1, kw["w1_scale"]), (w2, kw["w2_scale"])):
        per_expert_amax = w.float().abs().flatten(1).amax(dim=1)
        assert torch.equal(per_expert_amax, torch.full_like(per_expert_amax, 448.0))
        assert len(set(s.tolist())) == E  # one scale each, none left uninitialized


@pytest.mark.parametrize(
    ("quant", "block"), [(None, None), ("fp8_w8a8", (32, 32)), ("int8_w8a16", None)]
)
def test_inputs_run_through_the_op_and_reference(quant, block, device):
    p = _problem(quant=quant, block_shape=block, bias=True)
    args, kw = random_moe_inputs(p, M, device, seed=10)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    with poisoned_workspace():
        out = fused_experts(*args, **kw, config=cfg)
    res = check_close(out, fused_experts_reference(*args, **kw), dtype=p.torch_dtype, quant=quant)
    assert res.ok, res


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"M": 0}, "M must be"),
        ({"skew": "bimodal"}, "skew must be"),
        ({"fp8_dtype": torch.float8_e5m2}, "fp8_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    M_ = kwargs.pop("M", 4)
    with pytest.raises(ValueError, match=match):
        random_moe_inputs(_problem(), M_, "cpu", **kwargs)


def test_zipf_routing_is_skewed_and_distinct():
    """Expert load falls with popularity rank; each token still gets distinct experts."""
    from moetune.inputs import random_routing

    g = torch.Generator().manual_seed(3)
    weights, ids = random_routing(4000, 8, 2, torch.device("cpu"), skew="zipf", generator=g)
    load = torch.bincount(ids.flatten().long(), minlength=8)
    assert load[0] > 2 * load[3] > 0 and load[3] > load[7] > 0
    assert (ids[:, 0] != ids[:, 1]).all()
    assert torch.all((weights > 0) & (weights <= 1))


def test_timing_sets_count_the_weights_one_call_touches():
    """Qwen3-30B-A3B TP2 (E=128, 8 of 604 MB per call at M=1) needs fresh weights per call;
    Mixtral's two 176 MB experts do not fit the L2 at all; copies stay within the memory cap."""
    from moetune.timing import SET_MEMORY_BYTES, timing_set_count

    l2 = 50 * 2**20
    qwen = 128 * 3 * 384 * 2048 * 2
    assert timing_set_count(qwen, 128, 8, l2) == 6
    assert timing_set_count(8 * 3 * 7168 * 4096 * 2, 8, 2, l2) == 1
    assert timing_set_count(qwen, 128, 8, 0) == 1  # no L2 (interpreter)
    huge = SET_MEMORY_BYTES // 2
    assert timing_set_count(huge, 4096, 1, l2) == 2


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_static_activation_scales_are_calibrated_amaxes(activation, device):
    """a1: amax of the tokens; a2: amax of the activation between the GEMMs, per routed slot,
    recomputed here slot by slot; the op with these static scales passes the reference check."""
    from moetune.inputs import static_activation_scales
    from moetune.quant import dequantize_weight

    p = _problem(quant="fp8_w8a8", bias=True, activation=activation)
    args, kw = random_moe_inputs(p, M, device, seed=11)
    scales = static_activation_scales(args, kw)
    x, w1, _, _, ids = args
    qmax = quant_max(w1.dtype)
    assert scales["a1_scale"].shape == (1,) and scales["a2_scale"].shape == (1,)
    assert scales["a1_scale"].item() == pytest.approx(x.float().abs().amax().item() / qmax)
    amax = 0.0
    for t in range(M):
        for e in ids[t].tolist():
            g = x[t].double() @ dequantize_weight(w1[e], kw["w1_scale"][e]).T
            g = g + kw["w1_bias"][e].double()
            if activation == "silu":
                h = torch.nn.functional.silu(g[:N]) * g[N:]
            else:
                gate, up = g[0::2].clamp(max=7.0), g[1::2].clamp(-7.0, 7.0)
                h = gate * torch.sigmoid(1.702 * gate) * (up + 1)
            amax = max(amax, h.abs().max().item())
    assert scales["a2_scale"].item() == pytest.approx(amax / qmax, rel=1e-5)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    with poisoned_workspace():
        out = fused_experts(*args, **kw, **scales, config=cfg)
    ref = fused_experts_reference(*args, **kw, **scales)
    assert check_close(out, ref, dtype=p.torch_dtype, quant="fp8_w8a8").ok


def test_static_activation_scales_refuse_what_they_cannot_be():
    from moetune.inputs import static_activation_scales

    args, kw = random_moe_inputs(_problem(), M, "cpu", seed=0)
    with pytest.raises(ValueError, match="fp8_w8a8 and int8_w8a8"):
        static_activation_scales(args, kw)
    args, kw = random_moe_inputs(_problem(quant="fp8_w8a8", per_channel=True), M, "cpu", seed=0)
    with pytest.raises(ValueError, match="per tensor"):
        static_activation_scales(args, kw)


def test_timing_sets_rotate_distinct_weights_as_many_as_the_count(device, monkeypatch):
    """Benchmarks time over these sets: seed 1 first (the set they check), then new weights for
    every further set, as many as timing_set_count gives for this L2."""
    from moetune import timing
    from moetune.inputs import timing_input_sets

    p = Problem(E=4, N=32, K=64, topk=2, dtype="float16")
    monkeypatch.setattr(timing, "l2_bytes", lambda d: 10**6)  # 4 MB of passes over 48 KB sets
    sets = timing_input_sets(p, 8, device)
    w_bytes = sum(t.numel() * t.element_size() for t in sets[0][0][1:3])
    assert len(sets) == timing.timing_set_count(w_bytes, p.E, p.topk, 10**6) > 1
    first = random_moe_inputs(p, 8, device, seed=1)[0]
    assert all(torch.equal(a, b) for a, b in zip(sets[0][0], first, strict=True))
    assert not any(torch.equal(sets[0][0][1], s[0][1]) for s in sets[1:])
