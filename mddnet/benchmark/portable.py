"""Math whose results are the same bits on every x86-64 CPU, for the renderer.

numpy picks SIMD kernels for exp, sin, cos, arctan2 and power by the CPU's instruction set
(AVX-512, AVX2 or baseline), and they round differently in the last bit; BLAS (`@`,
`np.linalg.norm`) sums in a CPU-dependent order; libm's scalar functions may use FMA variants.
One such bit, through a threshold or a rounding to uint8, changed the generated benchmark between
machines (issue 14). Here each transcendental function runs in float64 and its result is rounded
to float32 precision: a 1-ulp float64 difference survives that rounding only when the value lies
within an ulp of a float32 rounding boundary (about 1 in 5 * 10^8). Sums are written out as
element-wise arithmetic, which IEEE 754 fixes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["arctan2", "cos", "dot", "exp", "hypot", "log", "norm", "power", "sin"]


def _rounded(function: Callable[..., Any], *args: Any) -> Any:
    """`function` on float64 values, rounded to float32 precision, in the caller's float type."""
    values = function(*(np.asarray(a, dtype=np.float64) for a in args))
    rounded = np.asarray(values).astype(np.float32)
    if all(isinstance(a, int | float) for a in args):
        return float(rounded)
    return rounded.astype(np.result_type(*args, np.float32))


def exp(x: Any) -> Any:
    return _rounded(np.exp, x)


def log(x: Any) -> Any:
    return _rounded(np.log, x)


def sin(x: Any) -> Any:
    return _rounded(np.sin, x)


def cos(x: Any) -> Any:
    return _rounded(np.cos, x)


def arctan2(y: Any, x: Any) -> Any:
    return _rounded(np.arctan2, y, x)


def power(x: Any, exponent: float) -> Any:
    return _rounded(np.power, x, exponent)


def hypot(x: Any, y: Any) -> Any:
    """sqrt(x^2 + y^2) from IEEE-exact operations (sqrt is correctly rounded everywhere)."""
    x, y = np.asarray(x), np.asarray(y)
    return np.sqrt(x * x + y * y)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two short vectors, summed left to right."""
    return math.fsum(float(p) * float(q) for p, q in zip(a, b, strict=True))


def norm(vector: np.ndarray) -> float:
    return math.sqrt(dot(vector, vector))
