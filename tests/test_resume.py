"""Resume: a sweep killed with SIGKILL at any moment loses at most the work in flight."""

import json
import os
import signal
import subprocess
import sys
import time

from moetune.journal import read_journal

ARGS = ["sweep", "--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16",
        "--batch-sizes", "1,8,16", "--space", "tiny", "--journal", "j.jsonl", "--out", "t",
        "--json"]  # fmt: skip


def _cmd():
    return [sys.executable, "-m", "moetune.cli", *ARGS]


def _pairs(path):
    recs = [r for r in read_journal(path).records if "candidate" in r]
    return [(r["candidate"], r["M"]) for r in recs]


def test_kill_9_then_resume_completes_without_redoing_work(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(_cmd(), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    journal = tmp_path / "j.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a few records are in
        if journal.exists() and journal.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _pairs(journal)
    assert 0 < len(before) < 21, "kill came too late or too early to test anything"
    with open(journal, "a") as f:  # a torn last line, as a kill mid-write leaves
        f.write('{"candidate": "M16-N16')
    run = subprocess.run(_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    after = _pairs(journal)
    assert after[: len(before)] == before, "records of the first run were lost or rewritten"
    assert len(after) == len(set(after)), "a (candidate, batch size) pair was evaluated twice"
    assert {M for _, M in after} == {1, 8, 16}
    sweep_pairs = [(k, M) for k, M in after if not k.startswith("final:")]
    assert len(sweep_pairs) == 7 * 3  # 6 candidates + the default, at 3 batch sizes
    table = json.loads((tmp_path / "t" / "E=4,N=32,device_name=cpu_interpreter.json").read_text())
    assert set(table) == {"triton_version", "1", "8", "16"}


def test_resume_refuses_another_problem(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [*_cmd()[:-9], "--batch-sizes", "1", "--journal", "j.jsonl", "--out", "t",
           "--restrict", "BLOCK_SIZE_N=32"]  # fmt: skip
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "j.jsonl").read_bytes()
    other = [a if a != "32" else "48" for a in _cmd()]  # N=48: another problem
    run = subprocess.run(other, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 1
    assert "belongs to another sweep" in run.stderr and "--fresh" in run.stderr
    assert (tmp_path / "j.jsonl").read_bytes() == before


def test_sigterm_stops_the_sweep_cleanly_and_it_resumes(tmp_path):
    """SIGTERM (what `timeout` and schedulers send) ends the sweep like Ctrl-C: its worker
    process stopped, the journal closed, one Error line, exit 143; a re-run finishes it."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [*_cmd(), "--isolate"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    journal = tmp_path / "j.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Error: terminated; the journal keeps every finished record" in stderr
    assert "Traceback" not in stderr
    before = _pairs(journal)
    assert 0 < len(before) < 21, "SIGTERM came too late or too early to test anything"
    run = subprocess.run(_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    after = _pairs(journal)
    assert after[: len(before)] == before and len(after) == len(set(after))


def test_resumed_settings_follow_the_latest_resume(tmp_path):
    """A resume with other batch sizes or strategy is journaled once, against the latest."""
    from moetune.journal import Journal, resumed_settings

    j = Journal(tmp_path / "j.jsonl", {"batch_sizes": [1], "strategy": "exhaustive"})
    same = {"batch_sizes": [1], "strategy": "exhaustive"}
    assert resumed_settings(j, same) == {}
    more = {"batch_sizes": [1, 4], "strategy": "exhaustive"}
    assert resumed_settings(j, more) == {"batch_sizes": [1, 4]}
    j.records.append({"kind": "resumed", "batch_sizes": [1, 4]})
    assert resumed_settings(j, more) == {}
    halving = {"batch_sizes": [1, 4], "strategy": "halving"}
    assert resumed_settings(j, halving) == {"strategy": "halving"}
