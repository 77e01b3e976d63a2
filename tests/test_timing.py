"""Timing: CUDA-graph captures share one memory pool per device; the host clock off the GPU."""

import pytest
import torch

from moetune import timing
from moetune.timing import graph_pool, time_op


def test_host_clock_off_the_gpu_makes_no_graph_pool():
    pools = dict(timing._POOLS)  # GPU tests before this one may have made theirs
    streams = dict(timing._STREAMS)
    calls = []
    t = time_op(lambda i: calls.append(i), 2, device="cpu", replays=5)
    assert t.method == "host-clock" and t.samples == 2 and calls == [0, 1]  # no warm-up call
    assert t.p20_us <= t.median_us <= t.p80_us
    assert pools == timing._POOLS and streams == timing._STREAMS


@pytest.mark.gpu
def test_captures_share_one_pool_and_reserve_nothing_more(monkeypatch):
    device = torch.device("cuda")
    seen = []
    real_graph = torch.cuda.graph

    def graph(cuda_graph, pool=None, stream=None, **kw):
        seen.append(pool)
        return real_graph(cuda_graph, pool=pool, stream=stream, **kw)

    monkeypatch.setattr(torch.cuda, "graph", graph)
    xs = [torch.randn(256, 256, device=device) for _ in range(2)]

    def fn(i):
        return xs[i] @ xs[i] + 1  # allocates inside the capture

    time_op(fn, 2, device=device, replays=3)
    reserved = torch.cuda.memory_reserved(device)
    for _ in range(20):
        t = time_op(fn, 2, device=device, replays=3)
        assert t.method == "cuda-graph" and t.median_us > 0
    assert torch.cuda.memory_reserved(device) == reserved  # the shared pool is reused
    assert len(seen) == 21 and seen[0] is not None
    assert all(p == seen[0] for p in seen), "a capture got a pool of its own"
    assert graph_pool(device) == seen[0]
