"""Deciding whether an op output matches the reference.

Errors are relative L2 norms, per row and over the whole tensor; a row-wise bound keeps one wrong
token from hiding in a large tensor's norm. NaN never passes, and neither does a row that still
holds the poison value the output was filled with before the run.

Tolerances (row-wise relative L2), derived from where the op and the reference can differ. Both
round at the same points, so they differ only where the fp32 accumulation (op) and the float64
one (reference) fall on two sides of a rounding boundary, which moves a value by one unit in the
last place. With ``u`` the unit roundoff of the output dtype, such flips leave the row error well
under ``u``; the bound is ``4u`` so that a correct kernel never fails while any epilogue-order bug
(errors of order 1 · bias or · (1 − router weight)) fails by orders of magnitude.

- float32 (u = 6e-8): the bound is 1e-4, set by the fp32 accumulation over K ≤ 16k terms
  (√K · 2⁻²⁴ ≈ 8e-6) and the fp32 activation, with a 10× margin.
- float16 (u = 2⁻¹¹): 4u ≈ 2e-3.  bfloat16 (u = 2⁻⁸): 4u ≈ 1.6e-2.
- int8_w8a16: the int8 weights are exact in the compute dtype, so the dtype's bound applies.
- w8a8: the activation is re-quantized between the GEMMs. When a one-ulp difference in the
  compute-dtype intermediate moves an element across an fp8/int8 rounding boundary, that element
  moves by a whole quantization step: 2⁻³ relative for e4m3 (3 mantissa bits), 1/127 of the
  row or tensor maximum for int8. If the dynamic scale itself moves by an ulp, about one element
  in eight moves so: row error ≈ √(1/8) · 2⁻⁴ ≈ 2.2e-2 for fp8, ≈ √(1/8) · 3/127 ≈ 8e-3 for int8
  (elements sit ~3× below the maximum). The bounds are 4e-2 (fp8) and 2e-2 (int8).

  A flip of one large element can still move a single row past that bound: the worst of thousands
  of rows grows with M, and Hopper's fp8 accumulation makes flips more frequent. :func:`check_op`
  therefore judges the op against the reference that follows the op's own re-quantization where
  it was a valid rounding (:meth:`moetune.reference.Reference.matching`), which leaves the bound
  to cover GEMM2 and the epilogue, and catches anything larger than a rounding difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moetune.reference import Reference

_DTYPE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_QUANT_TOL = {"fp8_w8a8": 4e-2, "int8_w8a8": 2e-2, "int8_w8a16": 0.0}
# Rows whose reference norm is tiny (tokens whose experts all live elsewhere, tiny router
# weights) are judged against this fraction of the mean row norm instead of their own norm.
_ROW_FLOOR = 1e-2


def tolerance(dtype: torch.dtype, quant: str | None = None) -> float:
    """The row-wise relative L2 bound for an output dtype and quantization (see module doc)."""
    if dtype not in _DTYPE_TOL:
        raise ValueError(f"no tolerance for dtype {dtype}")
    if quant is not None and quant not in _QUANT_TOL:
        raise ValueError(f"no tolerance for quant {quant!r}")
    return max(_DTYPE_TOL[dtype], _QUANT_TOL.get(quant, 0.0) if quant else 0.0)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    rel_err: float
    max_abs_err: float
    worst_row: int
    worst_row_err: float
    nan_count: int
    poison_rows: int
    tol: float
    reason: str

    def as_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


def check_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    dtype: torch.dtype,
    quant: str | None = None,
    poison: float = float("nan"),
    tol: float | None = None,
) -> CheckResult:
    """Compare ``out`` with ``ref`` (same shape, rows along dim 0); see the module doc."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {list(out.shape)} vs ref {list(ref.shape)}")
    tol = tolerance(dtype, quant) if tol is None else tol
    # On the tensors' own device: a GPU sweep checks thousands of outputs, a copy each would cost.
    o = out.detach().double().reshape(out.shape[0], -1)
    r = ref.detach().double().reshape(ref.shape[0], -1).to(o.device)
    nan_count = int(torch.isnan(o).sum())
    poisoned = torch.isnan(o).all(dim=1) if math.isnan(poison) else (o == poison).all(dim=1)
    poison_rows = int(poisoned.sum())

    diff = torch.nan_to_num(o - r, nan=math.inf)
    row_err_abs = diff.norm(dim=1)
    row_norm = r.norm(dim=1)
    floor = _ROW_FLOOR * float(row_norm.mean()) if row_norm.numel() else 0.0
    row_err = row_err_abs / row_norm.clamp(min=max(floor, 1e-30))
    if row_err.numel():
        worst_row = int(torch.argmax(torch.nan_to_num(row_err, nan=math.inf)))
        worst_row_err = float(row_err[worst_row])
    else:
        worst_row, worst_row_err = -1, 0.0
    ref_norm = float(r.norm())
    rel_err = float(diff.norm()) / max(ref_norm, 1e-30)
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0

    if nan_count:
        reason = f"{nan_count} NaN element(s)" + (
            f", {poison_rows} unwritten row(s)" if poison_rows else ""
        )
    elif poison_rows:
        reason = f"{poison_rows} row(s) still hold the poison value {poison}"
    elif not worst_row_err <= tol:
        reason = f"row {worst_row} relative error {worst_row_err:.3g} > {tol:.3g}"
    elif not rel_err <= tol:
        reason = f"relative error {rel_err:.3g} > {tol:.3g}"
    else:
        reason = ""
    return CheckResult(
        ok=not reason, rel_err=rel_err, max_abs_err=max_abs, worst_row=worst_row,
        worst_row_err=worst_row_err, nan_count=nan_count, poison_rows=poison_rows, tol=tol,
        reason=reason,
    )  # fmt: skip


def check_op(
    run: Callable[[], torch.Tensor],
    reference: Reference,
    *,
    dtype: torch.dtype,
    quant: str | None = None,
    tol: float | None = None,
) -> CheckResult:
    """Run the op (``run()``) on a NaN-poisoned workspace and check its output against
    ``reference``, following the op's re-quantization between the GEMMs where it was a valid
    rounding."""
    from moetune.ops import capture_requantized, poisoned_workspace

    with poisoned_workspace(), capture_requantized() as seen:
        out = run()
    if reference.w8a8 and len(seen) != 1:
        # Falling back to the plain reference would bring back false rejections unnoticed.
        raise ValueError(f"expected one re-quantization from the op, saw {len(seen)}")
    ref = reference.matching(seen[0] if seen else None)
    return check_close(out, ref, dtype=dtype, quant=quant, tol=tol)
