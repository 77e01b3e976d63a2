"""The GPU a table is tuned for: vLLM's device name plus the limits the search space needs.

Nothing here touches CUDA at import time; only :func:`detect_platform` asks torch, so the search
space stays a pure function of a :class:`Platform` passed in (and tests can name any GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e4m3fnuz": 240.0}


@dataclass(frozen=True)
class Platform:
    """One accelerator kind; ``device_name`` is spelled exactly as in vLLM's table file names."""

    key: str
    vendor: str  # "nvidia" | "amd" | "interpreter"
    device_name: str
    arch: str  # "sm90", "gfx942", ... or "interpreter"
    shared_mem_bytes: int  # opt-in shared memory per block (NVIDIA) or LDS per workgroup (AMD)
    multiprocessors: int  # SMs (NVIDIA) or CUs (AMD)
    fp8_dtype: str  # torch dtype name of the platform's native e4m3 flavour

    @property
    def is_rocm(self) -> bool:
        return self.vendor == "amd"

    @property
    def is_interpreter(self) -> bool:
        return self.vendor == "interpreter"

    @property
    def fp8_max(self) -> float:
        """Largest finite value of ``fp8_dtype``: gfx942's e4m3fnuz tops out at 240, not 448."""
        return FP8_MAX[self.fp8_dtype]

    @property
    def fp8_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.fp8_dtype)

    def cuda_capability(self) -> int | None:
        """Triton's compute capability for an NVIDIA arch ("sm90" -> 90), else None."""
        digits = self.arch.removeprefix("sm")
        return int(digits) if self.vendor == "nvidia" and digits.isdigit() else None


def _p(key, vendor, device_name, arch, smem, mps, fp8="float8_e4m3fn") -> Platform:
    return Platform(key, vendor, device_name, arch, smem, mps, fp8)


PLATFORMS: dict[str, Platform] = {
    p.key: p
    for p in (
        _p("h100", "nvidia", "NVIDIA_H100_80GB_HBM3", "sm90", 232448, 132),
        _p("h200", "nvidia", "NVIDIA_H200", "sm90", 232448, 132),
        _p("a100", "nvidia", "NVIDIA_A100-SXM4-80GB", "sm80", 166912, 108),
        _p("l40s", "nvidia", "NVIDIA_L40S", "sm89", 101376, 142),
        _p("b200", "nvidia", "NVIDIA_B200", "sm100", 232448, 148),
        _p("mi300x", "amd", "AMD_Instinct_MI300X", "gfx942", 65536, 304, "float8_e4m3fnuz"),
        _p("mi325x", "amd", "AMD_Instinct_MI325X", "gfx942", 65536, 304, "float8_e4m3fnuz"),
        _p("mi355x", "amd", "AMD_Instinct_MI355X", "gfx950", 163840, 256),
        _p("interpreter", "interpreter", "cpu_interpreter", "interpreter", 1 << 30, 1),
    )
}


def get_platform(key: str) -> Platform:
    """The named platform (case-insensitive); ValueError lists the known keys."""
    try:
        return PLATFORMS[key.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown platform {key!r}; known platforms: {', '.join(PLATFORMS)}"
        ) from None


# AMD names that older vLLM took from amdsmi's market name, mapped to what vLLM writes now that
# its ROCm device-id map knows these chips (0x74a5/0x74b9 -> MI325X, 0x75a0 -> MI350X,
# 0x75a3 -> MI355X; the VF ids map to the bare-metal names). vLLM 0.33.0 still ships tables under
# both spellings, hence the aliases below.
_AMD_CANONICAL = {
    "AMD_Instinct_MI325_OAM": "AMD_Instinct_MI325X",
    "AMD_Instinct_MI350_OAM": "AMD_Instinct_MI350X",
    "AMD_Instinct_MI355_OAM": "AMD_Instinct_MI355X",
    "AMD_Instinct_MI300X_VF": "AMD_Instinct_MI300X",
    "AMD_Instinct_MI325X_VF": "AMD_Instinct_MI325X",
}

# Names under which vLLM's shipped tables store the same chip; canonical (written) name first.
_ALIAS_GROUPS: tuple[tuple[str, ...], ...] = (
    ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H100"),
    ("AMD_Instinct_MI325X", "AMD_Instinct_MI325_OAM"),
    ("AMD_Instinct_MI350X", "AMD_Instinct_MI350_OAM"),
    ("AMD_Instinct_MI355X", "AMD_Instinct_MI355_OAM"),
)


def normalize_device_name(raw: str) -> str:
    """A GPU name as vLLM spells it in table file names.

    vLLM replaces each space with ``_`` and folds every H200 variant (any ``_``-separated token
    equal to ``H200``, so GH200 stays itself) to ``NVIDIA_H200``. moetune also collapses runs of
    whitespace and turns ``/`` into ``_`` (a ``/`` cannot be in a file name); for names with single
    spaces, which is every GPU name we know, the result is the same as vLLM's.
    """
    name = re.sub(r"[\s/]+", "_", raw.strip())
    if "H200" in name.split("_"):
        return "NVIDIA_H200"
    return _AMD_CANONICAL.get(name, name)


def device_name_aliases(device_name: str) -> list[str]:
    """File-name spellings a table for this device may be stored under, canonical one first."""
    canonical = normalize_device_name(device_name)
    names = [canonical]
    for group in _ALIAS_GROUPS:
        if canonical in group:
            names += [n for n in group if n != canonical]
    return names


_BY_DEVICE_NAME = {
    alias: p for p in PLATFORMS.values() for alias in device_name_aliases(p.device_name)
}


def _amd_arch(props: object) -> str:
    # gcnArchName looks like "gfx942:sramecc+:xnack-"; only the chip part matters here.
    return str(getattr(props, "gcnArchName", "") or "").split(":")[0] or "gfx_unknown"


def detect_platform(device_index: int = 0) -> Platform:
    """The platform of a visible GPU, or the interpreter platform when there is none.

    A known GPU keeps its key but takes the name, SM/CU count and shared memory the device reports:
    vLLM on this machine looks tables up under that name, and a MIG slice or a binned part must
    not be searched as the full chip.
    """
    if not torch.cuda.is_available():
        return PLATFORMS["interpreter"]
    props = torch.cuda.get_device_properties(device_index)
    raw_name = torch.cuda.get_device_name(device_index)
    is_hip = getattr(torch.version, "hip", None) is not None
    if is_hip:
        vendor, arch = "amd", _amd_arch(props)
        # gfx94x (MI300 series) only does the fnuz variant of e4m3; gfx950 and later do OCP e4m3.
        fp8 = "float8_e4m3fnuz" if arch.startswith("gfx94") else "float8_e4m3fn"
    else:
        vendor, arch, fp8 = "nvidia", f"sm{props.major}{props.minor}", "float8_e4m3fn"
    device_name = normalize_device_name(raw_name) or arch
    smem = int(
        getattr(props, "shared_memory_per_block_optin", 0)
        or getattr(props, "shared_memory_per_block", 0)
        or 0
    )
    mps = int(getattr(props, "multi_processor_count", 0) or 0)
    known = _BY_DEVICE_NAME.get(device_name)
    if known is not None:
        return replace(
            known,
            device_name=device_name,  # the spelling vLLM on this machine will look up
            shared_mem_bytes=smem or known.shared_mem_bytes,
            multiprocessors=mps or known.multiprocessors,
        )
    return Platform(
        key=device_name.lower(),
        vendor=vendor,
        device_name=device_name,
        arch=arch,
        shared_mem_bytes=smem,
        multiprocessors=mps,
        fp8_dtype=fp8,
    )
