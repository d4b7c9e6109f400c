"""Interpolation over measured points: a profile's size tables and its GEMM grid."""
from __future__ import annotations

import bisect
import math
import statistics

def piecewise(pts: list[tuple[float, float]], x: float, rate: float, floor: float) -> float:
    """Time at ``x`` bytes from ``(bytes, seconds)`` points sorted by bytes:
    linear between them; outside, the nearest point's time moved by the
    bytes' difference at ``rate``, never below ``floor``."""
    if x <= pts[0][0]:
        return max(floor, pts[0][1] - (pts[0][0] - x) / rate)
    if x >= pts[-1][0]:
        return pts[-1][1] + (x - pts[-1][0]) / rate
    for (x0, t0), (x1, t1) in zip(pts, pts[1:]):
        if x <= x1:
            return t0 + (t1 - t0) * (x - x0) / (x1 - x0) if x1 > x0 else t1
    return pts[-1][1]


def log_interp(pts: list[tuple[float, float]], x: float) -> float:
    """``(x, y)`` points sorted by x: linear in log x between them, the
    nearest's y beyond them."""
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return y0 + (y1 - y0) * f
    return pts[-1][1]


def bracket(axis: list, x: float) -> tuple[int, int, float]:
    """(i, j, weight of j) of ``x`` between grid points, in log x, held at the ends."""
    if x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    j = bisect.bisect_right(axis, x)
    i = j - 1
    return i, j, math.log(x / axis[i]) / math.log(axis[j] / axis[i])


def grid_rate(grid: dict, m: float, k: float, n: float) -> float:
    """TFLOP/s at (m, k, n), trilinear in the logarithms over the grid's
    corners (a corner not timed takes the mean of those that were)."""
    (m0, m1, wm), (k0, k1, wk), (n0, n1, wn) = (
        bracket(grid[a], x) for a, x in (("m", m), ("k", k), ("n", n)))
    t = grid["tflops"]
    total = weight = 0.0
    for i, a in ((m0, 1 - wm), (m1, wm)):
        for j, b in ((k0, 1 - wk), (k1, wk)):
            for q, c in ((n0, 1 - wn), (n1, wn)):
                v = t[i][j][q]
                if v is not None and a * b * c > 0:
                    total += a * b * c * v
                    weight += a * b * c
    if weight == 0:  # the point itself untimed: the mean of its nearest timed ones
        i0, j0, q0 = (m0 if wm < 0.5 else m1), (k0 if wk < 0.5 else k1), (n0 if wn < 0.5 else n1)
        known = [(abs(i - i0) + abs(j - j0) + abs(q - q0), t[i][j][q])
                 for i in range(len(t)) for j in range(len(t[i])) for q in range(len(t[i][j]))
                 if t[i][j][q] is not None]
        near = min(d for d, _ in known)
        return statistics.mean(v for d, v in known if d == near)
    return total / weight
