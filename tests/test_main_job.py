"""The README's main job on a CPU-only machine, as a user runs it: no TRITON_INTERPRET set."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
@pytest.mark.parametrize("isolate", [[], ["--isolate"]], ids=["in-process", "worker-process"])
def test_sweep_runs_in_the_interpreter_without_any_setup(tmp_path, isolate):
    """Also as ``python -m``: spawned workers re-import the main module as __mp_main__."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "moetune.cli", "sweep", "--batch-sizes", "1",
           "--restrict", "BLOCK_SIZE_N=32", "--restrict", "BLOCK_SIZE_K=32", *isolate]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "not GPU timings" in run.stderr
    assert (tmp_path / "results" / "tables" / "E=4,N=32,device_name=cpu_interpreter.json").is_file()
