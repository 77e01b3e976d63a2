"""benchmarks/grouped_ceiling.py builds its grouped GEMMs' operands right: the routed rows in
expert order with the offsets ``torch._grouped_mm`` takes, the weights as [E, K_in, N_out]
views, and a check that catches a wrong output. (The fp8 path, ``torch._scaled_grouped_mm``,
has no CPU kernel; its operands are checked here against their definition.)"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location(
    "grouped_ceiling", ROOT / "benchmarks/grouped_ceiling.py"
)
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)

E, N, K, TOPK, M = 4, 32, 64, 2, 24


def _inputs(seed: int, quant: str | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(E, 2 * N, K, generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(E, K, N, generator=g) / 8).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(M)])
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # leave expert 3 with fewer rows
    kw: dict = {}
    if quant:
        kw = {"quant": quant, "w1_scale": torch.rand(E, generator=g) + 0.5,
              "w2_scale": torch.rand(E, generator=g) + 0.5, "a1_scale": torch.tensor([0.02]),
              "a2_scale": torch.tensor([0.03])}  # fmt: skip
        w1, w2 = w1.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
    return (x, w1, w2, torch.rand(M, TOPK, generator=g), ids), kw


def test_sorted_slots_group_each_experts_slots_in_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 3]])
    order, offs = gc.sorted_slots(ids, 5)
    assert order.tolist() == [1, 2, 3, 0, 4, 5]  # expert 0: slots 1, 2; 1: 3; 2: 0, 4; 3: 5
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 3, 5, 6, 6]
    assert gc.expert_rows(offs).tolist() == [2, 1, 2, 1, 0]


@pytest.mark.parametrize("i", [1, 2])
def test_grouped_gemm_equals_each_experts_product(i):
    args, kw = _inputs(i)
    x, w1, w2, _, ids = args
    o = gc.grouped_operands(args, kw, seed=7)
    out = gc.grouped_gemm(o, i)
    order, offs = gc.sorted_slots(ids, E)
    start = 0
    for e, end in enumerate(offs.tolist()):  # each slot's row times its expert's weight
        slots = order[start:end]
        a = x[slots // TOPK] if i == 1 else o["a2"][start:end]
        w = w1[e] if i == 1 else w2[e]
        ref = a.double() @ w.double().T
        torch.testing.assert_close(out[start:end].double(), ref, rtol=2e-2, atol=2e-2)
        start = end
    assert gc.check_grouped(o, i, out) < 1e-2
    bad = out.clone()
    bad[0] += 1.0
    assert gc.check_grouped(o, i, bad) > gc.TOL, "a wrong row in the first expert passed"
    bad[0] = float("nan")
    assert gc.check_grouped(o, i, bad) == float("inf")


def test_fp8_operands_are_the_rows_quantized_with_the_static_scales():
    args, kw = _inputs(3, "fp8_w8a8")
    x, w1, _, _, ids = args
    o = gc.grouped_operands(args, kw, seed=7)
    order, offs = gc.sorted_slots(ids, E)
    rows = M * TOPK
    assert o["a1"].dtype == torch.float8_e4m3fn and o["a1"].shape == (rows, K)
    want = (x[order // TOPK].float() / 0.02).to(torch.float8_e4m3fn)
    assert torch.equal(o["a1"].view(torch.uint8), want.view(torch.uint8))
    assert o["sa1"].shape == (rows,) and torch.all(o["sa1"] == 0.02)
    assert o["sb1"].shape == (E, 2 * N) and torch.equal(o["sb1"][:, 0], kw["w1_scale"])
    assert o["sb2"].shape == (E, K) and o["sa2"].shape == (rows,)
    assert o["b1"].shape == (E, K, 2 * N) and o["b1"].data_ptr() == w1.data_ptr()
    # The float64 check applies both scales: a dequantized product checks against itself.
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    out = torch.cat([(o["a1"][s:e].double() * 0.02) @ (o["b1"][n].double() * kw["w1_scale"][n])
                     for n, (s, e) in enumerate(zip(starts, ends, strict=True))])  # fmt: skip
    assert gc.check_grouped(o, 1, out.to(torch.bfloat16)) < 1e-2


@pytest.mark.parametrize("quant", [None, "fp8_w8a8"])
def test_a_point_runs_end_to_end(monkeypatch, quant):
    """A whole row on the CPU (the op in Triton's interpreter, the profiler faked): the op is
    checked, both GEMMs get a floor, and a grouped GEMM the CPU lacks (fp8) is recorded as an
    error in the row instead of ending the run."""
    from moetune.inputs import random_moe_inputs
    from moetune.problem import Problem
    from moetune.roofline import Ceilings

    profiled: list[int] = []

    def fake_breakdown(run, n_sets):
        for i in range(n_sets):
            run(i)
        profiled.append(n_sets)
        return {"fused_moe_kernel#1": 3.0, "fused_moe_kernel#2": 2.0, "other": 1.0}, 3.0

    monkeypatch.setattr(gc, "breakdown", fake_breakdown)
    problem = Problem(E, N, K, TOPK, "float16", quant=quant)
    sets = [random_moe_inputs(problem, 16, "cpu", seed=s) for s in (1, 2)]
    ceilings = Ceilings(bandwidth_Bps=1e12, bf16_flops=1e15, fp8_flops=2e15)
    row = gc.point(problem, 8, sets, ceilings, "tiny", 1)
    assert row["problem"] == "tiny" and row["M"] == 8 and row["op_ok"], row
    assert row["op_gemm1_us"] == 3.0 and row["op_gemm2_us"] == 2.0
    flops1 = 2.0 * 8 * TOPK * K * 2 * N
    assert row["floor_gemm1_us"] >= flops1 / (2e15 if quant else 1e15) * 1e6 > 0
    if quant is None:
        assert row["grouped_gemm1_ok"] and row["grouped_gemm2_ok"], row
        assert row["grouped_gemm1_us"] == 6.0 and row["grouped_gemm1_rel_err"] < 1e-2
        assert profiled == [2, 2, 2]  # the op, then each grouped GEMM over both sets
    else:
        assert not row["grouped_gemm1_ok"] and "grouped_gemm1_error" in row
    assert "GEMM1 op      3.0" in gc.line(row)
