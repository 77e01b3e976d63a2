"""Random inputs for one MoE problem, shaped and quantized the way ``fused_experts`` takes them.

Shared by ``verify`` and the sweep, so every check draws the same kind of data:

- ``x ~ N(0, 1)``; weights ``~ N(0, 1) / sqrt(fan_in)`` so GEMM outputs stay of order 1 at any K
  or N (no overflow in fp16, no underflow into the quantizers' floor);
- biases ``~ N(0, 1)`` when the problem has them: comparable to the GEMM outputs, so a bias added
  in the wrong place of the epilogue (DESIGN §1) moves the result visibly;
- router weights are the top-k of a softmax over random logits, not renormalized, so they are
  below 1 whenever there is more than one expert (a weight of exactly 1 hides a router weight
  applied in the wrong place);
- quantized weights come from :func:`moetune.quant.quantize_weight`, in vLLM's scale shapes.

Nothing is zero-filled: zeros hide rows the kernel never wrote. Weights are drawn and quantized a
few experts at a time, so a table's real shape (DeepSeek-V3: 256 x 4096 x 7168 per GEMM) never
needs a full float32 copy of the weights on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.ops import softmax_topk
from moetune.problem import Problem
from moetune.quant import quantize_weight

SKEWS = ("uniform", "zipf", "one-hot")
ZIPF_EXPONENT = 1.2  # expert popularity ∝ 1 / rank^1.2: a few hot experts, a long tail
# Float32 elements drawn at once while building weights (1 GiB).
_CHUNK_ELEMENTS = 1 << 28


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None  # torch's global RNG: the caller's torch.manual_seed governs
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape: tuple[int, ...], device: torch.device, g: torch.Generator | None):
    return torch.randn(shape, device=device, dtype=torch.float32, generator=g)


def random_weights(
    E: int,
    n_out: int,
    K: int,
    problem: Problem,
    device: torch.device,
    *,
    generator: torch.Generator | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[E, n_out, K]`` weights ``~ N(0, 1/K)``, quantized as ``problem`` says; ``(w, scale)``.

    ``scale`` is None for unquantized problems. Built a chunk of experts at a time.
    """
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_out * K))
    std = K**-0.5
    w: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    for e0 in range(0, E, chunk):
        e1 = min(E, e0 + chunk)
        wf = _randn((e1 - e0, n_out, K), device, generator).mul_(std)
        if problem.quant is None:
            part, part_scale = wf.to(problem.torch_dtype), None
        else:
            part, part_scale = quantize_weight(
                wf,
                problem.quant,
                per_channel=problem.per_channel,
                block_shape=problem.block_shape,
                fp8_dtype=fp8_dtype,
            )
        del wf
        if w is None:
            w = torch.empty((E, *part.shape[1:]), dtype=part.dtype, device=device)
            if part_scale is not None:
                scale = torch.empty(
                    (E, *part_scale.shape[1:]), dtype=part_scale.dtype, device=device
                )
        w[e0:e1] = part
        if scale is not None:
            scale[e0:e1] = part_scale
    assert w is not None
    return w, scale


def random_routing(
    M: int,
    E: int,
    topk: int,
    device: torch.device,
    *,
    skew: str = "uniform",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights [M, topk] float32, topk_ids [M, topk] int32)``, distinct experts per token.

    ``skew="zipf"``: each token draws its experts without replacement with probability
    ∝ 1 / (e + 1)^1.2 (Gumbel top-k), the uneven load real routers show.
    ``skew="one-hot"``: every token ranks expert 0 first and expert 1 second, so most experts
    receive no token and one receives them all (the worst case of load imbalance).
    """
    if skew not in SKEWS:
        raise ValueError(f"skew must be one of {', '.join(SKEWS)}, got {skew!r}")
    logits = _randn((M, E), device, generator)
    if skew == "zipf":
        rank = torch.arange(1, E + 1, device=device, dtype=torch.float32)
        u = torch.rand((M, E), device=device, generator=generator).clamp(1e-12, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        logits = -ZIPF_EXPONENT * torch.log(rank) + gumbel
    if skew == "one-hot":
        logits[:, 0] += 100.0
        if E > 1:
            logits[:, 1] += 50.0
    return softmax_topk(logits, topk, renormalize=False)


def random_moe_inputs(
    problem: Problem,
    M: int,
    device: str | torch.device,
    *,
    seed: int | None = None,
    skew: str = "uniform",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    static_scales: bool = False,
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Fresh inputs for ``fused_experts(*args, **kwargs)`` (and the reference) at batch size M.

    ``args = (x, w1, w2, topk_weights, topk_ids)``; ``kwargs`` holds ``activation``, ``w1_bias``,
    ``w2_bias``, ``quant``, ``w1_scale``, ``w2_scale``, ``per_channel_quant`` and
    ``block_shape`` (None where the problem has none). Activation scales are left dynamic, as
    vLLM computes them, unless ``static_scales``: then ``a1_scale`` and ``a2_scale`` are
    calibrated on this draw (:func:`static_activation_scales`). ``seed`` makes the draw
    reproducible on one device; None uses torch's global RNG. ``fp8_dtype`` is the platform's
    e4m3 flavour (``float8_e4m3fnuz`` on gfx942).
    """
    if not isinstance(M, int) or isinstance(M, bool) or M < 1:
        raise ValueError(f"M must be a positive integer, got {M!r}")
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise ValueError(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    dev = torch.device(device)
    g = _generator(dev, seed)
    E, N, K, dtype = problem.E, problem.N, problem.K, problem.torch_dtype

    x = _randn((M, K), dev, g).to(dtype)
    wkw = dict(generator=g, fp8_dtype=fp8_dtype)
    w1, w1_scale = random_weights(E, 2 * N, K, problem, dev, **wkw)
    w2, w2_scale = random_weights(E, K, N, problem, dev, **wkw)
    topk_weights, topk_ids = random_routing(M, E, problem.topk, dev, skew=skew, generator=g)
    w1_bias = w2_bias = None
    if problem.bias:
        w1_bias = _randn((E, 2 * N), dev, g).to(dtype)
        w2_bias = _randn((E, K), dev, g).to(dtype)
    kwargs: dict[str, Any] = {
        "activation": problem.activation,
        "w1_bias": w1_bias,
        "w2_bias": w2_bias,
        "quant": problem.quant,
        "w1_scale": w1_scale,
        "w2_scale": w2_scale,
        "per_channel_quant": problem.per_channel,
        "block_shape": list(problem.block_shape) if problem.block_shape else None,
    }
    args = (x, w1, w2, topk_weights, topk_ids)
    if static_scales:
        kwargs.update(static_activation_scales(args, kwargs))
    return args, kwargs


def timing_input_sets(
    problem: Problem,
    M: int,
    device: str | torch.device,
    *,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    skew: str = "uniform",
    budget_share: int = 1,
    static_scales: bool = False,
) -> list[tuple[tuple[torch.Tensor, ...], dict[str, Any]]]:
    """Input sets of M tokens to rotate through when timing (the sweep, ``bench`` and the
    benchmark scripts): seed 1 first (the set a caller checks), then seeds 2, 3, ... up to
    :func:`moetune.timing.timing_set_count` sets, so the experts one call touches are cold in L2
    as in a served model. ``budget_share``: the sets may take 1/share of the weight-copy budget
    (a caller that keeps other copies of each set). ``static_scales``: each set's activation
    scales calibrated on it. Slice ``x``, ``topk_weights`` and ``topk_ids`` to time smaller batch
    sizes with the same weights."""
    from moetune.timing import l2_bytes, set_memory_budget, timing_set_count

    def draw(seed: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        return random_moe_inputs(problem, M, device, seed=seed, skew=skew, fp8_dtype=fp8_dtype,
                                 static_scales=static_scales)  # fmt: skip

    sets = [draw(1)]
    w_bytes = sum(t.numel() * t.element_size() for t in sets[0][0][1:3])
    n = timing_set_count(w_bytes, problem.E, problem.topk, l2_bytes(device),
                         set_memory_budget(device) // budget_share)  # fmt: skip
    return sets + [draw(seed) for seed in range(2, n + 1)]


def static_activation_scales(
    args: tuple[torch.Tensor, ...], kwargs: dict[str, Any], *, sample: int = 256
) -> dict[str, torch.Tensor]:
    """Per-tensor static scales for a w8a8 problem's two activations, calibrated on these inputs
    as checkpoints with static activation scales are: amax / qmax of the tokens, and of the
    activation between the GEMMs over the first ``sample`` tokens (float64, from dequantized
    weights). ``fused_experts(*args, **kwargs, **scales)`` then quantizes with one launch per
    GEMM instead of computing an amax first; the reference takes the same scales."""
    from moetune.activation import apply_activation_torch
    from moetune.quant import _scale_from_amax, dequantize_weight, quant_max

    x, w1, _, _, topk_ids = args
    if kwargs.get("quant") not in ("fp8_w8a8", "int8_w8a8"):
        raise ValueError("static activation scales are for fp8_w8a8 and int8_w8a8 problems")
    if kwargs.get("per_channel_quant") or kwargs.get("block_shape"):
        raise ValueError("static activation scales are per tensor: not with per-token or block")
    qmax = quant_max(w1.dtype)
    xs, ids = x[:sample].double(), topk_ids[:sample].long()
    amax_h = torch.zeros((), dtype=torch.float64, device=x.device)
    bias = kwargs.get("w1_bias")
    for e in ids.unique().tolist():
        rows = (ids == e).any(dim=1)
        w = dequantize_weight(w1[e], kwargs["w1_scale"][e])
        gate_up = xs[rows] @ w.T
        if bias is not None:
            gate_up = gate_up + bias[e].double()
        h = apply_activation_torch(gate_up, kwargs["activation"])
        amax_h = torch.maximum(amax_h, h.abs().amax())
    return {"a1_scale": _scale_from_amax(x.float().abs().amax(), qmax).reshape(1),
            "a2_scale": _scale_from_amax(amax_h.float(), qmax).reshape(1)}  # fmt: skip
