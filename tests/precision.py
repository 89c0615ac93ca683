"""Tolerances derived from a dtype's rounding, for assertions on results computed in that dtype.

``torch.testing.assert_close`` picks its default tolerance from the dtype of the tensors it
compares; a float32 result stored as float64 (a cosine, a norm ratio) then gets float64's
1e-7, which float32 rounding alone can exceed on another CPU (other SIMD widths sum in another
order). These helpers state the float32 bound instead.
"""

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the relative error of one rounding in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def dot_product_rtol(dtype: torch.dtype, length: int, safety: float = 4.0) -> float:
    """Relative tolerance of a value built from dot products of ``length`` terms in ``dtype``.

    A dot product of n terms has a relative error of at most γ_n = n u / (1 - n u) with u the
    unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.1); a cosine
    x·y / (|x| |y|) combines three of them, hence the ``safety`` factor.
    """
    u = unit_roundoff(dtype)
    return safety * length * u / (1 - length * u)
