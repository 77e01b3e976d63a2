"""`moetune bench`: the roofline floor's arithmetic, the naive baseline, the bench loop, the CLI."""

import importlib.util
import json
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

import moetune.cli  # noqa: F401  (before cli_bench: moetune.cli imports it at its end)
from moetune import bench as bench_mod
from moetune.bench import Ceilings, floor_us, measure_ceilings, naive_moe, run_bench, save_plot
from moetune.cli_bench import bench
from moetune.inputs import random_moe_inputs, random_routing
from moetune.naive import dequantized_for_naive
from moetune.problem import Problem
from moetune.reference import fused_experts_reference
from moetune.roofline import expected_experts, roofline

TINY = Problem(E=4, N=32, K=64, topk=2, dtype="float16")
# Round ceilings so the floors below can be worked out by hand.
CEIL = Ceilings(bandwidth_Bps=2e12, bf16_flops=5e14, fp8_flops=1e15)

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is invoked by name as in moetune
    app.command()(bench)
    return app


# --- expected experts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("E", "M", "topk", "routing", "expected"),
    [
        (8, 1, 2, "uniform", 2.0),  # M=1: one token touches exactly topk experts
        (8, 2, 2, "uniform", 8 * (1 - (6 / 8) ** 2)),  # an expert escapes both tokens: (6/8)²
        (8, 1, 8, "uniform", 8.0),  # topk=E: every expert
        (7, 10_000, 2, "uniform", 7.0),  # large M saturates (prime E)
        (8, 100, 2, "one-hot", 2.0),  # skewed: experts 0 and 1 take every token
        (8, 100, 1, "one-hot", 1.0),  # topk=1 skewed: expert 0 alone
        (8, 1, 4, "one-hot", 4.0),  # two pinned + two uniform over the other six
        (8, 2, 4, "one-hot", 2 + 6 * (1 - (4 / 6) ** 2)),
    ],
)
def test_expected_experts_by_hand(E, M, topk, routing, expected):
    assert expected_experts(E, M, topk, topk_routing=routing) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("skew", ["uniform", "one-hot"])
def test_expected_experts_matches_the_router_it_models(skew):
    """The formula must count what random_routing (the bench's inputs) actually produces."""
    E, M, topk, trials = 8, 3, 4, 4000
    _, ids = random_routing(M * trials, E, topk, "cpu", skew=skew)
    hit = torch.zeros(trials, E, dtype=torch.bool)
    hit.scatter_(1, ids.long().reshape(trials, M * topk), True)
    measured = hit.sum(dim=1).double().mean().item()
    # Standard error of the mean over 4000 trials is < 0.02 experts; 0.06 is 3σ.
    assert measured == pytest.approx(expected_experts(E, M, topk, topk_routing=skew), abs=0.06)


# --- floor ------------------------------------------------------------------------------------


def test_floor_at_m1_is_reading_two_experts_weights():
    """Bandwidth-bound: E=8, N=2048, K=1024, top-2, bf16 at M=1 touches exactly 2 experts."""
    p = Problem(E=8, N=2048, K=1024, topk=2, dtype="bfloat16")
    weights = 2 * (3 * 2048 * 1024) * 2  # 2 experts × (2N·K + K·N) × 2 bytes = 25,165,824
    x_out = 2 * 1 * 1024 * 2  # x read + output written
    caches = 2 * 2 * (2 * 2048 + 2048 + 1024) * 2  # 2 slots × (GEMM1, act, GEMM2) × write+read
    router = 2 * 8  # fp32 weight + int32 id per slot
    nbytes = weights + x_out + caches + router
    assert nbytes == 25_227_280
    floor = roofline(p, 1, CEIL)
    assert floor.bound == "memory" and floor.bytes == pytest.approx(nbytes, rel=1e-12)
    assert floor_us(p, 1, CEIL) == pytest.approx(nbytes / 2e12 * 1e6, rel=1e-12)  # 12.6 µs
    assert floor.flops == 2 * 1 * 2 * 3 * 2048 * 1024  # 25.2 MFLOP: 0.05 µs at 5e14, not binding


def test_floor_at_large_m_is_the_tensor_cores():
    """Compute-bound: at M=4096 the layer needs 103 GFLOP (206 µs), moves 352 MB (176 µs)."""
    p = Problem(E=8, N=2048, K=1024, topk=2, dtype="bfloat16")
    flops = 2 * 4096 * 2 * (2 * 2048 * 1024 + 2048 * 1024)
    assert flops == 103_079_215_104
    floor = roofline(p, 4096, CEIL)
    assert floor.bound == "compute" and floor.experts == pytest.approx(8.0)
    assert floor_us(p, 4096, CEIL) == pytest.approx(flops / 5e14 * 1e6, rel=1e-12)
    weights = 8 * 3 * 2048 * 1024 * 2
    acts = 2 * 4096 * 1024 * 2 + 2 * 8192 * (3 * 2048 + 1024) * 2 + 8192 * 8
    assert floor.bytes == pytest.approx(weights + acts, rel=1e-9)
    assert floor.bytes / 2e12 * 1e6 == pytest.approx(176.19, abs=0.01)


def test_floor_counts_the_experts_a_batch_does_route_to():
    """One draw of M=4 tokens may touch 5 experts where 5.47 are expected: the bench passes the
    routed count, and each expert adds exactly its weights."""
    p = Problem(E=8, N=2048, K=1024, topk=2, dtype="bfloat16")
    five, four = roofline(p, 4, CEIL, experts=5), roofline(p, 4, CEIL, experts=4)
    assert five.bytes - four.bytes == 3 * 2048 * 1024 * 2 and five.experts == 5
    expected = roofline(p, 4, CEIL)
    assert expected.experts == pytest.approx(8 * (1 - (6 / 8) ** 4))
    assert four.bytes < five.bytes < expected.bytes


def test_fp8_floor_uses_one_byte_weights_and_the_fp8_peak():
    p = Problem(E=8, N=2048, K=1024, topk=2, dtype="bfloat16", quant="fp8_w8a8")
    weights = 2 * 3 * 2048 * 1024 * 1 + 2 * 2 * 4  # 2 experts, 1-byte weights, 2 fp32 scales each
    x_out = 2 * 1024 * 2
    caches = 2 * 2 * (3 * 2048 + 1024) * 2
    requant = 2 * (1024 + 2 * 2048)  # x and the activation's output as 1-byte copies, write+read
    assert roofline(p, 1, CEIL).bytes == pytest.approx(weights + x_out + caches + requant + 16)
    # Large square layer: compute-bound at the fp8 peak (1e15), half the bf16 floor.
    big = Problem(E=8, N=4096, K=4096, topk=2, dtype="bfloat16", quant="fp8_w8a8")
    flops = 2 * 4096 * 2 * 3 * 4096 * 4096
    assert roofline(big, 4096, CEIL).bound == "compute"
    assert floor_us(big, 4096, CEIL) == pytest.approx(flops / 1e15 * 1e6, rel=1e-12)


def test_no_floor_without_a_gpu():
    ceilings = measure_ceilings("cpu")
    assert ceilings == Ceilings(None, None, None, None, None) and not ceilings.available
    with pytest.raises(ValueError, match="floor is not available"):
        floor_us(TINY, 1, ceilings)


# --- naive loop -------------------------------------------------------------------------------

# (problem, bound, why the bound): the naive loop rounds differently from the reference.
NAIVE_CASES = [
    pytest.param(TINY, 8e-3, id="fp16-topk2"),  # 4× fp16's 2e-3: extra roundings in the sum
    pytest.param(Problem(5, 48, 80, 1, "float16"), 8e-3, id="fp16-topk1-primeE"),
    pytest.param(  # 4× fp32's 1e-4
        Problem(4, 32, 64, 2, "float32", bias=True, activation="swigluoai"), 4e-4, id="fp32-bias"
    ),
    # w8a8: against the reference of what the loop computes (dequantized weights, activations
    # not quantized), with fp16's factor.
    pytest.param(Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8"), 8e-3, id="fp8-w8a8"),
    pytest.param(Problem(4, 32, 64, 2, "float16", quant="int8_w8a16"), 8e-3, id="int8-w8a16"),
]


def _row_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-12)).max())


@pytest.mark.parametrize(("problem", "bound"), NAIVE_CASES)
@pytest.mark.parametrize("skew", ["uniform", "one-hot"])  # one-hot: experts with no token
def test_naive_moe_agrees_with_the_reference(problem, bound, skew):
    args, kw = random_moe_inputs(problem, 13, "cpu", skew=skew)
    d_args, d_kw = dequantized_for_naive(args, kw)  # what the loop computes; as is unquantized
    ref = fused_experts_reference(*d_args, **d_kw)
    assert _row_err(naive_moe(args, kw), ref) < bound
    # The bound discriminates: router weights off by 2× must fail it.
    x, w1, w2, tw, ti = args
    assert _row_err(naive_moe((x, w1, w2, tw * 0.5, ti), kw), ref) > bound


# --- run_bench --------------------------------------------------------------------------------

OTHER_CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
                "num_warps": 4, "num_stages": 2}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour")
def test_run_bench_tiny_problem_in_the_interpreter():
    result = run_bench(TINY, [1, 5], device="cpu", table_config=lambda M: OTHER_CONFIG, replays=1)
    assert [r.M for r in result.rows] == [1, 5]  # 5: not a power of two, below BLOCK_SIZE_M
    for r in result.rows:
        for v in (r.default, r.tuned, r.naive):
            assert v.ok, v.reason
            assert v.us is not None and v.us > 0
            assert v.timing.method == "host-clock"
        assert r.tuned.config == OTHER_CONFIG and r.default.config != OTHER_CONFIG
        assert r.floor is None and r.tuned_over_floor is None
        assert r.speedup_vs_default and r.speedup_vs_naive
    assert result.interpreter and result.tuned_source == "given"
    assert "not GPU timings" in result.note and "no floor" in result.note
    assert result.provenance["interpreter"] is True and "torch" in result.provenance
    json.dumps(result.as_dict(), allow_nan=False)


def test_a_failing_check_reports_no_timing(monkeypatch, device):
    """A wrong output (here: the tuned config's, scaled by 1.01) marks its variant failed."""
    real = bench_mod.fused_experts

    def wrong_for_other(*args, config, **kw):
        out = real(*args, config=config, **kw)
        return out * 1.01 if config == OTHER_CONFIG else out

    monkeypatch.setattr(bench_mod, "fused_experts", wrong_for_other)
    result = run_bench(TINY, [3], device=device, table_config=lambda M: OTHER_CONFIG, replays=1)
    (row,) = result.rows
    assert row.default.ok and row.naive.ok
    assert not row.tuned.ok and row.tuned.reason.startswith("check failed")
    assert row.tuned.us is None and row.tuned.timing is None
    assert row.speedup_vs_default is None and row.speedup_vs_naive is None and not row.ok


# --- CLI --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour")
def test_cli_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "1,3", "--replays", "1", "--json"]  # fmt: skip
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    stem = tmp_path / "results" / "bench" / "cpu_interpreter-E4-N32-K64-top2-float16"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert [r["M"] for r in saved["rows"]] == [r["M"] for r in payload["rows"]] == [1, 3]
    assert saved["interpreter"] and "no floor" in saved["note"]
    assert all(r["floor"] is None and r["tuned"]["us"] > 0 for r in saved["rows"])
    assert saved["provenance"]["torch"] == torch.__version__
    if importlib.util.find_spec("matplotlib") is not None:
        assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        assert payload["png"] == str(stem.with_suffix(".png").relative_to(tmp_path))
    # A second run keeps the first one's measurement under .old instead of writing over it.
    again = runner.invoke(_app(), [*args[:-1]])
    assert again.exit_code == 0, again.output
    old = stem.with_name(stem.name + ".json.old")
    assert json.loads(old.read_text()) == saved and "kept the earlier" in again.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter behaviour")
def test_cli_static_scales_runs_every_variant_with_them(tmp_path, monkeypatch):
    """--static-scales: the op (default and tuned) and the reference run with the calibrated
    static activation scales (the naive loop computes in the compute dtype and needs none),
    every variant passes its check, and the outputs say so by name."""
    from moetune import bench, reference

    monkeypatch.chdir(tmp_path)
    scales_seen: list[bool] = []
    real_op, real_ref = bench.fused_experts, reference.fused_experts_reference

    def op(*args, **kw):
        scales_seen.append(kw.get("a1_scale") is not None and kw.get("a2_scale") is not None)
        return real_op(*args, **kw)

    def ref(*args, **kw):
        scales_seen.append(kw.get("a1_scale") is not None and kw.get("a2_scale") is not None)
        return real_ref(*args, **kw)

    monkeypatch.setattr(bench, "fused_experts", op)
    monkeypatch.setattr(reference, "fused_experts_reference", ref)
    monkeypatch.delenv("MOETUNE_FP8_ACCUM", raising=False)
    args = ["bench", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--quant", "fp8_w8a8", "--static-scales", "--batch-sizes", "2", "--replays", "1",
            "--json"]  # fmt: skip
    result = runner.invoke(_app(), args)
    assert result.exit_code == 0, result.output
    stem = (
        tmp_path / "results" / "bench" / "cpu_interpreter-E4-N32-K64-top2-float16-fp8_w8a8-static"
    )
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["static_scales"] is True
    assert saved["provenance"]["fp8_accum"] == "auto"  # the op's fp8 accumulation mode
    row = saved["rows"][0]
    assert all(row[v]["ok"] for v in ("default", "tuned", "naive")), row
    assert scales_seen and all(scales_seen)


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert save_plot(None, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_help_has_an_example():
    result = runner.invoke(_app(), ["bench", "--help"])
    assert result.exit_code == 0
    assert "Example: moetune bench" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--skew", "bimodal"], "--skew must be one of uniform, zipf, one-hot"),
        (["--replays", "0"], "--replays must be a positive integer"),
        (["--batch-sizes", "1,x"], "comma-separated"),
        (["--E", "4", "--N", "32"], "missing --K, --topk"),
        (["--model", "NoSuchModel"], "unknown model preset"),
        (
            [
                "--E",
                "4",
                "--N",
                "32",
                "--K",
                "64",
                "--topk",
                "2",
                "--dtype",
                "float16",
                "--static-scales",
            ],
            "--static-scales needs --quant fp8_w8a8",
        ),
    ],
)
def test_mistakes_give_one_error_line(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(_app(), ["bench", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and match in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists()  # nothing ran


@pytest.mark.gpu
def test_gpu_floor_is_a_lower_bound_and_the_naive_loop_runs_without_a_graph():
    """On a GPU: ceilings are plausible, no timing beats its floor, and the naive loop, whose
    per-expert nonzero a graph cannot capture, falls back to CUDA events (the rows after it
    still run: the failed capture leaves the device usable)."""
    p = Problem(E=8, N=1024, K=1024, topk=2, dtype="bfloat16")
    result = run_bench(p, [1, 512], device="cuda", replays=10)
    c = result.ceilings
    assert c.available and 1e11 < c.bandwidth_Bps < 2e13 and 1e13 < c.bf16_flops < 1e16
    for r in result.rows:
        assert r.ok, [v.reason for v in (r.default, r.tuned, r.naive)]
        assert r.default.timing.method == "cuda-graph" and r.naive.timing.method == "cuda-events"
        assert r.tuned_over_floor >= 1.0 and r.default.us >= r.floor.us
    torch.randn(4, device="cuda")  # no failed capture left the CUDA generator in capture state


def test_tuned_variant_runs_the_down_table_too(tmp_path, monkeypatch, device):
    """With a main table and a _down table for the problem, 'tuned' is what the op would run:
    both configs, the down one from the _down table."""
    from moetune.platform import detect_platform
    from moetune.tables import gemm_suffix, table_filename, write_table

    up = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
          "num_warps": 4, "num_stages": 2}  # fmt: skip
    name_of = detect_platform().device_name  # the lookup's name: cpu_interpreter without a GPU
    for gemm, cfg in (("up", up), ("down", OTHER_CONFIG)):
        name = table_filename(TINY.E, TINY.N, name_of, None, None, suffix=gemm_suffix(gemm))
        write_table(tmp_path / name, {1: cfg}, triton_version="3.9.0")
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(tmp_path))
    result = run_bench(TINY, [1], device=device, replays=1)
    assert result.tuned_source == "table"
    tuned = result.rows[0].tuned
    assert tuned.ok, tuned.reason
    assert tuned.config == up and tuned.config_down == OTHER_CONFIG
