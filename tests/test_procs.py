"""Helper processes forked from a fork server that imported torch once (moetune.procs)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moetune import procs

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import multiprocessing as mp, os, sys

def probe(q):
    q.put((os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("MOETUNE_PROBE"),
           "torch" in sys.modules, mp.parent_process() is not None))
"""

SCRIPT = """
import os, sys
import probe
from moetune import procs
from moetune.platform import detect_platform, get_platform
from moetune.problem import Problem
from moetune.space import search_space
from moetune.sweep import problem_dict
from moetune.workers import WorkerPool, chunk_pairs

assert procs.prestart(procs.PRELOAD + ["probe"])
ctx = procs.context()
assert ctx.get_start_method() == "forkserver", ctx.get_start_method()
os.environ["MOETUNE_PROBE"] = "set after the server started"
q = ctx.Queue()
p = ctx.Process(target=procs.with_env,
                args=({**os.environ, "CUDA_VISIBLE_DEVICES": "3"}, probe.probe, q))
p.start()
print("probe", q.get(timeout=120))
p.join(timeout=30)

# The worker runs where the sweep's would: on the GPU when there is one, else the interpreter.
gpu = os.environ.get("TRITON_INTERPRET") != "1"
plat = detect_platform() if gpu else get_platform("interpreter")
problem = Problem(4, 32, 64, 2, "float16")
cand = search_space(plat, problem, "tiny")[0]
pool = WorkerPool(problem_dict(problem), plat.key, "cuda" if gpu else "cpu", [1, 2], "uniform",
                  None, timeout_s=120)
seen = []
try:
    pool.run(chunk_pairs([(cand.key(), cand.as_config(), M, 1) for M in (1, 2)], 2),
             seen.append)
finally:
    pool.close()
print("pool", [r["status"] for r in seen], pool.restarts)
print("reasons", [r.get("reason", "") for r in seen])
"""


def test_without_prestart_helpers_are_spawned():
    assert procs.context().get_start_method() == "spawn"


def test_no_fork_server_for_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not procs.gpu_machine()


def test_with_env_replaces_the_environment(monkeypatch):
    monkeypatch.setenv("MOETUNE_STALE", "1")
    env = {k: v for k, v in os.environ.items() if k != "MOETUNE_STALE"}
    got = procs.with_env({**env, "MOETUNE_NEW": "2"}, lambda: dict(os.environ))
    assert got.get("MOETUNE_NEW") == "2" and "MOETUNE_STALE" not in got
    os.environ.pop("MOETUNE_NEW")  # monkeypatch restores MOETUNE_STALE


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only")
def test_forked_helpers_take_the_sweeps_environment_and_run_a_worker(tmp_path):
    """A child forked after the server started sees the environment the sweep gives it (its
    GPU), finds torch already imported, can watch its parent, and a worker pool runs on it."""
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    if not torch.cuda.is_available():  # a GPU machine runs its worker on the GPU, as a sweep does
        env["TRITON_INTERPRET"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["probe"] == "('3', 'set after the server started', True, True)"
    assert lines["pool"] == "['ok', 'ok'] 0", lines["reasons"]


def test_a_sigterm_during_a_helper_start_is_raised_once_the_helper_has_started(monkeypatch):
    """A SIGTERM that lands inside ``Process.start`` would close the pipe the child reads its
    start-up data from (the child then dies with a traceback on the user's stderr): it must
    wait for the start to end, then stop the command as usual."""
    import signal

    from moetune import cli_common

    monkeypatch.setattr(cli_common.signal, "signal", lambda *a: None)  # keep this process's

    class Helper:
        started = False

        def start(self):
            cli_common._raise_terminated(signal.SIGTERM, None)  # arrives mid-start
            self.started = True

    helper = Helper()
    with pytest.raises(cli_common.Terminated):
        procs.start_helper(helper)
    assert helper.started
    with pytest.raises(cli_common.Terminated):  # outside a start it is raised at once
        cli_common._raise_terminated(signal.SIGTERM, None)

    class Quiet:
        def start(self):
            pass

    procs.start_helper(Quiet())  # nothing is kept from the signal before


def test_messages_reads_each_pipe_to_its_last_whole_message():
    """A helper that dies in the middle of a message costs only its own pipe: the messages
    before the torn one count, the pipe is reported broken once, and another pipe's messages
    still arrive."""
    import multiprocessing

    torn_r, torn_w = multiprocessing.Pipe(duplex=False)
    ok_r, ok_w = multiprocessing.Pipe(duplex=False)
    torn_w.send(("done", 1))
    # A length header promising 1 MiB and 7 bytes of it, then the writer is gone.
    os.write(torn_w.fileno(), (1 << 20).to_bytes(4, "big") + b"partial")
    torn_w.close()
    ok_w.send(("ready", 2))
    got = list(procs.messages([torn_r, ok_r], timeout=1))
    assert (torn_r, ("done", 1)) in got and (torn_r, None) in got
    assert (ok_r, ("ready", 2)) in got
    assert got.index((torn_r, ("done", 1))) < got.index((torn_r, None))
    assert torn_r.closed and not ok_r.closed
