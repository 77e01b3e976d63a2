"""Export from hand-written journals: which record becomes a table entry, and the _down table."""

import json
from pathlib import Path

import pytest

from moetune.export import best_entries
from moetune.tables import load_table

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


def test_a_config_that_failed_its_recheck_never_becomes_an_entry(tmp_path):
    """Every finalist at M=128 failed its re-check on fresh inputs, so the sweep recorded no
    winner there: the fastest first-pass record must not slip into the table in its place."""
    bad, bad2, good = _cfg(BLOCK_SIZE_N=16), _cfg(BLOCK_SIZE_N=64), _cfg(BLOCK_SIZE_N=32)
    j = _journal(tmp_path / "j.jsonl", _header(), [
        _ok("bad", 128, 4.0, bad), _ok("bad2", 128, 4.5, bad2), _ok("good", 128, 9.0, good),
        _ok("final:bad", 128, 4.1, bad, phase="final", recheck={"ok": False, "reason": "x"}),
        _ok("final:bad2", 128, 4.6, bad2, phase="final", recheck={"ok": True}),
        {"kind": "recheck-failed", "M": 128, "failed": "bad2", "recheck": {"ok": False}},
        _ok("bad", 8, 4.0, bad),  # no re-check failed at M=8: the fastest ok counts there
    ])  # fmt: skip
    _, entries = best_entries([j])
    assert entries == {8: bad, 128: good}


def _split_journal(tmp_path: Path, down_pair_up: dict | None = None) -> Path:
    """A finished split sweep at M=1 and 8: up winners, down winners paired with them."""
    up = {1: _cfg(BLOCK_SIZE_N=16), 8: _cfg(BLOCK_SIZE_N=64)}
    down = {1: _cfg(BLOCK_SIZE_M=32), 8: _cfg(BLOCK_SIZE_K=64)}
    records = []
    for M in (1, 8):
        records += [
            _ok(f"up:{M}", M, 2.0, _cfg(GROUP_SIZE_M=8), gemm="up"),  # faster, never re-checked
            _winner(f"up:{M}", M, 5.0, up[M], gemm="up"),
            _winner(f"down:{M}", M, 6.0, down[M], gemm="down",
                    pair_up=down_pair_up if down_pair_up is not None else up[M]),
        ]  # fmt: skip
    return _journal(tmp_path / "s.jsonl", _header(gemms="split"), records)


def test_split_journal_exports_main_and_down_tables(tmp_path):
    from moetune.export import export_configs
    from moetune.tables import load_table, sidecar_path

    res = export_configs([_split_journal(tmp_path)], tmp_path / "out", sglang=True)
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in res.paths)
    assert names == [
        "E=4,N=32,device_name=cpu_interpreter.json",
        "E=4,N=32,device_name=cpu_interpreter_down.json",
        "triton_3_9_0/E=4,N=32,device_name=cpu_interpreter.json",
        "triton_3_9_0/E=4,N=32,device_name=cpu_interpreter_down.json",
    ]
    main = load_table(tmp_path / "out" / names[0])
    down = load_table(tmp_path / "out" / names[1])
    assert main.entries == {1: _cfg(BLOCK_SIZE_N=16), 8: _cfg(BLOCK_SIZE_N=64)}
    assert down.entries == {1: _cfg(BLOCK_SIZE_M=32), 8: _cfg(BLOCK_SIZE_K=64)}
    assert json.loads(sidecar_path(down.path).read_text())["gemm"] == "down"
    assert any("BLOCK_SIZE_M differs" in w and "M=[1]" in w for w in res.warnings)


def test_no_down_table_without_winners_checked_with_the_main_entries(tmp_path):
    """A down winner checked with another up config is no evidence for this pair: the _down
    table is left out (and an older one removed), so the runtime falls back to the main table."""
    from moetune.export import export_configs

    out = tmp_path / "out"
    export_configs([_split_journal(tmp_path)], out)
    assert (out / "E=4,N=32,device_name=cpu_interpreter_down.json").exists()
    res = export_configs([_split_journal(tmp_path, down_pair_up=_cfg())], out)
    assert [p.name for p in res.paths] == ["E=4,N=32,device_name=cpu_interpreter.json"]
    assert res.down_entries is None
    assert not (out / "E=4,N=32,device_name=cpu_interpreter_down.json").exists()
    assert any("no _down table" in w for w in res.warnings)


def test_split_and_joint_journals_do_not_mix(tmp_path):
    from moetune.export import ExportError, export_configs

    joint = _journal(tmp_path / "j.jsonl", _header(), [_ok("a", 1, 5.0, CFG)])
    named = _journal(tmp_path / "n.jsonl", _header(gemms="joint"), [_ok("a", 1, 5.0, CFG)])
    assert best_entries([joint, named])[1] == {1: CFG}, "no gemms field means joint"
    with pytest.raises(ExportError, match="gemms"):
        export_configs([_split_journal(tmp_path), joint], tmp_path / "out")


MAIN = "E=4,N=32,device_name=cpu_interpreter.json"


def test_merge_replaces_the_journals_batch_sizes_and_keeps_the_rest(tmp_path):
    """A re-tune of M=1 (and a new M=2) into a table of M=1, 8, 64: entries 8 and 64 stay as they
    were, and the sidecar says which entries changed and keeps the old provenance."""
    from moetune.export import export_configs
    from moetune.tables import load_table, sidecar_path

    out = tmp_path / "out"
    old = {1: _cfg(), 8: _cfg(BLOCK_SIZE_K=64), 64: _cfg(BLOCK_SIZE_M=64)}
    first = _journal(tmp_path / "a.jsonl", _header(),
                     [_winner(f"k{M}", M, 9.0, c) for M, c in old.items()])  # fmt: skip
    export_configs([first], out)
    retune = _journal(tmp_path / "b.jsonl", _header(), [
        _winner("n16", 1, 4.0, _cfg(BLOCK_SIZE_N=16)), _winner("same", 2, 4.0, _cfg()),
    ])  # fmt: skip
    res = export_configs([retune], out, merge=True)
    table = load_table(out / MAIN)
    assert table.entries == {1: _cfg(BLOCK_SIZE_N=16), 2: _cfg(), 8: old[8], 64: old[64]}
    assert res.entries == table.entries
    merged = json.loads(sidecar_path(out / MAIN).read_text())["merged"]
    assert (merged["from_journals"], merged["changed"], merged["kept"]) == ([1, 2], [1, 2], [8, 64])
    assert merged["previous_sidecar"]["journals"] == [str(first)]
    assert res.changed == [1, 2]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = export_configs([retune], out, merge=True)  # the same again: nothing to write
    assert res.changed == [] and any("left as it was" in w for w in res.warnings)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_merge_refuses_without_a_table_or_beside_a_down_table(tmp_path):
    """Nothing to merge into, or a _down table whose entries were checked with the old main
    entries: an error, and nothing written or changed."""
    from moetune.export import ExportError, export_configs

    j = _journal(tmp_path / "j.jsonl", _header(), [_winner("a", 1, 5.0, CFG)])
    with pytest.raises(ExportError, match="no table to merge into"):
        export_configs([j], tmp_path / "empty", merge=True)
    assert not (tmp_path / "empty" / MAIN).exists()
    out = tmp_path / "out"
    export_configs([_split_journal(tmp_path)], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"_down\.json pairs with every entry"):
        export_configs([j], out, merge=True)
    with pytest.raises(ExportError, match="joint sweeps only"):
        export_configs([_split_journal(tmp_path)], out, merge=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_batch_sizes_pick_entries_of_the_journals(tmp_path):
    """A re-tune confirmed at some of its batch sizes merges those alone."""
    from moetune.export import ExportError, export_configs
    from moetune.tables import load_table

    out = tmp_path / "out"
    old = {1: _cfg(), 8: _cfg(BLOCK_SIZE_K=64)}
    first = [_winner(f"k{M}", M, 9.0, c) for M, c in old.items()]
    export_configs([_journal(tmp_path / "a.jsonl", _header(), first)], out)
    retune = _journal(tmp_path / "b.jsonl", _header(), [
        _winner("n16", 1, 4.0, _cfg(BLOCK_SIZE_N=16)), _winner("g8", 8, 4.0, _cfg(GROUP_SIZE_M=8)),
    ])  # fmt: skip
    export_configs([retune], out, merge=True, batch_sizes=[8])
    assert load_table(out / MAIN).entries == {1: old[1], 8: _cfg(GROUP_SIZE_M=8)}
    with pytest.raises(ExportError, match=r"no passing candidate at M=\[2\]"):
        export_configs([retune], out, merge=True, batch_sizes=[1, 2])
    assert load_table(out / MAIN).entries == {1: old[1], 8: _cfg(GROUP_SIZE_M=8)}


def test_a_gzipped_journal_exports_like_the_plain_one(tmp_path):
    """results/ keeps journals gzipped: export and merge read them as they are."""
    import gzip

    from moetune.export import ExportError, export_configs
    from moetune.journal import JournalError

    plain = _journal(tmp_path / "j.jsonl", _header(), [_winner("a", 1, 5.0, _cfg(BLOCK_SIZE_N=16))])
    packed = tmp_path / "j.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert best_entries([packed]) == best_entries([plain])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises((JournalError, ExportError), match="cannot read journal"):
        export_configs([cut], tmp_path / "out")


def test_the_sidecar_lists_the_batch_sizes_of_every_journal(tmp_path):
    from moetune.export import export_configs
    from moetune.tables import sidecar_path

    a = _journal(tmp_path / "a.jsonl", _header(batch_sizes=[1]), [_winner("a", 1, 5.0, CFG)])
    b = _journal(tmp_path / "b.jsonl", _header(batch_sizes=[2, 8]), [_winner("b", 8, 5.0, CFG)])
    res = export_configs([a, b], tmp_path / "out")
    sweep = json.loads(sidecar_path(res.paths[0]).read_text())["sweep"]
    assert sweep["batch_sizes"] == [1, 2, 8]


def test_merge_refuses_a_table_of_another_problem_gpu_or_without_provenance(tmp_path):
    """The file name says E, N, GPU and dtype only: the sidecar must say the rest matches."""
    from moetune.export import ExportError, export_configs
    from moetune.tables import sidecar_path

    out = tmp_path / "out"
    export_configs([_journal(tmp_path / "a.jsonl", _header(), [_winner("a", 1, 5.0, CFG)])], out)
    new = [_winner("b", 1, 4.0, _cfg(BLOCK_SIZE_N=16))]
    other_k = _header()
    other_k["problem"] = {**PROBLEM, "K": 128}
    cases = [(other_k, "another problem"), (_header(interpreter=False), "another interpreter")]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for i, (header, match) in enumerate(cases):
        with pytest.raises(ExportError, match=match):
            export_configs([_journal(tmp_path / f"{i}.jsonl", header, new)], out, merge=True,
                           device_name="cpu_interpreter")  # fmt: skip
    sidecar_path(out / MAIN).unlink()
    with pytest.raises(ExportError, match="needs its provenance sidecar"):
        export_configs([_journal(tmp_path / "n.jsonl", _header(), new)], out, merge=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        k: v for k, v in before.items() if not k.endswith(".provenance.json")}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"merge": True, "sglang": True}, "vLLM's table name only"),
     ({"batch_sizes": [1]}, "--batch-sizes goes with --merge")],
)  # fmt: skip
def test_merge_options_that_do_not_go_together(tmp_path, kwargs, match):
    from moetune.export import ExportError, export_configs

    j = _journal(tmp_path / "j.jsonl", _header(), [_winner("a", 1, 5.0, CFG)])
    with pytest.raises(ExportError, match=match):
        export_configs([j], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_corrupted_gzipped_journal_is_an_error_not_a_crash(tmp_path):
    import gzip

    from moetune.journal import JournalError, read_journal

    plain = _journal(tmp_path / "j.jsonl", _header(), [_winner("a", 1, 5.0, CFG)] * 20)
    packed = bytearray(gzip.compress(plain.read_bytes()))
    packed[len(packed) // 2 : len(packed) // 2 + 8] = b"\xff" * 8
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(packed))
    with pytest.raises(JournalError, match="cannot read journal"):
        read_journal(tmp_path / "bad.jsonl.gz")


def test_a_sweep_does_not_append_to_a_gzipped_journal(tmp_path):
    from moetune.journal import JournalError, open_journal

    with pytest.raises(JournalError, match=r"plain \.jsonl journal"):
        open_journal(tmp_path / "j.jsonl.gz", {"problem": PROBLEM}, fresh=False)
    assert not (tmp_path / "j.jsonl.gz").exists()


def test_an_export_never_overwrites_another_table(tmp_path):
    """Exporting over a table with other entries keeps the old one (and its sidecar) as
    <name>.old, then .old1; exporting the same entries again just rewrites the table."""
    from moetune.export import export_configs

    out = tmp_path / "out"
    first = _journal(tmp_path / "a.jsonl", _header(), [_ok("a", 1, 5.0, CFG)])
    second = _journal(tmp_path / "b.jsonl", _header(), [_ok("b", 1, 5.0, _cfg(BLOCK_SIZE_N=64))])
    third = _journal(tmp_path / "c.jsonl", _header(), [_ok("c", 8, 5.0, CFG)])
    export_configs([first], out)
    res = export_configs([first], out)
    assert res.warnings == [] and sorted(p.name for p in out.iterdir()) == [
        MAIN, MAIN.replace(".json", ".provenance.json")]
    res = export_configs([second], out)
    assert any("kept it as " + MAIN + ".old" in w for w in res.warnings)
    assert load_table(out / MAIN).entries == {1: _cfg(BLOCK_SIZE_N=64)}
    old = json.loads((out / (MAIN + ".old")).read_text())
    assert old["1"] == CFG, "the first table, unchanged"
    side = out / (MAIN.replace(".json", ".provenance.json") + ".old")
    assert json.loads(side.read_text())["journals"] == [str(first)]
    export_configs([third], out)
    assert json.loads((out / (MAIN + ".old1")).read_text())["1"] == _cfg(BLOCK_SIZE_N=64)
    assert json.loads((out / (MAIN + ".old")).read_text())["1"] == CFG


def test_a_resume_that_only_adds_batch_sizes_keeps_no_copy(tmp_path):
    from moetune.export import export_configs

    out = tmp_path / "out"
    export_configs([_journal(tmp_path / "a.jsonl", _header(), [_ok("a", 1, 5.0, CFG)])], out)
    more = _journal(tmp_path / "b.jsonl", _header(batch_sizes=[1]),
                    [_ok("a", 1, 5.0, CFG), {"kind": "resumed", "batch_sizes": [1, 8]},
                     _ok("a", 8, 6.0, CFG)])  # fmt: skip
    res = export_configs([more], out)
    assert res.warnings == [] and not (out / (MAIN + ".old")).exists()
    side = json.loads((out / MAIN.replace(".json", ".provenance.json")).read_text())
    assert side["sweep"]["batch_sizes"] == [1, 8]
    assert side["sweep"]["resumed"] == [{"batch_sizes": [1, 8]}]


def test_a_failed_second_write_keeps_the_copy_of_the_table_it_replaced(tmp_path):
    """--format sglang writes two names: when the second write fails, the first table is already
    replaced, so its .old copy must stay (and the error says so); nothing else is copied."""
    from moetune.export import ExportError, export_configs

    first = _journal(tmp_path / "a.jsonl", _header(), [_ok("a", 1, 5.0, CFG)])
    second = _journal(tmp_path / "b.jsonl", _header(), [_ok("b", 1, 5.0, _cfg(BLOCK_SIZE_N=64))])
    probe = export_configs([first], tmp_path / "probe", sglang=True)
    sglang_name = probe.paths[1].relative_to(tmp_path / "probe")
    out = tmp_path / "out"
    export_configs([first], out, sglang=True)
    (out / sglang_name).unlink()
    (out / sglang_name / "blocker").mkdir(parents=True)  # a folder where the table goes
    with pytest.raises(ExportError, match=r"already written: .*kept as " + MAIN + r"\.old"):
        export_configs([second], out, sglang=True)
    assert load_table(out / MAIN).entries == {1: _cfg(BLOCK_SIZE_N=64)}
    assert json.loads((out / (MAIN + ".old")).read_text())["1"] == CFG
    assert not list((out / sglang_name.parent).glob("*.old*"))


def test_a_merge_that_changes_an_entry_keeps_the_old_table(tmp_path):
    from moetune.export import export_configs

    out = tmp_path / "out"
    export_configs([_journal(tmp_path / "a.jsonl", _header(), [_ok("a", 1, 5.0, CFG),
                                                               _ok("a", 8, 5.0, CFG)])], out)
    retune = _journal(tmp_path / "b.jsonl", _header(), [_ok("b", 1, 4.0, _cfg(num_warps=8))])
    res = export_configs([retune], out, merge=True)
    assert res.changed == [1]
    assert load_table(out / MAIN).entries == {1: _cfg(num_warps=8), 8: CFG}
    assert json.loads((out / (MAIN + ".old")).read_text())["1"] == CFG
