"""Compile-only mode (what the compile processes run): GEMMs go to Triton's warmup, the other
steps run in PyTorch, so CPU tensors suffice and nothing is launched on a GPU."""

import multiprocessing

import pytest
import torch
from helpers import make_case, record_launches_and_warmups

from moetune import launch, ops
from moetune.launch import compile_only, compiling
from moetune.platform import PLATFORMS
from moetune.precompile import Compiler, Ladder, Pin, default_compile_workers, pin_target
from moetune.problem import Problem

CONFIG = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4,
              num_stages=2)  # fmt: skip


class _FakeKernel:
    def __init__(self):
        self.warmups: list[dict] = []

    def warmup(self, *args, grid, **kwargs):
        assert all(not torch.is_tensor(a) or a.device.type == "cpu" for a in args)
        self.warmups.append(kwargs)

    def __getitem__(self, grid):
        raise AssertionError("compile-only mode launched a GEMM")


def _refuse(*args, **kwargs):
    raise AssertionError("compile-only mode ran a Triton kernel outside the GEMMs")


@pytest.mark.parametrize("quant", [None, "fp8_w8a8"])
def test_compile_only_warms_up_both_gemms_from_cpu_tensors(monkeypatch, quant):
    fake = _FakeKernel()
    monkeypatch.setattr(launch, "fused_moe_kernel", fake)
    for name in ("moe_align_block_size", "apply_activation", "quantize_activation"):
        monkeypatch.setattr(ops, name, _refuse)
    case = make_case(16, 4, 32, 64, 2, torch.float16, "cpu", quant=quant)
    down = {**CONFIG, "BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64}
    assert not compiling()
    with compile_only():
        assert compiling()
        ops.fused_experts(*case.args(), config=CONFIG, config_down=down, **case.kwargs)
    assert not compiling()
    assert [w["BLOCK_SIZE_N"] for w in fake.warmups] == [32, 64]
    assert [w["use_fp8_w8a8"] for w in fake.warmups] == [quant == "fp8_w8a8"] * 2


@pytest.mark.parametrize("limit", [None, 8], ids=["fused", "above-static-fp8-limit"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_compile_only_compiles_the_variant_the_op_launches(
    monkeypatch, static, activation, limit, device
):
    """Compile processes must build the kernels the op then runs: the same constexprs (the fused
    epilogue's included) and the same argument dtypes, or every candidate compiles twice."""
    from moetune.inputs import static_activation_scales

    seen = record_launches_and_warmups(monkeypatch)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", limit)  # M=16 is above 8
    case = make_case(16, 4, 32, 64, 2, torch.float16, device, quant="fp8_w8a8", bias=True,
                     activation=activation)  # fmt: skip
    if static:
        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    ops.fused_experts(*case.args(), config=CONFIG, **case.kwargs)
    with compile_only():
        ops.fused_experts(*case.args(), config=CONFIG, **case.kwargs)
    assert len(seen["launch"]) == len(seen["warmup"]) == 2
    assert seen["warmup"] == seen["launch"]
    assert seen["launch"][0][1]["QUANT_OUT"] == (static and limit is None)
    assert seen["launch"][0][1]["ACTIVATION"] == (
        0 if static and limit else launch.ACTIVATION_CODES[activation]
    )


@pytest.mark.skipif(
    torch.cuda.is_available()
    and (torch.version.hip is not None or torch.cuda.get_device_capability()[0] < 9),
    reason="this GPU has no TMA (NVIDIA sm90+)",
)
def test_compile_only_compiles_the_tma_variant_the_op_launches(monkeypatch, device):
    """64-row tiles load the weights through TMA (launch.WEIGHTS_TMA_MIN_BLOCK_M): the compile
    processes' warmups must pass the descriptor too."""
    seen = record_launches_and_warmups(monkeypatch)
    case = make_case(16, 4, 32, 64, 2, torch.float16, device, bias=True)
    config = {**CONFIG, "BLOCK_SIZE_M": 64}
    ops.fused_experts(*case.args(), config=config, **case.kwargs)
    with compile_only():
        ops.fused_experts(*case.args(), config=config, **case.kwargs)
    assert seen["warmup"] == seen["launch"]
    assert [kw["B_TMA"] for _, kw, _ in seen["launch"]] == [True, True]
    # the descriptors' tiles: silu's half tile for GEMM1, the whole tile for GEMM2
    descs = [types[2] for types, _, _ in seen["warmup"]]
    assert descs == ["TensorDescriptor[16, 32]", "TensorDescriptor[32, 32]"]


def test_compiler_reports_first_and_gpu_compiled_candidates():
    """Reports from compile processes (simulated: no process started) reach ``ready`` and the
    timeline; a candidate reported while processes are gone is left to the sweep."""
    compiler = Compiler(Problem(4, 32, 64, 2, "float16"), [("a", {}), ("b", {}), ("c", {})],
                        "float8_e4m3fn", workers=0)  # fmt: skip
    assert not compiler.ready("a") and not compiler.ready("up:b")
    mine, theirs = multiprocessing.Pipe(duplex=False)  # as a compile process's own pipe
    compiler.pipes.append(mine)
    theirs.send(("compiled", "a", "target"))
    theirs.send(("compiled", "b", "cuda"))
    theirs.send_bytes(b"not a report")  # then garbage (a report torn in the middle: test_procs)
    theirs.close()
    compiler.poll()
    assert compiler.pipes == [], "a broken pipe is dropped, after the reports before it"
    assert (compiler.compiled, compiler.failed) == (2, 0)
    assert compiler.ways == {"target": 1, "cuda": 1}
    assert compiler.ready("a") and compiler.ready("up:b")
    assert compiler.ready("c")  # no compile process alive: the sweep compiles it itself
    text = compiler.timeline()
    assert text.startswith("first after")
    assert "1 without CUDA" in text and "1 from GPU inputs" in text
    compiler.close()


def _runner(fails: set[tuple[str, str]], calls: list[str]):
    def run(way: str, key: str) -> None:
        calls.append(f"{key}@{way}")
        if (key, way) in fails or (key, "*") in fails:
            raise RuntimeError("no")

    return run


def test_ladder_keeps_the_first_way_that_works_then_blames_candidates():
    ladder, calls = Ladder(["target", "cpu", "cuda"]), []
    run = _runner({("a", "target"), ("b", "*")}, calls)
    assert ladder.compile(lambda w: run(w, "a")) == ("compiled", "cpu")  # target never worked
    assert ladder.compile(lambda w: run(w, "b")) == ("failed", "cpu")  # its own failure
    assert ladder.compile(lambda w: run(w, "c")) == ("compiled", "cpu")
    assert calls == ["a@target", "a@cpu", "b@cpu", "c@cpu"]


def test_ladder_stays_on_its_first_way_when_a_bad_candidate_comes_first():
    """A candidate that fails every way says nothing about the ways: none is dropped."""
    ladder, calls = Ladder(["target", "cpu", "cuda"]), []
    run = _runner({("bad", "*")}, calls)
    assert ladder.compile(lambda w: run(w, "bad")) == ("failed", "target")
    assert ladder.compile(lambda w: run(w, "ok")) == ("compiled", "target")
    assert calls == ["bad@target", "bad@cpu", "bad@cuda", "ok@target"]


class _Driver:
    """Stand-in for Triton's CUDA driver: PyTorch's answers are instance attributes, the target
    a method (as in Triton's GPUDriver / CudaDriver)."""

    def __init__(self):
        self.get_current_device = lambda: 3
        self.get_current_stream = lambda device=None: 1234

    def get_current_target(self):
        raise AssertionError("asked the GPU")


def test_pin_target_answers_without_the_gpu_and_undoes():
    drv = _Driver()
    undo = pin_target(90, drv)
    target = drv.get_current_target()
    assert (target.backend, target.arch, target.warp_size) == ("cuda", 90, 32)
    assert drv.get_current_device() == 0 and drv.get_current_stream(0) == 0
    undo()
    assert drv.get_current_device() == 3 and drv.get_current_stream(0) == 1234
    with pytest.raises(AssertionError, match="asked the GPU"):
        drv.get_current_target()


def test_compile_processes_take_tma_from_the_pinned_target(monkeypatch):
    """Outside the interpreter a compile process knows its GPU from the target it pinned
    (Triton's driver stood in for): sm90 takes TMA for 64-row tiles, sm80 does not."""
    drv = _Driver()
    monkeypatch.setattr(launch, "_compile_target", lambda: drv.get_current_target())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(2, 64, 64, dtype=torch.float16)
    for capability, tma in ((90, True), (80, False)):
        undo = pin_target(capability, drv)
        try:
            with compile_only():
                assert launch.weights_tma(w, 64, 64, 32) == tma
        finally:
            undo()
    assert not launch.weights_tma(w, 64, 64, 32)  # CPU weights, no interpreter, not compiling


class _LazyProxy:
    """Stand-in for the LazyProxy some Triton releases return as ``driver.active``: attribute
    reads and writes go to the driver behind it, which is made on first use."""

    def __init__(self, make):
        self.__dict__["_make"], self.__dict__["_obj"] = make, None

    def _initialize_obj(self):
        if self._obj is None:
            self.__dict__["_obj"] = self._make()

    def __getattr__(self, name):
        self._initialize_obj()
        return getattr(self._obj, name)

    def __setattr__(self, name, value):
        self._initialize_obj()
        setattr(self._obj, name, value)


def test_pin_target_undoes_through_a_lazy_proxy():
    proxy = _LazyProxy(_Driver)
    undo = pin_target(90, proxy)
    assert proxy.get_current_target().arch == 90 and proxy.get_current_device() == 0
    undo()
    assert proxy.get_current_device() == 3
    with pytest.raises(AssertionError, match="asked the GPU"):
        proxy.get_current_target()


def test_pin_follows_the_ways_a_compile_process_switches_between():
    """target fails -> cpu runs with Triton asking the GPU -> target pins again."""
    drv = _Driver()
    pin = Pin(90, drv)
    pin.set(True)
    pin.set(True)  # no second pin on top of the first: one undo restores the driver
    assert drv.get_current_target().arch == 90
    pin.set(False)
    with pytest.raises(AssertionError, match="asked the GPU"):
        drv.get_current_target()
    assert drv.get_current_device() == 3
    pin.set(True)
    assert drv.get_current_target().arch == 90
    pin.set(False)
    assert drv.get_current_device() == 3
    with pytest.raises(RuntimeError):
        Pin(None, drv).set(True)  # no target (AMD): the "target" way fails, the next is tried


def test_default_compile_workers_grow_slowly_with_gpus_and_stop_at_the_cores():
    assert default_compile_workers(1, cpus=64) == 16
    assert default_compile_workers(4, cpus=64) == 28
    assert default_compile_workers(8, cpus=32) == 32
    assert default_compile_workers(1, cpus=2) == 2


def test_cuda_capability_only_for_nvidia():
    assert PLATFORMS["h100"].cuda_capability() == 90
    assert all(p.cuda_capability() is None for p in PLATFORMS.values() if p.vendor != "nvidia")


def test_compile_loop_reports_each_candidate_with_the_way_that_compiled_it(monkeypatch):
    """The loop a compile process runs, in this process: Triton refuses a named target here
    (simulated), so the first candidate moves the ladder to CPU tensors with the pin undone;
    a candidate that then fails is reported failed, and the loop ends at the stop marker."""
    import queue

    from moetune import precompile

    pinned = []

    class FakePin:
        def __init__(self, capability):
            self.on = False

        def set(self, on):
            self.on = on
            pinned.append(on)

    pin_box = {}

    def make_pin(capability):
        pin_box["pin"] = FakePin(capability)
        return pin_box["pin"]

    def fake_fused(*args, config, **kw):
        assert compiling() and all(not torch.is_tensor(a) or a.device.type == "cpu" for a in args)
        if pin_box["pin"].on or config.get("bad"):
            raise RuntimeError("cannot compile")

    monkeypatch.setattr(precompile, "Pin", make_pin)
    monkeypatch.setattr(ops, "fused_experts", fake_fused)
    monkeypatch.setattr(precompile.os, "nice", lambda inc: 0)  # leave this process's priority
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    tasks = queue.Queue()
    mine, theirs = multiprocessing.Pipe(duplex=False)
    for item in [("a", {}), ("b", {"bad": 1}), ("c", {}), None]:
        tasks.put(item)
    precompile._compile_loop(Problem(4, 32, 64, 2, "float16"), "float8_e4m3fn", 90, 10, tasks,
                             theirs)  # fmt: skip
    reports = []
    while mine.poll():
        reports.append(mine.recv())
    assert reports == [("compiled", "a", "cpu"), ("failed", "b", "cpu"), ("compiled", "c", "cpu")]
    assert pinned[:2] == [True, False] and not any(pinned[2:]), "pinned after leaving target"


def test_compile_loop_ends_when_the_sweep_is_gone(monkeypatch):
    """A killed sweep leaves its compile processes waiting on a queue that nobody fills: they
    notice their parent is gone and end instead of lingering."""
    import queue

    from moetune import precompile

    class Silent:
        def get(self, timeout=None):
            raise queue.Empty

    alive = iter([True, False])  # alive at the first look, gone at the next

    class Parent:
        def is_alive(self):
            return next(alive)

    monkeypatch.setattr(precompile.mp, "parent_process", Parent)
    monkeypatch.setattr(precompile.os, "nice", lambda inc: 0)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    results = []

    class Sink:
        def put(self, item):
            results.append(item)

    precompile._compile_loop(Problem(4, 32, 64, 2, "float16"), "float8_e4m3fn", None, 10,
                             Silent(), Sink())  # fmt: skip
    assert results == [] and next(alive, None) is None, "left before the parent was gone"


def test_compile_loop_stops_with_candidates_still_queued_once_the_sweep_is_gone(monkeypatch):
    """kill -9 of the sweep: the queue still holds candidates, which must not be compiled."""
    import queue

    from moetune import precompile

    class Gone:
        def is_alive(self):
            return False

    compiled = []
    monkeypatch.setattr(precompile.mp, "parent_process", Gone)
    monkeypatch.setattr(precompile.os, "nice", lambda inc: 0)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ops, "fused_experts", lambda *a, **kw: compiled.append(kw["config"]))
    tasks, results = queue.Queue(), queue.Queue()
    for item in [("a", {}), ("b", {}), None]:
        tasks.put(item)
    precompile._compile_loop(Problem(4, 32, 64, 2, "float16"), "float8_e4m3fn", None, 10, tasks,
                             results)  # fmt: skip
    assert compiled == [] and results.empty() and tasks.qsize() == 3
