"""Export from hand-written journals: which record becomes a table entry, and the _down table."""

import json
from pathlib import Path

from moetune.export import best_entries

CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
       "num_warps": 4, "num_stages": 2}  # fmt: skip
PROBLEM = {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16", "quant": None,
           "block_shape": None, "per_channel": False, "bias": False,
           "activation": "silu"}  # fmt: skip


def _cfg(**kw) -> dict:
    return {**CFG, **kw}


def _header(**extra) -> dict:
    return {"kind": "moetune-journal", "problem": PROBLEM, "device_name": "cpu_interpreter",
            "interpreter": True, "triton": "3.9.0", "space_id": "abc", "moetune": "0.1.0",
            **extra}  # fmt: skip


def _ok(key: str, M: int, us: float, config: dict, **extra) -> dict:
    return {"candidate": key, "M": M, "status": "ok", "config": config,
            "timing": {"median_us": us}, **extra}  # fmt: skip


def _winner(key: str, M: int, us: float, config: dict, **extra) -> dict:
    return {"kind": "winner", "M": M, "winner": key, "config": config,
            "timing": {"median_us": us}, "recheck": {"ok": True}, **extra}  # fmt: skip


def _journal(path: Path, header: dict, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in [header, *records]))
    return path


def test_winner_outranks_a_faster_first_pass_record(tmp_path):
    """The first pass times with few replays and a record may fail the re-check: a faster
    first-pass time must not put an unchecked config in the table once a winner exists."""
    lucky, checked = _cfg(BLOCK_SIZE_N=16), _cfg(BLOCK_SIZE_N=32)
    j = _journal(tmp_path / "j.jsonl", _header(), [
        _ok("a", 1, 5.0, lucky), _ok("b", 1, 9.0, checked), _winner("b", 1, 8.0, checked),
        _ok("a", 8, 5.0, lucky),  # no winner at M=8 (unfinished): the fastest ok counts
    ])  # fmt: skip
    _, entries = best_entries([j])
    assert entries == {1: checked, 8: lucky}
