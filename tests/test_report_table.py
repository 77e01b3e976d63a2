"""benchmarks/report_table.py: the ratio report from bench JSON files."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report_table", ROOT / "benchmarks/report_table.py")
report_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_table)


def _row(M, default, tuned, floor):
    return {"M": M, "ok": True, "default": {"ok": True, "us": default},
            "tuned": {"ok": True, "us": tuned}, "floor": {"us": floor},
            "tuned_over_floor": tuned / floor, "speedup_vs_default": default / tuned}  # fmt: skip


def _bench(tmp_path, name, problem, rows, **extra):
    path = tmp_path / name
    bench = {"problem": problem, "rows": rows, "static_scales": False,
             "provenance": {"gpu": "NVIDIA H100 80GB HBM3"}, **extra}  # fmt: skip
    path.write_text(json.dumps(bench))
    return path


QWEN3 = {"E": 128, "N": 384, "K": 2048, "topk": 8, "dtype": "bfloat16", "quant": None}


SEVEN = [1, 8, 32, 128, 512, 2048, 4096]


def test_report_geomeans_worst_and_reference(tmp_path):
    rows = [_row(M, 40.0, 36.0, 12.0) if M == 1 else _row(M, 110.0, 100.0, 80.0) for M in SEVEN]
    a = _bench(tmp_path, "a.json", QWEN3, rows, tuned_source="table",
               table="/x/configs/E=128,N=384,device_name=H.json")  # fmt: skip
    fp8 = [_row(M, 50.0, 50.0, 10.0) for M in SEVEN]
    b = _bench(tmp_path, "b.json", {**QWEN3, "quant": "fp8_w8a8"}, fp8, tuned_source="default",
               static_scales=True)  # fmt: skip
    text = report_table.report([a, b])
    gm = math.exp((math.log(3.0) + 6 * math.log(1.25)) / 7)
    assert f"| Qwen3-30B-A3B TP2 bf16 | {gm:.2f} | 3.00 |" in text and "| 1.45 |" in text
    assert "| Qwen3-30B-A3B TP2 fp8_w8a8 | 5.00 | 5.00 | 1.00× | 1.86 | no table: default" in text
    assert "E=128,N=384,device_name=H.json" in text
    assert f"Overall (geomean of the rows above): {math.sqrt(gm * 5.0):.2f}; vLLM " in text
    assert "| 8 | 110.0 | 100.0 | 80.0 | 1.25 | 1.10× |" in text


def test_report_compares_with_vllm_only_under_its_conditions(tmp_path):
    """zipf routing, dynamic fp8 scales or other batch sizes are not what vLLM's figure was."""
    rows = [_row(M, 40.0, 36.0, 12.0) for M in SEVEN]
    zipf = _bench(tmp_path, "z.json", QWEN3, rows, skew="zipf", tuned_source="table")
    dyn = _bench(tmp_path, "d.json", {**QWEN3, "quant": "fp8_w8a8"}, rows, tuned_source="table")
    few = _bench(tmp_path, "f.json", QWEN3, rows[:3], tuned_source="table")
    text = report_table.report([zipf, dyn, few])
    assert "| Qwen3-30B-A3B TP2 bf16, zipf routing | 3.00 | 3.00 | 1.11× |  |" in text
    assert "| Qwen3-30B-A3B TP2 fp8_w8a8, dynamic scales | 3.00 | 3.00 | 1.11× |  |" in text
    assert "| Qwen3-30B-A3B TP2 bf16 | 3.00 | 3.00 | 1.11× |  |" in text
    assert "vLLM 1." not in text


def test_report_compares_with_vllm_only_on_an_h100(tmp_path):
    """vLLM's figures are H100 ratios: an H200 run (a lower floor) gets none."""
    rows = [_row(M, 40.0, 36.0, 12.0) for M in SEVEN]
    h200 = _bench(tmp_path, "h.json", QWEN3, rows, tuned_source="table",
                  provenance={"gpu": "NVIDIA H200"})  # fmt: skip
    text = report_table.report([h200])
    assert "| Qwen3-30B-A3B TP2 bf16 | 3.00 | 3.00 | 1.11× |  |" in text
    assert "vLLM 1." not in text and "GPU: NVIDIA H200." in text


def test_report_skips_failed_rows_and_names_unknown_problems(tmp_path):
    bad = _row(1, 40.0, 36.0, 12.0)
    bad["tuned"]["ok"] = False
    naive_failed = {**_row(4, 20.0, 10.0, 8.0), "ok": False}  # the naive loop is not needed
    other = {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16", "quant": None}
    path = _bench(tmp_path, "c.json", other, [bad, naive_failed, _row(16, 20.0, 10.0, 8.0)],
                  tuned_source="given")  # fmt: skip
    text = report_table.report([path])
    assert "| 1 |" not in text and "| 4 |" in text and "| 16 |" in text
    assert "| E4 N32 K64 top2 float16 | 1.25 | 1.25 | 2.00× |  | given configs |" in text
