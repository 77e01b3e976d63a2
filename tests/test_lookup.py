"""Runtime lookup of the two GEMMs' tables: the main (up) table and SGLang's ``_down`` table."""

import warnings

import pytest
import torch

from moetune import lookup
from moetune.defaults import default_config
from moetune.tables import gemm_suffix, parse_table_filename, table_filename, write_table

DEV = "cpu_interpreter"
E, N = 4, 32


def _entry(bm: int, bn: int) -> dict:
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
            "num_warps": 4, "num_stages": 2}  # fmt: skip


UP = {1: _entry(16, 32), 64: _entry(32, 64)}
DOWN = {1: _entry(64, 16), 64: _entry(16, 128)}


def _write(folder, entries, gemm="up"):
    name = table_filename(E, N, DEV, suffix=gemm_suffix(gemm))
    return write_table(folder / name, entries, triton_version="3.6.0")


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Two user folders, searched in order, and a fresh set of "missing table" warnings."""
    first, second = tmp_path / "moetune", tmp_path / "vllm"
    first.mkdir(), second.mkdir()
    monkeypatch.setenv("MOETUNE_CONFIG_DIR", str(first))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(second))
    monkeypatch.setattr(lookup, "_warned", set())
    return first, second


def test_down_table_name_round_trips():
    """The ``_down`` name comes from vLLM's naming function and parses back to the same parts."""
    name = table_filename(8, 7168, "NVIDIA_H100_80GB_HBM3", "fp8_w8a8", (128, 128),
                          suffix=gemm_suffix("down"))  # fmt: skip
    assert name == (
        "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128]_down.json"
    )
    parsed = parse_table_filename(name)
    assert parsed.gemm == "down" and parsed.filename == name
    assert parse_table_filename(name.replace("_down", "")).gemm == "up"
    with pytest.raises(ValueError, match="gemm"):
        gemm_suffix("gate")


def test_each_gemm_reads_its_own_table_nearest_batch(dirs):
    first, _ = dirs
    _write(first, UP)
    _write(first, DOWN, "down")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup.get_config(40, E, N, device_name=DEV) == UP[64]
        assert lookup.get_config(40, E, N, device_name=DEV, gemm="down") == DOWN[64]
        assert lookup.get_config(2, E, N, device_name=DEV, gemm="down") == DOWN[1]


def test_down_falls_back_to_the_up_table_without_a_warning(dirs):
    first, _ = dirs
    _write(first, UP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing _down table is the usual case: no warning
        assert lookup.get_config(64, E, N, device_name=DEV, gemm="down") == UP[64]


def test_down_falls_back_to_the_heuristic_like_up(dirs):
    with pytest.warns(UserWarning, match="no tuned config table"):
        down = lookup.config_for(8, E, N, 64, 2, dtype=torch.float16, quant=None,
                                 block_shape=None, gemm="down")  # fmt: skip
    assert down == default_config(8, E, N, 64, 2, dtype=torch.float16)


def test_down_table_only_beside_its_main_table(dirs, monkeypatch):
    """A ``_down`` table is read only from the folder its main table came from: one in another
    folder was never checked together with that main table (e.g. a stale file)."""
    first, second = dirs
    _write(first, UP)
    _write(second, DOWN, "down")
    monkeypatch.setattr(lookup, "_current_device_name", lambda: DEV)
    assert lookup.get_config(1, E, N, gemm="down") == UP[1]
    _write(first, {1: _entry(32, 32)}, "down")
    assert lookup.get_config(1, E, N, gemm="down") == _entry(32, 32)
    with pytest.raises(ValueError, match="gemm"):
        lookup.get_config(1, E, N, gemm="both")
