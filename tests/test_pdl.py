"""Programmatic dependent launch (``launch.PDL``): GEMM2 and the sum over top-k launch as
dependents of the op's kernel before them, GEMM1 too where that kernel is the op's own routing
or quantization launch (``launch.PDL_GEMM1``), and every GEMM and sum program waits for the
previous kernel's memory before touching any.

On a CPU (interpreter) nothing changes. Compiled for sm90 here (a stand-in driver, as in
test_hopper_compile.py), both GEMMs and the sum kernel carry both griddepcontrol instructions,
the wait before any global load or store, and the launch_pdl flag where they follow the op's own
kernel; the routing and quantization kernels signal before any memory access. On a Hopper GPU
the op's bits must not change, eagerly or replayed from a CUDA graph with fresh inputs each
replay (a read before the wait could race with the kernel before it there; a race shows only
by chance)."""

import pytest
import torch
from helpers import compile_for_sm90, make_case

from moetune import fused_experts, launch
from moetune.inputs import static_activation_scales


def test_off_on_the_cpu_and_when_switched_off(monkeypatch):
    monkeypatch.setattr(launch, "PDL", True)
    assert not launch.use_pdl(torch.device("cpu"))
    monkeypatch.setattr(launch, "PDL", False)
    if torch.cuda.is_available():
        assert not launch.use_pdl(torch.device("cuda"))


@pytest.mark.parametrize(
    ("backend", "arch", "want"), [("cuda", 90, True), ("cuda", 80, False), ("hip", "gfx942", False)]
)
def test_compile_processes_follow_their_target(backend, arch, want, monkeypatch):
    """Outside the interpreter, a compile process (CPU tensors) builds dependents for a
    Hopper target only, and for none with PDL switched off."""
    from triton.backends.compiler import GPUTarget

    if not launch._HAS_PDL:
        pytest.skip("this Triton has no griddepcontrol")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch, "_compile_target", lambda: GPUTarget(backend, arch, 32))
    monkeypatch.setattr(launch, "PDL", True)
    cpu = torch.device("cpu")
    assert not launch.use_pdl(cpu)  # not compiling: a CPU tensor launches nothing on a GPU
    with launch.compile_only():
        assert launch.use_pdl(cpu) is want
        monkeypatch.setattr(launch, "PDL", False)
        assert not launch.use_pdl(cpu)


SCRIPT = r"""
launch.PDL = sys.argv[1] != "off"
launch.PDL_GEMM1 = sys.argv[1] != "no-gemm1"
launch.PDL_TRIGGER = {"late": "late", "auto": "auto", "auto-one": "auto"}.get(sys.argv[1], "early")
launch.PDL_LATE_MIN_PROGRAMS = 2  # every launch here is that large: "auto" goes by direct slots
config = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4,
              num_stages=3)
case = make_case(1 if sys.argv[1] == "auto-one" else 16, 8, 128, 256, 2, torch.bfloat16, "cpu")
with compile_only():
    ops.fused_experts(*case.args(), config=config, **case.kwargs)
if launch.PDL:  # the sum kernel as topk_sum() launches it on such a GPU
    from moetune.topk_sum import _topk_sum_kernel

    x, out = torch.empty(4, 256), torch.empty(2, 256)
    _topk_sum_kernel.warmup(x, out, 2, 256, TOPK=2, BLOCK_M=2, BLOCK_K=256, USE_PDL=True,
                            launch_pdl=True, num_warps=8, grid=(1,))


def first(ptx, *ops):
    found = [i for i in (ptx.find(op) for op in ops) if i >= 0]
    return min(found) if found else len(ptx)


cache = Path(os.environ["TRITON_CACHE_DIR"])
for meta in sorted(cache.glob("*/fused_moe_kernel.json")):
    ptx = meta.with_suffix(".ptx").read_text()
    trigger = ptx.find("griddepcontrol.launch_dependents")
    order = "none" if trigger < 0 else "after" if trigger > ptx.rfind("mma") else "before"
    wait = ptx.find("griddepcontrol.wait")
    memory = first(ptx, "ld.global", "st.global", "cp.async", "atom.global", "red.global")
    print(json.loads(meta.read_text())["launch_pdl"], ptx.count("griddepcontrol.wait"),
          ptx.count("griddepcontrol.launch_dependents"), order, 0 <= wait < memory)
for meta in cache.glob("*/_topk_sum_kernel.json"):
    ptx = meta.with_suffix(".ptx").read_text()
    memory = first(ptx, "ld.global", "st.global")
    print("sum", json.loads(meta.read_text())["launch_pdl"],
          ptx.find("griddepcontrol.launch_dependents") < ptx.find("griddepcontrol.wait") < memory)
"""


@pytest.mark.parametrize("switch", ["on", "late", "auto", "auto-one", "no-gemm1", "off"])
def test_the_gemms_compile_as_dependents_for_hopper(switch, tmp_path):
    """The trigger comes before the main loop's MMAs, or after them with the late trigger, and
    with the "auto" trigger only in GEMM1 of a one-token (direct-slot) launch."""
    stdout = compile_for_sm90(SCRIPT, tmp_path, switch)
    lines = sorted(stdout.split("\n")[:-1])
    # GEMM1 with its activation, and GEMM2: both carry the instructions, the wait before any
    # memory access; GEMM2 launches as a dependent, GEMM1 too after the routing launch (16
    # tokens) but not where its predecessor is the caller's kernel (one bf16 token: no routing
    # launch), nor with PDL_GEMM1 off. Then the sum kernel: signal, wait, then memory.
    # "auto": late in GEMM1 (its dependent is GEMM2) of a one-token launch alone.
    order = {"on": "before", "late": "after", "auto": "before", "auto-one": "after",
             "no-gemm1": "before"}.get(switch)  # fmt: skip
    if order:
        gemm2 = "before" if switch == "auto-one" else order
        gemm1_pdl = switch not in ("auto-one", "no-gemm1")
        want = sorted([f"{gemm1_pdl} 1 1 {order} True", f"True 1 1 {gemm2} True",
                       "sum True True"])  # fmt: skip
    else:
        want = ["False 0 0 none False"] * 2
    assert lines == want, stdout


SIGNAL_SCRIPT = r"""
from moetune import align_kernel, quant_kernel

ids, out = torch.zeros(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)
x, q, s = torch.empty(4, 256), torch.empty(4, 256, dtype=torch.float8_e4m3fn), torch.empty(4, 2)
signal = sys.argv[1] == "on"
align_kernel._one_program_kernel.warmup(
    ids, out, out, out, ids, 16, 8, 64, 4, x, q, s, 256, 256, 256, 448.0, BLOCK_M=16, E_BINS=16,
    SLOTS=16, FILL=1024, HAS_MAP=False, SIGNAL=signal, grid=(1,))
align_kernel._place_kernel.warmup(
    ids, out, out, out, out, out, ids, 16, 8, 4, BLOCK_M=16, E_BINS=16, CHUNK=1024, BLOCKS=32,
    HAS_MAP=False, SIGNAL=signal, grid=(1,))
quant_kernel._quant_tensor_kernel.warmup(
    x, q, s, s, 4, 256, 256, 256, 448.0, 1e-12, DYNAMIC=False, PER_ROW_SCALE=False, COLS=1024,
    MIN_EXP=-6, SIGNAL=signal, grid=(4, 1))
quant_kernel._quant_group_rows_kernel.warmup(
    x, q, s, 4, 256, 256, 256, 2, 448.0, 1e-12, GROUP=128, BLOCK=128, ROWS=4, MIN_EXP=-6,
    SIGNAL=signal, grid=(1, 2))
quant_kernel._quant_group_kernel.warmup(
    x, q, s, 256, 256, 256, 2, 448.0, 1e-12, GROUP=128, BLOCK=128, MIN_EXP=-6, SIGNAL=signal,
    grid=(4, 2))
for meta in sorted(Path(os.environ["TRITON_CACHE_DIR"]).glob("*/*.json")):
    if meta.name.startswith("__grp__"):
        continue
    ptx = meta.with_suffix(".ptx").read_text()
    found = [i for i in map(ptx.find, ("ld.global", "st.global", "atom.global")) if i >= 0]
    trigger = ptx.find("griddepcontrol.launch_dependents")
    print(meta.stem, "none" if trigger < 0 else "first" if trigger < min(found) else "late",
          ptx.count("griddepcontrol.wait"))
"""


@pytest.mark.parametrize("signal", ["on", "off"])
def test_routing_and_quantization_kernels_signal_first(signal, tmp_path):
    """With SIGNAL the kernels that may run right before GEMM1 let it launch before any memory
    access of theirs, and none of them waits (they do not launch as dependents)."""
    lines = compile_for_sm90(SIGNAL_SCRIPT, tmp_path, signal).split("\n")[:-1]
    names = ["_one_program_kernel", "_place_kernel", "_quant_group_kernel",
             "_quant_group_rows_kernel", "_quant_tensor_kernel"]  # fmt: skip
    want = "first" if signal == "on" else "none"
    assert sorted(lines) == [f"{name} {want} 0" for name in names], lines


@pytest.mark.parametrize(
    ("switch", "direct", "quantized", "dependent"),
    [(True, False, False, True), (True, True, True, True), (True, True, False, False),
     (False, False, True, False)],
)  # fmt: skip
def test_gemm1_is_a_dependent_after_the_ops_own_kernel(switch, direct, quantized, dependent,
                                                      monkeypatch):  # fmt: skip
    from moetune import ops

    monkeypatch.setattr(launch, "PDL_GEMM1", switch)
    assert ops.gemm1_dependent(direct, quantized) is dependent


@pytest.mark.parametrize(
    ("M", "quant", "switch", "dependent"),
    [(1, "fp8_w8a8", True, True), (1, None, True, False), (2, None, True, True),
     (2, "fp8_w8a8", False, False)],
)  # fmt: skip
def test_the_op_launches_gemm1_as_a_dependent_after_its_own_kernel(
    M, quant, switch, dependent, device, monkeypatch
):
    """What the op passes: one fp8 token (its input quantized first) and two tokens (the routing
    launch first) make GEMM1 a dependent, one bf16 token (no kernel of the op's first) does not,
    nor anything with launch.PDL_GEMM1 off. GEMM2 always is one."""
    from moetune import ops

    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", 1)
    monkeypatch.setattr(launch, "PDL_GEMM1", switch)
    seen, real = [], ops.invoke_moe_gemm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dependent", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "invoke_moe_gemm", spy)
    case = make_case(M, 6, 32, 64, 2, torch.float16, device, quant=quant)
    if quant:
        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    config = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1)
    fused_experts(*case.args(), config=config, **case.kwargs)
    assert seen == [dependent, True]


def test_signal_gemm1_follows_the_switches(monkeypatch):
    from triton.backends.compiler import GPUTarget

    if not launch._HAS_PDL:
        pytest.skip("this Triton has no griddepcontrol")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch, "_compile_target", lambda: GPUTarget("cuda", 90, 32))
    cpu = torch.device("cpu")
    with launch.compile_only():
        for pdl, gemm1, want in ((True, True, True), (True, False, False), (False, True, False)):
            monkeypatch.setattr(launch, "PDL", pdl)
            monkeypatch.setattr(launch, "PDL_GEMM1", gemm1)
            assert launch.signal_gemm1(cpu) is want


@pytest.mark.parametrize(
    ("trigger", "direct", "programs", "down", "late"),
    [("auto", True, 896, False, True), ("auto", True, 399, False, False),
     ("auto", False, 5000, False, False), ("auto", True, 896, True, False),
     ("early", True, 896, False, False), ("late", False, 1, True, True)],
)  # fmt: skip
def test_late_trigger(trigger, direct, programs, down, late, monkeypatch):
    monkeypatch.setattr(launch, "PDL_TRIGGER", trigger)
    monkeypatch.setattr(launch, "PDL_LATE_MIN_PROGRAMS", 400)
    assert launch.late_trigger(direct, programs, down) is late


@pytest.mark.parametrize(("direct_max", "one_token"), [(1, True), (None, False)])
@pytest.mark.parametrize("trigger", ["auto", "early"])
def test_compile_inputs_include_one_token_on_direct_slots(direct_max, one_token, trigger,
                                                          monkeypatch):  # fmt: skip
    """A one-token GEMM1 on direct slots may compile another kernel than the 16-token warm-up
    builds (the late trigger, no launch_pdl flag): compile processes warm up at one token too
    wherever one token takes direct slots, so M=1 sweeps time no compile."""
    from moetune import ops
    from moetune.precompile import compile_inputs
    from moetune.problem import Problem

    monkeypatch.setattr(launch, "PDL_TRIGGER", trigger)
    monkeypatch.setattr(ops, "DIRECT_SLOTS_MAX_M", direct_max)
    monkeypatch.setattr(ops, "FUSE_GEMM1_STATIC_FP8_MAX_M", 64)
    plain = Problem(4, 32, 64, 2, "float16")
    fp8 = Problem(4, 32, 64, 2, "float16", quant="fp8_w8a8")
    for problem, scales in ((plain, "dynamic"), (fp8, "static")):  # static: 16 and 65 besides
        sets = compile_inputs(problem, "cpu", torch.float8_e4m3fn, scales)
        assert (1 in [args[0].shape[0] for args, _ in sets]) is one_token, scales


def test_an_unknown_trigger_is_an_error(monkeypatch):
    monkeypatch.setattr(launch, "PDL_TRIGGER", "sometimes")
    with pytest.raises(ValueError, match="early, late or auto"):
        launch.late_trigger(True, 1, False)


def _hopper() -> bool:
    return (torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability()[0] >= 9)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs an NVIDIA GPU of compute capability 9+")
@pytest.mark.parametrize("M", [1, 8, 200])
@pytest.mark.parametrize("kind", ["bf16", "fp8-static", "fp8-block"])
def test_dependent_launches_keep_the_bits_eager_and_in_a_graph(M, kind, monkeypatch):
    """fp8-static: GEMM1 after the routing launch that quantizes (M=8), or the quantization's
    own launch (M=1); fp8-block: after the dynamic per-group quantization kernel."""
    quant = None if kind == "bf16" else "fp8_w8a8"
    block = (128, 128) if kind == "fp8-block" else None

    def new_case():
        return make_case(M, 64, 384, 2048, 8, torch.bfloat16, "cuda", quant=quant,
                         block_shape=block, bias=True)  # fmt: skip

    case = new_case()
    if kind == "fp8-static":
        case.kwargs.update(static_activation_scales(case.args(), case.kwargs))
    monkeypatch.setattr(launch, "PDL_GEMM1", True)  # whatever the default: every dependent
    monkeypatch.setattr(launch, "PDL", False)
    want = fused_experts(*case.args(), **case.kwargs)
    monkeypatch.setattr(launch, "PDL", True)
    assert launch.use_pdl(torch.device("cuda"))  # else both sides would run without it
    got = fused_experts(*case.args(), **case.kwargs)
    assert torch.equal(got, want)
    # A graph over static inputs: each replay first gets a new token batch and routing, so a
    # kernel that read before its wait would see the last replay's data.
    x, w1, w2, weights, ids = (t.clone() for t in case.args())
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fused_experts(x, w1, w2, weights, ids, **case.kwargs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w1, w2, weights, ids, **case.kwargs)
    for _ in range(3):
        fresh = new_case()
        x.copy_(fresh.args()[0])
        weights.copy_(fresh.args()[3])
        ids.copy_(fresh.args()[4])
        graph.replay()
        monkeypatch.setattr(launch, "PDL", False)
        eager = fused_experts(x, w1, w2, weights, ids, **case.kwargs)
        monkeypatch.setattr(launch, "PDL", True)
        assert torch.equal(out, eager)
