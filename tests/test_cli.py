"""The CLI end to end in the interpreter: sweep → journal → export → verify → get_config."""

import json
import warnings

import pytest
from typer.testing import CliRunner

from moetune import sweep
from moetune.cli import app
from moetune.journal import read_journal
from moetune.lookup import get_config

runner = CliRunner()


@pytest.mark.parametrize("command", ["sweep", "export-configs", "verify", "space"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example: moetune " + command in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["sweep", "--model", "NoSuchModel"], 2, "unknown"),
        (["sweep", "--E", "4", "--N", "32"], 2, "missing --K, --topk"),
        (["sweep", "--E", "0", "--N", "32", "--K", "64", "--topk", "1"], 2, "E must be"),
        (["sweep", "--batch-sizes", "1,x"], 2, "comma-separated"),
        (["sweep", "--platform", "tpu"], 2, "tpu"),
        (["sweep", "--restrict", "BLOCK_SIZE_Q=16"], 2, "BLOCK_SIZE_Q"),
        (["export-configs", "missing.jsonl"], 2, "not found"),
        (["verify", "no/such/dir"], 2, "no/such/dir"),
    ],
)
def test_mistakes_give_one_error_line(args, code, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and match in result.output, result.output
    assert "Traceback" not in result.output


def test_tiny_sweep_export_verify_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "1,8", "--restrict", "BLOCK_SIZE_N=32", "--restrict",
            "BLOCK_SIZE_K=32", "--journal", "j.jsonl", "--out", "tables", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert payload["interpreter"] and "not GPU timings" in payload["note"]
    assert [b["M"] for b in payload["batches"]] == [1, 8]
    assert all(b["best"] for b in payload["batches"])
    journal = read_journal(tmp_path / "j.jsonl")
    assert journal.header["interpreter"] is True
    assert {r["M"] for r in journal.records if "candidate" in r} == {1, 8}
    table = tmp_path / "tables" / "E=4,N=32,device_name=cpu_interpreter.json"
    doc = json.loads(table.read_text())
    assert set(doc) == {"triton_version", "1", "8"}

    # Resume: the same command evaluates nothing again.
    n_before = len(journal.records)
    assert runner.invoke(app, args).exit_code == 0
    assert len(read_journal(tmp_path / "j.jsonl").records) == n_before

    # A GPU-named table from an interpreter run is refused, nothing written.
    result = runner.invoke(app, ["export-configs", "j.jsonl", "--out", "gpu",
                                 "--device-name", "NVIDIA_H100_80GB_HBM3"])  # fmt: skip
    assert result.exit_code == 1 and "interpreter" in result.output
    assert not (tmp_path / "gpu").exists() or not any((tmp_path / "gpu").iterdir())

    result = runner.invoke(app, ["verify", str(table), "--json"])
    assert result.exit_code == 0, result.output

    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(tmp_path / "tables"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found: no "missing table" warning
        cfg = get_config(8, 4, 32, device_name="cpu_interpreter")
    assert cfg == doc["8"]


def test_skewed_sweep_is_its_own_journal_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "8", "--restrict", "BLOCK_SIZE_N=32", "--restrict", "BLOCK_SIZE_K=32",
            "--restrict", "BLOCK_SIZE_M=16", "--journal", "j.jsonl", "--out", "t"]  # fmt: skip
    result = runner.invoke(app, [*base, "--skew", "zipf"])
    assert result.exit_code == 0, result.output
    assert read_journal(tmp_path / "j.jsonl").header["skew"] == "zipf"
    before = (tmp_path / "j.jsonl").read_bytes()
    result = runner.invoke(app, base)  # uniform routing: another sweep
    assert result.exit_code == 1 and "skew" in result.output
    assert (tmp_path / "j.jsonl").read_bytes() == before
    assert runner.invoke(app, [*base, "--skew", "bimodal"]).exit_code == 2


def test_halving_runs_only_survivors_past_the_anchor_batch_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "FINALISTS", 1)  # re-timing is not what this test is about
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "12,16,20,24,32", "--space", "tiny", "--strategy", "halving",
            "--keep", "0.1", "--journal", "j.jsonl", "--out", "t"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    recs = [
        r
        for r in read_journal(tmp_path / "j.jsonl").records
        if "candidate" in r and r.get("phase") != "final" and r["candidate"] != "default"
    ]
    # Small batches (the interpreter's cost grows with M), none small enough to prune a tile.
    anchors, rest = {12, 20, 32}, {16, 24}
    at_anchor = {r["candidate"] for r in recs if r["M"] in anchors}
    past = {r["candidate"] for r in recs if r["M"] in rest}
    assert len(at_anchor) == 6, "every tiny-space candidate runs at the anchors"
    fastest = set()  # the 4 fastest at each anchor (keep 0.1 of 6 rounds up to the minimum 4)
    for M in anchors:
        ok = sorted((r for r in recs if r["M"] == M and r["status"] == "ok"),
                    key=lambda r: r["timing"]["median_us"])  # fmt: skip
        fastest |= {r["candidate"] for r in ok[:4]}
    assert past == fastest and len(past) >= 4, "exactly the anchors' fastest go on"
    table = json.loads((tmp_path / "t" / "E=4,N=32,device_name=cpu_interpreter.json").read_text())
    assert set(table) == {"triton_version", "12", "16", "20", "24", "32"}
    assert runner.invoke(app, [*args[:-4], "--keep", "0"]).exit_code == 2

    # A re-run with an incumbent table resumes the journal and times only the incumbent's
    # entries that did not go on, each at its own batch size.
    dropped = sorted(at_anchor - past)
    assert dropped, "keep 0.1 of 6 leaves 2 behind"
    config = {r["candidate"]: r["config"] for r in recs}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"triton_version": "3.6.0", "12": config[sorted(past)[0]],
                               "16": config[dropped[0]], "24": config[dropped[-1]],
                               "32": config[sorted(past)[0]]}))  # fmt: skip
    result = runner.invoke(app, [*args, "--incumbent", str(old)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    # (the path may be folded across lines in a narrow terminal)
    assert "incumbent table:" in said and "incumbent table's entry at 2 of them" in said
    again = [r for r in read_journal(tmp_path / "j.jsonl").records if "candidate" in r
             and r.get("phase") != "final" and r["candidate"] != "default"]  # fmt: skip
    new = {(r["candidate"], r["M"]) for r in again} - {(r["candidate"], r["M"]) for r in recs}
    assert new == {(dropped[0], 16), (dropped[-1], 24)}


@pytest.mark.parametrize("content", [None, "{not json", '{"16": {"BLOCK_SIZE_M": 16}}'])
def test_incumbent_that_is_not_a_table_is_refused(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["sweep", "--strategy", "halving", "--journal", "j.jsonl",
                                 "--incumbent", str(path)])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "--incumbent" in lines[0] and "old.json" in lines[0]
    assert not (tmp_path / "j.jsonl").exists(), "a refused command wrote a journal"


def test_budget_implies_halving_and_a_large_one_keeps_everyone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "FINALISTS", 1)  # re-timing is not what this test is about
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "12,16,20,24", "--space", "tiny", "--restrict", "BLOCK_SIZE_K=32",
            "--journal", "j.jsonl", "--out", "t"]  # fmt: skip
    for bad in (["--budget", "0"], ["--strategy", "exhaustive", "--budget", "60"]):
        result = runner.invoke(app, [*args, *bad])
        assert result.exit_code == 2 and "--budget must be > 0 seconds" in result.output
        assert not (tmp_path / "j.jsonl").exists(), "a refused command wrote a journal"
    result = runner.invoke(app, [*args, "--budget", "100000"])
    assert result.exit_code == 0, result.output
    assert "--budget 100000 s:" in result.output and "ms a pair, room for" in result.output
    journal = read_journal(tmp_path / "j.jsonl")
    recs = [r for r in journal.records if "candidate" in r and r.get("phase") != "final"
            and r["candidate"] != "default"]  # fmt: skip
    at_anchor = {r["candidate"] for r in recs if r["M"] == 12}
    assert {r["candidate"] for r in recs if r["M"] == 16} == at_anchor, "a candidate was dropped"
    assert journal.header["strategy"] == "halving" and len(at_anchor) > 4


def test_split_sweep_exports_both_tables_resumes_and_feeds_the_op(tmp_path, monkeypatch):
    """--gemms split: each GEMM tuned apart, a main and a _down table exported, a re-run
    evaluates nothing, a joint run refuses the journal, verify runs the pair, the op reads both."""
    import torch

    from moetune import ops
    from moetune.ops import fused_experts

    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "1,8", "--space", "tiny", "--restrict", "BLOCK_SIZE_N=32",
            "--restrict", "BLOCK_SIZE_K=32", "--journal", "j.jsonl", "--out", "tables",
            "--json"]  # fmt: skip
    result = runner.invoke(app, [*args, "--gemms", "split"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    assert all(b["best"].startswith("up:") and b["best_down"].startswith("down:")
               for b in payload["batches"])  # fmt: skip
    # The time shown is the two tables' entries timed together, not either winner's own.
    assert all(b["pair_us"] and b["time_us"] == b["pair_us"] for b in payload["batches"])
    journal = read_journal(tmp_path / "j.jsonl")
    assert journal.header["gemms"] == "split"
    keys = {r["candidate"] for r in journal.records if "candidate" in r}
    assert {k.split(":")[0] for k in keys if k != "default"} == {"up", "down", "final", "pair"}
    # The winners, then at each M the pairs timed together and the choice (moetune.pairs): the
    # last winner record of each GEMM is the one that counts (a settled pair's, if it won).
    winners = {(r["M"], r["gemm"]): r for r in journal.records if r.get("kind") == "winner"}
    assert sorted(winners) == [(1, "down"), (1, "up"), (8, "down"), (8, "up")]
    assert all(r["pair_recheck"]["ok"] for r in winners.values() if r["gemm"] == "down")
    pairs_timed = {(r["M"], r["candidate"]) for r in journal.records if r.get("phase") == "pair"}
    assert {M for M, _ in pairs_timed} == {1, 8} and len(pairs_timed) >= 2
    choices = [r for r in journal.records if r.get("kind") == "pair-choice"]
    assert sorted(r["M"] for r in choices) == [1, 8]
    winners = list(winners.values())
    main = json.loads((tmp_path / "tables" / "E=4,N=32,device_name=cpu_interpreter.json")
                      .read_text())  # fmt: skip
    down = json.loads((tmp_path / "tables" / "E=4,N=32,device_name=cpu_interpreter_down.json")
                      .read_text())  # fmt: skip
    by_gemm = {(r["M"], r["gemm"]): r["config"] for r in winners}
    for M in (1, 8):
        assert main[str(M)] == by_gemm[M, "up"] and down[str(M)] == by_gemm[M, "down"]

    n_before = len(journal.records)
    assert runner.invoke(app, [*args, "--gemms", "split"]).exit_code == 0
    assert len(read_journal(tmp_path / "j.jsonl").records) == n_before, "resume re-evaluated"
    joint = runner.invoke(app, args)
    assert joint.exit_code == 1 and "gemms" in joint.output
    bad = runner.invoke(app, [*args, "--gemms", "both"])
    assert bad.exit_code == 2 and "Error: --gemms" in bad.output

    result = runner.invoke(app, ["verify", "tables", "--json"])
    assert result.exit_code == 0, result.output
    verified = json.loads(result.stdout[result.stdout.index("{") :])["results"]
    assert sorted((r["file"].endswith("_down.json"), r["status"]) for r in verified) == [
        (False, "ok"), (False, "ok"), (True, "ok"), (True, "ok")]  # fmt: skip

    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(tmp_path / "tables"))
    assert get_config(8, 4, 32, device_name="cpu_interpreter", gemm="down") == down["8"]
    launched = []
    launch = ops.invoke_moe_gemm
    monkeypatch.setattr(ops, "invoke_moe_gemm",
                        lambda *a, config, **kw: launched.append(config) or launch(
                            *a, config=config, **kw))  # fmt: skip
    monkeypatch.setattr("moetune.lookup._current_device_name", lambda: "cpu_interpreter")
    x = torch.randn(8, 64, dtype=torch.float16)
    w1 = torch.randn(4, 64, 64, dtype=torch.float16) / 8
    w2 = torch.randn(4, 64, 32, dtype=torch.float16) / 6
    ids = torch.tensor([[0, 1], [2, 3]] * 4, dtype=torch.int32)
    fused_experts(x, w1, w2, torch.full((8, 2), 0.5), ids)
    assert launched == [main["8"], down["8"]]


def test_incumbent_entry_is_a_finalist_where_it_ranked_below_them(tmp_path, monkeypatch):
    """A re-tune replaces an incumbent entry only with a config that beat it in the finalists'
    longer timing: the incumbent's config is re-timed with them wherever it passed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "FINALISTS", 1)
    args = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
            "--batch-sizes", "12,16", "--space", "tiny", "--journal", "j.jsonl",
            "--out", "t"]  # fmt: skip
    # A first run without finalists' winners: time every candidate once, then pick the slowest
    # passing one at M=12 as the incumbent and re-run on a fresh journal with it.
    assert runner.invoke(app, args).exit_code == 0
    first = [r for r in read_journal(tmp_path / "j.jsonl").records if r.get("status") == "ok"
             and r.get("phase") != "final" and r["candidate"] != "default"]  # fmt: skip
    at12 = sorted((r for r in first if r["M"] == 12), key=lambda r: r["timing"]["median_us"])
    assert len(at12) >= 3
    slow = at12[-1]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"triton_version": "3.6.0", "12": slow["config"]}))
    result = runner.invoke(app, [*args, "--fresh", "--incumbent", str(old)])
    assert result.exit_code == 0, result.output
    journal = read_journal(tmp_path / "j.jsonl")
    added = 0
    for M in (12, 16):  # the runtime would run the M=12 entry at M=16 too (nearest key)
        finals = {r["candidate"] for r in journal.records
                  if r.get("phase") == "final" and r["M"] == M}  # fmt: skip
        ranked = sweep.ranked_ok(journal, M)
        want = {sweep.FINAL_PREFIX + r["candidate"] for r in ranked[:1]}
        configs = [ranked[0]["config"]]
        if ranked[0]["candidate"] != slow["candidate"]:  # it ranked below the one finalist
            want.add(sweep.FINAL_PREFIX + slow["candidate"])
            configs.append(slow["config"])
            added += 1
        default = next(r for r in journal.records if r.get("candidate") == "default"
                       and r["M"] == M and r["status"] == "ok")  # fmt: skip
        if (default["config"] not in configs  # the default beat the one finalist (finalists())
                and default["timing"]["median_us"] < ranked[0]["timing"]["median_us"]):
            want.add(sweep.FINAL_PREFIX + "default")
        assert finals == want, M
    assert added, "the slowest config of the first run was fastest at both sizes the second time"
