"""benchmarks/target_budget.py: what a geomean target asks of each band of batch sizes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("target_budget", ROOT / "benchmarks/target_budget.py")
tb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tb)

QWEN3 = {"E": 128, "N": 384, "K": 2048, "topk": 8, "dtype": "bfloat16", "quant": None}
# M: (tuned µs, floor µs)
ROWS = {1: (30.0, 10.0), 8: (44.0, 40.0), 512: (100.0, 100.0), 2048: (150.0, 100.0)}


def _file(tmp_path: Path) -> Path:
    rows = [
        {"M": M, "tuned": {"ok": True, "us": t}, "floor": {"us": f}} for M, (t, f) in ROWS.items()
    ]
    rows.append({"M": 4096, "tuned": {"ok": False, "us": None}, "floor": {"us": 200.0}})
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"problem": QWEN3, "rows": rows}))
    return path


def test_points_skip_failed_rows_and_shares_sum_to_the_log_excess(tmp_path):
    pts = tb.points([_file(tmp_path)])
    assert [(p.M, p.ratio) for p in pts] == [(1, 3.0), (8, 1.1), (512, 1.0), (2048, 1.5)]
    sh = tb.shares(pts, 1.10)
    assert sh["M=1"] == pytest.approx(math.log(3.0 / 1.1))
    assert sh["8<=M<=512"] == pytest.approx(math.log(1.0 / 1.1))  # 1.1 at M=8 adds nothing
    assert sh["M>=2048"] == pytest.approx(math.log(1.5 / 1.1))
    overall = math.exp(math.log(3.0 * 1.1 * 1.0 * 1.5) / 4)
    assert sum(sh.values()) == pytest.approx(4 * math.log(overall / 1.1))


def test_what_if_caps_each_band_and_keeps_points_below_a_cap(tmp_path):
    pts = tb.points([_file(tmp_path)])
    assert tb.what_if(pts, None, None, None) == pytest.approx((3.0 * 1.1 * 1.5) ** 0.25)
    # M=1 at floor + 2 µs = 1.2; the middle at 1.05 (512 stays at 1.0); M >= 2048 at 1.25
    want = (1.2 * 1.05 * 1.0 * 1.25) ** 0.25
    assert tb.what_if(pts, 2.0, 1.05, 1.25) == pytest.approx(want)
    # a cap above a point's ratio leaves it
    assert tb.what_if(pts, 100.0, 2.0, 2.0) == pytest.approx((3.0 * 1.1 * 1.5) ** 0.25)


def test_report_says_whether_the_target_is_met(tmp_path):
    text = tb.report(tb.points([_file(tmp_path)]), 1.10)
    assert "4 points; geomean time/floor 1.492, target 1.10." in text
    assert "| as measured | as measured | as measured | 1.492 | no |" in text
    assert "| 2 µs | 1 | 1.17 | " in text
    g = (1.2 * 1.0 * 1.0 * 1.17) ** 0.25
    assert f"| 2 µs | 1 | 1.17 | {g:.3f} | yes |" in text
