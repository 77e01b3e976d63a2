"""The decode re-tune's scripts: retune_points.py lists the entries a re-tune changed, for
close_configs.py; merge_confirmed.py merges only those confirmed faster in the interleaved
timing, from the re-tune's journals."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "merge_confirmed", ROOT / "benchmarks/merge_confirmed.py"
)
merge_confirmed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_confirmed)
spec = importlib.util.spec_from_file_location("retune_points", ROOT / "benchmarks/retune_points.py")
retune_points = importlib.util.module_from_spec(spec)
spec.loader.exec_module(retune_points)

CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
       "num_warps": 4, "num_stages": 2}  # fmt: skip
HEADER = {"kind": "moetune-journal", "device_name": "cpu_interpreter", "interpreter": True,
          "triton": "3.9.0", "space_id": "abc", "moetune": "0.2.12",
          "problem": {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16", "quant": None,
                      "block_shape": None, "per_channel": False, "bias": False,
                      "activation": "silu"}}  # fmt: skip


def _point(M: int, median: float, hi: float, new: str = "M16-N16-K32-G1-w4-s2") -> dict:
    row = {"config": "M16-N32-K32-G1-w4-s2", "median_us": 1.0, "ratio_median": 1.0,
           "ratio_min": 1.0, "ratio_max": 1.0}  # fmt: skip
    timed = {**row, "config": new, "ratio_median": median, "ratio_min": median - 0.01,
             "ratio_max": hi}  # fmt: skip
    return {"M": M, "rows": [row, timed, row]}


@pytest.mark.parametrize(
    ("median", "hi", "merged"),
    [(0.95, 0.97, True), (0.99, 0.995, True), (0.995, 0.998, False), (0.97, 1.002, False)],
)  # fmt: skip
def test_confirmed_needs_one_percent_and_every_round(median, hi, merged):
    assert merge_confirmed.confirmed(_point(1, median, hi)) is merged


def test_only_confirmed_batch_sizes_are_merged(tmp_path):
    from moetune.export import export_configs
    from moetune.tables import load_table

    def journal(path: Path, winners: dict[int, dict]) -> Path:
        lines = [HEADER] + [{"kind": "winner", "M": M, "winner": "w", "config": c,
                             "timing": {"median_us": 1.0}, "recheck": {"ok": True}}
                            for M, c in winners.items()]  # fmt: skip
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return path

    configs, journals, confirm = tmp_path / "configs", tmp_path / "j", tmp_path / "c"
    journals.mkdir(), confirm.mkdir()
    shipped = {1: CFG, 2: CFG, 8: CFG}
    export_configs([journal(tmp_path / "old.jsonl", shipped)], configs)
    new = {M: {**CFG, "BLOCK_SIZE_N": 16} for M in (1, 2)}
    journal(journals / "tiny-m1.jsonl", {1: new[1]})
    journal(journals / "tiny-m2.jsonl", {2: new[2]})
    for p in journals.iterdir():  # the journals results/ keeps are gzipped
        (journals / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()
    (confirm / "tiny.json").write_text(json.dumps({"points": [
        _point(1, 0.95, 0.97, new="M16-N64-K32-G1-w4-s2"), _point(2, 1.0, 1.01)]}))  # fmt: skip
    with pytest.raises(SystemExit, match="is not M16-N64"):  # not the config that was timed
        merge_confirmed.main(confirm, journals, configs)
    (confirm / "tiny.json").write_text(json.dumps({"points": [
        _point(1, 0.95, 0.97), _point(2, 1.0, 1.01)]}))  # fmt: skip
    merge_confirmed.main(confirm, journals, configs)
    table = load_table(configs / "E=4,N=32,device_name=cpu_interpreter.json")
    assert table.entries == {1: new[1], 2: CFG, 8: CFG}


def test_retune_points_lists_changed_entries_for_close_configs(tmp_path):
    from moetune.export import export_configs

    def journal(path: Path, winners: dict[int, dict]) -> Path:
        lines = [HEADER] + [{"kind": "winner", "M": M, "winner": "w", "config": c,
                             "timing": {"median_us": 1.0}, "recheck": {"ok": True}}
                            for M, c in winners.items()]  # fmt: skip
        path.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
        return path

    configs, journals = tmp_path / "configs", tmp_path / "j"
    journals.mkdir()
    export_configs([journal(tmp_path / "old.jsonl.gz", {1: CFG, 2: CFG})], configs)
    new = {**CFG, "BLOCK_SIZE_N": 16}
    journal(journals / "Tiny-tp2-fp8_w8a8-m1.jsonl.gz", {1: new})
    journal(journals / "Tiny-tp2-fp8_w8a8-m2-4.jsonl.gz", {2: CFG})  # unchanged: no point
    (journals / "notes.txt").write_text("not a journal")
    (line,) = retune_points.points(journals, configs)
    assert line == ("Tiny-tp2-fp8_w8a8 --model Tiny --tp 2 --quant fp8_w8a8 "
                    "--point 1:M16-N32-K32-G1-w4-s2,M16-N16-K32-G1-w4-s2")  # fmt: skip
