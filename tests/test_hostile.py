"""Hostile input: every command and loader meets malformed input with one ``Error:`` line.

A mistake in the command line or its files exits 2, failed work exits 1; never a traceback, and
nothing that existed before (a journal, a table, an unrelated file) is overwritten or lost.
Sweeps here stop where the work would start (``no_sweep``) unless the case is about what the
work does with its files; those run the tiny problem at one batch size and one tile width.
"""

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moetune.cli import app
from moetune.journal import JournalError, open_journal
from moetune.platform import PLATFORMS
from moetune.space import KNOBS, SPACE_NAMES, load_space_spec
from moetune.tables import (
    TABLE_KEYS_CUDA,
    TABLE_KEYS_OTHER,
    TABLE_KEYS_ROCM_EXTRA,
    TableError,
    load_table,
)

runner = CliRunner()
# Few examples, no deadline: the file must stay well under a minute on two CPU cores.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SHAPE = ["--E", "4", "--N", "32", "--K", "64", "--topk", "2", "--dtype", "float16"]
TINY_RUN = [*SHAPE, "--batch-sizes", "1", "--restrict", "BLOCK_SIZE_N=32",
            "--restrict", "BLOCK_SIZE_K=32"]  # fmt: skip
TABLE_NAME = "E=4,N=32,device_name=cpu_interpreter.json"
CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
       "num_warps": 4, "num_stages": 2}  # fmt: skip


class _SweepReached(Exception):
    """Raised by the stubbed run_sweep: the command got past every check."""


@pytest.fixture
def no_sweep(monkeypatch):
    def stop(*args, **kwargs):
        raise _SweepReached

    monkeypatch.setattr("moetune.sweep.run_sweep", stop)


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _invoke(args: list[str], code: int) -> str:
    """Run the CLI; check the exit code, no traceback, one ``Error:`` line iff it failed."""
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == (1 if code else 0), result.output
    return errors[0] if errors else result.output


def _outcome(args: list[str]) -> tuple[str, str]:
    """("reached", "") when a sweep would start, else ("error", the one Error line)."""
    result = runner.invoke(app, args)
    if isinstance(result.exception, _SweepReached):
        return "reached", ""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return "error", errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _header(**problem) -> dict:
    prob = {"E": 4, "N": 32, "K": 64, "topk": 2, "dtype": "float16", "quant": None,
            "block_shape": None, "per_channel": False, "bias": False, "activation": "silu",
            **problem}  # fmt: skip
    return {"kind": "moetune-journal", "problem": prob, "device_name": "cpu_interpreter",
            "interpreter": True, "triton": "3.9.0", "space_id": "abc",
            "moetune": "0.1.0"}  # fmt: skip


def _ok(M: int = 1, us: float = 5.0) -> dict:
    return {"candidate": "M16-N32-K32-G1-w4-s2", "M": M, "status": "ok", "config": CFG,
            "timing": {"median_us": us}}  # fmt: skip


def _write_journal(path: Path, lines: list, tail: str = "\n") -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + tail)
    return path


# --- sweep: the problem, the space, the batch sizes ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(["--E", "0", "--N", "32", "--K", "64", "--topk", "1"],
                     "E must be a positive integer", id="E-zero"),
        pytest.param(["--E", "-3", "--N", "32", "--K", "64", "--topk", "1"],
                     "E must be a positive integer", id="E-negative"),
        pytest.param(["--E", "4", "--N", "0", "--K", "64", "--topk", "1"],
                     "N must be a positive integer", id="N-zero"),
        pytest.param(["--E", "4", "--N", "32", "--K", "64", "--topk", "5"],
                     "topk (5) cannot exceed", id="topk-above-E"),
        pytest.param([*SHAPE[:-2], "--dtype", "int4"], "unknown dtype 'int4'", id="dtype-int4"),
        pytest.param(["--dtype", "int4"], "--dtype needs --model", id="dtype-without-problem"),
        pytest.param([*SHAPE, "--quant", "fp4"], "unknown quant 'fp4'", id="quant-fp4"),
        pytest.param([*SHAPE, "--quant", "fp8_w8a8", "--block-shape", "128"],
                     "two integers", id="block-one-number"),
        pytest.param([*SHAPE, "--quant", "fp8_w8a8", "--block-shape", "0,128"],
                     "positive integers", id="block-zero"),
        pytest.param([*SHAPE, "--quant", "fp8_w8a8", "--block-shape", "a,b"],
                     "comma-separated integers", id="block-letters"),
        pytest.param([*SHAPE, "--quant", "fp8_w8a8", "--block-shape", "32,24"],
                     "bk=24 is not a multiple of 16", id="block-bk-not-16x"),
        pytest.param([*SHAPE, "--block-shape", "32,32"], "needs quant", id="block-unquantized"),
        pytest.param([*SHAPE, "--activation", "relu"], "unknown activation", id="activation"),
        pytest.param(["--model", "unknown"], "unknown model preset 'unknown'", id="model-unknown"),
        pytest.param(["--model", "Mixtral-8x7B", "--tp", "3"],
                     "14336 is not divisible by tp=3", id="tp-not-dividing"),
        pytest.param(["--model", "Mixtral-8x7B", "--tp", "0"], "tp must be", id="tp-zero"),
        pytest.param([*SHAPE, "--tp", "2"], "--tp splits a --model", id="tp-without-model"),
        pytest.param(["--model", "Mixtral-8x7B", "--block-shape", "128,128"],
                     "--model takes them from its preset", id="model-with-block"),
        pytest.param(["--model", "Mixtral-8x7B", "--E", "4"], "not both", id="model-and-shape"),
        pytest.param([*SHAPE, "--batch-sizes", ""], "positive integers", id="batches-empty"),
        pytest.param([*SHAPE, "--batch-sizes", "0"], "positive integers", id="batches-zero"),
        pytest.param([*SHAPE, "--batch-sizes", "-1"], "positive integers", id="batches-negative"),
        pytest.param([*SHAPE, "--batch-sizes", "1,x"], "comma-separated", id="batches-letters"),
        pytest.param([*SHAPE, "--space", "nope"], "unknown space 'nope'", id="space-unknown"),
        pytest.param([*SHAPE, "--restrict", "FOO=1"], "unknown knob 'FOO'", id="knob-unknown"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_M=17"], "power of two",
                     id="knob-not-pow2"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_M=x"], "comma-separated",
                     id="knob-letters"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_M"], "KNOB=V1,V2", id="knob-no-values"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_M="], "positive integers",
                     id="knob-empty-values"),
        pytest.param([*SHAPE, "--restrict", "num_warps=64"], "1024 threads", id="warps-too-many"),
        pytest.param([*SHAPE, "--restrict", "kpack=2"], "only exist on ROCm", id="rocm-knob"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_K=256", "--restrict", "BLOCK_SIZE_N=32"],
                     "deeper than both GEMMs' K", id="restrict-prunes-all"),
        pytest.param([*SHAPE, "--platform", "tpu"], "unknown platform 'tpu'",
                     id="platform-unknown"),
        pytest.param([*SHAPE, "--batch-sizes", "1,4,1"], "names 1 more than once",
                     id="batches-twice"),
        pytest.param([*SHAPE, "--restrict", "BLOCK_SIZE_M=16", "--restrict", "BLOCK_SIZE_M=32"],
                     "names BLOCK_SIZE_M twice", id="knob-twice"),
        pytest.param([*SHAPE, "--timeout", "nan"], "--timeout must be", id="timeout-nan"),
        pytest.param([*SHAPE, "--timeout", "inf"], "--timeout must be", id="timeout-inf"),
        pytest.param([*SHAPE, "--compile-workers", "-3"], "--compile-workers must be 0 or more",
                     id="compile-workers-negative"),
        pytest.param([*SHAPE, "--out", "file"], "--out file is not a folder", id="out-a-file"),
        pytest.param([*SHAPE, "--out", "file/tables"], "(file is a file)", id="out-under-a-file"),
        pytest.param([*SHAPE, "--journal", "file/j.jsonl"], "file is a file, not a folder",
                     id="journal-under-a-file"),
    ],
)  # fmt: skip
def test_sweep_usage_mistakes(args, match, cwd, no_sweep):
    (cwd / "file").write_text("not a folder")
    line = _invoke(["sweep", *args], 2)
    assert match in line
    assert not (cwd / "results").exists(), "a refused sweep must not create its journal"
    assert (cwd / "file").read_text() == "not a folder"


def test_space_and_a_spec_naming_another_space_are_refused(cwd, no_sweep):
    (cwd / "spec.yaml").write_text("space: tiny\n")
    line = _invoke(["sweep", *SHAPE, "--space", "full", "--space-spec", "spec.yaml"], 2)
    assert "--space full and spec.yaml's space tiny differ" in line
    assert not (cwd / "results").exists()


def test_a_spec_space_decides_when_space_is_not_given(cwd, monkeypatch):
    """The default problem on CPU takes a spec's space; a spec naming none means full."""
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["space_name"])
        raise _SweepReached

    monkeypatch.setattr("moetune.sweep.run_sweep", record)
    (cwd / "fast.yaml").write_text("space: fast\n")
    (cwd / "none.yaml").write_text("restrict: {BLOCK_SIZE_M: [16]}\n")
    assert _outcome(["sweep", "--space-spec", "fast.yaml"])[0] == "reached"
    assert _outcome(["sweep", *SHAPE, "--space-spec", "none.yaml"])[0] == "reached"
    assert _outcome(["sweep", *SHAPE, "--space", "tiny", "--space-spec", "none.yaml"])[0] == (
        "reached")
    assert _outcome(["sweep"])[0] == "reached"
    assert seen == ["fast", "full", "tiny", "tiny"]


def test_an_incumbent_table_of_another_problem_is_refused(cwd, no_sweep):
    name = "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json"
    (cwd / name).write_text(json.dumps({"1": CFG}))
    line = _invoke(["sweep", *SHAPE, "--incumbent", name], 2)
    assert "is a table for another problem" in line and "(8, 7168" in line
    down = "E=4,N=32,device_name=cpu_interpreter_down.json"
    (cwd / down).write_text(json.dumps({"1": CFG}))
    assert "is a _down table; give the main table" in _invoke(
        ["sweep", *SHAPE, "--incumbent", down], 2)
    assert not (cwd / "results").exists()


def test_an_incumbent_spelt_bf16_is_this_bfloat16_problem(cwd):
    """vLLM's older tables spell bfloat16 ``dtype=bf16``; the interpreter cannot sweep bf16, so
    the resolver is called as the sweep calls it."""
    from moetune.cli import UsageError, _incumbent
    from moetune.problem import Problem

    name = "E=4,N=32,device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json"
    (cwd / name).write_text(json.dumps({"1": CFG}))
    bf16 = Problem(E=4, N=32, K=64, topk=2, dtype="bfloat16")
    assert _incumbent(name, bf16, None).entries == {1: CFG}
    with pytest.raises(UsageError, match="another problem"):
        _incumbent(name, Problem(E=4, N=32, K=64, topk=2, dtype="float32"), None)


@pytest.mark.parametrize("args", [["--E", "abc"], ["--tp", "x"]], ids=["E-letters", "tp-letters"])
def test_unparsable_option_is_refused_by_click(args, cwd, no_sweep):
    """Click rejects a non-integer before moetune sees it: exit 2 naming the option."""
    result = runner.invoke(app, ["sweep", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"Invalid value for '{args[0]}'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [["sweep", "--E", "abc"], ["export-configs"]])
def test_unparsable_option_gives_one_error_line(args, cwd):
    result = runner.invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output


def test_block_shape_the_gpu_kernel_cannot_use(cwd):
    """On Hopper 8-bit dots need K tiles >= 32, and none of 64..256 divides block_k 48: the
    space names that instead of reporting an empty sweep."""
    args = ["--E", "8", "--N", "256", "--K", "512", "--topk", "2", "--quant", "fp8_w8a8",
            "--block-shape", "128,48"]  # fmt: skip
    line = _invoke(["space", "--platform", "h100", *args], 2)
    assert "every candidate of space 'fast' is pruned" in line
    assert "does not divide block_k 48" in line


# --- sweep: GPU-only work on this machine -------------------------------------------------------


@pytest.mark.parametrize("key", ["h100", "mi325x"])
def test_sweep_for_a_gpu_this_machine_lacks(key, cwd, monkeypatch):
    """Naming a GPU platform to sweep requires that GPU; nothing is started or written."""
    monkeypatch.setattr("moetune.platform.detect_platform", lambda *a: PLATFORMS["interpreter"])
    line = _invoke(["sweep", *TINY_RUN, "--platform", key, "--journal", "j.jsonl"], 2)
    assert f"--platform {key} needs that GPU" in line and "no GPU" in line
    assert not (cwd / "j.jsonl").exists()


def test_space_names_any_platform_without_its_gpu(cwd, monkeypatch):
    monkeypatch.setattr("moetune.platform.detect_platform", lambda *a: PLATFORMS["interpreter"])
    assert "NVIDIA_H100_80GB_HBM3" in _invoke(["space", "--platform", "h100", *SHAPE], 0)
    assert "AMD_Instinct_MI325X" in _invoke(["space", "--platform", "mi325x", *SHAPE], 0)


def test_sweep_platform_must_be_the_gpu_at_hand(cwd, monkeypatch, no_sweep):
    """On a (simulated) H100 an H200 sweep is refused: its timings would be filed as H200's."""
    monkeypatch.setattr("moetune.platform.detect_platform", lambda *a: PLATFORMS["h100"])
    line = _invoke(["sweep", *SHAPE, "--platform", "h200"], 2)
    assert "this machine has a NVIDIA_H100_80GB_HBM3" in line
    assert _outcome(["sweep", *SHAPE, "--platform", "h100"]) == ("reached", "")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in _invoke(["sweep", *SHAPE, "--platform", "interpreter"], 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _outcome(["sweep", *SHAPE, "--platform", "interpreter"]) == ("reached", "")


# --- sweep: the space spec ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param("space: [fast\n", "not valid YAML", id="invalid-yaml"),
        pytest.param("\tspace: fast\n", "not valid YAML", id="tab-indent"),
        pytest.param("space: !!python/object:os.system x\n", "not valid YAML", id="python-tag"),
        pytest.param("- 1\n- 2\n", "expected a mapping", id="a-list"),
        pytest.param("space: fast\nfoo: 1\n", "unknown keys foo", id="unknown-key"),
        pytest.param('"[/x]": 1\n', "unknown keys [/x]", id="key-looks-like-markup"),
        pytest.param("space: 3\n", "space must be one of", id="space-int"),
        pytest.param("restrict: [1]\n", "expected a mapping of knob", id="restrict-list"),
        pytest.param("restrict: {BLOCK_SIZE_M: [16, x]}\n", "'x' is not an integer",
                     id="restrict-letter"),
        pytest.param("restrict: {BLOCK_SIZE_M: 16.0}\n", "non-empty list", id="restrict-float"),
        pytest.param("restrict: {BLOCK_SIZE_M: [-16]}\n", "negative", id="restrict-negative"),
        pytest.param("[" * 3000 + "]" * 3000, "nested too deeply", id="deep-nesting"),
        pytest.param(b"\xff\xfe space", "not UTF-8", id="not-utf8"),
    ],
)  # fmt: skip
def test_space_spec_mistakes(content, match, cwd, no_sweep):
    spec = cwd / "spec.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _invoke(["sweep", *SHAPE, "--space-spec", str(spec)], 2)
    assert "spec.yaml" in line and match in line


@pytest.mark.parametrize("target", ["missing.yaml", "."], ids=["missing", "a-folder"])
def test_space_spec_unreadable_path(target, cwd, no_sweep):
    line = _invoke(["sweep", *SHAPE, "--space-spec", target], 2)
    assert "cannot read space spec" in line


def _unreadable(path: Path) -> None:
    path.chmod(0)
    if os.access(path, os.R_OK):  # root (as in CI containers) reads through mode 000
        path.chmod(0o644)
        pytest.skip("running as root: chmod 000 does not stop this process reading the file")


@pytest.mark.parametrize("command", ["sweep", "export-configs", "verify"])
def test_unreadable_file(command, cwd, no_sweep):
    path = cwd / ("spec.yaml" if command == "sweep" else "j.jsonl" if command == "export-configs"
                  else TABLE_NAME)  # fmt: skip
    path.write_text("space: fast\n" if command == "sweep" else "{}")
    _unreadable(path)
    try:
        if command == "sweep":
            assert "Permission denied" in _invoke(["sweep", *SHAPE, "--space-spec", "spec.yaml"], 2)
        elif command == "export-configs":
            assert "Permission denied" in _invoke(["export-configs", "j.jsonl"], 1)
        else:
            result = runner.invoke(app, ["verify", TABLE_NAME, "--json"])
            assert result.exit_code == 1 and "Permission denied" in result.stdout
    finally:
        path.chmod(0o644)


_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=8) | st.sampled_from(KNOBS + SPACE_NAMES + ("[/x]", "&a", "*a"))
)  # fmt: skip
_yaml_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(KNOBS), inner, max_size=4)
    ),
    max_leaves=12,
)
_spec_texts = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "space": st.sampled_from(SPACE_NAMES) | _scalars,
            "restrict": st.dictionaries(
                st.sampled_from(KNOBS) | st.text(max_size=6),
                st.lists(st.integers(-4, 300), max_size=3) | _yaml_values,
                max_size=3,
            ),
        },
    ).map(yaml.safe_dump),
    _yaml_values.map(yaml.safe_dump),
    st.text(max_size=80),
)


@FUZZ
@given(text=_spec_texts)
def test_fuzzed_space_specs_give_one_error_line_or_a_sweep(text, tmp_path, no_sweep):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    try:
        load_space_spec(spec)
        loads = True
    except ValueError:
        loads = False
    status, line = _outcome(["sweep", *SHAPE, "--space-spec", str(spec)])
    if not loads:  # a valid spec may still be refused by the space (e.g. ROCm knobs on CPU)
        assert status == "error" and "spec.yaml" in line


@FUZZ
@given(data=st.binary(max_size=200) | _spec_texts.map(str.encode))
def test_space_spec_loader_raises_only_value_error(data, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(data)
    try:
        spec_ = load_space_spec(spec)
    except ValueError as e:
        assert "spec.yaml" in str(e)
    else:
        assert spec_["space"] in (*SPACE_NAMES, None)


# --- sweep: journal and output folder -----------------------------------------------------------


def test_unwritable_out_is_refused_first_and_a_journal_resumes(cwd):
    """--out under a regular file is refused before any work (exit 2, no journal); a journal of
    another problem is refused untouched; the right problem resumes and exports."""
    (cwd / "file").write_text("not a folder")
    line = _invoke(["sweep", *TINY_RUN, "--journal", "j.jsonl", "--out", "file/tables"], 2)
    assert "--out file/tables is not a folder" in line
    assert (cwd / "file").read_text() == "not a folder"
    assert not (cwd / "j.jsonl").exists()
    _invoke(["sweep", *TINY_RUN, "--journal", "j.jsonl", "--out", "first"], 0)
    journal = (cwd / "j.jsonl").read_bytes()
    assert b'"kind": "winner"' in journal

    other = ["sweep", *TINY_RUN, "--journal", "j.jsonl", "--out", "tables"]
    other[other.index("--E") + 1] = "8"
    assert "belongs to another sweep (different problem" in _invoke(other, 1)
    assert (cwd / "j.jsonl").read_bytes() == journal
    assert not (cwd / "tables").exists()

    _invoke(["sweep", *TINY_RUN, "--journal", "j.jsonl", "--out", "tables"], 0)
    assert (cwd / "tables" / TABLE_NAME).is_file()
    assert (cwd / "j.jsonl").read_bytes() == journal, "a resume re-evaluates nothing"


@pytest.mark.parametrize(
    ("setup", "fresh", "match", "code"),
    [
        pytest.param("dir", False, "is a folder; give a file name", 2, id="journal-is-a-folder"),
        pytest.param("dir", True, "is a folder; give a file name", 2,
                     id="fresh-journal-is-a-folder"),
        pytest.param("other-problem", False, "belongs to another sweep", 1, id="other-problem"),
        pytest.param("not-a-journal", False, "not a moetune journal", 1, id="not-a-journal"),
        pytest.param("not-a-journal", True, "--fresh will not replace it", 1,
                     id="fresh-not-journal"),
        pytest.param("under-a-file", False, "is a file, not a folder", 2, id="under-a-file"),
    ],
)  # fmt: skip
def test_bad_journal_is_refused_untouched(setup, fresh, match, code, cwd):
    journal = cwd / "j.jsonl"
    if setup == "dir":
        journal.mkdir()
        (journal / "keep").write_text("x")
    elif setup == "other-problem":
        _write_journal(journal, [_header(E=8), _ok()])
    elif setup == "not-a-journal":
        journal.write_text("precious notes\n")
    else:
        (cwd / "file").write_text("x")
        journal = cwd / "file" / "j.jsonl"
    before = _snapshot(cwd)
    args = ["sweep", *TINY_RUN, "--journal", str(journal), "--out", "tables"]
    assert match in _invoke([*args, "--fresh"] if fresh else args, code)
    assert _snapshot(cwd) == before


def test_fresh_never_overwrites_an_older_set_aside_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    for n in range(3):
        open_journal(path, {"n": n}, fresh=True).close()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["j.jsonl", "j.jsonl.old", "j.jsonl.old.1"]
    assert [json.loads(p.read_text())["n"] for p in sorted(tmp_path.iterdir())] == [2, 0, 1]
    with pytest.raises(JournalError, match="not a moetune journal"):
        (tmp_path / "notes").write_text("x")
        open_journal(tmp_path / "notes", {}, fresh=True)


# --- export-configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "tail", "match"),
    [
        pytest.param([], "", "is empty", id="empty-file"),
        pytest.param([_ok()], "\n", "not a moetune journal", id="no-header"),
        pytest.param(['{"kind": "moet'], "", "not a moetune journal", id="only-a-torn-line"),
        pytest.param(["[1, 2]", _ok()], "\n", "not a moetune journal", id="header-a-list"),
        pytest.param([_header(), "garbage", _ok()], "\n", "line 2 is not a JSON object",
                     id="garbage-middle-line"),
        pytest.param([_header(), {**_ok(), "status": "rejected"}], "\n",
                     "no candidate that passed", id="no-passing-record"),
        pytest.param([_header(), {"status": "ok", "M": 1}], "\n", "line 2: a passing record",
                     id="ok-record-without-timing"),
        pytest.param([_header(), {"kind": "winner", "M": 1}], "\n", "line 2: a passing record",
                     id="winner-without-timing"),
        pytest.param([_header(), {**_ok(), "M": [1]}], "\n", "a passing record", id="M-a-list"),
        pytest.param([_header(), _ok(), {**_ok(), "timing": {"median_us": "fast"}}], "\n",
                     "line 3: a passing record", id="timing-a-string"),
        pytest.param([_header(), {**_ok(), "config": {"a": 1}}], "\n", "missing BLOCK_SIZE_M",
                     id="config-not-a-kernel-config"),
        pytest.param([{"kind": "moetune-journal"}, _ok()], "\n", "lacks a valid problem",
                     id="header-without-problem"),
        pytest.param([_header(E=-1), _ok()], "\n", "E must be a positive integer",
                     id="header-bad-problem"),
        pytest.param([{**_header(), "device_name": "a b/c"}, _ok()], "\n",
                     "cannot name the table", id="header-bad-device-name"),
    ],
)  # fmt: skip
def test_export_refuses_bad_journals_and_keeps_the_table(lines, tail, match, cwd):
    """Each failure leaves an existing table (and its folder) exactly as it was."""
    _write_journal(cwd / "j.jsonl", lines, tail)
    (cwd / "out").mkdir()
    (cwd / "out" / TABLE_NAME).write_text('{"1": "the table from yesterday"}')
    before = _snapshot(cwd / "out")
    assert match in _invoke(["export-configs", "j.jsonl", "--out", "out"], 1)
    assert _snapshot(cwd / "out") == before


def test_export_of_a_non_utf8_journal(cwd):
    (cwd / "j.jsonl").write_bytes(b"\xff\xfe\x00\n")
    assert "not UTF-8" in _invoke(["export-configs", "j.jsonl"], 1)


def test_export_with_a_torn_last_line_warns_and_exports(cwd):
    _write_journal(cwd / "j.jsonl", [_header(), _ok(), '{"candid'], tail="")
    output = _invoke(["export-configs", "j.jsonl", "--out", "out"], 0)
    assert "Warning: j.jsonl: ignored a torn last line (3)" in output
    assert json.loads((cwd / "out" / TABLE_NAME).read_text())["1"] == CFG


def test_export_of_two_journals_of_different_problems(cwd):
    _write_journal(cwd / "a.jsonl", [_header(), _ok()])
    _write_journal(cwd / "b.jsonl", [_header(E=8), _ok()])
    line = _invoke(["export-configs", "a.jsonl", "b.jsonl", "--out", "out"], 1)
    assert "b.jsonl is a sweep of another problem than a.jsonl" in line
    assert not (cwd / "out").exists()


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        pytest.param(["missing.jsonl"], 2, "journal not found: missing.jsonl", id="missing"),
        pytest.param(["."], 2, "journal is a folder", id="a-folder"),
        pytest.param(["j.jsonl", "--format", "xml"], 2, "--format must be", id="format"),
        pytest.param(["j.jsonl", "--device-name", "a/b"], 2, "--device-name 'a/b'",
                     id="device-name"),
        pytest.param(["j.jsonl", "--out", "file"], 2, "--out file is not a folder",
                     id="out-a-file"),
        pytest.param(["j.jsonl", "--out", "file/x"], 2, "--out file/x is not a folder",
                     id="out-under-a-file"),
        pytest.param(["j.jsonl", "--batch-sizes", "1"], 2, "--batch-sizes goes with --merge",
                     id="batches-without-merge"),
        pytest.param(["j.jsonl", "--merge", "--format", "sglang"], 2,
                     "--merge writes vLLM's table name only", id="merge-sglang"),
        pytest.param(["j.jsonl", "--device-name", "NVIDIA_H100_80GB_HBM3"], 1,
                     "refusing to write a table named for NVIDIA_H100", id="gpu-name"),
        pytest.param(["j.jsonl", "--merge", "--out", "nothing-here"], 1,
                     "--merge: no table to merge into at nothing-here/E=4,N=32", id="merge-none"),
    ],
)  # fmt: skip
def test_export_usage_and_output_mistakes(args, code, match, cwd):
    _write_journal(cwd / "j.jsonl", [_header(), _ok()])
    (cwd / "file").write_text("a file, not a folder")
    before = _snapshot(cwd)
    assert match in _invoke(["export-configs", *args], code)
    assert _snapshot(cwd) == before


def test_export_prints_paths_verbatim(cwd):
    """Paths are text, not rich markup: ``[/x]`` once crashed the renderer."""
    _write_journal(cwd / "j.jsonl", [_header(), _ok()])
    assert f"wrote [/x]/{TABLE_NAME}" in _invoke(["export-configs", "j.jsonl", "--out", "[/x]"], 0)


# --- verify -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(["missing"], "missing: no such file or folder", id="missing"),
        pytest.param(["empty"], "folder holds no *.json table", id="empty-folder"),
        pytest.param([TABLE_NAME], "folder holds no *.json table", id="folder-named-like-table"),
        pytest.param(["empty", "--K", "0"], "--K must be a positive integer", id="K-zero"),
        pytest.param(["empty", "--topk", "-1"], "--topk must be", id="topk-negative"),
        pytest.param(["empty", "--batch-sizes", "x"], "comma-separated", id="batches-letters"),
    ],
)  # fmt: skip
def test_verify_usage_mistakes(args, match, cwd):
    (cwd / "empty").mkdir()
    (cwd / TABLE_NAME).mkdir()
    assert match in _invoke(["verify", *args], 2)


def test_verify_that_checks_nothing_fails(cwd):
    """A named file that is skipped, or no entry at --batch-sizes, is not a pass."""
    (cwd / "t").mkdir()
    (cwd / "t" / TABLE_NAME).write_text(json.dumps({"1": CFG}))
    (cwd / "named.json").write_text(json.dumps({"1": CFG}))
    assert "named.json: skipped, 'named.json' is not a table file name" in _invoke(
        ["verify", "named.json"], 1)
    assert "nothing was checked at --batch-sizes 7" in _invoke(
        ["verify", "t", "--batch-sizes", "7"], 1)
    assert "ok" in _invoke(["verify", "t", "--batch-sizes", "1"], 0)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"\xff\xfe{}", "UnicodeDecodeError", id="not-utf8"),
        pytest.param(b"", "JSONDecodeError", id="empty-file"),
        pytest.param(b'{"\xc2\xb2": {}}', 'key "\xb2"', id="superscript-digit-key"),
        pytest.param(b'{"[/x]": {}}', 'key "[/x]"', id="key-looks-like-markup"),
        pytest.param(b'{"' + b"9" * 5000 + b'": {}}', "batch-size keys", id="5000-digit-key"),
    ],
)  # fmt: skip
def test_verify_reports_malformed_tables_as_invalid(content, reason, cwd):
    (cwd / TABLE_NAME).write_bytes(content)
    assert "1 of 1 results failed or invalid" in _invoke(["verify", TABLE_NAME], 1)
    result = runner.invoke(app, ["verify", TABLE_NAME, "--json"])
    assert result.exit_code == 1, result.output
    (only,) = json.loads(result.stdout[result.stdout.index("{") :])["results"]
    assert only["status"] == "invalid" and reason in only["reason"]


def test_verify_skips_a_folder_named_like_a_table_among_tables(cwd):
    (cwd / "tables").mkdir()
    (cwd / "tables" / TABLE_NAME).mkdir()
    (cwd / "tables" / "notes.json").write_text("{}")
    result = runner.invoke(app, ["verify", "tables", "--schema-only", "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (only,) = json.loads(result.stdout[result.stdout.index("{") :])["results"]
    assert only["file"].endswith("notes.json") and only["status"] == "invalid"


_knobs = st.sampled_from(TABLE_KEYS_CUDA + TABLE_KEYS_ROCM_EXTRA + TABLE_KEYS_OTHER)
_values = (
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats() | st.text(max_size=4)
    | st.sampled_from([16, 32, 64]) | st.lists(st.integers(), max_size=2)
)  # fmt: skip
_good_entry = st.fixed_dictionaries({k: st.sampled_from([16, 32, 64]) for k in TABLE_KEYS_CUDA[:4]})
_entries = (
    _good_entry | st.dictionaries(_knobs | st.text(max_size=6), _values, max_size=8) | _values
)
_batch_keys = (
    st.integers(-2, 5000).map(str) | st.text(max_size=5)
    | st.sampled_from(["01", "\xb2", "[/x]", "1" * 30, "triton_version", " 1", "1e3"])
)  # fmt: skip
_table_texts = st.one_of(
    st.dictionaries(st.integers(1, 4096).map(str), _good_entry, min_size=1, max_size=3).map(
        lambda d: json.dumps({"triton_version": "3.9.0", **d})
    ),  # well-formed
    st.dictionaries(_batch_keys, _entries, max_size=4).map(json.dumps),
    st.recursive(_values, lambda c: st.lists(c, max_size=3), max_leaves=6).map(json.dumps),
    st.text(max_size=40),
)


@FUZZ
@given(text=_table_texts)
def test_fuzzed_tables_verify_without_traceback(text, tmp_path):
    """A malformed table is one ``invalid`` result and exit 1; a well-formed one exits 0 (schema
    only). Under a name no problem can be derived from it is skipped, so nothing runs, and a
    file named on the command line that nothing checked exits 1."""
    table = tmp_path / TABLE_NAME
    table.write_text(text, encoding="utf-8")
    try:
        load_table(table)
        valid = True
    except TableError:
        valid = False
    unnamed = tmp_path / "fuzz.json"
    unnamed.write_text(text, encoding="utf-8")
    for args in ([str(table), "--schema-only"], [str(unnamed)]):
        result = runner.invoke(app, ["verify", *args, "--json"])
        assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
        assert result.exit_code == (0 if valid and args[0] == str(table) else 1), result.output
        statuses = {r["status"] for r in json.loads(result.stdout)["results"]}
        assert ("invalid" in statuses) == (not valid)
        assert "Traceback" not in result.output


@FUZZ
@given(data=st.binary(max_size=120) | _table_texts.map(str.encode))
def test_table_loader_raises_only_table_error(data, tmp_path):
    table = tmp_path / TABLE_NAME
    table.write_bytes(data)
    try:
        loaded = load_table(table)
    except TableError as e:
        assert TABLE_NAME in str(e)
    else:
        assert loaded.entries and all(k > 0 for k in loaded.entries)


@pytest.mark.parametrize("command", [["space", *SHAPE], ["sweep", *TINY_RUN],
                                     ["verify", "missing.json"], ["bench", *SHAPE]])  # fmt: skip
def test_unknown_fp8_accumulation_mode(command, cwd, monkeypatch, no_sweep):
    """A misspelt MOETUNE_FP8_ACCUM is one usage error before any work, for every command."""
    monkeypatch.setenv("MOETUNE_FP8_ACCUM", "tiles")
    line = _invoke(command, 2)
    assert "MOETUNE_FP8_ACCUM must be one of auto, precise, tile, fast, got 'tiles'" in line
    assert not any(cwd.iterdir())


# --- running out of memory, progress in a log ---------------------------------------------------


def test_out_of_memory_gives_one_error_line_and_other_bugs_stay_visible(cwd, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr("moetune.sweep.run_sweep", oom)
    line = _invoke(["sweep", *SHAPE], 1)
    assert line.startswith("Error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "more detail" not in line

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("moetune.sweep.run_sweep", bug)
    result = runner.invoke(app, ["sweep", *SHAPE])
    assert isinstance(result.exception, RuntimeError), "a bug is not dressed up as a usage error"


def test_progress_off_a_terminal_prints_lines(monkeypatch, capsys):
    from moetune import cli_common

    monkeypatch.setattr(cli_common, "PLAIN_PROGRESS_S", 0.0)

    def work(update):
        for done in range(1, 4):
            update(done, 3, "pass 1")
        return "done"

    assert cli_common.run_with_progress(work) == "done"
    lines = [line for line in capsys.readouterr().err.splitlines() if "pass 1" in line]
    assert lines == ["1/3 pass 1", "2/3 pass 1", "3/3 pass 1"]
