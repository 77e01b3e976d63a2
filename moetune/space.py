"""Candidate kernel configs as a pure function of the platform and the problem.

A space is a union of knob products (``itertools.product`` over each group's value lists), minus
the candidates :func:`prune_reason` rejects before anything is compiled. Nothing here queries a
GPU: the :class:`~moetune.platform.Platform` is an argument, so tests can simulate any device.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moetune.problem import Problem

if TYPE_CHECKING:
    from moetune.platform import Platform

CUDA_KNOBS = (
    "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages",
)  # fmt: skip
ROCM_KNOBS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
KNOBS = CUDA_KNOBS + ROCM_KNOBS
SPACE_NAMES = ("full", "fast", "tiny")
_SHORT = {
    "BLOCK_SIZE_M": "M", "BLOCK_SIZE_N": "N", "BLOCK_SIZE_K": "K", "GROUP_SIZE_M": "G",
    "num_warps": "w", "num_stages": "s", "waves_per_eu": "wpe", "matrix_instr_nonkdim": "nk",
    "kpack": "kp",
}  # fmt: skip

Group = dict[str, tuple[int, ...]]


@dataclass(frozen=True, order=True)
class Candidate:
    """One kernel config: a vLLM table entry. ROCm knobs are None on other platforms."""

    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int
    waves_per_eu: int | None = None
    matrix_instr_nonkdim: int | None = None
    kpack: int | None = None

    def as_config(self) -> dict[str, int]:
        """The table entry: the six CUDA keys, plus each ROCm key that is set."""
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> Candidate:
        """Inverse of :meth:`as_config`; ValueError on missing, unknown or non-integer keys."""
        unknown = set(d) - set(KNOBS)
        if unknown:
            raise ValueError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        missing = [k for k in CUDA_KNOBS if k not in d]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        for k, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"config {k} must be an integer, got {v!r}")
        return cls(**d)

    def key(self) -> str:
        """Short stable id, e.g. ``M64-N128-K64-G8-w4-s3`` (``-wpe2-nk16-kp1`` added on ROCm)."""
        return "-".join(f"{_SHORT[k]}{v}" for k, v in self.as_config().items())


# --- the named spaces ---------------------------------------------------------------------------

# vLLM benchmark_moe.py get_configs_compute_bound(), CUDA branch.
_CUDA_FULL: Group = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (32, 64, 128, 256),
    "BLOCK_SIZE_K": (64, 128, 256),
    "GROUP_SIZE_M": (1, 16, 32, 64),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}
# vLLM get_rocm_tuning_space(): blocks 16..256 (BLOCK_SIZE_K 16 only for 16-bit operands, see
# prune_reason), one pipeline stage setting, occupancy hint and MFMA shape knobs.
_ROCM_FULL: Group = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_K": (16, 32, 64, 128, 256),
    "GROUP_SIZE_M": (1, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
    "num_stages": (2,),
    "waves_per_eu": (0, 1, 2, 4),
    "matrix_instr_nonkdim": (16, 32),
    "kpack": (1, 2),
}

# "fast" keeps the (BLOCK_M, BLOCK_N, BLOCK_K) tiles that win in the tables vLLM 0.33 ships: these
# 25 tiles are 94% of the 2094 H100/H200 entries. GROUP_SIZE_M 1 or 16 (1, 16, 32, 64 win about
# 50/22/14/13%; 16..64 all mean "walk down M first"); every warps/stages pair but 8 warps with 5
# stages (1% of wins).
_CUDA_FAST_TILES = (
    (16, 32, 64), (16, 32, 128), (16, 32, 256), (16, 64, 64), (16, 64, 128), (16, 64, 256),
    (16, 128, 64), (16, 128, 128), (16, 128, 256), (16, 256, 128), (32, 128, 64), (32, 128, 128),
    (32, 256, 128), (64, 64, 64), (64, 64, 128), (64, 64, 256), (64, 128, 64), (64, 128, 128),
    (64, 128, 256), (64, 256, 64), (64, 256, 128), (128, 128, 64), (128, 128, 128),
    (128, 256, 64), (128, 256, 128),
)  # fmt: skip
_CUDA_FAST_REST: tuple[Group, ...] = (
    {"GROUP_SIZE_M": (1, 16), "num_warps": (4,), "num_stages": (2, 3, 4, 5)},
    {"GROUP_SIZE_M": (1, 16), "num_warps": (8,), "num_stages": (2, 3, 4)},
)
# The 21 tiles that win most in vLLM's MI300X/MI325X/MI35x tables (86% of 1081 entries), with the
# values those tables almost always pick: waves_per_eu 0 (98%), nonkdim 16 (98%), GROUP_SIZE_M 1/4.
_ROCM_FAST_TILES = (
    (16, 16, 128), (16, 16, 256), (16, 32, 64), (16, 32, 128), (16, 32, 256), (16, 64, 64),
    (16, 64, 128), (16, 64, 256), (16, 128, 128), (16, 128, 256), (32, 32, 256), (32, 64, 128),
    (32, 64, 256), (64, 64, 128), (64, 64, 256), (64, 128, 128), (128, 128, 64),
    (128, 128, 128), (128, 128, 256), (128, 256, 128), (256, 256, 64),
)  # fmt: skip
_ROCM_FAST_REST: tuple[Group, ...] = (
    {
        "GROUP_SIZE_M": (1, 4),
        "num_warps": (2, 4, 8),
        "num_stages": (2,),
        "waves_per_eu": (0,),
        "matrix_instr_nonkdim": (16,),
        "kpack": (1, 2),
    },
)
# "tiny": six small tiles for the interpreter and CI; the second group runs several K steps with
# grouped tile order (BLOCK_SIZE_K 16 is dropped again for 8-bit operands on a GPU).
_TINY: tuple[Group, ...] = (
    {
        "BLOCK_SIZE_M": (16, 32),
        "BLOCK_SIZE_N": (16, 32),
        "BLOCK_SIZE_K": (32,),
        "GROUP_SIZE_M": (1,),
        "num_warps": (4,),
        "num_stages": (2,),
    },
    {
        "BLOCK_SIZE_M": (16, 32),
        "BLOCK_SIZE_N": (32,),
        "BLOCK_SIZE_K": (16,),
        "GROUP_SIZE_M": (4,),
        "num_warps": (2,),
        "num_stages": (3,),
    },
)
_ROCM_TINY_REST: Group = {"waves_per_eu": (0,), "matrix_instr_nonkdim": (16,), "kpack": (1,)}
TINY_SIZE = sum(math.prod(len(v) for v in g.values()) for g in _TINY)


def _tiles(tiles: tuple[tuple[int, int, int], ...], rests: tuple[Group, ...]) -> list[Group]:
    return [
        {"BLOCK_SIZE_M": (m,), "BLOCK_SIZE_N": (n,), "BLOCK_SIZE_K": (k,), **rest}
        for m, n, k in tiles
        for rest in rests
    ]


def _groups(platform: Platform, name: str) -> list[Group]:
    if name == "tiny" or platform.is_interpreter:
        rocm = _ROCM_TINY_REST if platform.is_rocm else {}
        return [{**g, **rocm} for g in _TINY]
    if platform.is_rocm:
        groups = [_ROCM_FULL] if name == "full" else _tiles(_ROCM_FAST_TILES, _ROCM_FAST_REST)
        if platform.arch == "gfx950":
            # Triton deprecates kpack from gfx950 on and silently forces it to 1.
            groups = [{**g, "kpack": (1,)} for g in groups]
        return groups
    return [_CUDA_FULL] if name == "full" else _tiles(_CUDA_FAST_TILES, _CUDA_FAST_REST)


# --- restrict / spec validation -----------------------------------------------------------------


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _value_error(knob: str, v: int) -> str | None:
    """Why ``v`` is not a valid value of ``knob`` on any platform, or None."""
    if knob.startswith("BLOCK_SIZE_") and (v < 16 or not _is_pow2(v)):
        return "must be a power of two >= 16 (tl.dot tile)"
    if knob in ("GROUP_SIZE_M", "num_stages") and v < 1:
        return "must be >= 1"
    if knob == "num_warps" and not _is_pow2(v):
        return "must be a power of two"
    if knob == "matrix_instr_nonkdim" and v not in (0, 16, 32):
        return "must be 0 (auto), 16 or 32"
    if knob == "kpack" and v not in (1, 2):
        return "must be 1 or 2"
    return None


def normalize_restrict(restrict: Any, where: str = "restrict") -> dict[str, tuple[int, ...]]:
    """Check a ``{knob: [values]}`` mapping; ValueError names ``where`` and the bad entry."""
    if not isinstance(restrict, dict):
        raise ValueError(f"{where}: expected a mapping of knob -> list of integers")
    out: dict[str, tuple[int, ...]] = {}
    for knob, values in restrict.items():
        if knob not in KNOBS:
            raise ValueError(f"{where}: unknown knob {knob!r}; knobs are {', '.join(KNOBS)}")
        if isinstance(values, int) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{where}: {knob} must be a non-empty list of integers")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{where}: {knob} value {v!r} is not an integer")
            if v < 0:
                raise ValueError(f"{where}: {knob} value {v} is negative")
            problem = _value_error(knob, v)
            if problem:
                raise ValueError(f"{where}: {knob} value {v} {problem}")
        out[knob] = tuple(dict.fromkeys(values))
    return out


def _check_for_platform(restrict: dict[str, tuple[int, ...]], platform: Platform) -> None:
    rocm_only = [k for k in restrict if k in ROCM_KNOBS]
    if rocm_only and not platform.is_rocm:
        raise ValueError(f"{', '.join(rocm_only)} only exist on ROCm, not on {platform.key}")
    # A workgroup holds at most 1024 threads: 32 warps of 32 lanes, 16 wavefronts of 64.
    max_warps = 16 if platform.is_rocm else 32
    if any(w > max_warps for w in restrict.get("num_warps", ())):
        raise ValueError(f"num_warps above {max_warps} exceeds 1024 threads on {platform.key}")
    if platform.arch == "gfx950" and any(k != 1 for k in restrict.get("kpack", ())):
        raise ValueError("kpack is deprecated on gfx950 (Triton forces it to 1)")


def load_space_spec(path: str | Path) -> dict[str, Any]:
    """Read ``{space: fast, restrict: {BLOCK_SIZE_M: [16, 32]}}`` from YAML.

    Returns ``{"space": name | None, "restrict": dict | None}`` (``space`` None when the file
    names none); bad content raises ValueError naming
    the file, so a typo fails before a sweep starts rather than silently widening it.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{p}: cannot read space spec: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{p}: space spec is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{p}: space spec is nested too deeply") from None
    except yaml.YAMLError as e:
        # One line: pyyaml's own message spans several, with a snippet of the file.
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{p}: not valid YAML: {what}{where}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping with keys 'space' and 'restrict'")
    unknown = set(data) - {"space", "restrict"}
    if unknown:
        raise ValueError(f"{p}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    space = data.get("space")  # None: the command's --space decides
    if space is not None and space not in SPACE_NAMES:
        raise ValueError(f"{p}: space must be one of {', '.join(SPACE_NAMES)}, got {space!r}")
    restrict = data.get("restrict")
    if restrict is not None:
        restrict = {k: list(v) for k, v in normalize_restrict(restrict, str(p)).items()}
    return {"space": space, "restrict": restrict}


# --- pruning ------------------------------------------------------------------------------------


def _next_pow2(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def _sm(platform: Platform) -> int:
    arch = platform.arch
    return int(arch[2:]) if platform.vendor == "nvidia" and arch[2:].isdigit() else 0


def _eight_bit(problem: Problem) -> bool:
    """Both tl.dot operands are 8-bit (int8_w8a16 upcasts the weight to the compute dtype)."""
    return problem.quant in ("fp8_w8a8", "int8_w8a8")


def operand_bytes(problem: Problem) -> tuple[int, int]:
    """Bytes per element of the A (activation) and B (weight) tiles staged in shared memory."""
    if _eight_bit(problem):
        return 1, 1
    a = problem.torch_dtype.itemsize  # bf16/fp16 2, fp32 4: fp32 tl.dot stages 4-byte tiles
    return (a, 1) if problem.quant == "int8_w8a16" else (a, a)


def _uses_wgmma(c: Candidate, platform: Platform) -> bool:
    # Triton picks Hopper's wgmma (MMAv3) only for an M tile that is a multiple of 64 and whole
    # warpgroups; otherwise it falls back to mma.sync (MMAv2).
    return _sm(platform) >= 90 and c.BLOCK_SIZE_M % 64 == 0 and c.num_warps % 4 == 0


def pipeline_buffers(c: Candidate, platform: Platform) -> int:
    """How many K tiles of A and B the software pipeline keeps in shared memory / LDS.

    Triton's NVIDIA pipeliner allocates ``num_stages - 1`` buffers, plus one for wgmma. AMD's
    stream pipeliner prefetches the next tile into registers and keeps ``num_stages - 1`` LDS
    buffers, except on gfx950, whose default async global->LDS copies need all ``num_stages``.
    This reproduces vLLM's shipped tables: every A100 entry fits 163 KB with ``num_stages - 1``
    (46 would not with ``num_stages``), every MI300X/MI325X entry fits 64 KB with one buffer
    (vLLM's own ROCm pruning counts one stage), and all but four misnamed H100/H200 entries fit.
    """
    s = c.num_stages
    if platform.is_rocm:
        return s if platform.arch == "gfx950" else max(1, s - 1)
    if platform.is_interpreter or _uses_wgmma(c, platform):
        return s
    return max(1, s - 1)


def shared_mem_bytes(c: Candidate, platform: Platform, problem: Problem) -> int:
    """Estimated shared memory (LDS) of the K loop's staged tiles.

    The epilogue reuses these buffers after the loop, and scales and bias are a few hundred
    bytes, so the operand tiles are the whole estimate.
    """
    a, b = operand_bytes(problem)
    stage = c.BLOCK_SIZE_M * c.BLOCK_SIZE_K * a + c.BLOCK_SIZE_K * c.BLOCK_SIZE_N * b
    return stage * pipeline_buffers(c, platform)


def max_block_m(platform: Platform, problem: Problem, M: int) -> int:
    """Largest useful BLOCK_SIZE_M for batch size M.

    Each expert's tokens are padded to a multiple of BLOCK_SIZE_M, and uniform routing gives
    ``M * topk / E`` tokens per expert; a tile more than 4x that is padding. The factor 4 leaves
    room for uneven routing and keeps 98% of the winners in vLLM's H100/H200/MI3xx tables. Those
    tables also show 8-bit GEMMs on Hopper winning with BLOCK_SIZE_M 64 even at M=1 (wgmma
    needs 64 rows), so from sm90 on the floor is 64 instead of 16 for them.
    """
    floor = 64 if _sm(platform) >= 90 and _eight_bit(problem) else 16
    return max(floor, _next_pow2(4 * M * problem.topk / problem.E))


def prune_reason(
    c: Candidate, platform: Platform, problem: Problem, M: int | None = None
) -> str | None:
    """Why ``c`` is not worth compiling for this problem (and batch size M), or None to keep it.

    Without M only the batch-independent rules apply (what :func:`search_space` uses); a sweep
    calls it again per batch size.
    """
    bm, bn, bk = c.BLOCK_SIZE_M, c.BLOCK_SIZE_N, c.BLOCK_SIZE_K
    rocm_set = [k for k in ROCM_KNOBS if getattr(c, k) is not None]
    # launch.py passes the ROCm knobs only under HIP: elsewhere the candidate is its CUDA twin.
    if rocm_set and not platform.is_rocm:
        return f"{', '.join(rocm_set)} only exist on ROCm"
    if platform.arch == "gfx950" and c.kpack not in (None, 1):
        return f"kpack {c.kpack} is deprecated on gfx950 (Triton forces 1): a duplicate"
    nk = c.matrix_instr_nonkdim
    if nk and (nk > bm or nk > bn):
        # One MFMA instruction computes an nk x nk block; a smaller tile cannot hold it.
        return f"matrix_instr_nonkdim {nk} exceeds the {bm}x{bn} tile"
    if _eight_bit(problem) and bk < 32 and not platform.is_interpreter:
        # NVIDIA's 8-bit mma has k=32 (Triton's min_dot_size); vLLM drops K=16 for fp8 on ROCm.
        return f"BLOCK_SIZE_K {bk} < 32: 8-bit tl.dot needs K tiles of 32"
    # Block quantization: the kernel applies one activation/weight scale per K step, so a K tile
    # must not straddle two scale groups. BLOCK_SIZE_N is free (weight scales are loaded per output
    # column), and vLLM's shipped block tables do win with BLOCK_SIZE_N 16..64 < block_n 128.
    if problem.block_shape is not None and problem.block_shape[1] % bk:
        return f"BLOCK_SIZE_K {bk} does not divide block_k {problem.block_shape[1]}"
    smem = shared_mem_bytes(c, platform, problem)
    if smem > platform.shared_mem_bytes:
        return f"shared memory {smem} B > {platform.shared_mem_bytes} B"
    # Fewer accumulator elements than 32 per warp leaves warps idle. vLLM's tables hold winners at
    # exactly 32 (MI300X 16x16 tile, 8 warps) and 64 (H100 16x32, 8 warps): small tiles do gain from
    # extra warps' loads, so the line sits there and only bites on restricted values.
    if bm * bn < 32 * c.num_warps:
        return f"{bm}x{bn} tile has fewer than 32 outputs per warp for {c.num_warps} warps"
    # One config serves both GEMMs: w1 (N_out = 2N, K) and w2 (N_out = K, K = N). A tile wider than
    # both is masked-out work in both.
    n_cap = _next_pow2(max(2 * problem.N, problem.K))
    if bn > n_cap:
        return f"BLOCK_SIZE_N {bn} > {n_cap}, wider than both GEMMs' outputs"
    k_cap = _next_pow2(max(problem.K, problem.N))
    if bk > k_cap:
        return f"BLOCK_SIZE_K {bk} > {k_cap}, deeper than both GEMMs' K"
    if M is not None:
        if not isinstance(M, int) or isinstance(M, bool) or M < 1:
            raise ValueError(f"M must be a positive integer, got {M!r}")
        cap = max_block_m(platform, problem, M)
        if bm > cap:
            tpe = M * problem.topk / problem.E
            return f"BLOCK_SIZE_M {bm} > {cap} for ~{tpe:.3g} tokens per expert (M={M})"
    return None


# --- the space ----------------------------------------------------------------------------------


def search_space(
    platform: Platform,
    problem: Problem,
    name: str = "full",
    restrict: dict[str, list[int]] | None = None,
) -> list[Candidate]:
    """The sorted, pruned candidates of the named space on this platform for this problem.

    ``restrict`` replaces a knob's values in every group of the space (values outside the named
    space are allowed if valid). The interpreter always starts from "tiny": it runs a handful of
    candidates in minutes, not hundreds.
    """
    if name not in SPACE_NAMES:
        raise ValueError(f"unknown space {name!r}; expected one of {', '.join(SPACE_NAMES)}")
    fixed = normalize_restrict(restrict) if restrict is not None else {}
    _check_for_platform(fixed, platform)
    seen: set[Candidate] = set()
    for group in _groups(platform, name):
        group = {**group, **fixed}
        knobs = [k for k in KNOBS if k in group]
        for values in itertools.product(*(group[k] for k in knobs)):
            seen.add(Candidate(**dict(zip(knobs, values, strict=True))))
    reasons = {c: prune_reason(c, platform, problem) for c in seen}
    kept = sorted(c for c, why in reasons.items() if why is None)
    if seen and not kept:
        # An empty sweep is a problem the space cannot serve (e.g. a block_k no K tile divides):
        # say why, rather than leave the caller to report "nothing to do".
        common = Counter(reasons.values()).most_common(3)
        raise ValueError(
            f"every candidate of space {name!r} is pruned on {platform.key} for "
            f"{problem.describe()}: " + "; ".join(f"{why} (x{n})" for why, n in common)
        )
    return kept


def space_id(candidates: list[Candidate]) -> str:
    """Short stable hash of the candidate set (order-insensitive), for journal provenance."""
    text = "\n".join(sorted({c.key() for c in candidates}))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
