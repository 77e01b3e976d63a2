"""Platform facts, vLLM's device-name spelling, aliases and detection (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moetune.platform import (
    PLATFORMS,
    detect_platform,
    device_name_aliases,
    get_platform,
    normalize_device_name,
)
from moetune.tables import parse_table_filename

ROOT = Path(__file__).parents[1]
VLLM_TABLES = Path(__file__).parents[2] / "shared/data/vllm-tables"


def shipped_names() -> list[str]:
    if not VLLM_TABLES.is_dir():
        pytest.skip(f"vLLM's shipped tables are not at {VLLM_TABLES} (a clone has no shared/)")
    return sorted(p.name for p in VLLM_TABLES.glob("*.json"))


def test_get_platform_is_case_insensitive():
    assert get_platform("H100") is PLATFORMS["h100"]
    assert get_platform(" mi355x ") is PLATFORMS["mi355x"]


def test_get_platform_unknown_lists_every_key():
    with pytest.raises(ValueError, match="unknown platform 'v100'") as err:
        get_platform("v100")
    for key in PLATFORMS:
        assert key in str(err.value)


@pytest.mark.parametrize(
    "key, vendor, fp8, fp8_max",
    [
        ("h100", "nvidia", "float8_e4m3fn", 448.0),
        ("mi300x", "amd", "float8_e4m3fnuz", 240.0),  # gfx942: fnuz only
        ("mi325x", "amd", "float8_e4m3fnuz", 240.0),
        ("mi355x", "amd", "float8_e4m3fn", 448.0),  # gfx950 switched to OCP e4m3
        ("interpreter", "interpreter", "float8_e4m3fn", 448.0),
    ],
)
def test_fp8_flavour_follows_arch(key, vendor, fp8, fp8_max):
    p = PLATFORMS[key]
    assert (p.vendor, p.fp8_dtype, p.fp8_max) == (vendor, fp8, fp8_max)
    assert p.fp8_torch_dtype == getattr(torch, fp8)
    assert torch.finfo(p.fp8_torch_dtype).max == fp8_max
    assert p.is_rocm == (vendor == "amd")
    assert p.is_interpreter == (vendor == "interpreter")


def test_named_platforms_use_canonical_device_names():
    for p in PLATFORMS.values():
        if not p.is_interpreter:
            assert normalize_device_name(p.device_name) == p.device_name, p.key
        assert p.shared_mem_bytes > 0 and p.multiprocessors > 0


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),  # SXM
        ("NVIDIA H100 PCIe", "NVIDIA_H100_PCIe"),  # a different card: not folded
        ("NVIDIA H200", "NVIDIA_H200"),
        ("NVIDIA H200 NVL", "NVIDIA_H200"),
        ("NVIDIA H200 141GB HBM3e", "NVIDIA_H200"),
        ("NVIDIA GH200 480GB", "NVIDIA_GH200_480GB"),  # token is GH200, not H200
        ("NVIDIA H20", "NVIDIA_H20"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA_A100-SXM4-80GB"),
        ("NVIDIA L40S", "NVIDIA_L40S"),
        ("Intel(R) Arc(TM) Pro B70 Graphics", "Intel(R)_Arc(TM)_Pro_B70_Graphics"),
        ("AMD Instinct MI300X", "AMD_Instinct_MI300X"),
        ("AMD Instinct MI325X", "AMD_Instinct_MI325X"),
        ("AMD Instinct MI355X", "AMD_Instinct_MI355X"),
        ("AMD Instinct MI355 OAM", "AMD_Instinct_MI355X"),  # amdsmi market name -> vLLM's map
        ("AMD Instinct MI350 OAM", "AMD_Instinct_MI350X"),
        ("AMD Instinct MI300X VF", "AMD_Instinct_MI300X"),
        ("  NVIDIA  L40S\t", "NVIDIA_L40S"),  # runs of whitespace collapse
        ("Some/GPU", "Some_GPU"),  # '/' can never be part of a file name
    ],
)
def test_normalize_device_name(raw, expected):
    assert normalize_device_name(raw) == expected
    assert normalize_device_name(expected) == expected  # idempotent


def test_aliases_put_the_canonical_name_first():
    assert device_name_aliases("AMD_Instinct_MI355X") == [
        "AMD_Instinct_MI355X",
        "AMD_Instinct_MI355_OAM",
    ]
    assert device_name_aliases("AMD_Instinct_MI355_OAM")[0] == "AMD_Instinct_MI355X"
    assert device_name_aliases("NVIDIA_H100_80GB_HBM3") == ["NVIDIA_H100_80GB_HBM3", "NVIDIA_H100"]
    assert device_name_aliases("NVIDIA_H100") == ["NVIDIA_H100", "NVIDIA_H100_80GB_HBM3"]
    assert device_name_aliases("NVIDIA H200 NVL") == ["NVIDIA_H200"]
    assert device_name_aliases("NVIDIA_L40S") == ["NVIDIA_L40S"]


def test_aliases_find_the_oam_tables_vllm_ships():
    """vLLM 0.33.0 ships some MI350/MI355 tables only under the older amdsmi market names."""
    names = set(shipped_names())
    for canonical, n in (("AMD_Instinct_MI355X", 384), ("AMD_Instinct_MI350X", 192)):
        wanted = "E=160,N={},device_name={},dtype=fp8_w8a8.json"
        assert wanted.format(n, canonical) not in names  # the canonical name alone misses it
        found = [d for d in device_name_aliases(canonical) if wanted.format(n, d) in names]
        assert found == [canonical.replace("X", "_OAM")]


def test_every_shipped_device_name_is_reachable_from_its_canonical_name():
    """A machine computes normalize(name) and searches its aliases: every shipped table is found."""
    devices = {parse_table_filename(n).device_name for n in shipped_names()}
    assert "AMD_Instinct_MI355_OAM" in devices and "NVIDIA_H100" in devices
    for d in devices:
        assert d in device_name_aliases(normalize_device_name(d)), d


def test_detect_platform_without_gpu_is_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; this checks the CPU-only fallback")
    assert detect_platform() is PLATFORMS["interpreter"]


def _fake_gpu(monkeypatch, name, props, hip=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.version, "hip", hip)


def test_detect_known_nvidia_gpu_takes_measured_limits(monkeypatch):
    """A MIG slice reports fewer SMs: the search space must see those, not the full chip's."""
    props = SimpleNamespace(
        major=9, minor=0, multi_processor_count=66, shared_memory_per_block_optin=232448
    )
    _fake_gpu(monkeypatch, "NVIDIA H200 NVL", props)
    p = detect_platform()
    assert (p.key, p.device_name, p.arch, p.multiprocessors) == ("h200", "NVIDIA_H200", "sm90", 66)


def test_detect_h100_under_its_plain_name_keeps_that_name(monkeypatch):
    """vLLM on a GPU that reports "NVIDIA H100" looks for NVIDIA_H100 tables, so write those."""
    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    _fake_gpu(monkeypatch, "NVIDIA H100", props)
    p = detect_platform()
    assert (p.key, p.device_name) == ("h100", "NVIDIA_H100")
    assert p.shared_mem_bytes == PLATFORMS["h100"].shared_mem_bytes  # not reported: keep known


@pytest.mark.parametrize(
    "arch, fp8", [("gfx942:sramecc+:xnack-", "float8_e4m3fnuz"), ("gfx950", "float8_e4m3fn")]
)
def test_detect_unknown_amd_gpu_from_properties(monkeypatch, arch, fp8):
    props = SimpleNamespace(
        major=9, minor=4, multi_processor_count=80, shared_memory_per_block=65536, gcnArchName=arch
    )
    _fake_gpu(monkeypatch, "AMD Instinct MI308X", props, hip="6.4")
    p = detect_platform()
    assert p.key == "amd_instinct_mi308x"
    assert (p.vendor, p.arch.split(":")[0], p.fp8_dtype) == ("amd", arch.split(":")[0], fp8)
    assert ":" not in p.arch
    assert (p.multiprocessors, p.shared_mem_bytes) == (80, 65536)


def test_detect_known_amd_gpu(monkeypatch):
    props = SimpleNamespace(multi_processor_count=256, gcnArchName="gfx950", major=9, minor=5)
    _fake_gpu(monkeypatch, "AMD Instinct MI355 OAM", props, hip="7.0")
    p = detect_platform()
    assert (p.key, p.device_name, p.fp8_dtype) == ("mi355x", "AMD_Instinct_MI355X", "float8_e4m3fn")


def test_importing_platform_does_not_touch_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k):\n"
        "    raise SystemExit('CUDA queried at import time')\n"
        "torch.cuda.is_available = torch.cuda.get_device_properties = boom\n"
        "torch.cuda.get_device_name = boom\n"
        "import moetune.platform, moetune.tables\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
