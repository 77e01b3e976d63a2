"""Halving's survivors: by --keep fraction, or as many as fit --budget."""

from moetune.halving import (
    affordable_pairs,
    anchors,
    incumbent_pairs,
    pair_seconds,
    survivors_within,
    take_within,
)
from moetune.journal import Journal


def test_anchors_are_the_smallest_a_middle_and_the_largest():
    assert anchors([64, 1, 8, 4096, 512]) == [1, 64, 4096]


def test_pair_seconds_share_the_time_over_parallel_workers():
    recs = [{"eval_s": 0.02}, {"eval_s": 0.04}, {"status": "pruned"}]
    assert abs(pair_seconds(recs, 1) - 0.03) < 1e-12
    assert abs(pair_seconds(recs, 3) - 0.01) < 1e-12
    assert pair_seconds([{"status": "pruned"}], 2) is None


def test_affordable_pairs_pay_the_fixed_work_first():
    assert affordable_pairs(100.0, 40.0, 0.5, 20) == 100  # (100 - 40 - 10) / 0.5
    assert affordable_pairs(100.0, 99.0, 0.5, 20) == 0  # over budget: nothing left


def test_take_within_grows_every_ranking_together_and_keeps_a_minimum():
    ranked = [["a", "b", "c", "d", "e", "f"], ["b", "a", "g", "h", "i", "j"]]
    # top-4 of both: a b c d g h (6 candidates x 2 pairs = 12) fits 13; top-5 adds e, i (16).
    assert take_within(ranked, 2, 13) == {"a", "b", "c", "d", "g", "h"}
    assert take_within(ranked, 2, 16) == {"a", "b", "c", "d", "e", "g", "h", "i"}
    assert take_within(ranked, 2, 0) == {"a", "b", "c", "d", "g", "h"}, "the minimum goes on"
    assert take_within(ranked, 2, 10**6) == set("abcdefghij")
    assert take_within([], 2, 100) == set()


def _journal(tmp_path, records):
    j = Journal(tmp_path / "j.jsonl", {})
    j.records = records
    return j


def _ok(key, M, us, eval_s=0.1):
    return {"candidate": key, "M": M, "status": "ok", "timing": {"median_us": us},
            "eval_s": eval_s}  # fmt: skip


def test_survivors_within_budget_count_from_the_anchor_times(tmp_path):
    keys = [f"c{i}" for i in range(10)]
    recs = [_ok(k, M, us=i + (M == 64) * (9 - 2 * i)) for i, k in enumerate(keys) for M in (1, 64)]
    journal = _journal(tmp_path, recs)
    keyed = [(k, None) for k in keys]
    # 0.1 s a pair on one worker; 60 s budget, 10 s spent, fixed work 100 pairs (10 s): room
    # for 400 pairs = 40 candidates x 10 batch sizes: everyone.
    everyone, how = survivors_within(journal, keyed, [1, 64], 10, 60.0, 10.0, 1, 100, 0.25)
    assert [k for k, _ in everyone] == keys and "room for 400 pairs" in how
    # 2 workers halve the pair cost: same answer with half the budget left.
    assert len(survivors_within(journal, keyed, [1, 64], 10, 35.0, 10.0, 2, 100, 0.25)[0]) == 10
    # Room for 60 pairs = 6 candidates; the top 4 at M=1 (c0-c3) and at M=64 (c9-c6) are 8
    # already: only the minimum, n=4 of each ranking, goes on.
    few, how = survivors_within(journal, keyed, [1, 64], 10, 26.0, 10.0, 1, 100, 0.25)
    assert {k for k, _ in few} == {"c0", "c1", "c2", "c3", "c6", "c7", "c8", "c9"}
    assert "budget is spent" not in how
    # The anchors alone took longer than the budget: the minimum goes on, and the note says so.
    late, how = survivors_within(journal, keyed, [1, 64], 10, 26.0, 30.0, 1, 100, 0.25)
    assert {k for k, _ in late} == {k for k, _ in few} and "room for 0 pairs" in how
    assert "the budget is spent: only the 4 fastest of each ranking go on" in how


def test_survivors_within_budget_fall_back_to_keep_without_times(tmp_path):
    recs = [{**_ok(f"c{i}", 1, i), "eval_s": None} for i in range(10)]
    keyed = [(f"c{i}", None) for i in range(10)]
    chosen, how = survivors_within(_journal(tmp_path, recs), keyed, [1], 5, 60.0, 0.0, 1, 0, 0.5)
    assert [k for k, _ in chosen] == [f"c{i}" for i in range(5)] and "no times" in how


def test_budgeted_choice_is_journaled_and_kept_by_a_later_run(tmp_path):
    """The budget's choice depends on the clock; a resumed or repeated run (a fresh clock, a
    bigger budget) must go on with the same candidates, not evaluate new ones."""
    import time
    from types import SimpleNamespace

    from moetune.sweep import Execution, _budgeted

    keys = [f"c{i}" for i in range(10)]
    recs = [_ok(k, M, us=i + (M == 64) * (9 - 2 * i)) for i, k in enumerate(keys) for M in (1, 64)]
    journal = _journal(tmp_path, recs)
    keyed = [(k, None) for k in keys]

    def runner(budget_s):
        return SimpleNamespace(execution=Execution(budget_s=budget_s), t0=time.time() - 10.0,
                               parallel=1)  # fmt: skip

    first, _ = _budgeted(journal, keyed, [1, 64], [8, 16], [1, 8, 16, 64], runner(12.0))
    assert len(first) == 8, "10 s spent of 12: only the minimum goes on"
    made = [r for r in journal.records if r.get("kind") == "survivors"]
    assert [r["keys"] for r in made] == [[k for k, _ in first]]
    again, how = _budgeted(journal, keyed, [1, 64], [8, 16], [1, 8, 16, 64], runner(1e6))
    assert again == first and "as chosen before" in how
    assert len([r for r in journal.records if r.get("kind") == "survivors"]) == 1


def test_incumbent_pairs_time_the_replaced_entries_that_did_not_go_on():
    from moetune.gemms import split_key
    from moetune.space import Candidate

    a, b, c = (Candidate(16, n, 64, 1, 4, 3) for n in (32, 64, 128))
    outside = Candidate(16, 256, 64, 1, 4, 3).as_config()
    keyed = [(x.key(), x) for x in (a, b, c)]
    incumbent = {
        1: b.as_config(),
        8: a.as_config(),
        16: b.as_config(),
        24: outside,
        64: c.as_config(),
    }
    # rest = 8, 16, 24 (anchors 1 and 64 run everyone); a went on, b did not, outside is no
    # candidate of the space, and 32 has no entry.
    pairs = incumbent_pairs(keyed, incumbent, [8, 16, 24, 32], kept={a.key()})
    assert pairs == [(b.key(), b, 16)]
    assert incumbent_pairs(keyed, {}, [8, 16], kept=set()) == []
    # A split sweep keys each candidate once per GEMM: the incumbent serves both, as vLLM's one
    # table does.
    split = [(split_key(g, x.key()), x) for x in (a, b) for g in ("up", "down")]
    got = incumbent_pairs(split, {16: b.as_config()}, [16], kept={split_key("up", b.key())})
    assert got == [(split_key("down", b.key()), b, 16)]


def test_a_resumed_halving_sweep_compiles_only_what_it_has_left(tmp_path):
    """Past the anchor round, only the survivors with pairs left (and an incumbent entry that
    did not go on) are compiled ahead, not the whole space again; before it, everything."""
    from moetune.space import Candidate
    from moetune.sweep import Execution, compile_keys

    cands = [Candidate(16, n, k, 1, 4, 3) for n in (32, 64, 128) for k in (64, 128, 256)]
    keyed = [(c.key(), c) for c in cands]
    sizes = [1, 8, 16, 24, 64]  # anchors 1, 16 and 64
    # Candidate i is i-th fastest at every anchor: MIN_KEEP = 4 go on at keep 0.25.
    recs = [_ok(c.key(), M, us=10 + i) for i, c in enumerate(cands) for M in (1, 16, 64)]
    halving = Execution(strategy="halving", keep=0.25)
    keys = [c.key() for c in cands]

    assert compile_keys(_journal(tmp_path, recs[:-1]), keyed, sizes, halving, {}) == set(keys), (
        "an anchor pair left: everything, as a fresh sweep"
    )
    assert compile_keys(_journal(tmp_path, list(recs)), keyed, sizes, halving, {}) == set(keys[:4])
    # c0 has finished both other sizes, c1 one of them; the incumbent's M=24 entry is c6.
    more = recs + [_ok(keys[0], M, 9) for M in (8, 24)] + [_ok(keys[1], 8, 9)]
    got = compile_keys(_journal(tmp_path, more), keyed, sizes, halving, {24: cands[6].as_config()})
    assert got == {keys[1], keys[2], keys[3], keys[6]}
    # Exhaustive runs every candidate at every size: anything with a size left is compiled.
    assert compile_keys(_journal(tmp_path, list(recs)), keyed, sizes, Execution(), {}) == set(keys)
    # Under --budget the survivors are known only once journaled.
    budget = Execution(strategy="halving", budget_s=60.0)
    assert compile_keys(_journal(tmp_path, list(recs)), keyed, sizes, budget, {}) == set(keys)
    chosen = [*recs, {"kind": "survivors", "keys": keys[2:4]}]
    assert compile_keys(_journal(tmp_path, chosen), keyed, sizes, budget, {}) == set(keys[2:4])
