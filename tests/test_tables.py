"""The vLLM table format: names, reading, nearest-batch lookup and atomic writing."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetune.tables import (
    TABLE_KEYS_CUDA,
    TABLE_KEYS_OTHER,
    TABLE_KEYS_ROCM_EXTRA,
    TableError,
    TableName,
    load_table,
    nearest_entry,
    parse_table_filename,
    sglang_filename,
    sglang_version_dir,
    sidecar_path,
    table_filename,
    write_table,
)

VLLM_TABLES = Path(__file__).parents[2] / "shared/data/vllm-tables"
H100_FP8 = "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
CFG = {
    "BLOCK_SIZE_M": 16,
    "BLOCK_SIZE_N": 64,
    "BLOCK_SIZE_K": 128,
    "GROUP_SIZE_M": 1,
    "num_warps": 4,
    "num_stages": 3,
}


@pytest.fixture(scope="module")
def shipped() -> list[Path]:
    if not VLLM_TABLES.is_dir():
        pytest.skip(f"vLLM's shipped tables are not at {VLLM_TABLES} (a clone has no shared/)")
    files = sorted(VLLM_TABLES.glob("*.json"))
    assert len(files) > 300
    return files


# --- file names -------------------------------------------------------------------------------


def test_every_shipped_name_parses_and_round_trips(shipped):
    wrong = [p.name for p in shipped if parse_table_filename(p.name).filename != p.name]
    assert wrong == []


@pytest.mark.parametrize(
    "name, parts",
    [
        (H100_FP8, (8, 7168, "NVIDIA_H100_80GB_HBM3", "fp8_w8a8", None, None)),
        (
            "E=64,N=512,device_name=Intel(R)_Arc(TM)_Pro_B70_Graphics.json",
            (64, 512, "Intel(R)_Arc(TM)_Pro_B70_Graphics", None, None, None),
        ),
        (
            "E=1,N=1792,device_name=NVIDIA_A100-SXM4-80GB,dtype=int8_w8a16.json",
            (1, 1792, "NVIDIA_A100-SXM4-80GB", "int8_w8a16", None, None),
        ),
        (  # block shape without a dtype part
            "E=256,N=1024,device_name=AMD_Instinct_MI325X,block_shape=[128,128].json",
            (256, 1024, "AMD_Instinct_MI325X", None, (128, 128), None),
        ),
        (
            "E=384,N=256,device_name=AMD_Instinct_MI355X,dtype=int4_w4a16,backend=flydsl.json",
            (384, 256, "AMD_Instinct_MI355X", "int4_w4a16", None, "flydsl"),
        ),
    ],
)
def test_parse_odd_names(name, parts):
    n = parse_table_filename(name)
    assert (n.E, n.N, n.device_name, n.dtype, n.block_shape, n.backend) == parts
    assert n.filename == name


@pytest.mark.parametrize(
    "bad",
    [
        "E=8,N=7168.json",  # no device
        "E=08,N=7168,device_name=X.json",  # leading zero would not round-trip
        "E=0,N=7168,device_name=X.json",
        "E=8,N=7168,device_name=NVIDIA H100.json",  # space
        "E=8,N=7168,device_name=X,dtype=fp8_w8a8.yaml",
        "N=7168,E=8,device_name=X.json",  # order matters to vLLM
        "E=8,N=7168,device_name=X,block_shape=[128].json",
        "E=8,N=7168,device_name=X,dtype=fp8_w8a8,extra=1.json",
        "E=8,N=7168,device_name=X.provenance.json",  # a sidecar is not a table
        "",
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_table_filename(bad)


def test_table_filename_follows_vllm():
    assert table_filename(8, 7168, "NVIDIA_H100_80GB_HBM3", "fp8_w8a8", [128, 128]) == (
        "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
    )
    # vLLM drops the block part when a block size is 0 (its "no block quant" spelling).
    assert table_filename(8, 14336, "NVIDIA_H200", None, [0, 0]) == (
        "E=8,N=14336,device_name=NVIDIA_H200.json"
    )
    for bad in [(0, 1, "X"), (1, 1, "NVIDIA H100"), (1, 1, "a,b"), (True, 1, "X")]:
        with pytest.raises(ValueError):
            table_filename(*bad)


def test_sglang_names():
    """SGLang writes the block shape with Python's list repr (a space) and '_down' for w2."""
    name = sglang_filename(256, 256, "NVIDIA_H20-3e", "fp8_w8a8", [128, 128], down=True)
    assert (
        name
        == "E=256,N=256,device_name=NVIDIA_H20-3e,dtype=fp8_w8a8,block_shape=[128, 128]_down.json"
    )
    n = parse_table_filename(name)
    assert (n.block_shape, n.suffix, n.dtype) == ((128, 128), "_down", "fp8_w8a8")
    assert sglang_filename(n.E, n.N, n.device_name, n.dtype, n.block_shape, down=True) == name
    down = parse_table_filename("E=160,N=384,device_name=X,dtype=fp8_w8a8_down.json")
    assert (down.dtype, down.suffix) == ("fp8_w8a8", "_down")
    pcq = sglang_filename(8, 1, "X", "int8_w8a8", per_channel_quant=True)
    assert parse_table_filename(pcq).per_channel_quant
    assert sglang_version_dir("3.4.0") == "triton_3_4_0"


def test_tablename_defaults_render_like_vllm():
    assert TableName(8, 7168, "NVIDIA_H200", None, None).filename == (
        "E=8,N=7168,device_name=NVIDIA_H200.json"
    )


# --- reading ------------------------------------------------------------------------------------


def test_every_shipped_table_loads(shipped):
    tables = [load_table(p) for p in shipped]
    assert all(t.name is not None and t.entries for t in tables)
    for t in tables:
        assert list(t.entries) == sorted(t.entries)


def test_shipped_key_sets_are_the_ones_we_know(shipped):
    """Survey of vLLM 0.33.0: which kernel keys occur, so the validator's key list is grounded."""
    key_sets: Counter[frozenset[str]] = Counter()
    for p in shipped:
        for entry in load_table(p).entries.values():
            key_sets[frozenset(entry)] += 1
    known = set(TABLE_KEYS_CUDA + TABLE_KEYS_ROCM_EXTRA + TABLE_KEYS_OTHER)
    flydsl = {"tile_m", "tile_n", "tile_k", "tile_n2", "tile_k2"}
    for ks in key_sets:
        assert ks <= known or ks == flydsl, sorted(ks)
    assert key_sets[frozenset(TABLE_KEYS_CUDA)] > 4000
    assert key_sets[frozenset(TABLE_KEYS_CUDA + TABLE_KEYS_ROCM_EXTRA)] > 500


def test_loaded_table_keeps_triton_version_apart(shipped):
    t = load_table(VLLM_TABLES / "E=64,N=1536,device_name=NVIDIA_H100_80GB_HBM3.json")
    assert t.triton_version == "3.6.0"
    assert all(isinstance(k, int) for k in t.entries)
    assert t.name is not None and t.name.device_name == "NVIDIA_H100_80GB_HBM3"


def _write(tmp_path: Path, text: str | bytes, name: str = H100_FP8) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _table(**overrides) -> str:
    entry = {**CFG, **overrides}
    return json.dumps({"1": CFG, "16": {k: v for k, v in entry.items() if v is not None}})


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ('{"1": {', None, "not a readable JSON table"),
        ("[1, 2]", None, "top level must be a JSON object"),
        ("{}", None, "no batch-size entries"),
        (json.dumps({"abc": CFG}), "abc", "batch-size keys must be positive integers"),
        (json.dumps({"01": CFG}), "01", "batch-size keys"),
        (json.dumps({"-4": CFG}), "-4", "batch-size keys"),
        (json.dumps({"1.5": CFG}), "1.5", "batch-size keys"),
        ('{"1": {}, "1": {}}', None, 'key "1" appears more than once'),
        ('{"1": {"num_warps": 4, "num_warps": 8}}', None, 'key "num_warps" appears more'),
        (json.dumps({"triton_version": 3.6, "1": CFG}), "triton_version", "must be a string"),
        (json.dumps({"1": [16, 64]}), "1", "value must be an object"),
        (_table(BLOCK_SIZE_N=None), "16", "missing BLOCK_SIZE_N"),
        (_table(BLOCK_SIZE_M=-16), "16", "BLOCK_SIZE_M must be a positive integer"),
        (_table(BLOCK_SIZE_M=0), "16", "BLOCK_SIZE_M must be a positive integer"),
        (_table(BLOCK_SIZE_K=96), "16", "BLOCK_SIZE_K must be a power of two"),
        (_table(num_warps=6), "16", "num_warps must be a power of two"),
        (_table(BLOCK_SIZE_N=64.0), "16", "BLOCK_SIZE_N must be a positive integer"),
        (_table(GROUP_SIZE_M=True), "16", "GROUP_SIZE_M must be a positive integer"),
        (_table(num_stages="3"), "16", "num_stages must be a positive integer"),
        (_table(USE_TMA=1), "16", "unknown key 'USE_TMA'"),
        (_table(waves_per_eu=0), "16", "ROCm-only key"),  # an NVIDIA table
    ],
)
def test_malformed_tables_name_file_and_key(tmp_path, text, key, reason):
    p = _write(tmp_path, text)
    with pytest.raises(TableError) as err:
        load_table(p)
    e = err.value
    assert (e.path, e.key) == (p, key)
    assert reason in str(e)
    assert str(e).startswith(H100_FP8 + ":")
    if key is not None:
        assert f'key "{key}"' in str(e)


def test_unreadable_files_are_table_errors(tmp_path):
    with pytest.raises(TableError, match="not a readable JSON table"):
        load_table(_write(tmp_path, b"\xff\xfe{"))
    with pytest.raises(TableError, match="not a readable JSON table"):
        load_table(tmp_path / "missing.json")


def test_rocm_table_accepts_rocm_keys_and_their_zero_defaults(tmp_path):
    entry = {**CFG, "waves_per_eu": 0, "matrix_instr_nonkdim": 16, "kpack": 2}
    p = _write(
        tmp_path, json.dumps({"1": entry}), "E=8,N=7168,device_name=AMD_Instinct_MI300X.json"
    )
    assert load_table(p).entries == {1: entry}
    bad = _write(tmp_path, json.dumps({"1": {**entry, "kpack": 4}}), p.name)
    with pytest.raises(TableError, match="kpack must be 1 or 2"):
        load_table(bad)


def test_entries_without_warps_or_stages_load_like_vllm_defaults(tmp_path):
    """vLLM's own default configs carry only the four block keys; Triton supplies the rest."""
    entry = {k: CFG[k] for k in TABLE_KEYS_CUDA[:4]}
    assert load_table(_write(tmp_path, json.dumps({"1": entry}))).entries == {1: entry}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
_near_valid = st.dictionaries(
    st.sampled_from(["1", "2", "16", "0", "x", "triton_version", "1024"]),
    st.dictionaries(
        st.sampled_from([*TABLE_KEYS_CUDA, *TABLE_KEYS_ROCM_EXTRA, *TABLE_KEYS_OTHER, "bogus"]),
        st.integers(-2, 300) | st.sampled_from([1.0, "256", None, True]),
        max_size=10,
    )
    | st.text(max_size=5),
    max_size=5,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.text(max_size=8), _json, max_size=6) | _near_valid)
def test_arbitrary_json_objects_load_or_raise_table_error(tmp_path, doc):
    p = _write(tmp_path, json.dumps(doc), "E=8,N=7168,device_name=AMD_Instinct_MI300X.json")
    try:
        table = load_table(p)
    except TableError as e:
        assert e.path == p
        return
    for entry in table.entries.values():  # whatever loads satisfies the invariants
        for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"):
            assert isinstance(entry[k], int) and entry[k] > 0
        for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps"):
            assert k not in entry or entry[k] & (entry[k] - 1) == 0


# --- nearest batch ------------------------------------------------------------------------------

ENTRIES = {k: {"BLOCK_SIZE_M": k} for k in (16, 32, 64, 256)}


@pytest.mark.parametrize(
    "M, expected",
    [
        (1, 16),  # below the smallest key
        (16, 16),
        (24, 16),  # tie between 16 and 32: the smaller, as vLLM on an ascending file
        (25, 32),
        (48, 32),  # tie
        (160, 64),  # tie between 64 and 256
        (161, 256),
        (100_000, 256),  # above the largest key
    ],
)
def test_nearest_entry(M, expected):
    assert nearest_entry(ENTRIES, M)["BLOCK_SIZE_M"] == expected
    reversed_order = dict(reversed(list(ENTRIES.items())))
    assert nearest_entry(reversed_order, M)["BLOCK_SIZE_M"] == expected


def test_nearest_entry_empty():
    with pytest.raises(ValueError):
        nearest_entry({}, 1)


def test_nearest_entry_matches_vllm_on_every_sorted_shipped_table(shipped):
    checked = 0
    for p in shipped:
        raw = json.loads(p.read_text())
        raw.pop("triton_version", None)
        vllm = {int(k): v for k, v in raw.items()}  # vLLM keeps file order
        if list(vllm) != sorted(vllm):
            continue
        keys = sorted(vllm)
        probes = {0, 1, 10**7, *keys, *(k + 1 for k in keys), *(k - 1 for k in keys)}
        probes |= {(a + b) // 2 for a, b in itertools.pairwise(keys)}
        ours = load_table(p)
        for M in probes:
            assert ours.lookup(M) == vllm[min(vllm, key=lambda x: abs(x - M))], (p.name, M)
        checked += 1
    assert checked > 300


def test_unsorted_shipped_table_ties_differ_from_vllm(shipped):
    """vLLM breaks ties by file order; three shipped H100 tables list keys unsorted, so at a
    midpoint vLLM may take the larger key where moetune (sorted) takes the smaller."""
    p = VLLM_TABLES / "E=16,N=3200,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    raw = {int(k): v for k, v in json.loads(p.read_text()).items()}
    assert list(raw) != sorted(raw)
    M = 640  # midway between 512 and 768; the file lists 768 first
    assert raw[min(raw, key=lambda x: abs(x - M))] == raw[768]
    assert load_table(p).lookup(M) == raw[512] != raw[768]


# --- writing ------------------------------------------------------------------------------------


def test_write_then_read_back(tmp_path):
    entries = {64: {**CFG, "BLOCK_SIZE_M": 64}, 1: CFG, 8: {**CFG, "num_stages": 4}}
    p = write_table(tmp_path / H100_FP8, entries, triton_version="3.6.0")
    t = load_table(p)
    assert (t.triton_version, t.entries) == ("3.6.0", dict(sorted(entries.items())))
    text = p.read_text()
    assert list(json.loads(text)) == ["triton_version", "1", "8", "64"]
    assert text.startswith('{\n    "triton_version": "3.6.0",\n    "1": {\n        "BLOCK_SIZE_M"')
    assert not sidecar_path(p).exists()
    assert [f.name for f in tmp_path.iterdir()] == [H100_FP8]  # no temp file left behind


def test_writer_reproduces_vllm_files_byte_for_byte(shipped, tmp_path):
    """Tables vLLM's own tuner wrote (triton_version first, indent 4, final newline)."""
    same = 0
    for p in shipped:
        text = p.read_text()
        doc = json.loads(text)
        if "triton_version" not in doc or text != json.dumps(doc, indent=4) + "\n":
            continue
        t = load_table(p)
        out = write_table(tmp_path / p.name, t.entries, triton_version=t.triton_version)
        assert out.read_text() == text, p.name
        same += 1
    assert same > 50


def test_sidecar_beside_the_table(tmp_path):
    side = {"moetune": "0.1.0", "gpu": "NVIDIA H100 80GB HBM3", "median_us": {"1": 12.5}}
    p = write_table(tmp_path / H100_FP8, {1: CFG}, triton_version="3.6.0", sidecar=side)
    sp = sidecar_path(p)
    assert sp.name == H100_FP8.removesuffix(".json") + ".provenance.json"
    assert json.loads(sp.read_text()) == side
    assert "moetune" not in p.read_text()  # provenance never inside the table


@pytest.mark.parametrize(
    "entries, sidecar, reason",
    [
        ({1: {**CFG, "note": "fast"}}, None, "unknown key 'note'"),
        ({1: {k: v for k, v in CFG.items() if k != "num_stages"}}, None, "missing num_stages"),
        ({1: {**CFG, "BLOCK_SIZE_N": 48}}, None, "power of two"),
        ({0: CFG}, None, "positive integers"),
        ({"1": CFG}, None, "positive integers"),
        ({}, None, "no batch-size entries"),
        ({1: CFG}, {"when": object()}, "not JSON-serializable"),
        ({1: CFG}, {"x": float("nan")}, "not JSON-serializable"),
    ],
)
def test_failed_write_leaves_existing_files_untouched(tmp_path, entries, sidecar, reason):
    p = write_table(tmp_path / H100_FP8, {1: CFG}, triton_version="3.5.0", sidecar={"v": 1})
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(TableError, match=reason):
        write_table(p, entries, triton_version="3.6.0", sidecar=sidecar)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_crash_during_replace_leaves_old_table_and_no_temp(tmp_path, monkeypatch):
    p = write_table(tmp_path / H100_FP8, {1: CFG}, triton_version="3.5.0")
    before = p.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_table(p, {1: {**CFG, "num_stages": 5}}, triton_version="3.6.0")
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == [H100_FP8]


def test_write_rejects_rocm_keys_on_nvidia_but_keeps_them_on_amd(tmp_path):
    rocm = {**CFG, "waves_per_eu": 0, "matrix_instr_nonkdim": 16, "kpack": 2}
    with pytest.raises(TableError, match="ROCm-only"):
        write_table(tmp_path / H100_FP8, {1: rocm}, triton_version="3.6.0")
    amd = "E=8,N=7168,device_name=AMD_Instinct_MI355X,dtype=fp8_w8a8.json"
    p = write_table(tmp_path / "sub" / amd, {1: rocm}, triton_version="3.6.0")
    assert load_table(p).entries == {1: rocm}
    assert list(json.loads(p.read_text())["1"])[-3:] == list(TABLE_KEYS_ROCM_EXTRA)


def test_rewrite_without_provenance_drops_the_stale_sidecar(tmp_path):
    """A sidecar must never describe a table other than the one beside it."""
    p = write_table(tmp_path / H100_FP8, {1: CFG}, triton_version="3.5.0", sidecar={"v": 1})
    write_table(p, {1: {**CFG, "num_stages": 4}}, triton_version="3.6.0")
    assert not sidecar_path(p).exists()
    assert load_table(p).entries[1]["num_stages"] == 4
