"""A split sweep's winners timed together (moetune.pairs), from hand-written journals.

What is asserted, and why:

- the pairs timed at a batch size are the winners together (W), the up winner on both GEMMs
  (U), the incumbent on both (I) and the incumbent's up entry with the down winner (V), each
  once;
- by default (vLLM-safe) W and U count only where U, which vLLM runs from the main table, is at
  most 1% slower than I: elsewhere the fastest of I and V replaces the winners, and with none
  passing the winners stand with a warning export repeats;
- the fastest pair that passes a check on fresh inputs counts: W keeps the winners; U or I
  replaces them with ``settled`` records, which export ranks above the per-GEMM winners in
  both tables, even though those show faster times (measured with the other GEMM at the
  heuristic default, they are not comparable);
- a pair that fails its check is passed over for the next; a W that failed on the sweep's
  inputs loses to any passing pair, and with none it stands with a warning;
- settled records count only once a ``pair-choice`` commits them: a sweep killed between the
  appends leaves records that export ignores and that the next run decides again;
- without W timed, nothing changes; a decision is journaled and a second call keeps it.
"""

import json
from pathlib import Path

import pytest

from moetune import pairs
from moetune.export import export_configs
from moetune.gemms import gemm_configs, gemm_of, pair_key
from moetune.journal import read_journal
from moetune.problem import Problem

PROBLEM = Problem(E=4, N=32, K=64, topk=2, dtype="float16")
HEADER = {"kind": "moetune-journal", "device_name": "cpu_interpreter", "interpreter": True,
          "triton": "3.9.0", "space_id": "abc", "moetune": "0.2.6", "gemms": "split",
          "problem": {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16", "quant": None,
                      "block_shape": None, "per_channel": False, "bias": False,
                      "activation": "silu"}}  # fmt: skip


def _cfg(**kw) -> dict:
    return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 2, **kw}  # fmt: skip


UP, DOWN, INC = _cfg(BLOCK_SIZE_N=64), _cfg(BLOCK_SIZE_K=64), _cfg(num_warps=8)
UP_K, DOWN_K, INC_K = "M16-N64-K32-G1-w4-s2", "M16-N32-K64-G1-w4-s2", "M16-N32-K32-G1-w8-s2"


def _final(gemm: str, key: str, us: float, config: dict, ok: bool = True) -> dict:
    return {"candidate": f"final:{gemm}:{key}", "M": 8, "status": "ok", "config": config,
            "timing": {"median_us": us}, "phase": "final", "gemm": gemm,
            "recheck": {"ok": ok}}  # fmt: skip


def _winner(gemm: str, key: str, us: float, config: dict) -> dict:
    extra = {"pair_up": UP, "pair_recheck": {"ok": True}} if gemm == "down" else {}
    return {"kind": "winner", "M": 8, "gemm": gemm, "winner": f"{gemm}:{key}", "config": config,
            "timing": {"median_us": us}, "recheck": {"ok": True}, **extra}  # fmt: skip


def _pair(up_k: str, down_k: str, us: float, up: dict, down: dict, status: str = "ok") -> dict:
    rec = {"candidate": pair_key(up_k, down_k), "M": 8, "status": status, "phase": "pair",
           "gemm": "pair", "config": {"up": up, "down": down}}  # fmt: skip
    rec.update({"timing": {"median_us": us}} if status == "ok" else {"reason": "check failed"})
    return rec


def _journal(tmp_path: Path, records: list[dict]):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [HEADER, *records]))
    return read_journal(path)


def _finished(tmp_path, w_us: float, u_us: float, i_us: float, w_status: str = "ok",
              v_us: float | None = None, u_status: str = "ok"):  # fmt: skip
    """Per-GEMM winners at M=8 (faster on their own than any pair) and the pairs timed (V only
    with ``v_us``)."""
    v = [_pair(INC_K, DOWN_K, v_us, INC, DOWN)] if v_us is not None else []
    return _journal(tmp_path, [
        _final("up", UP_K, 4.0, UP), _final("down", DOWN_K, 3.0, DOWN),
        _winner("up", UP_K, 4.0, UP), _winner("down", DOWN_K, 3.0, DOWN),
        _pair(UP_K, DOWN_K, w_us, UP, DOWN, w_status), _pair(UP_K, UP_K, u_us, UP, UP, u_status),
        _pair(INC_K, INC_K, i_us, INC, INC), *v,
    ])  # fmt: skip


def _settle(journal, monkeypatch, check_ok=lambda up, down: True, winners=None,
            vllm_safe=True, said=None):  # fmt: skip
    """``settle`` at M=8 with a stand-in fresh check; ``winners`` (default: the journal's two
    winner records) are the (up, down) records handed in."""
    checked = []

    def fake_recheck(problem, workload, config, M, seed, config_down=None):
        checked.append((config, config_down))
        ok = check_ok(config, config_down)
        return {"ok": ok, "reason": "" if ok else "wrong"}

    monkeypatch.setattr(pairs, "recheck", fake_recheck)
    up, down = winners or [r for r in journal.records if r.get("kind") == "winner"]
    got = pairs.settle(PROBLEM, lambda: None, journal, 8, up, down,
                       said.append if said is not None else None, incumbent=INC,
                       vllm_safe=vllm_safe)  # fmt: skip
    return got, checked


def test_options_are_the_winners_the_up_winner_the_incumbent_and_its_up_once_each():
    up, down = _winner("up", UP_K, 4.0, UP), _winner("down", DOWN_K, 3.0, DOWN)
    got = dict(pairs.options(up, down, INC))
    assert got == {pair_key(UP_K, DOWN_K): {"up": UP, "down": DOWN},
                   pair_key(UP_K, UP_K): {"up": UP, "down": UP},
                   pair_key(INC_K, INC_K): {"up": INC, "down": INC},
                   pair_key(INC_K, DOWN_K): {"up": INC, "down": DOWN}}  # fmt: skip
    assert len(dict(pairs.options(up, down, UP))) == 2, "the incumbent is the up winner: once"
    assert len(dict(pairs.options(up, {**down, "winner": "down:" + UP_K}, None))) == 1
    assert pairs.config_name({"BLOCK_SIZE_M": 16}) == "incumbent"
    key = pair_key(UP_K, DOWN_K)
    assert gemm_of(key) == "pair"
    assert gemm_configs(PROBLEM, key, {"up": UP, "down": DOWN}, 8) == (UP, DOWN)


def test_the_winners_stand_when_their_pair_is_fastest(tmp_path, monkeypatch):
    j = _finished(tmp_path, w_us=10.0, u_us=11.0, i_us=12.0)
    (up, down), checked = _settle(j, monkeypatch)
    # W stands, but U (what vLLM runs) is slower than I: the sweep says so.
    said = []
    (tmp_path / "b").mkdir()
    j2 = _finished(tmp_path / "b", w_us=10.0, u_us=12.0, i_us=11.0)
    up2, down2 = [r for r in j2.records if r.get("kind") == "winner"]
    got = pairs.settle(PROBLEM, lambda: None, j2, 8, up2, down2, said.append, incumbent=INC,
                       vllm_safe=False)  # fmt: skip
    assert got == (up2, down2)
    assert "the winners stand" in said[0] and "vLLM" in said[0] and "9.1% slower" in said[0]
    assert (up["config"], down["config"]) == (UP, DOWN) and not up.get("settled")
    assert checked == []
    assert pairs.pair_time(j, 8, up, down) == 10.0, "the pair's time, not either winner's own"
    assert j.records[-1] == {"kind": "pair-choice", "M": 8, "chosen": pair_key(UP_K, DOWN_K),
                             "kept": True, "vllm_safe": True}  # fmt: skip


@pytest.mark.parametrize(("u_us", "i_us", "want"), [(9.0, 12.0, (UP, UP)), (11.0, 8.0, (INC, INC))])
def test_a_faster_pair_replaces_the_winners_and_export_takes_it(tmp_path, monkeypatch, u_us,
                                                                i_us, want):  # fmt: skip
    j = _finished(tmp_path, w_us=10.0, u_us=u_us, i_us=i_us)
    (up, down), checked = _settle(j, monkeypatch)
    assert (up["config"], down["config"]) == want and up["settled"] and down["settled"]
    assert checked == [want], "the replacing pair is checked on fresh inputs first"
    assert down["pair_up"] == want[0] and up["timing"]["median_us"] == min(u_us, i_us)
    assert pairs.pair_time(j, 8, up, down) == min(u_us, i_us)
    res = export_configs([j.path], tmp_path / "out")
    assert res.entries == {8: want[0]} and res.down_entries == {8: want[1]}
    n = len(read_journal(j.path).records)
    again = read_journal(j.path)
    w = {r["gemm"]: r for r in again.records if r.get("kind") == "winner"}  # the last of each
    assert pairs.settle(PROBLEM, lambda: None, again, 8, w["up"], w["down"]) == (w["up"], w["down"])
    assert len(again.records) == n, "a second call decided again"


def test_a_pair_that_fails_its_check_is_passed_over(tmp_path, monkeypatch):
    j = _finished(tmp_path, w_us=10.0, u_us=8.05, i_us=8.0)  # U within 1% of I: vLLM-safe
    (up, down), checked = _settle(j, monkeypatch, check_ok=lambda u, d: u != INC)
    assert checked == [(INC, INC), (UP, UP)]
    assert (up["config"], down["config"]) == (UP, UP)
    failed = [r for r in j.records if r.get("kind") == "recheck-failed"]
    assert [r["failed"] for r in failed] == [pair_key(INC_K, INC_K)]


def test_nothing_changes_without_the_winners_pair_timed(tmp_path, monkeypatch):
    j = _journal(tmp_path, [_winner("up", UP_K, 4.0, UP), _winner("down", DOWN_K, 3.0, DOWN),
                            _pair(INC_K, INC_K, 1.0, INC, INC)])  # fmt: skip
    n = len(j.records)
    (up, down), checked = _settle(j, monkeypatch)
    assert (up["config"], down["config"]) == (UP, DOWN) and checked == [] and len(j.records) == n


@pytest.mark.parametrize(("u_us", "ok_pairs", "want", "warned"), [
    (9.0, {"U", "I"}, (UP, UP), False),  # W failed: the fastest passing pair, though slower
    (9.0, set(), (UP, DOWN), True),  # nothing else passes: W stands, with a warning
])  # fmt: skip
def test_a_winners_pair_that_failed_its_check_loses(tmp_path, monkeypatch, u_us, ok_pairs, want,
                                                    warned):  # fmt: skip
    j = _finished(tmp_path, w_us=5.0, u_us=u_us, i_us=12.0, w_status="rejected")

    def name(u):
        return "U" if u == UP else "I" if u == INC else None

    (up, down), _ = _settle(j, monkeypatch, check_ok=lambda u, d: name(u) in ok_pairs)
    assert (up["config"], down["config"]) == want
    choice = j.records[-1]
    assert choice["kind"] == "pair-choice" and ("warning" in choice) == warned
    assert pairs.pair_time(j, 8, up, down) == (u_us if want == (UP, UP) else None)


def test_settled_records_count_only_once_committed(tmp_path, monkeypatch):
    """A sweep killed after its settled records but before the pair-choice: export ignores
    them (the per-GEMM winners count), and the next run decides again."""
    j = _finished(tmp_path, w_us=10.0, u_us=11.0, i_us=8.0)
    (up, _), _ = _settle(j, monkeypatch)
    assert up["settled"]
    lines = j.path.read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "pair-choice"
    j.path.write_text("\n".join(lines[:-2]) + "\n")  # killed after the settled up record
    res = export_configs([j.path], tmp_path / "out")
    assert res.entries == {8: UP} and res.down_entries == {8: DOWN}
    again = read_journal(j.path)
    assert not pairs.decided(again, 8)
    orig = [r for r in again.records if r.get("kind") == "winner" and not r.get("settled")]
    (up2, down2), _ = _settle(again, monkeypatch, winners=orig)
    assert (up2["config"], down2["config"]) == (INC, INC)
    res = export_configs([j.path], tmp_path / "out2")
    assert res.entries == {8: INC} and res.down_entries == {8: INC}


def test_pairs_timed_for_other_winners_or_incumbents_do_not_count(tmp_path, monkeypatch):
    """An earlier run's pair (a down winner that lost its check with the up winner, or another
    incumbent) is faster than W but is none of this run's W, U or I: it is ignored."""
    stale = _cfg(BLOCK_SIZE_N=128)
    j = _finished(tmp_path, w_us=10.0, u_us=11.0, i_us=12.0)
    j.append(_pair(UP_K, "M16-N128-K32-G1-w4-s2", 5.0, UP, stale))
    (up, down), checked = _settle(j, monkeypatch)
    assert (up["config"], down["config"]) == (UP, DOWN) and checked == []
    said = []
    (tmp_path / "b").mkdir()
    j2 = _finished(tmp_path / "b", w_us=10.0, u_us=11.0, i_us=12.0)
    up2, down2 = [r for r in j2.records if r.get("kind") == "winner"]
    pairs.settle(PROBLEM, lambda: None, j2, 8, up2, down2, said.append, incumbent=None)
    assert "vLLM" not in said[0], "no incumbent given: nothing to compare U with"


def test_export_warns_about_a_winners_pair_that_failed(tmp_path, monkeypatch):
    j = _finished(tmp_path, w_us=5.0, u_us=9.0, i_us=12.0, w_status="rejected")
    _settle(j, monkeypatch, check_ok=lambda u, d: False)
    res = export_configs([j.path], tmp_path / "out")
    assert any("M=8" in w and "failed its check" in w for w in res.warnings)


@pytest.mark.parametrize(("v_us", "want"), [(10.5, (INC, DOWN)), (None, (INC, INC))])
def test_vllm_safe_keeps_the_incumbents_entry_where_vllm_would_run_slower(
    tmp_path, monkeypatch, v_us, want
):
    """W is the fastest, but U (the up winner on both GEMMs, what vLLM runs from the main
    table) is 9% slower than I: the fastest pair whose up entry is the incumbent's (V, else I)
    replaces the winners, so the main table keeps the incumbent's entry; export takes it."""
    j = _finished(tmp_path, w_us=10.0, u_us=12.0, i_us=11.0, v_us=v_us)
    said: list[str] = []
    (up, down), checked = _settle(j, monkeypatch, said=said)
    assert (up["config"], down["config"]) == want and up["settled"]
    assert checked == [want]
    assert "vLLM-safe" in said[0] and "9.1% slower" in said[0]
    res = export_configs([j.path], tmp_path / "out")
    assert res.entries == {8: INC} and res.down_entries == {8: want[1]}
    assert not res.warnings


def test_vllm_safe_passes_over_an_up_winner_that_failed_on_both(tmp_path, monkeypatch):
    """U failed its check: vLLM would run an entry that fails on the down GEMM. W, though the
    fastest, does not count; V does."""
    j = _finished(tmp_path, w_us=10.0, u_us=9.0, i_us=12.0, v_us=11.0, u_status="rejected")
    (up, down), _ = _settle(j, monkeypatch)
    assert (up["config"], down["config"]) == (INC, DOWN)


def test_an_up_winner_that_failed_on_both_is_unsafe_without_an_incumbent(tmp_path, monkeypatch):
    """No incumbent to compare with, but U failed its check: vLLM would run an entry that fails
    on the down GEMM. Nothing safe is left (no I, no V): W stands, with a warning."""
    j = _journal(tmp_path, [_winner("up", UP_K, 4.0, UP), _winner("down", DOWN_K, 3.0, DOWN),
                            _pair(UP_K, DOWN_K, 10.0, UP, DOWN),
                            _pair(UP_K, UP_K, 9.0, UP, UP, "rejected")])  # fmt: skip
    up, down = [r for r in j.records if r.get("kind") == "winner"]
    said: list[str] = []
    got = pairs.settle(PROBLEM, lambda: None, j, 8, up, down, said.append, incumbent=None)
    assert got == (up, down) and "no vLLM-safe pair passed" in said[0]
    assert "vLLM-safe" in j.records[-1]["warning"] and j.records[-1]["vllm_safe"] is True


def test_vllm_safe_with_nothing_safe_passing_keeps_the_winners_and_warns(tmp_path, monkeypatch):
    j = _finished(tmp_path, w_us=10.0, u_us=12.0, i_us=11.0, v_us=10.5)
    said: list[str] = []
    (up, down), checked = _settle(j, monkeypatch, check_ok=lambda u, d: u != INC, said=said)
    assert (up["config"], down["config"]) == (UP, DOWN) and not up.get("settled")
    assert checked == [(INC, DOWN), (INC, INC)]
    assert "no vLLM-safe pair passed" in said[0]
    res = export_configs([j.path], tmp_path / "out")
    assert any("M=8" in w and "vLLM-safe" in w for w in res.warnings)


def test_no_vllm_safe_takes_the_fastest_pair(tmp_path, monkeypatch):
    j = _finished(tmp_path, w_us=10.0, u_us=12.0, i_us=11.0, v_us=10.5)
    (up, down), checked = _settle(j, monkeypatch, vllm_safe=False)
    assert (up["config"], down["config"]) == (UP, DOWN) and checked == []
