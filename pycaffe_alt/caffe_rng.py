"""Caffe's random number stream, so that ``random_seed`` gives Caffe's very initial weights.

Caffe draws everything at set-up from one generator: ``Caffe::set_random_seed(s)`` makes it a
``boost::mt19937`` seeded with ``s`` (the standard MT19937 ``init_genrand``); without a seed it
is seeded from /dev/urandom. Fillers take ``caffe_rng_uniform``: ``boost::uniform_real<float>``
over ``[a, nextafter(b, +inf))``, which turns one 32-bit draw ``u`` into
``float(u) / 2^32 * (b' - a) + a`` in float arithmetic and draws again when the result is not
below ``b'``. Layers that start threads or seed their own generators take raw draws from the same
stream first (see :func:`skip`), so the layer order of a net decides which values each filler gets.

What follows Caffe draw for draw: every filler (``gaussian`` and ``msra`` through boost's
ziggurat normal distribution, :mod:`pycaffe_alt.boost_random.ziggurat`; the sparse gaussian
mask through ``bernoulli_distribution<float>``), the set-up draws of data layers, and the
Data/ImageData layers' random crops and mirrors (their transformer's own mt19937, seeded by one
of those set-up draws; data/pipeline.py). Dropout masks on the CPU follow it too (one draw per
unit at every TRAIN forward; on CUDA, where Caffe draws with cuRAND, and inside compiled graphs,
torch's generator draws them).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional

import numpy as np

from .boost_random import ziggurat

_TWO_32 = np.float32(4294967296.0)  # boost: float(eng.max() - eng.min()) + 1
_GAUSSIAN_BLOCK = 1 << 16  # values per ziggurat call: small, cache-resident working arrays


class CaffeRNG:
    """A boost::mt19937 stream (Caffe's ``caffe_rng()``) with Caffe's uniform draws."""

    def __init__(self, seed: Optional[int] = None):
        if seed is None:  # Caffe's cluster_seedgen reads /dev/urandom
            seed = int.from_bytes(os.urandom(4), "little")
        # RandomState seeds an integer the way boost::mt19937(seed) does (init_genrand).
        state = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state()
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937",
                            "state": {"key": state[1], "pos": int(state[2])}}

    def raw(self, n: int) -> np.ndarray:
        """``n`` 32-bit draws (``caffe_rng_rand()``)."""
        return self._bits.random_raw(int(n)).astype(np.uint32)

    def uniform(self, n: int, a: float, b: float) -> np.ndarray:
        """``caffe_rng_uniform<float>(n, a, b)``: ``n`` float32 values in ``[a, b]``."""
        a32, b32 = np.float32(a), np.nextafter(np.float32(b), np.float32(np.inf))
        span = np.float32(b32 - a32)
        if not (np.isfinite(span) and span >= 0 and np.isfinite(a32)):
            # No draw could land in [a, b]: the rejection loop below would never end.
            raise ValueError(f"uniform draw needs finite a <= b, got a={a!r} b={b!r}")
        # boost draws again when a value is not below b' (float(u) may round up to 2^32): the
        # accepted values, in order, are Caffe's sequence; rejected draws are simply used up.
        parts, missing = [], int(n)
        while missing:
            values = self._from_raw(self.raw(missing), a32, span)
            kept = values[values < b32]
            parts.append(kept)
            missing -= len(kept)
        return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``caffe_rng_bernoulli<double>(n, p)``: ``n`` booleans, each True with probability
        ``p``. boost's ``bernoulli_distribution<double>`` takes one raw draw ``u`` per value and
        gives ``u <= p * (2^32 - 1)`` in double (False for every draw when ``p`` is 0, which
        takes none)."""
        if p == 0:
            return np.zeros(int(n), dtype=bool)
        # u is a whole number, so u <= t exactly when u <= floor(t): one integer comparison
        # on the raw draws, no float copy of them.
        threshold = np.uint64(math.floor(float(p) * 4294967295.0))
        return self._bits.random_raw(int(n)) <= threshold

    def gaussian(self, n: int, mean: float, sigma: float) -> np.ndarray:
        """``caffe_rng_gaussian<float>(n, mean, sigma)``: ``n`` float32 values of boost's
        ``normal_distribution<float>`` (:mod:`pycaffe_alt.boost_random.ziggurat`), which takes
        a varying number of draws per value."""
        out = np.empty(int(n), dtype=np.float32)
        # Blocks keep the working arrays small (cache-resident, no fresh pages per call).
        for lo in range(0, len(out), _GAUSSIAN_BLOCK):
            count = min(_GAUSSIAN_BLOCK, len(out) - lo)
            start = self._bits.state
            size = count + count // 16 + 64  # about 1.01 draws per value; more when short
            while True:
                try:
                    out[lo:lo + count], used = ziggurat.unit_normals(self.raw(size), count)
                    break
                except ziggurat.NeedMoreDraws:
                    self._bits.state = start
                    size *= 2
            # Rewind and take exactly the draws the values used.
            self._bits.state = start
            self.skip(used)
        # normal_distribution<float>: unit * sigma + mean, in float.
        out *= np.float32(sigma)
        out += np.float32(mean)
        return out

    def bernoulli_float(self, n: int, p: float) -> np.ndarray:
        """``caffe_rng_bernoulli<float>(n, p)`` (the sparse gaussian filler's mask): like
        :meth:`bernoulli` with boost's float comparison; ``p`` is a float32 and must lie in
        [0, 1]."""
        if np.float32(p) == 0:
            return np.zeros(int(n), dtype=bool)
        return ziggurat.bernoulli_float(self.raw(int(n)), np.float32(p))

    def shuffle(self, values: np.ndarray) -> None:
        """``caffe::shuffle(begin, end, this generator)`` in place (util/rng.hpp): Fisher-Yates
        from the last position down, swapping position ``i`` with ``boost::uniform_int(0, i)``.
        boost's uniform_int on a 32-bit engine divides one draw by a bucket size of
        ``(2^32 - 1) // (i + 1)`` (one more when ``(2^32 - 1) % (i + 1) == i``) and draws again
        when the quotient exceeds ``i``."""
        n = len(values)
        if n < 2:
            return
        tops = np.arange(n - 1, 0, -1, dtype=np.int64)
        span = np.int64(0xFFFFFFFF)
        buckets = span // (tops + 1) + (span % (tops + 1) == tops)
        picks = np.empty(n - 1, dtype=np.int64)
        buf, at, done = self.raw(n - 1).astype(np.int64), 0, 0
        while done < n - 1:
            need = n - 1 - done
            if len(buf) - at < need:  # a rejected draw was replaced: take one more per rejection
                buf, at = np.concatenate([buf[at:], self.raw(need - (len(buf) - at)).astype(np.int64)]), 0
            quotient = buf[at:at + need] // buckets[done:]
            rejected = np.flatnonzero(quotient > tops[done:])
            ok = int(rejected[0]) if len(rejected) else need
            picks[done:done + ok] = quotient[:ok]
            done, at = done + ok, at + ok + (ok < need)
        order = values.tolist()
        for i, j in zip(tops.tolist(), picks.tolist()):
            order[i], order[j] = order[j], order[i]
        values[:] = order

    @staticmethod
    def _from_raw(raw: np.ndarray, a32: np.float32, span: np.float32) -> np.ndarray:
        return raw.astype(np.float32) / _TWO_32 * span + a32

    def skip(self, n: int) -> None:
        """Advance by ``n`` raw draws."""
        if n > 0:
            self._bits.random_raw(int(n))

    def state(self) -> Dict[str, object]:
        """The generator's position (MT19937 key words and index), for exact resume."""
        st = self._bits.state["state"]
        return {"key": np.asarray(st["key"], dtype=np.uint32).tobytes(), "pos": int(st["pos"])}

    def set_state(self, state: Dict[str, object]) -> None:
        """Continue from a :meth:`state` (ValueError for a damaged one)."""
        key = np.frombuffer(state["key"], dtype=np.uint32).copy()  # type: ignore[arg-type]
        pos = check_mt_position(key, state["pos"])
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}


def check_mt_position(key: np.ndarray, pos: object) -> int:
    """``pos`` as an int when ``key`` and ``pos`` form an MT19937 state (624 words, position
    0..624); ValueError otherwise. numpy's setters check neither, and a position outside the key
    makes the next draw read past it (a crash)."""
    position = int(pos)  # type: ignore[call-overload]
    if len(key) != 624 or not 0 <= position <= 624:
        raise ValueError(f"not an MT19937 state ({len(key)} key words, position {position})")
    return position


_stream: Optional[CaffeRNG] = None


def seed(value: Optional[int]) -> None:
    """``Caffe::set_random_seed``: restart the stream (``None``: from /dev/urandom)."""
    global _stream
    _stream = CaffeRNG(value)


def stream() -> CaffeRNG:
    """The process's stream (seeded from /dev/urandom until :func:`seed` is called)."""
    global _stream
    if _stream is None:
        _stream = CaffeRNG(None)
    return _stream


def skip(n: int) -> None:
    """Take ``n`` raw draws, as a Caffe layer does at set-up (thread seeds, generator seeds)."""
    stream().skip(n)
