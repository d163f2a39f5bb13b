"""Batch assembly and prefetching for the data layers.

Design: a batch is a *pure function of its number*. ``BatchMaker.make(b)`` reads the records of
batch ``b`` (positions from :class:`Ordering`), draws that batch's random crops and flips from a
generator derived from ``(layer seed, b)``, and transforms them. Hence

* the order is deterministic and independent of how batches are produced: a background thread,
  or N worker processes each working on different batch numbers, give identical batches;
* the whole reading state is ``(next batch number, seed, skip)``: ``state()``/``load_state()``
  resume bit-exactly, and prefetched batches can simply be dropped.

Order follows Caffe's Data layer: records in key order with a wrapping cursor (after the last
record comes the first), an optional random skip at the start (``rand_skip``), and an optional
reshuffle at every pass (ImageData's ``shuffle``, in Caffe's order: :class:`CaffeShuffles`; an
opt-in for Data, which Caffe never shuffles).

Every batch carries the record index (position in key order) of each sample: the alternation
mask store keys on them.

Workers are separate processes that each open the dataset themselves: record sources open their
files lazily in the process that reads (an LMDB environment must not cross a fork). When the
target device is CUDA, batches are put in pinned memory and copied with ``non_blocking=True``.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing.util
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from ..distributed.sharding import MAX_SAMPLES, UNSHARDED, Shard
from ..errors import CaffeError, DataError
from ..caffe_rng import CaffeRNG
from .transformer import (TransformSpec, draw_params, draws_per_record, mean_window,
                          needs_random, normalize_batch, output_shape, place_pixels, rand_from)

# Sub-streams of a layer's seed: one family of generators per purpose, so that e.g. turning
# shuffling on does not change the crops.
_STREAM_TRANSFORM = 0
_STREAM_SHUFFLE = 1
_STREAM_SHARD_TRANSFORM = 3


def derived_generator(seed: int, stream: int, number: int, *more: int) -> np.random.Generator:
    """The generator for item ``number`` (and ``more`` coordinates) of sub-stream ``stream`` of
    a layer seed (pure)."""
    return np.random.Generator(np.random.Philox(
        np.random.SeedSequence([seed, stream, number, *more])))


def layer_seed(name: str) -> int:
    """A layer's seed, from torch's seed and the layer name.

    ``torch.manual_seed`` (and the solver's ``random_seed``) therefore makes runs reproducible,
    and two data layers of one net get different streams. Reading ``initial_seed`` rather than
    drawing from torch's generator leaves the weight fillers' random stream untouched.
    """
    seq = np.random.SeedSequence([torch.initial_seed() & (2**64 - 1),
                                  int.from_bytes(name.encode("utf-8")[:32].ljust(32, b"\0"),
                                                 "little")])
    return int(seq.generate_state(2, np.uint32).view(np.uint64)[0] >> np.uint64(1))


class RecordSource(Protocol):
    """Random access to the records of a dataset, in its canonical (key/list) order."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Tuple[np.ndarray, float]:
        """Record ``index`` as a C,H,W array (uint8 or float32) and its label."""

    def load_many(self, indices: Sequence[int]) -> Iterable[Tuple[np.ndarray, float, bool]]:
        """``load`` of each of ``indices``, in order (a source may read them in one go), each
        with whether Caffe decodes it to a ``cv::Mat`` first (an encoded record, an image
        file), which changes how a mirrored sample reads the mean (``mean_window``)."""

    def close(self) -> None: ...

    def release(self) -> None:
        """Between batches: give back what stops other code in the process from opening the
        dataset (see :meth:`BatchMaker.release_if_idle`); the next load reopens it."""


class CaffeShuffles:
    """The orders ImageData's ``shuffle`` reads in Caffe: key order shuffled once at set-up and
    again, in place, at the end of every pass, by ``caffe::shuffle`` on the layer's own mt19937
    (seeded with a draw from Caffe's stream). Pass ``e`` reads the order after ``e + 1``
    shuffles; the chain is kept, so consecutive passes cost one shuffle each (an earlier pass,
    after a resume, recomputes from the seed)."""

    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed = num_records, seed
        self._lock = threading.Lock()
        self._restart()

    def _restart(self) -> None:
        self._rng = CaffeRNG(self.seed)
        self._order = np.arange(self.num_records, dtype=np.int64)
        self._pass = -1

    def order(self, epoch: int) -> np.ndarray:
        """Record indices of pass ``epoch`` (0 = the first)."""
        with self._lock:
            if epoch < self._pass:
                self._restart()
            while self._pass < epoch:
                self._rng.shuffle(self._order)
                self._pass += 1
            return self._order.copy()

    def __getstate__(self) -> Dict[str, object]:
        # Worker processes go on from the current pass instead of replaying every shuffle
        # before it (a pass over 1.28M records costs about a second).
        with self._lock:
            return {"num_records": self.num_records, "seed": self.seed, "pass": self._pass,
                    "order": self._order.copy(), "rng": self._rng.state()}

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__init__(state["num_records"], state["seed"])
        self._pass, self._order = int(state["pass"]), state["order"]
        self._rng.set_state(state["rng"])


@dataclass(frozen=True)
class Ordering:
    """Which record is the ``n``-th sample served: key order from ``skip`` on, wrapping at the
    end; with ``shuffle`` every pass (epoch) uses its own permutation: Caffe's (ImageData's
    chain of in-place shuffles, :class:`CaffeShuffles`) when ``caffe_shuffle_seed`` is given,
    else an independent permutation per pass from ``seed`` (Data's opt-in reshuffle)."""

    num_records: int
    skip: int = 0
    shuffle: bool = False
    seed: int = 0
    caffe_shuffle_seed: Optional[int] = None

    def __post_init__(self) -> None:
        chain = (CaffeShuffles(self.num_records, self.caffe_shuffle_seed)
                 if self.shuffle and self.caffe_shuffle_seed is not None else None)
        object.__setattr__(self, "_caffe_chain", chain)  # a cache, not part of the value

    def permutation(self, epoch: int) -> np.ndarray:
        if self._caffe_chain is not None:
            return self._caffe_chain.order(epoch)
        return derived_generator(self.seed, _STREAM_SHUFFLE, epoch).permutation(self.num_records)

    def indices(self, first: int, count: int,
                cache: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
        """Record indices (int64) of samples ``first .. first+count-1``."""
        return self.records(first + np.arange(count, dtype=np.int64), cache)

    def records(self, samples: np.ndarray,
                cache: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
        """Record indices (int64) of the global sample numbers ``samples``."""
        pos = self.skip + np.asarray(samples, dtype=np.int64)
        count = len(pos)
        if not self.shuffle:
            return pos % self.num_records
        epochs, within = np.divmod(pos, self.num_records)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            perm = cache.get(int(e)) if cache is not None else None
            if perm is None:
                perm = self.permutation(int(e))
                if cache is not None:
                    cache.clear()  # one or two passes are live at a time
                    cache[int(e)] = perm
            sel = epochs == e
            out[sel] = perm[within[sel]]
        return out


class BatchMaker:
    """Builds batch ``b`` of a record source (pure function of ``b``); picklable for workers.

    A batch is a dict of numpy arrays: ``data`` (N,C,H,W float32), ``label`` (N float32),
    ``indices`` (N int64 record positions) and ``mirrored`` (N bool: which samples were flipped;
    the alternation solver flips their stored spatial supports to match). As in Caffe, the first sample of a batch fixes the
    batch's shape; a later sample of another shape is an error.
    """

    def __init__(self, source: RecordSource, spec: TransformSpec, batch_size: int,
                 ordering: Ordering, seed: int, where: str, shard: Shard = UNSHARDED,
                 transform_seed: Optional[int] = None):
        self.source = source
        # The seed of Caffe's transformer generator (an mt19937 the layer seeds with a draw from
        # Caffe's stream at set-up): crops and flips then follow Caffe's draw for draw.
        self.transform_seed = transform_seed
        self._stream: Optional[CaffeRNG] = None
        self._stream_pos = 0
        # Data-parallel training: which samples of the global order this rank reads.
        self.shard = shard
        self.spec = spec
        self.batch_size = batch_size
        self.ordering = ordering
        self.seed = seed
        self.where = where
        self._perm_cache: Dict[int, np.ndarray] = {}
        # Lay batches out channels-last (NHWC in memory, NCHW in shape) for a net that runs in
        # that format (pycaffe_alt/memory_format.py): its first convolution then reads them as
        # they are, instead of reordering every batch on the training thread.
        self.channels_last = False
        # > 0 while a training loop runs (InputPipeline.hold): the database stays open between
        # batches. Otherwise it is released after each batch, see release_if_idle.
        self.holds = 0

    def restart(self, ordering: Ordering) -> None:
        """Read by ``ordering`` (and the current seeds) from now on: cached permutations and
        the transformer stream's position are dropped."""
        self.ordering = ordering
        self._perm_cache.clear()
        self._stream, self._stream_pos = None, 0

    def indices(self, b: int) -> np.ndarray:
        samples = self.shard.positions(b * self.batch_size, self.batch_size)
        return self.ordering.records(samples, self._perm_cache)

    def transform_rand(self, b: int) -> Callable[[int], int]:
        """Caffe's ``Rand(n)`` for the crops and flips of batch ``b``.

        Caffe's transformer draws the same count of numbers for every record
        (:func:`draws_per_record`), one record after the other from its own mt19937, so batch
        ``b`` starts at number ``b * batch_size * count`` of that stream: a batch stays a pure
        function of ``b`` (workers and resume skip ahead to it). A data-parallel rank draws from
        its own sub-stream (as each of Caffe's solvers seeds its own transformer), so its records
        are the single-process run's, but not its random crops and flips; so does a maker given
        no Caffe seed.
        """
        count = self.batch_size * draws_per_record(self.spec)
        s = self.shard
        unsharded = s.world == 1 and s.start == 0
        if unsharded and self.transform_seed is not None:
            return rand_from(self._caffe_draws(b * count, count))
        rng = derived_generator(self.seed, _STREAM_TRANSFORM, b) if unsharded \
            else derived_generator(self.seed, _STREAM_SHARD_TRANSFORM, b, s.rank, s.world, s.start)
        return rand_from(rng.integers(0, 2 ** 32, size=count, dtype=np.uint64).tolist())

    def _caffe_draws(self, start: int, count: int) -> List[int]:
        """Numbers ``start .. start+count-1`` of the transformer's mt19937 stream."""
        if self._stream is None or start < self._stream_pos:
            self._stream, self._stream_pos = CaffeRNG(self.transform_seed), 0
        while self._stream_pos < start:  # skip ahead (a worker's other batches, a resume)
            step = min(start - self._stream_pos, 1 << 22)  # bounded memory per chunk
            self._stream.skip(step)
            self._stream_pos += step
        self._stream_pos += count
        return self._stream.raw(count).tolist()

    def make(self, b: int) -> Dict[str, np.ndarray]:
        indices = self.indices(b)
        labels = np.empty(self.batch_size, dtype=np.float32)
        images, decoded = [], []
        for i, (image, labels[i], from_mat) in enumerate(self.source.load_many(indices)):
            images.append(image)
            decoded.append(from_mat)
        data = self._batch_buffer(self._sample_shape(indices, images))
        mirrored = np.zeros(self.batch_size, dtype=bool)
        if not needs_random(self.spec) and not self.spec.crop_size:
            # Nothing is cropped or flipped: one cast-copy of the whole batch (the shapes were
            # checked equal above), or one per sample into a channels-last buffer.
            if data.flags.c_contiguous:
                np.concatenate(images, axis=0, out=data.reshape((-1,) + data.shape[2:]),
                               casting="unsafe")
            else:
                for i, image in enumerate(images):
                    np.copyto(data[i], image, casting="unsafe")
            offsets = [(False, 0, 0)] * self.batch_size
        else:
            rand = self.transform_rand(b)
            offsets = []
            for i, image in enumerate(images):
                mirror, h_off, w_off = draw_params(self.spec, rand, image.shape[1], image.shape[2])
                place_pixels(data[i], image, mirror, h_off, w_off)
                mirrored[i] = mirror
                offsets.append(mean_window(mirror, h_off, w_off, decoded[i]))
        # Mean and scale over the whole batch at once: the same per-element arithmetic as
        # Caffe's (pixel - mean) * scale, without a Python-level pass per sample.
        normalize_batch(data, self.spec, offsets)
        return {"data": data, "label": labels, "indices": indices, "mirrored": mirrored}

    def _batch_buffer(self, sample: Tuple[int, ...]) -> np.ndarray:
        """An uninitialized float32 (N, C, H, W) batch, channels-last in memory when asked."""
        if self.channels_last and len(sample) == 3:
            c, h, w = sample
            return np.empty((self.batch_size, h, w, c), dtype=np.float32).transpose(0, 3, 1, 2)
        return np.empty((self.batch_size,) + sample, dtype=np.float32)

    def _sample_shape(self, indices: np.ndarray, images: Sequence[np.ndarray]) -> Tuple[int, ...]:
        """The transformed C,H,W shared by the batch; Caffe's checks run once per record shape."""
        shape, first_shape = None, None
        for index, image in zip(indices, images):
            if image.shape == first_shape:
                continue
            where = f"{self.where}: record {int(index)}"
            sample = output_shape(self.spec, image.shape, where)
            if shape is None:
                shape, first_shape = sample, image.shape
            elif sample != shape:
                raise DataError(
                    f"gives a {sample} sample but the batch's first sample is {shape}",
                    where, "records of different sizes need batch_size: 1, a crop_size, or "
                    "resizing when the dataset is made (convert_imageset --resize_height/width)")
        return shape

    def release_if_idle(self) -> None:
        """Close the dataset between batches unless a training loop holds it open.

        py-lmdb refuses a second environment on the same files in one process, so a handle kept
        while nobody trains would stop other code in the process (a script, a checker, another
        tool) from opening the database. Reopening costs 1.5-2 ms per batch (mapping and
        faulting the file in again), which is why a running training loop holds it instead.
        """
        if not self.holds:
            self.source.release()

    def close(self) -> None:
        self.source.close()


# Per-sample bookkeeping that stays a CPU tensor (the data and labels go to the device).
_HOST_KEYS = ("indices", "mirrored")


def _to_tensors(batch: Dict[str, np.ndarray], pin: bool) -> Dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    if pin:
        out = {k: (v.pin_memory() if k not in _HOST_KEYS else v) for k, v in out.items()}
    return out


class _SyncReader:
    """Makes each batch when it is asked for, in the caller's thread.

    Used on the CPU when torch's threads already occupy every core: a prefetch thread could only
    run by pre-empting one of them, which stalls each parallel op at its barrier (measured: a
    LeNet training step is ~15% slower with the thread than with reading in line).
    """

    def __init__(self, maker: BatchMaker, start: int):
        self.maker = maker
        self.b = start

    def next(self) -> Dict[str, torch.Tensor]:
        batch = _to_tensors(self.maker.make(self.b), False)
        self.b += 1
        self.maker.release_if_idle()
        return batch

    def close(self) -> None:
        self.maker.source.close()


def _cores_are_busy() -> bool:
    """Whether torch's intra-op threads use every core of this machine."""
    return torch.get_num_threads() >= (os.cpu_count() or 1)


class _ThreadPrefetcher:
    """Produces batches start, start+1, ... in a background thread (Caffe's prefetch thread).

    Reading and decoding run in numpy/OpenCV/LMDB code that releases the GIL, so the thread
    overlaps with the net's forward/backward.
    """

    def __init__(self, maker: BatchMaker, start: int, depth: int, pin: bool):
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(maker, start, pin),
                                        name="pycaffe_alt-prefetch", daemon=True)
        self._thread.start()

    def _run(self, maker: BatchMaker, start: int, pin: bool) -> None:
        for b in itertools.count(start):
            try:
                item = _to_tensors(maker.make(b), pin)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            # About to wait for the consumer: an idle (or abandoned, not yet garbage-collected)
            # layer must not keep the database from other code in this process. While waiting,
            # look again every 0.1 s, since a training loop's hold may end meanwhile.
            if self._queue.full():
                maker.release_if_idle()
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    maker.release_if_idle()
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def next(self) -> Dict[str, torch.Tensor]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the prefetch thread stopped without a batch") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over batch numbers, for torch's DataLoader workers."""

    def __init__(self, maker: BatchMaker):
        self.maker = maker

    def __getitem__(self, b: int):
        try:
            return self.maker.make(b)
        except CaffeError as e:
            # Returned rather than raised so the user sees our message, not a worker traceback.
            return {"error": e}


class _CountFrom(torch.utils.data.Sampler):
    """Batch numbers start, start+1, ... without end (the cursor wraps over the records)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _ProcessPrefetcher:
    """Produces batches in ``workers`` processes (torch DataLoader), delivered in order."""

    def __init__(self, maker: BatchMaker, start: int, workers: int, depth: int, pin: bool):
        loader = torch.utils.data.DataLoader(
            _BatchDataset(maker), batch_size=None, sampler=_CountFrom(start),
            num_workers=workers, pin_memory=pin, prefetch_factor=max(1, -(-depth // workers)),
            persistent_workers=False)
        # A worker passes each batch's shared memory to this process through a socket in a
        # multiprocessing temp folder (/tmp/pymp-*), made on first use and removed when that
        # process exits normally. stop_outright() ends workers at once, so folders of their own
        # would stay behind, one per worker per run. Made here first, the folder is inherited
        # by the forked workers and removed when this process exits.
        multiprocessing.util.get_temp_dir()
        self._iter = iter(loader)

    def next(self) -> Dict[str, torch.Tensor]:
        item = next(self._iter)
        if "error" in item:
            raise item["error"]
        return item

    def close(self) -> None:
        """Stop the workers gracefully: torch sets their done event while every worker is
        alive (so the event's lock is free), tells each to stop, and terminates the ones that
        have not exited after its timeout. Terminating them first could deadlock there (seen
        once in CI: a worker killed inside ``done_event.is_set()`` never releases its lock)."""
        if self._iter is None:
            return
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = None

    def stop_outright(self) -> None:
        """From a finalizer (``del net``, interpreter exit): torch's queues may be finalized
        already, and a graceful shutdown then waits 5 s per worker for a goodbye that never
        arrives (measured: 20 s for 4). The workers hold only read handles: terminate them,
        and leave the loader's shutdown (and its done event) alone."""
        if self._iter is None:
            return
        for worker in getattr(self._iter, "_workers", ()):
            if worker.is_alive():
                worker.terminate()
        self._iter = None


class InputPipeline:
    """Serves the batches of a :class:`BatchMaker` in order, prefetched.

    ``workers == 0``: one background thread (the default, as Caffe's prefetch thread);
    ``workers >= 1``: that many processes. ``depth`` batches are read ahead (data_param.prefetch).
    Prefetching starts at the first ``next_batch`` call, on the device given there.
    """

    def __init__(self, maker: BatchMaker, *, workers: int = 0, depth: int = 4):
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}", maker.where)
        self.maker = maker
        self.workers = workers
        self.depth = depth
        self._next = 0  # number of the next batch handed to the layer
        self._engine = None
        self._engine_pin = False

    # -- serving --------------------------------------------------------------------------
    def next_batch(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The next batch as tensors on ``device`` (``indices`` and ``mirrored`` stay on the CPU)."""
        pin = device.type == "cuda"
        if self._engine is None or self._engine_pin != pin:
            self._start(pin)
        try:
            batch = self._engine.next()
        except BaseException:
            # A failed batch leaves each engine elsewhere (the thread has exited, workers have
            # moved on to the following batches): restart from this batch at the next call, so
            # a caller that goes on gets the same error again, or the batch once the file is
            # fixed, never a later batch out of step with state().
            self._stop_engine()
            raise
        self._next += 1
        if device.type != "cpu":
            batch = {k: (v if k in _HOST_KEYS else v.to(device, non_blocking=pin))
                     for k, v in batch.items()}
        return batch

    def _start(self, pin: bool) -> None:
        self._stop_engine()
        if self.workers == 0 and not pin and _cores_are_busy():
            self._engine = _SyncReader(self.maker, self._next)
        elif self.workers == 0:
            self._engine = _ThreadPrefetcher(self.maker, self._next, self.depth, pin)
        else:
            self._engine = _ProcessPrefetcher(self.maker, self._next, self.workers, self.depth,
                                              pin)
        self._engine_pin = pin

    def _stop_engine(self, outright: bool = False) -> None:
        """Stop prefetching; ``outright`` from a finalizer (see _ProcessPrefetcher)."""
        if self._engine is not None:
            if outright and isinstance(self._engine, _ProcessPrefetcher):
                self._engine.stop_outright()
            else:
                self._engine.close()
            self._engine = None

    def set_workers(self, workers: int) -> None:
        """Change the number of worker processes; the order of batches does not change."""
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}", self.maker.where)
        self._stop_engine()
        self.workers = workers

    def set_shuffle(self, shuffle: bool) -> None:
        """Reshuffle the records at every pass (True) or read them in key order (False)."""
        self._stop_engine()
        o = self.maker.ordering
        self.maker.restart(Ordering(o.num_records, o.skip, bool(shuffle), o.seed,
                                    o.caffe_shuffle_seed))

    def set_shard(self, rank: int, world: int) -> None:
        """Read as rank ``rank`` of ``world`` data-parallel ranks (Caffe's skip rule, see
        :mod:`pycaffe_alt.distributed.sharding`), continuing from the current global cursor."""
        self._stop_engine()
        shard, served = self.maker.shard.regrouped(rank, world, self._next * self.maker.batch_size)
        self.maker.shard = shard
        self._next = served // self.maker.batch_size

    # -- resume ---------------------------------------------------------------------------
    def state(self) -> Dict[str, object]:
        """Everything needed to continue exactly: batches served so far, seed, skip, shuffle,
        and under data parallelism the shard geometry and the global cursor."""
        o = self.maker.ordering
        state = {"batch": self._next, "seed": self.maker.seed, "skip": o.skip,
                 "shuffle": o.shuffle, "num_records": o.num_records,
                 "caffe_shuffle_seed": o.caffe_shuffle_seed,
                 "batch_size": self.maker.batch_size,
                 "transform_seed": self.maker.transform_seed}
        state.update(self.maker.shard.state(self._next * self.maker.batch_size))
        return state

    def load_state(self, state: Dict[str, object]) -> None:
        """Continue from a ``state()``: the next batch is the one that followed it."""
        o = self.maker.ordering
        try:
            n, bs = int(state["num_records"]), int(state["batch_size"])
            batch, seed, skip = int(state["batch"]), int(state["seed"]), int(state["skip"])
            shuffle = bool(state["shuffle"])
            # Absent in snapshots from before the transformer followed Caffe's stream.
            transform_seed = state.get("transform_seed", self.maker.transform_seed)
            transform_seed = None if transform_seed is None else int(transform_seed)
            shuffle_seed = state.get("caffe_shuffle_seed", o.caffe_shuffle_seed)
            shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data state is incomplete or malformed ({e!r})", self.maker.where,
                            "pass a dict returned by state()") from None
        if not 0 <= batch * bs <= MAX_SAMPLES or seed < 0 or not 0 <= skip < max(n, 1) or \
                not all(v is None or 0 <= v < 2 ** 32 for v in (transform_seed, shuffle_seed)):
            raise DataError(f"data state is out of range (batch {batch}, seed {seed}, skip {skip} "
                            f"of {n} records)", self.maker.where, "pass a dict returned by state()")
        if n != o.num_records or bs != self.maker.batch_size:
            raise DataError(f"data state was saved for {n} records in batches of {bs}, this "
                            f"layer has {o.num_records} records in batches of "
                            f"{self.maker.batch_size}", self.maker.where,
                            "resume with the same dataset and batch_size")
        self._stop_engine()
        self.maker.seed, self.maker.transform_seed = seed, transform_seed
        self.maker.restart(Ordering(n, skip, shuffle, seed, shuffle_seed))
        # A snapshot of W ranks continues on this layer's own number of ranks (see Shard.resumed).
        try:
            shard, served = self.maker.shard.resumed(state, batch * bs)
        except (TypeError, ValueError) as e:
            raise DataError(f"data state has a malformed shard position ({e})", self.maker.where,
                            "pass a dict returned by state()") from None
        self.maker.shard = shard
        self._next = served // bs

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the dataset open between batches while the block runs (a training loop).

        Outside a hold, the database is closed after each batch (see
        :meth:`BatchMaker.release_if_idle`); in line reading closes it again when the hold ends,
        a prefetch thread at its next wait.
        """
        self.maker.holds += 1
        try:
            yield
        finally:
            self.maker.holds -= 1
            if isinstance(self._engine, _SyncReader):
                self.maker.release_if_idle()

    def close(self) -> None:
        """Stop prefetching and close the dataset in this process."""
        self._stop_engine()
        self.maker.close()

    def __del__(self):
        try:
            self._stop_engine(outright=True)
        except Exception:
            pass

