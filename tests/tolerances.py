"""Floating-point tolerances for the tests, derived from the arithmetic and written once.

Two computations of the same value in floating point differ by rounding. One operation rounds to
within half a unit in the last place, ``eps / 2`` with ``eps = torch.finfo(dtype).eps``; a reduction
over ``n`` terms (a matmul, a mean, a loss over a batch) done in another order, which is what another
BLAS blocking or another thread count does, accumulates up to about ``n · eps`` in the worst case.
The absolute error is relative to the magnitude of the *terms*, not of the result: a sum that cancels
to almost zero still carries the rounding of its large terms. So each comparison here has

    |actual − expected| ≤ rtol · |expected| + rtol · scale

where ``scale`` is the magnitude of the terms (for outputs: the largest |expected| entry; for a
difference of losses: the loss itself), and ``rtol`` per dtype is

* float64: 1e-12 (reductions of ≲ 10⁴ terms stay far below this, 2.2e-16 · 10⁴ ≈ 2e-12 worst case
  only for adversarial orders);
* float32: 1e-5, i.e. about 80 units in the last place (eps = 1.19e-7): room for reductions over the
  few hundred to few thousand terms of the tiny test models in any summation order, yet 100× tighter
  than any real bug we test for (a wrong scale, a missing rank, a dropped term: ≥ 1e-3 relative);
* float16 / bfloat16: 4 units in the last place of the final rounding (4e-3 / 3e-2), because the
  kernels accumulate in float32 and round once at the end.

Exact comparisons (``torch.equal``, ``==``) stay where exactness is the contract: bitwise-identical
replicas, resume identity, the same rank decisions, function-preserving rank changes.
"""

from __future__ import annotations

import torch

RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def tol(dtype: torch.dtype = torch.float32, scale: float = 1.0) -> dict:
    """``rtol`` / ``atol`` keyword arguments for ``torch.testing.assert_close`` (see the module doc)."""
    r = RTOL[dtype]
    return {"rtol": r, "atol": r * float(scale)}


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, scale: float | None = None, msg=None):
    """``torch.testing.assert_close`` at the tolerance of ``dtype`` (default: ``expected``'s, for float64
    references of a float32 computation pass ``dtype=torch.float32``) with ``atol = rtol · scale``;
    ``scale`` defaults to the largest |expected| entry (the magnitude of the terms of an output)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    kw = tol(dtype, max(scale, torch.finfo(dtype).tiny))
    torch.testing.assert_close(actual.detach(), expected.detach().to(actual.dtype), **kw, msg=msg)
