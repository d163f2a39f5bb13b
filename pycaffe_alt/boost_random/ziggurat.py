"""boost.random's ``normal_distribution<float>`` over a buffer of raw mt19937 draws: the values
Caffe's ``caffe_rng_gaussian<float>`` gives (gaussian and msra fillers), draw for draw.

boost (1.64 and later; see below for older versions) samples a unit normal with a 128-layer
ziggurat. One attempt takes one 32-bit draw ``u`` (``generate_int_float_pair<float, 8>`` on a
32-bit engine): the low 8 bits pick the layer ``i = bits >> 1`` and the sign (bit 0 set: +),
the high 24 bits give ``r = (u >> 8) / 2^24``, and ``x = r * X[i]`` (float). When ``x`` is
below the next layer's edge ``X[i + 1]`` (compared in double: the table is double) the
attempt returns ``+-x``: about 98.8% of draws. Otherwise layer 0 samples the tail beyond
``X[1]`` (two unit exponentials per try, each a 256-layer ziggurat of its own), and any other
layer draws ``y01 = uniform_01<float>`` and accepts ``x`` when the point lies under
``exp(-x^2 / 2)`` (boost first tests the tangent and chord bounds of the layer, then the
function itself); a rejected attempt starts over with a new draw. ``normal_distribution`` then
returns ``unit * sigma + mean`` in float. Every step below is the float (or double, where boost
mixes in its double tables) arithmetic of those lines, in the same order.

boost 1.56-1.63 sampled the same ziggurat, so fast-path values agree, but took the tail from a
logarithm-based exponential and tested the wedge without the bounds; boost before 1.56 used
Box-Muller. A Caffe built against those gives other values (distributed the same way).

:func:`unit_normals` is vectorized: it evaluates an attempt at every position of the buffer,
then follows the chain of sample starts. Only tail samples and the rare ``y01`` that rounds up
to 1 run the scalar code (:func:`unit_normal_at`), which is also the reference the tests hold
the vectorized path to.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from .tables import EXPONENTIAL_X, EXPONENTIAL_Y, NORMAL_X, NORMAL_Y

F32 = np.float32


class NeedMoreDraws(Exception):
    """The buffer ended before the requested values were complete; call again with more."""


def _float_tables(xs, ys):
    x64, y64 = np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)
    # RealType(table[i]) casts and RealType(table_x[i] - table_x[i+1]) (difference in double).
    return (x64, x64.astype(F32), y64.astype(F32), (x64[:-1] - x64[1:]).astype(F32),
            (y64[1:] - y64[:-1]).astype(F32))


_NX, _NXF, _NYF, _NDX, _NDY = _float_tables(NORMAL_X, NORMAL_Y)
_EX, _EXF, _EYF, _EDX, _EDY = _float_tables(EXPONENTIAL_X, EXPONENTIAL_Y)
_TWO_M24 = F32(2.0 ** -24)  # generate_int_float_pair's mult for the 24 high bits
_TWO_M32 = F32(2.0 ** -32)  # uniform_01<float>: 1 / (float(2^32 - 1) + 1)
_ONE, _TWO, _MINUS_ONE = F32(1), F32(2), F32(-1)


def _expf(x) -> np.float32:
    """``std::exp`` of a float, rounded to float (glibc's expf is correctly rounded in all
    but a vanishing set of cases; so is exp in double rounded once)."""
    return F32(math.exp(float(x)))


class _Reader:
    """Sequential reads from the buffer, as boost's calls to the engine."""

    def __init__(self, raw: np.ndarray, pos: int):
        self.raw, self.pos = raw, pos

    def draw(self) -> int:
        if self.pos >= len(self.raw):
            raise NeedMoreDraws()
        u = int(self.raw[self.pos])
        self.pos += 1
        return u

    def uniform01(self) -> np.float32:
        # new_uniform_01<float>: float(u) * 2^-32, drawn again when float(u) rounds up to 2^32.
        while True:
            v = F32(F32(self.draw()) * _TWO_M32)
            if v < _ONE:
                return v


def _unit_exponential(rd: _Reader) -> np.float32:
    """boost's ``unit_exponential_distribution<float>`` (256-layer ziggurat)."""
    shift = F32(0)
    while True:
        u = rd.draw()
        i, x = u & 0xFF, F32(F32(F32(u >> 8) * _TWO_M24) * _EXF[u & 0xFF])
        if x < _EXF[i + 1]:
            return F32(shift + x)
        if i == 0:
            shift = F32(shift + _EXF[1])
            continue
        y01 = rd.uniform01()
        y = F32(_EYF[i] + F32(y01 * _EDY[i]))
        above_upper = F32(F32(_EDX[i] * y01) - F32(_EXF[i] - x))
        above_lower = F32(y - F32(_EYF[i + 1] + F32(F32(_EXF[i + 1] - x) * _EYF[i + 1])))
        if above_upper < 0 and (above_lower < 0 or y < _expf(-x)):
            return F32(x + shift)


def _normal_tail(rd: _Reader) -> np.float32:
    """``generate_tail``: x ~ Exp(X[1]) shifted by X[1], accepted when 2 y > x^2 for
    y ~ Exp(1)."""
    start = _NXF[1]
    while True:
        x = F32(_unit_exponential(rd) / start)
        y = F32(_unit_exponential(rd) / _ONE)
        if F32(_TWO * y) > F32(x * x):
            return F32(x + start)


def _wedge(i, x, y01):
    """Accept ``x`` in layer ``i > 0`` given ``y01`` (arrays or scalars, all float32)."""
    y = _NYF[i] + y01 * _NDY[i]
    chord = _NDX[i] * y01 - (_NXF[i] - x)
    tangent = y - (_NYF[i] + (_NXF[i] - x) * _NYF[i] * _NXF[i])
    # Convex layers (X[i] >= 1, the inflection layer included): the chord is the upper bound
    # and the tangent the lower one; concave layers swap them.
    convex = _NX[i] >= 1
    above_upper = np.where(convex, chord, tangent)
    above_lower = np.where(convex, tangent, chord)
    density = np.exp(-((x * x) / _TWO).astype(np.float64)).astype(F32)
    return (above_upper < 0) & ((above_lower < 0) | (y < density))


def unit_normal_at(raw: np.ndarray, pos: int) -> Tuple[np.float32, int]:
    """One ``unit_normal_distribution<float>`` sample from the draws at ``pos``: (value, the
    position after its last draw). Scalar reference code; NeedMoreDraws past the buffer."""
    rd = _Reader(raw, pos)
    while True:
        u = rd.draw()
        bits = u & 0xFF
        sign, i = (_ONE if bits & 1 else _MINUS_ONE), bits >> 1
        x = F32(F32(F32(u >> 8) * _TWO_M24) * _NXF[i])
        if float(x) < _NX[i + 1]:
            return F32(x * sign), rd.pos
        if i == 0:
            return F32(_normal_tail(rd) * sign), rd.pos
        y01 = rd.uniform01()
        if bool(_wedge(np.intp(i), x, y01)):
            return F32(x * sign), rd.pos


def unit_normals(raw: np.ndarray, n: int) -> Tuple[np.ndarray, int]:
    """The first ``n`` unit normal samples (float32) boost draws from the uint32 ``raw``, and
    how many draws they used. NeedMoreDraws when ``raw`` is too short."""
    if n <= 0:
        return np.empty(0, F32), 0
    raw = np.asarray(raw, dtype=np.uint32)
    size = len(raw)
    bits = (raw & 0xFF).astype(np.intp)
    layer = bits >> 1
    x = (raw >> 8).astype(F32) * _TWO_M24 * _NXF[layer]
    value = np.where(bits & 1, x, -x)
    # end[p]: the position after the last draw of a sample that starts at p (-1: not known
    # from this buffer). A fast attempt is a whole sample.
    end = np.arange(1, size + 1, dtype=np.int64)
    slow = np.flatnonzero(x.astype(np.float64) >= _NX[layer + 1])
    if len(slow):
        _resolve_slow(raw, slow, layer, x, value, end)
    return _follow_chain(slow, value, end, n)


def _resolve_slow(raw, slow, layer, x, value, end) -> None:
    """Fill ``value``/``end`` of every slow position as if a sample started there."""
    size = len(raw)
    wedge = slow[(layer[slow] > 0) & (slow + 1 < size)]
    y01 = raw[wedge + 1].astype(F32) * _TWO_M32
    ok = y01 < _ONE  # else uniform_01 draws again: scalar
    wedge, y01 = wedge[ok], y01[ok]
    accept = _wedge(layer[wedge], x[wedge], y01)
    end[wedge[accept]] = wedge[accept] + 2
    # A rejected attempt starts over at the next draw, exactly as a new sample would.
    pending = wedge[~accept]
    scalar = np.setdiff1d(slow, wedge, assume_unique=True)
    for p in scalar.tolist():
        try:
            value[p], end[p] = unit_normal_at(raw, p)
        except NeedMoreDraws:
            end[p] = -1
    is_pending = np.zeros(size, dtype=bool)
    is_pending[pending] = True
    while len(pending):
        target = pending + 2
        inside = target < size
        ready = ~inside
        ready[inside] = ~is_pending[target[inside]]
        done, src = pending[ready], target[ready]
        src_in = src < size
        end[done[~src_in]] = -1
        end[done[src_in]] = end[src[src_in]]
        value[done[src_in]] = value[src[src_in]]
        is_pending[done] = False
        pending = pending[~ready]


def _follow_chain(slow, value, end, n) -> Tuple[np.ndarray, int]:
    """Walk the sample starts from position 0: every fast position up to the next slow one
    starts a sample; a slow start jumps to its end. Only the slow starts need a loop."""
    size = len(value)
    stop = size  # positions from here on are not known
    starts = np.ones(size, dtype=bool)
    if len(slow):
        ends = end[slow]
        following = np.searchsorted(slow, ends).tolist()
        ends_list = ends.tolist()
        chosen = []
        j = 0
        while j < len(slow):
            if ends_list[j] < 0:
                stop = int(slow[j])
                break
            chosen.append(j)
            j = following[j]
        if chosen:
            first = slow[chosen]
            inner = np.zeros(size + 1, dtype=np.int64)
            np.add.at(inner, first + 1, 1)
            np.add.at(inner, end[first], -1)
            starts &= np.cumsum(inner[:size]) == 0
    starts[stop:] = False
    positions = np.flatnonzero(starts)[:n]
    if len(positions) < n:
        raise NeedMoreDraws()
    return value[positions].astype(F32, copy=False), int(end[positions[-1]])


def bernoulli_float(raw: np.ndarray, p: np.float32) -> np.ndarray:
    """boost's ``bernoulli_distribution<float>(p)`` on each draw: ``float(u) <= p * float(2^32
    - 1)``, in float (caffe_rng_bernoulli<float>, the sparse gaussian filler's mask). For
    ``p == 0`` boost returns False without drawing; the caller handles that."""
    return np.asarray(raw, dtype=np.uint32).astype(F32) <= F32(F32(p) * F32(4294967295.0))
