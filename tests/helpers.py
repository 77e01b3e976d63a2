"""Random MoE problems for the tests (never zeros: they hide unwritten outputs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moetune.quant import quantize_weight


@dataclass
class MoeCase:
    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def args(self) -> tuple:
        return (self.x, self.w1, self.w2, self.topk_weights, self.topk_ids)


def random_routing(M: int, E: int, topk: int, device: str, skew: str = "uniform"):
    """Top-k expert ids without repeats per token, and router weights that are not 1."""
    if skew == "uniform":
        logits = torch.randn(M, E, device=device)
    elif skew == "one-hot":  # every token prefers expert 0, most experts get nothing
        logits = torch.randn(M, E, device=device)
        logits[:, 0] += 100.0
        logits[:, 1] += 50.0
    else:
        raise ValueError(skew)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
    weights = torch.rand_like(weights) * 0.9 + 0.1  # in [0.1, 1): order of epilogue steps shows
    return weights.float(), ids.to(torch.int32)


def coarse(shape: tuple[int, ...], fan_in: int, device: str) -> torch.Tensor:
    """Random values ±(8..15)/16 · 2^-round(log2(√fan_in)): four significant bits and one
    binade, so every dot product of them (or of their fp8/int8 codes) over up to 2^10 terms is
    exact in fp32 whatever the order of its sums. Triton's interpreter computes tl.dot with
    numpy, whose result for a column can depend on the column's place in the tile; with these
    values it cannot."""
    mag = torch.randint(8, 16, shape, device=device).float() / 16
    sign = torch.randint(0, 2, shape, device=device).float() * 2 - 1
    return sign * mag * 2.0 ** -round(math.log2(fan_in**0.5))


def make_case(
    M: int, E: int, N: int, K: int, topk: int, dtype: torch.dtype, device: str, *,
    quant: str | None = None, per_channel: bool = False, block_shape=None, bias: bool = False,
    activation: str = "silu", skew: str = "uniform", fp8_dtype=torch.float8_e4m3fn,
    w_scale_mult: float = 1.0, bias_mult: float = 1.0, exact_dots: bool = False,
) -> MoeCase:  # fmt: skip
    """``exact_dots``: x and the weights from :func:`coarse` instead of normal draws."""
    if exact_dots:
        x = coarse((M, K), 1, device).to(dtype)
        w1, w2 = coarse((E, 2 * N, K), K, device), coarse((E, K, N), N, device)
    else:
        x = torch.randn(M, K, device=device, dtype=torch.float32).to(dtype)
        w1 = torch.randn(E, 2 * N, K, device=device) / K**0.5
        w2 = torch.randn(E, K, N, device=device) / N**0.5
    weights, ids = random_routing(M, E, topk, device, skew)
    kw: dict = {"activation": activation}
    if bias:
        # Biases comparable to the GEMM outputs, so a bias in the wrong place is visible.
        kw["w1_bias"] = (torch.randn(E, 2 * N, device=device) * bias_mult).to(dtype)
        kw["w2_bias"] = (torch.randn(E, K, device=device) * bias_mult).to(dtype)
    if quant is None:
        return MoeCase(x, w1.to(dtype), w2.to(dtype), weights, ids, kw)
    q1, s1 = quantize_weight(w1, quant, per_channel=per_channel, block_shape=block_shape,
                             fp8_dtype=fp8_dtype)  # fmt: skip
    q2, s2 = quantize_weight(w2, quant, per_channel=per_channel, block_shape=block_shape,
                             fp8_dtype=fp8_dtype)  # fmt: skip
    kw.update(quant=quant, w1_scale=s1 * w_scale_mult, w2_scale=s2 * w_scale_mult)
    if per_channel:
        kw["per_channel_quant"] = True
    if block_shape is not None:
        kw["block_shape"] = list(block_shape)
    return MoeCase(x, q1, q2, weights, ids, kw)


def static_scales(case: MoeCase) -> dict:
    """Static per-tensor activation scales for both GEMMs: the input's from its amax, GEMM2's
    input's a fixed 0.02."""
    x = case.x
    return {"a1_scale": x.abs().amax().float().reshape(1) / 448,
            "a2_scale": torch.full((1,), 0.02, device=x.device)}  # fmt: skip


def mode_case(M: int, E: int, N: int, K: int, device: str, *, quant, per_channel, block_shape,
              static: bool, activation: str) -> MoeCase:  # fmt: skip
    """A top-2 fp16 case with biases and exact dot products in one quantization mode, with
    static activation scales where ``static``: the cases of the tests that compare two layouts
    of the same op bit for bit."""
    case = make_case(M, E, N, K, 2, torch.float16, device, quant=quant, per_channel=per_channel,
                     block_shape=block_shape, bias=True, activation=activation,
                     exact_dots=True)  # fmt: skip
    if static:
        case.kwargs.update(static_scales(case))
    return case


def record_launches(monkeypatch, *, run: bool) -> list[dict]:
    """The keyword arguments of every fused-MoE kernel launch, in order, with its run-time
    ``direct_slots`` argument; the kernel still runs when ``run``, else the launch is only
    recorded (its output stays unwritten)."""
    from moetune import launch

    kernel = launch.fused_moe_kernel
    recorded: list[dict] = []

    class Recording:
        def __getitem__(self, grid):
            def launch_kernel(*args, **kwargs):
                named = dict(zip(kernel.arg_names, args, strict=False))
                recorded.append({**kwargs, "direct_slots": named["direct_slots"]})
                return kernel[grid](*args, **kwargs) if run else None

            return launch_kernel

    monkeypatch.setattr(launch, "fused_moe_kernel", Recording())
    return recorded


def record_launches_and_warmups(monkeypatch) -> dict[str, list]:
    """Every fused-MoE kernel launch (which still runs) and compile-only warmup, each as
    ``(argument types, keyword arguments, output shape)``: what selects the compiled kernel, so
    a test can tell whether compile processes build the kernel the op launches."""
    import torch

    from moetune import launch

    kernel = launch.fused_moe_kernel
    seen: dict[str, list] = {"launch": [], "warmup": []}

    def signature(args, kwargs):
        def kind(a):  # a TMA descriptor's tile shape selects the kernel too
            if torch.is_tensor(a):
                return str(a.dtype)
            shape = getattr(a, "block_shape", None)
            return type(a).__name__ + (str(list(shape)) if shape is not None else "")

        types = tuple(kind(a) for a in args)
        return types, kwargs, tuple(args[4].shape)  # c (after a, b, b_desc and a_desc)

    class Recording:
        def warmup(self, *args, grid, **kwargs):
            seen["warmup"].append(signature(args, kwargs))

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen["launch"].append(signature(args, kwargs))
                return kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(launch, "fused_moe_kernel", Recording())
    return seen


# The opening of a script in which Triton compiles for Hopper (sm90) on a machine without a GPU,
# outside the interpreter: a stand-in for the CUDA driver (what Triton asks it before compiling)
# and moetune's compile target pinned, as the sweep's compile processes pin theirs.
SM90_PREAMBLE = r"""
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

TARGET = GPUTarget("cuda", 90, 32)


class Stand_in:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


driver.set_active(Stand_in())
from helpers import make_case
from moetune import launch, ops
from moetune.launch import compile_only

launch._compile_target = lambda: TARGET
"""


def compile_for_sm90(body: str, cache_dir, *args: str) -> str:
    """Run :data:`SM90_PREAMBLE` + ``body`` (with ``args``) in a subprocess whose Triton cache is
    ``cache_dir``; its stdout. Skips the test where this Triton cannot compile for CUDA."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    try:
        from triton.backends import backends
    except ImportError:  # pragma: no cover
        pytest.skip("this Triton has no backends registry")
    if "nvidia" not in backends:
        pytest.skip("this Triton cannot compile for CUDA")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": str(root)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SM90_PREAMBLE + body, *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
