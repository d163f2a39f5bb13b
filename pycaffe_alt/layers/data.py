"""Caffe's data layers: ``Data`` (LMDB/LevelDB of Datum records), ``ImageData`` (list of image
files), ``HDF5Data`` (list of .h5 files), ``MemoryData`` (arrays from Python); ``WindowData`` is
refused with advice.

A data layer has no bottoms; ``forward()`` returns the next batch as float32 tensors on the layer's
device (set with ``layer.to(device)``), and ``layer.last_indices`` holds the record index (position
in key/list order) of each sample of that batch: the alternation mask store keys on them.
``state()``/``load_state()`` save and restore the reading position and random streams so that a
resumed run reads exactly what an uninterrupted run would have read.

Paths in the prototxt are used as given, relative to the current directory, as Caffe does.
Top shapes come from the first record, as in Caffe's ``DataLayerSetUp``.
"""
from __future__ import annotations

import os
import warnings
from typing import ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import caffe_rng
from ..blob_memory import check_blob_fits
from ..data.datum import decimal_label, too_large
from ..data.db import open_db
from ..data.pipeline import (MAX_SAMPLES, BatchMaker, InputPipeline, Ordering,
                             layer_seed)
from ..data.transformer import (TransformSpec, needs_random, normalize_batch, output_shape,
                                place_pixels, spec_from_param)
from ..distributed.sharding import UNSHARDED
from ..errors import CaffeError, DataError
from ..fileio import check_input_path, refuse_external_data
from ..proto import caffe_pb2
from ..registry import LAYERS
from .base import TRAIN, Layer, Shape


def _is_embedded_dataset(source: str) -> bool:
    """Whether ``source`` names one of the embedded mnist5k LMDBs (``.../mnist5k/mnist5k_*_lmdb``)."""
    from ..data import mnist5k

    folder, name = os.path.split(os.path.normpath(source))
    return name in (mnist5k.TRAIN_NAME, mnist5k.TEST_NAME) and \
        os.path.isfile(os.path.join(folder, mnist5k.CSV_NAME))


def _create_db_hint(source: str) -> str:
    """The exact commands that make a missing database, for the datasets the repository knows."""
    folder = os.path.dirname(os.path.normpath(source)) or "."
    name = os.path.basename(os.path.normpath(source)).lower()
    if name.startswith("cifar100"):
        return (f"run data/cifar100/get_cifar100 (downloads CIFAR-100 and writes "
                f"{folder}/cifar100_{{train,test}}_lmdb), or without network: "
                f"tools/convert_cifar --label fine DIR {folder}  (DIR: the extracted "
                "cifar-100-python folder)")
    if name.startswith("cifar10"):
        return (f"run data/cifar10/get_cifar10 (downloads CIFAR-10 and writes "
                f"{folder}/cifar10_{{train,test}}_lmdb and the mean), or without network: "
                f"tools/convert_cifar DIR {folder}  (DIR: the extracted cifar-10-batches-bin "
                "folder)")
    if name.startswith("mnist"):
        return ("run data/mnist/get_mnist (downloads MNIST and writes the LMDBs), or without "
                "network: tools/convert_mnist IMAGES.idx LABELS.idx DB")
    return ("create it with tools/convert_imageset ROOT/ LIST.txt DB (images), tools/convert_mnist "
            "or data/mnist/get_mnist (MNIST), tools/convert_cifar or data/cifar10/get_cifar10")


class DataLayerBase(Layer):
    """What every data layer shares: no bottoms, no parameter blobs, a device, record indices."""

    num_bottoms = (0, 0)
    blob_names = ()
    shape_by_fake_run = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        # Moves with layer.to(device) and tells forward() where the batch must go; not saved.
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self.last_indices: torch.Tensor = torch.empty(0, dtype=torch.long)
        # Which samples of the last batch were mirrored (bool, CPU); None for layers that never
        # mirror. The alternation solver flips stored spatial supports of those samples.
        self.last_mirrored: Optional[torch.Tensor] = None
        self._top_shapes: List[Shape] = []

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        return list(self._top_shapes)

    def require_batch_size(self, batch_size: int, field: str) -> int:
        if batch_size <= 0:
            raise self.error(f"{field}.batch_size must be positive, got {batch_size}",
                             f"set {field} {{ batch_size: N }}")
        return int(batch_size)

    def require_source(self, source: str, field: str, what: str, create_hint: str,
                       folder_ok: bool = False) -> str:
        if not source:
            raise self.error(f"{field}.source is not set", f"give the path of the {what}")
        if not os.path.exists(source) and _is_embedded_dataset(source):
            # The embedded digits ship as a CSV; their LMDBs are made on first use, so a fresh
            # clone trains offline without a preparation step.
            from ..data.mnist5k import ensure_mnist5k_lmdb

            ensure_mnist5k_lmdb(os.path.dirname(os.path.normpath(source)))
        if not os.path.exists(source):
            raise DataError(f"{what} {source!r} does not exist (relative paths are taken from the "
                            f"current directory, {os.getcwd()})", self.where, create_hint)
        return check_input_path(source, DataError, what, folder_ok=folder_ok)


class PipelinedDataLayer(DataLayerBase):
    """A data layer fed by an :class:`InputPipeline` (Data, ImageData)."""

    def init_pipeline(self, source, spec: TransformSpec, batch_size: int, skip: int,
                      shuffle: bool, workers: int, prefetch: int,
                      transform_seed: Optional[int] = None,
                      caffe_shuffle_seed: Optional[int] = None) -> None:
        """Read ``source`` from record ``skip`` on (wrapping within the records), reshuffled
        at every pass when ``shuffle`` (Caffe's order when ``caffe_shuffle_seed`` is given)."""
        seed = layer_seed(self.name)
        n = len(source)
        ordering = Ordering(n, skip % max(n, 1), shuffle, seed, caffe_shuffle_seed)
        maker = BatchMaker(source, spec, batch_size, ordering, seed, self.where,
                           transform_seed=transform_seed)
        # The first record served fixes the top shapes (Caffe reads it in DataLayerSetUp).
        first = int(ordering.indices(0, 1)[0])
        image, _ = source.load(first)
        shape = output_shape(spec, image.shape, f"{self.where}: record {first}")
        # Release this process's handles: the prefetch thread or worker processes reopen them.
        source.release()
        self._top_shapes = [(batch_size,) + shape]
        if len(self.param.top) > 1:
            self._top_shapes.append((batch_size,))
        self.pipeline = InputPipeline(maker, workers=workers, depth=prefetch)

    def forward(self):
        batch = self.pipeline.next_batch(self.device)
        self.last_indices = batch["indices"]
        self.last_mirrored = batch.get("mirrored")
        if len(self._top_shapes) > 1:
            return batch["data"], batch["label"]
        return batch["data"]

    def hold(self) -> ContextManager[None]:
        """Keep the dataset open between batches while the block runs (see InputPipeline.hold)."""
        return self.pipeline.hold()

    def set_pipeline(self, workers: Optional[int] = None, shuffle: Optional[bool] = None) -> None:
        """Read with ``workers`` processes (0: one background thread) and/or reshuffle the
        records at every pass; neither changes which batch comes next."""
        if workers is not None:
            self.pipeline.set_workers(int(workers))
        if shuffle is not None:
            self.pipeline.set_shuffle(bool(shuffle))

    def set_memory_format(self, fmt: torch.memory_format) -> None:
        """Make batches in the net's memory format (channels-last batches need no reorder)."""
        self.pipeline.maker.channels_last = fmt is torch.channels_last

    def set_shard(self, rank: int, world: int) -> None:
        """Read as data-parallel rank ``rank`` of ``world``: record k of the order goes to rank
        k mod world (Caffe's DataLayer skip rule; :mod:`pycaffe_alt.distributed.sharding`)."""
        self.pipeline.set_shard(rank, world)

    def state(self) -> Dict[str, object]:
        """Reading position and random-stream seeds (see :meth:`InputPipeline.state`)."""
        return self.pipeline.state()

    def load_state(self, state: Dict[str, object]) -> None:
        """Continue exactly where ``state()`` was taken."""
        self.pipeline.load_state(state)

    def close(self) -> None:
        """Stop prefetching and release the dataset."""
        self.pipeline.close()


# ---------------------------------------------------------------------------------------------
# Data: Datum records from an LMDB / LevelDB
# ---------------------------------------------------------------------------------------------
class DbSource:
    """Records of a Caffe database, decoded as Caffe's Data layer does (picklable, fork-safe)."""

    def __init__(self, path: str, backend: str, force_color: bool, force_gray: bool, where: str):
        try:
            self.reader = open_db(path, backend, "r")
        except DataError as e:
            raise DataError(f"{e.what} ({path})", where, e.hint) from None
        self.force_color = force_color
        self.force_gray = force_gray
        self.where = where
        self._warned_force = False

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> Tuple[np.ndarray, float]:
        from ..data.datum import datum_to_array, decode_datum

        datum = self.reader.datum(index)  # a corrupt record raises naming the path and key
        if datum.encoded:
            where = f"{self.where}: {self.reader.where(index)}"
            image = decode_datum(datum, self.force_color, self.force_gray, where=where)
        else:
            if (self.force_color or self.force_gray) and not self._warned_force:
                # Caffe logs this and goes on with the raw pixels.
                warnings.warn(f"{self.where}: force_color/force_gray only apply to encoded "
                              "records; this database holds raw pixels")
                self._warned_force = True
            try:
                image = datum_to_array(datum, where=self.where)
            except DataError:  # say it again with the record's key (built only on failure)
                image = datum_to_array(datum, where=f"{self.where}: {self.reader.where(index)}")
        return image, float(datum.label)

    def load_many(self, indices: Sequence[int]) -> Iterator[Tuple[np.ndarray, float, bool]]:
        """``load`` for a batch: one read of every record, raw uint8 Datums decoded without a
        per-record detour; anything else (encoded, float_data, malformed) goes through ``load``,
        which decodes it or names the record in its error. The flag says whether the record
        was encoded (Caffe transforms those as a decoded cv::Mat)."""
        datum = caffe_pb2.Datum()
        raw_ok = not (self.force_color or self.force_gray)  # load() warns about those once
        for index, value in zip(indices, self.reader.values(indices)):
            try:
                datum.ParseFromString(value)
            except Exception:
                yield (*self.load(int(index)), False)  # load names the corrupt record
                continue
            data = datum.data
            c, h, w = datum.channels, datum.height, datum.width
            if raw_ok and not datum.encoded and data and len(data) == c * h * w:
                image = np.frombuffer(data, dtype=np.uint8).reshape(c, h, w)
                yield image, float(datum.label), False
            else:
                yield (*self.load(int(index)), bool(datum.encoded))

    def close(self) -> None:
        self.reader.close()

    def release(self) -> None:
        self.reader.release()


def _backend_of(dp, path: str) -> str:
    """``data_param.backend``; when the prototxt leaves it out, the kind of database found.

    Caffe's default is LEVELDB, which fails on the LMDBs everyone uses today; choosing by what is
    on disk (an LMDB folder holds data.mdb) accepts both without changing an explicit choice.
    """
    if dp.HasField("backend"):
        return "lmdb" if dp.backend == dp.LMDB else "leveldb"
    lmdb_layout = os.path.isfile(os.path.join(path, "data.mdb")) or os.path.isfile(path)
    return "lmdb" if lmdb_layout else "leveldb"


@LAYERS.register("Data")
class Data(PipelinedDataLayer):
    """Caffe's ``Data`` layer: Datum records in key order with a wrapping cursor, transformed by
    ``transform_param``; tops ``data`` and optionally ``label``.

    ``data_param``: source, batch_size, backend (LMDB/LEVELDB), prefetch (``rand_skip`` is
    ignored with a warning, as Caffe's Data layer ignores it). Extensions:
    ``set_pipeline(workers=N, shuffle=True)`` (per-pass reshuffle, off by default as in Caffe).
    """

    num_tops = (1, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        dp = param.data_param
        batch_size = self.require_batch_size(dp.batch_size, "data_param")
        source = self.require_source(dp.source, "data_param", "database",
                                     _create_db_hint(dp.source), folder_ok=True)
        spec = spec_from_param(param.transform_param, ctx.phase == TRAIN, self.where)
        # Caffe's set-up draws from its stream, in order: the reader thread's seed (DataReader,
        # made with the layer), two transformer seeds when it crops or mirrors (InitRand runs in
        # BaseDataLayer::LayerSetUp and again before prefetching starts; the second seeds the
        # generator that is used), and the prefetch thread's seed.
        draws = caffe_rng.stream().raw(2 + 2 * needs_random(spec))
        transform_seed = int(draws[2]) if needs_random(spec) else None
        records = DbSource(source, _backend_of(dp, source), spec.force_color, spec.force_gray,
                           self.where)
        if dp.rand_skip:
            # The reference Caffe's Data layer (DataReader) and BVLC master's alike never read
            # data_param.rand_skip (only ImageData does): reading starts at the first record.
            warnings.warn(f"{self.where}: data_param.rand_skip is ignored, as Caffe's Data layer "
                          "ignores it; reading starts at the first record")
        self.init_pipeline(records, spec, batch_size, 0,
                           shuffle=bool(dp.shuffle),
                           workers=int(dp.workers),
                           prefetch=max(1, int(dp.prefetch)),
                           transform_seed=transform_seed)


# ---------------------------------------------------------------------------------------------
# ImageData: a list file of "path label" lines
# ---------------------------------------------------------------------------------------------
def parse_image_list(path: str, where: str) -> List[Tuple[str, int]]:
    """Lines ``<image path> <integer label>`` (split at the last space, as Caffe does).

    Blank lines are ignored; any other line without an integer label after its last space is an
    error naming the file and line number.
    """
    entries: List[Tuple[str, int]] = []
    check_input_path(path, DataError, "image list")
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if lineno == 1 and line.startswith("\ufeff"):
                # Caffe would take the mark as part of the first image's name and fail to load
                # an image that is plainly there; the name printed then looks right.
                raise DataError("the list starts with a UTF-8 byte-order mark, which Caffe reads "
                                "as part of the first image's path", f"{path}:1",
                                "save the list as UTF-8 without BOM (or plain ASCII)")
            if not line.strip():
                continue
            name, sep, label = line.rpartition(" ")
            value = decimal_label(label)
            if not sep or not name or value is None:
                raise DataError(f"line {lineno} is {line!r}, not '<image path> <integer label>'",
                                f"{path}:{lineno}",
                                "write one image per line: its path, a space, its integer label")
            if not -2 ** 31 <= value < 2 ** 31:  # Caffe reads labels as int
                raise DataError(f"label {value} does not fit an int32", f"{path}:{lineno}",
                                "labels are 32-bit integers")
            entries.append((name, value))
    if not entries:
        raise DataError(f"image list {path!r} has no entries", where,
                        "write one '<image path> <label>' line per image")
    return entries


class ImageListSource:
    """Images named by a list file, read as Caffe's ImageData layer reads them."""

    def __init__(self, entries: List[Tuple[str, int]], root: str, new_height: int, new_width: int,
                 is_color: bool, list_path: str):
        self.entries = entries
        self.root = root
        self.new_height = new_height
        self.new_width = new_width
        self.is_color = is_color
        self.list_path = list_path

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> Tuple[np.ndarray, float]:
        from ..data.image import read_image

        name, label = self.entries[index]
        # Caffe concatenates root_folder and the listed name as strings (no separator added).
        path = self.root + name
        try:
            image = read_image(path, self.new_height, self.new_width, self.is_color)
        except CaffeError as e:
            raise DataError(f"{e.what} ({path})", f"{self.list_path} entry {index + 1}",
                            e.hint) from None
        return image.transpose(2, 0, 1), float(label)

    def load_many(self, indices: Sequence[int]) -> Iterator[Tuple[np.ndarray, float, bool]]:
        """``load`` for each of ``indices`` (images are separate files: nothing to batch); every
        image is decoded, as Caffe's ImageData transforms a cv::Mat."""
        return ((*self.load(int(i)), True) for i in indices)

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass


@LAYERS.register("ImageData")
class ImageData(PipelinedDataLayer):
    """Caffe's ``ImageData`` layer: images listed in a text file, tops ``data`` and ``label``.

    ``image_data_param``: source, root_folder, batch_size, new_height/new_width (both or neither),
    is_color, shuffle (a new order at every pass), rand_skip.
    """

    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        ip = param.image_data_param
        batch_size = self.require_batch_size(ip.batch_size, "image_data_param")
        if (ip.new_height > 0) != (ip.new_width > 0):
            raise self.error("image_data_param sets only one of new_height/new_width",
                             "set both (resize) or neither (keep the image size)")
        if ip.new_height > 0:
            # Before any image is resized: OpenCV's own allocation failure is not a message.
            channels = 3 if ip.is_color else 1
            check_blob_fits((batch_size, channels, int(ip.new_height), int(ip.new_width)), None,
                            param.top[0] if len(param.top) else "data", self.where)
        source = self.require_source(
            ip.source, "image_data_param", "image list",
            "write a text file with one '<image path> <label>' line per image (paths relative "
            "to root_folder)")
        entries = parse_image_list(source, self.where)
        spec = spec_from_param(param.transform_param, ctx.phase == TRAIN, self.where)
        # Caffe's set-up draws, in order: a transformer seed when it crops or mirrors
        # (BaseDataLayer::LayerSetUp), the shuffle generator's seed, the rand_skip draw
        # (ImageDataLayer::DataLayerSetUp: skip = draw % rand_skip), the second transformer seed
        # (the one used), and the prefetch thread's seed.
        at = int(needs_random(spec))
        first = at + bool(ip.shuffle) + (ip.rand_skip > 0)
        draws = caffe_rng.stream().raw(first + 1 + needs_random(spec)).tolist()
        transform_seed = draws[first] if needs_random(spec) else None
        shuffle_seed = draws[at] if ip.shuffle else None
        skip = draws[at + bool(ip.shuffle)] % ip.rand_skip if ip.rand_skip > 0 else 0
        if skip >= len(entries):
            # Caffe's CHECK_GT(lines_.size(), skip) ("Not enough points to skip") stops here on
            # this very draw; wrapping round the list would start where no Caffe run starts.
            raise self.error(f"image_data_param.rand_skip {ip.rand_skip} drew a skip of {skip} "
                             f"but {source} lists {len(entries)} images (Caffe stops: not "
                             "enough points to skip)",
                             f"set rand_skip to at most {len(entries)}")
        records = ImageListSource(entries, ip.root_folder, int(ip.new_height), int(ip.new_width),
                                  bool(ip.is_color), source)
        self.init_pipeline(records, spec, batch_size, skip,
                           shuffle=bool(ip.shuffle),
                           workers=int(ip.workers),
                           prefetch=max(1, int(param.data_param.prefetch)),
                           transform_seed=transform_seed, caffe_shuffle_seed=shuffle_seed)


# ---------------------------------------------------------------------------------------------
# DenseImageData (SegNet): an image and its label image per line
# ---------------------------------------------------------------------------------------------
def parse_pair_list(path: str, where: str) -> List[Tuple[str, str]]:
    """Whitespace-separated ``<image> <label image>`` pairs, as the fork's ``infile >> a >> b``
    reads them; a trailing name without its pair is an error naming the file."""
    with open(path, "rb") as f:
        words = f.read().decode("utf-8", errors="replace").split()
    if len(words) % 2:
        raise DataError(f"{path} lists {len(words)} names; each line holds an image and its label "
                        "image", where, "write '<image> <label image>' on every line")
    return list(zip(words[0::2], words[1::2]))


@LAYERS.register("DenseImageData")
class DenseImageData(DataLayerBase):
    """SegNet's ``DenseImageData`` (alexgkendall/caffe-segnet ``dense_image_data_layer.cpp``):
    tops ``data`` (N, C, H, W) and ``label`` (N, 1, H, W), the label image's pixel values.

    ``dense_image_data_param``: source (lines ``<image> <label image>``), root_folder,
    batch_size, new_height/new_width (both or neither; labels resized nearest-neighbour),
    is_color, shuffle (Caffe's order, as ImageData), rand_skip, mirror and
    crop_height/crop_width (random per image: ``rand() % 2`` for the flip, then the crop's row
    and column offsets, as the fork draws them, but from a generator of the layer's own: the
    fork's prefetch thread takes them from the process-wide stream while the main thread goes
    on drawing, an order no run repeats). ``transform_param`` gives mean and scale for the image
    only (the fork refuses its mirror and crop_size). With batch_size 1 and no resizing or
    cropping every batch takes its image's own size. ENet's fork adds ``label_divide_factor``
    f: labels are read at ``new_height / f x new_width / f`` (C integer division, nearest
    neighbour), the label top is (N, 1, H / f, W / f); it needs new_height/new_width, and the
    fork's crop of such labels (the image's window applied to the smaller label) is refused.
    """

    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.dense_image_data_param
        self.batch_size = self.require_batch_size(p.batch_size, "dense_image_data_param")
        for a, b, what in (("new_height", "new_width", "resize"), ("crop_height", "crop_width", "crop")):
            if (getattr(p, a) > 0) != (getattr(p, b) > 0):  # the fork's CHECKs
                raise self.error(f"dense_image_data_param sets only one of {a}/{b}",
                                 f"set both ({what}) or neither")
        if p.new_height > 0:
            # Before any image is resized: OpenCV's own failure names no field.
            check_blob_fits((self.batch_size, 3 if p.is_color else 1, int(p.new_height),
                             int(p.new_width)), None, param.top[0] if len(param.top) else "data",
                            self.where)
        self.spec = spec_from_param(param.transform_param, ctx.phase == TRAIN, self.where)
        if self.spec.mirror or self.spec.crop_size:
            raise self.error("transform_param mirror/crop_size would transform the image and not "
                             "its labels (the fork refuses them)",
                             "use dense_image_data_param { mirror: true crop_height: H "
                             "crop_width: W }, which move both")
        source = self.require_source(p.source, "dense_image_data_param", "image pair list",
                                     "write a text file with one '<image> <label image>' line "
                                     "per example (paths relative to root_folder)")
        self.pairs = parse_pair_list(source, self.where)
        if not self.pairs:
            raise self.error(f"{source} lists no image pairs", "add '<image> <label image>' lines")
        self.list_path, self.root = source, p.root_folder
        self.new_hw = (int(p.new_height), int(p.new_width))
        self.crop_hw = (int(p.crop_height), int(p.crop_width))
        f = int(p.label_divide_factor)
        if f < 1:  # the fork divides by it
            raise self.error(f"label_divide_factor {f} must be at least 1")
        if f > 1 and (self.new_hw[0] == 0 or self.crop_hw[0] or min(self.new_hw) < f):
            raise self.error(f"label_divide_factor {f} needs new_height and new_width of at least "
                             f"{f} and no crop_height/crop_width (the fork reads labels at "
                             "new_height/f x new_width/f and crops them with the image's window)",
                             "set new_height/new_width and drop the crop")
        self.label_hw = (self.new_hw[0] // f, self.new_hw[1] // f) if f > 1 else self.new_hw
        self.label_factor = f
        self.mirror, self.is_color = bool(p.mirror), bool(p.is_color)
        # The fork's set-up draws from Caffe's stream: the shuffle generator's seed, then the
        # rand_skip draw (its prefetch thread draws no seed of its own).
        draws = caffe_rng.stream().raw(bool(p.shuffle) + (p.rand_skip > 0)).tolist()
        shuffle_seed = draws[0] if p.shuffle else None
        skip = draws[int(bool(p.shuffle))] % p.rand_skip if p.rand_skip > 0 else 0
        self._rng = caffe_rng.CaffeRNG(layer_seed(self.name) & 0xFFFFFFFF)
        self.ordering = Ordering(len(self.pairs), skip % len(self.pairs), bool(p.shuffle),
                                 layer_seed(self.name), shuffle_seed)
        self._served = 0
        self.variable = self.batch_size == 1 and self.new_hw == (0, 0) and self.crop_hw == (0, 0)
        first = int(self.ordering.indices(0, 1)[0])
        image, label = self._read(first)
        if label.shape[:2] != self._label_size(image.shape[:2]):
            raise self.error(f"label image {self.pairs[first][1]!r} is {label.shape[1]} x "
                             f"{label.shape[0]}, its image {image.shape[1]} x {image.shape[0]}",
                             "input and label images must have the same height and width")
        h, w = self.crop_hw if self.crop_hw[0] else image.shape[:2]
        # The mean goes to the (cropped) image: checked now, naming the mean, not at the first
        # batch as numpy's broadcast failure.
        output_shape(self.spec, (image.shape[2], h, w), f"{self.list_path} pair {first + 1}")
        self._top_shapes = [(self.batch_size, image.shape[2], h, w),
                            (self.batch_size, 1) + self._label_size((h, w))]

    def _label_size(self, plane: Sequence[int]) -> Tuple[int, int]:
        """The label size that goes with an image of ``plane`` (H, W): the same, or ENet's
        reduced one."""
        return (int(plane[0]), int(plane[1])) if self.label_factor == 1 else self.label_hw

    def _read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        from ..data.image import read_image

        image_name, label_name = self.pairs[index]
        paths = (self.root + image_name, self.root + label_name)  # string concatenation, as Caffe
        try:
            image = read_image(paths[0], *self.new_hw, is_color=self.is_color)
            label = read_image(paths[1], *self.label_hw, is_color=False, nearest=True)
        except CaffeError as e:
            raise DataError(f"{e.what} ({e.where})", f"{self.list_path} pair {index + 1}",
                            e.hint) from None
        return image, label

    def forward(self):
        n = self.batch_size
        indices = self.ordering.indices(self._served, n)
        items = []
        for index in indices.tolist():
            image, label = self._read(index)
            if label.shape[:2] != self._label_size(image.shape[:2]):
                raise DataError(f"label image is {label.shape[1]} x {label.shape[0]}, its image "
                                f"{image.shape[1]} x {image.shape[0]}",
                                f"{self.list_path} pair {index + 1}",
                                "input and label images must have the same height and width")
            if self.mirror and self._rng.raw(1)[0] % 2:
                image, label = image[:, ::-1], label[:, ::-1]
            if self.crop_hw[0]:
                (ch, cw), (h, w) = self.crop_hw, image.shape[:2]
                if ch > h or cw > w:
                    raise DataError(f"crop {ch} x {cw} is larger than the {h} x {w} image",
                                    f"{self.list_path} pair {index + 1}",
                                    "lower crop_height/crop_width or resize the images")
                h_off, w_off = (int(d) for d in self._rng.raw(2) % np.array([h - ch + 1, w - cw + 1]))
                image = image[h_off:h_off + ch, w_off:w_off + cw]
                label = label[h_off:h_off + ch, w_off:w_off + cw]
            items.append((image, label))
        shape = items[0][0].shape if self.variable else self._top_shapes[0][2:] + (self._top_shapes[0][1],)
        data = np.empty((n, shape[2], shape[0], shape[1]), dtype=np.float32)
        labels = np.empty((n, 1) + self._label_size(shape[:2]), dtype=np.float32)
        for i, (image, label) in enumerate(items):
            if image.shape != shape:
                raise DataError(f"image is {image.shape[1]} x {image.shape[0]} x {image.shape[2]}, "
                                f"the batch {shape[1]} x {shape[0]} x {shape[2]}",
                                f"{self.list_path} pair {int(indices[i]) + 1}",
                                "give every image the same size, or set new_height/new_width")
            place_pixels(data[i], image.transpose(2, 0, 1), False, 0, 0)
            labels[i, 0] = label[:, :, 0]  # the label's pixel values, no mean or scale
        if self.variable:  # each batch its image's size: the mean must fit this one too
            output_shape(self.spec, data.shape[1:], f"{self.list_path} pair {int(indices[0]) + 1}")
        normalize_batch(data, self.spec, [(False, 0, 0)] * n)
        self._served += n
        self.last_indices = torch.from_numpy(indices.astype(np.int64))
        return torch.from_numpy(data).to(self.device), torch.from_numpy(labels).to(self.device)

    def state(self) -> Dict[str, object]:
        """The serving position and the flip/crop generator, for exact resume."""
        rng = self._rng.state()
        return {"served": self._served, "num_records": len(self.pairs), "rng_key": rng["key"],
                "rng_pos": rng["pos"], "caffe_shuffle_seed": self.ordering.caffe_shuffle_seed,
                "skip": self.ordering.skip}

    def load_state(self, state: Dict[str, object]) -> None:
        try:
            served, n = int(state["served"]), int(state["num_records"])
            skip = int(state["skip"])
            seed = state.get("caffe_shuffle_seed")
            seed = None if seed is None else int(seed)
            rng = {"key": state["rng_key"], "pos": state["rng_pos"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data state is incomplete or malformed ({e!r})", self.where,
                            "pass a dict returned by state()") from None
        if n != len(self.pairs) or not 0 <= served <= MAX_SAMPLES or not 0 <= skip < n:
            raise DataError(f"data state was saved for {n} image pairs (served {served}, skip "
                            f"{skip}); this layer lists {len(self.pairs)}", self.where,
                            "resume with the same list file")
        try:
            self._rng.set_state(rng)
        except (ValueError, TypeError) as e:
            raise DataError(f"data state has a damaged generator ({e})", self.where,
                            "pass a dict returned by state()") from None
        o = self.ordering
        self.ordering = Ordering(o.num_records, skip, o.shuffle, o.seed, seed)
        self._served = served


# ---------------------------------------------------------------------------------------------
# HDF5Data: datasets named after the tops, from the .h5 files listed in a text file
# ---------------------------------------------------------------------------------------------
@LAYERS.register("HDF5Data")
class HDF5Data(DataLayerBase):
    """Caffe's ``HDF5Data`` layer: one top per dataset of the same name in each listed .h5 file.

    ``hdf5_data_param``: source (a text file naming one .h5 file per line), batch_size, shuffle.
    Rows are served file after file, wrapping at the end. With ``shuffle`` the file order is
    permuted at every pass and the rows of a file at every visit (Caffe's random_shuffle; here
    from the layer's seed, so runs repeat). No ``transform_param`` (Caffe refuses it too).
    ``last_indices`` are global row numbers: file offset (in list order) + row in file.
    """

    num_tops = (1, None)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        import h5py

        hp = param.hdf5_data_param
        if param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data",
                             "remove transform_param; store preprocessed data in the .h5 files")
        self.batch_size = self.require_batch_size(hp.batch_size, "hdf5_data_param")
        source = self.require_source(hp.source, "hdf5_data_param", "HDF5 file list",
                                     "write a text file naming one .h5 file per line")
        with open(source, "rb") as f:
            raw = f.read()
        if raw.startswith(b"\x89HDF\r\n\x1a\n"):
            raise DataError(f"source {source!r} is an HDF5 file, not a list of them", self.where,
                            "hdf5_data_param.source names a text file with one .h5 path per "
                            f"line: echo {source} > list.txt and use list.txt")
        try:
            # Caffe reads whitespace-separated names.
            self.files = raw.decode("utf-8").split()
        except UnicodeDecodeError:
            raise DataError(f"HDF5 file list {source!r} is not UTF-8 text", self.where,
                            "write a text file naming one .h5 file per line") from None
        if not self.files:
            raise DataError(f"HDF5 file list {source!r} names no files", self.where,
                            "write one .h5 path per line")
        self.datasets = list(param.top)
        self.shuffle = bool(hp.shuffle)
        self.seed = layer_seed(self.name)
        rows, tails = [], None
        for path in self.files:
            if not os.path.isfile(path):
                what = "is not a regular file" if os.path.exists(path) else "does not exist"
                raise DataError(f"HDF5 file {path!r} (listed in {source}) {what}",
                                self.where, "fix the list file or create the file with h5py")
            try:
                with h5py.File(path, "r") as h5:
                    refuse_external_data(h5, path, DataError)
                    shapes = [self._dataset_shape(h5, name, path) for name in self.datasets]
            except (OSError, RuntimeError) as e:  # h5py: RuntimeError for damaged tables
                raise DataError(f"cannot read HDF5 file {path!r} ({e})", self.where,
                                "the file is not HDF5 or is damaged") from None
            n = shapes[0][0]
            if any(s[0] != n for s in shapes):
                raise DataError(f"datasets {self.datasets} of {path!r} have different numbers of "
                                f"rows {[s[0] for s in shapes]}", self.where,
                                "every top's dataset needs one row per example")
            if n == 0:
                raise DataError(f"HDF5 file {path!r} has no rows", self.where)
            # Caffe reads a whole file at once (as float32 here, plus an int64 row order): a
            # file beyond memory is named now, not met as numpy's allocation failure at the
            # batch that reaches it.
            why = too_large(sum(4 * int(np.prod(s, dtype=object)) for s in shapes) + 8 * n, None)
            if why is not None:
                raise DataError(f"HDF5 file {path!r} holds {n} rows of shapes "
                                f"{[s[1:] for s in shapes]}: read whole as Caffe does, that is "
                                f"{why}", self.where,
                                "split it into smaller .h5 files listed in the source, or store "
                                "smaller rows")
            if tails is None:
                tails = [s[1:] for s in shapes]
            elif tails != [s[1:] for s in shapes]:
                raise DataError(f"datasets of {path!r} have row shapes {[s[1:] for s in shapes]} "
                                f"but the first file's are {tails}", self.where,
                                "all listed files must hold rows of the same shapes")
            rows.append(n)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)[:-1]])
        self.total = int(self.rows.sum())
        self._top_shapes = [(self.batch_size,) + tuple(t) for t in tails]
        self._served = 0  # rows served so far (by this rank)
        self._shard = UNSHARDED
        self._cache: Tuple[Optional[int], List[np.ndarray]] = (None, [])

    def _dataset_shape(self, h5, name: str, path: str) -> Tuple[int, ...]:
        if name not in h5 or not hasattr(h5[name], "shape"):
            raise DataError(f"HDF5 file {path!r} has no dataset {name!r} (one per top)",
                            self.where, "name the tops after the datasets in the file")
        ds = h5[name]
        if ds.ndim < 1 or ds.dtype.kind not in "fiub":
            raise DataError(f"dataset {name!r} of {path!r} is {ds.dtype} with {ds.ndim} axes; "
                            "numeric data with at least one axis is needed", self.where)
        return tuple(int(d) for d in ds.shape)

    # Pure functions of (seed, pass, visit) so that state() is just a counter.
    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        from ..data.pipeline import derived_generator
        return derived_generator(self.seed, 10, epoch).permutation(len(self.files))

    def _row_order(self, epoch: int, file_index: int) -> np.ndarray:
        n = int(self.rows[file_index])
        if not self.shuffle:
            return np.arange(n)
        from ..data.pipeline import derived_generator
        return derived_generator(self.seed, 11, epoch * len(self.files) + file_index).permutation(n)

    def _file_arrays(self, file_index: int) -> List[np.ndarray]:
        import h5py

        if self._cache[0] != file_index:
            path = self.files[file_index]
            try:
                with h5py.File(path, "r") as h5:
                    refuse_external_data(h5, path, DataError)
                    arrays = [np.asarray(h5[name][...], dtype=np.float32) for name in self.datasets]
            except (OSError, RuntimeError, KeyError) as e:  # damaged (or changed) since set-up
                raise DataError(f"cannot read HDF5 file {path!r} ({e})", self.where,
                                "the file is damaged or was replaced while training") from None
            self._cache = (file_index, arrays)
        return self._cache[1]

    def _locate(self, pos: int) -> Tuple[int, int, int]:
        """Global row position ``pos`` of the serving order -> (pass, file, place of the row
        in that file's order)."""
        epoch, within = divmod(pos, self.total)
        order = self._file_order(epoch)
        ends = np.cumsum(self.rows[order])
        k = int(np.searchsorted(ends, within, side="right"))
        f = int(order[k])
        return epoch, f, within - (int(ends[k]) - int(self.rows[f]))

    def forward(self):
        tops = [np.empty(s, dtype=np.float32) for s in self._top_shapes]
        indices = np.empty(self.batch_size, dtype=np.int64)
        shard = self._shard
        if shard.world == 1:
            self._forward_runs(tops, indices, shard.start + self._served)
        else:
            # Data-parallel: every world-th row of the global order (Caffe's skip rule). A
            # file's row order is drawn once per batch, not once per row.
            orders: Dict[Tuple[int, int], np.ndarray] = {}
            for i, pos in enumerate(shard.positions(self._served, self.batch_size)):
                epoch, f, place = self._locate(int(pos))
                order = orders.get((epoch, f))
                if order is None:
                    order = orders[(epoch, f)] = self._row_order(epoch, f)
                row = int(order[place])
                for top, arr in zip(tops, self._file_arrays(f)):
                    top[i] = arr[row]
                indices[i] = self.offsets[f] + row
        self._served += self.batch_size
        self.last_indices = torch.from_numpy(indices)
        out = tuple(torch.from_numpy(t).to(self.device) for t in tops)
        return out[0] if len(out) == 1 else out

    def _forward_runs(self, tops: List[np.ndarray], indices: np.ndarray, pos: int) -> None:
        """Fill a batch from consecutive rows, copying each file's run in one go."""
        i = 0
        while i < self.batch_size:
            epoch, f, start_in_file = self._locate(pos)
            take = min(self.batch_size - i, int(self.rows[f]) - start_in_file)
            rows = self._row_order(epoch, f)[start_in_file:start_in_file + take]
            for top, arr in zip(tops, self._file_arrays(f)):
                top[i:i + take] = arr[rows]
            indices[i:i + take] = self.offsets[f] + rows
            i += take
            pos += take

    def set_shard(self, rank: int, world: int) -> None:
        """Read as data-parallel rank ``rank`` of ``world`` (row k of the order to rank
        k mod world, Caffe's skip rule)."""
        self._shard, self._served = self._shard.regrouped(rank, world, self._served)

    def state(self) -> Dict[str, object]:
        state = {"served": self._served, "seed": self.seed, "total": self.total}
        state.update(self._shard.state(self._served))
        return state

    def load_state(self, state: Dict[str, object]) -> None:
        if int(state.get("total", -1)) != self.total:
            raise DataError(f"data state was saved for {state.get('total')} rows, this layer "
                            f"reads {self.total}", self.where, "resume with the same files")
        seed, served = int(state["seed"]), int(state["served"])
        if seed < 0 or not 0 <= served <= MAX_SAMPLES:
            raise DataError(f"data state is out of range (seed {seed}, served {served})",
                            self.where, "resume with a snapshot of this net")
        self._shard, self._served = self._shard.resumed(state, served)
        self.seed = seed


# ---------------------------------------------------------------------------------------------
# MemoryData: arrays handed over from Python
# ---------------------------------------------------------------------------------------------
def _float32_in_place_or_copy(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is a writable float32 C-order array (a view of the caller's
    memory, as Caffe's MemoryData reads it), else a float32 C-order copy."""
    if (array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable
            and array.dtype.isnative):
        return array
    return np.array(array, dtype=np.float32, order="C")


@LAYERS.register("MemoryData")
class MemoryData(DataLayerBase):
    """Caffe's ``MemoryData`` layer: serves ``batch_size`` rows at a time of the arrays given to
    :meth:`set_input_arrays` (pycaffe's ``net.set_input_arrays``), wrapping around.

    ``memory_data_param``: batch_size, channels, height, width. Like Caffe, arrays are not
    transformed; the label top is batch_size x 1 x 1 x 1 once data flows (batch_size at setup).
    """

    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        mp = param.memory_data_param
        dims = (mp.batch_size, mp.channels, mp.height, mp.width)
        if min(dims) <= 0:
            raise self.error(f"memory_data_param needs positive batch_size, channels, height and "
                             f"width, got {dims}", "set all four in memory_data_param")
        self.batch_size = int(mp.batch_size)
        self.sample_shape = tuple(int(d) for d in dims[1:])
        self._top_shapes = [(self.batch_size,) + self.sample_shape, (self.batch_size,)]
        self._data: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._pos = 0
        if param.HasField("transform_param"):
            warnings.warn(f"{self.where}: MemoryData does not transform arrays given with "
                          "set_input_arrays (as in Caffe); transform_param is ignored")
        # Caffe's BaseDataLayer set-up seeds a transformer that would crop or mirror.
        caffe_rng.skip(needs_random(spec_from_param(param.transform_param, ctx.phase == TRAIN,
                                                    self.where)))

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve these arrays: data N x C x H x W, labels N values; N a multiple of batch_size.

        Caffe's MemoryDataLayer::Reset keeps pointers into the caller's arrays (pycaffe's
        Net_SetInputArrays passes PyArray_DATA, no copy), so a program that refills the same
        float32 C-order arrays in place and calls forward() again trains on the new values.
        Arrays in that form are therefore kept, not copied, and each forward copies its batch
        out of them as they are then; any other dtype or layout (which pycaffe refuses) is
        copied as float32 here.
        """
        data, labels = self._numeric(data, "data"), self._numeric(labels, "labels")
        if data.ndim != 4 or tuple(data.shape[1:]) != self.sample_shape:
            raise DataError(f"data has shape {data.shape}, expected N x "
                            f"{' x '.join(map(str, self.sample_shape))}", self.where,
                            "match memory_data_param's channels, height and width")
        n = data.shape[0]
        if labels.size != n or (labels.ndim > 1 and labels.shape[0] != n):
            raise DataError(f"{n} data rows but labels of shape {labels.shape}", self.where,
                            "give one label per row")
        if n == 0 or n % self.batch_size:
            raise DataError(f"{n} rows is not a positive multiple of batch_size "
                            f"{self.batch_size}", self.where,
                            "pad or trim the arrays to a multiple of the batch size")
        self._data = torch.from_numpy(_float32_in_place_or_copy(data))
        self._labels = torch.from_numpy(_float32_in_place_or_copy(labels).reshape(n))
        self._pos = 0

    def _numeric(self, values, what: str) -> np.ndarray:
        """``values`` as a numpy array of real numbers (pycaffe takes float32 arrays only; any
        real or integer dtype is converted here, anything else is refused by name)."""
        try:
            array = np.asarray(values)
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise DataError(f"{what} cannot be made an array ({e})", self.where,
                            "pass numpy arrays: data N x C x H x W, labels N") from None
        if array.dtype.kind not in "fiub":
            raise DataError(f"the {what} array holds {array.dtype} values, not real numbers",
                            self.where, f"pass {what} as a float32 numpy array")
        return array

    def forward(self):
        if self._data is None:
            raise DataError("no data: call set_input_arrays(data, labels) first", self.where,
                            "net.set_input_arrays(data, labels) or "
                            "net.layers[i].set_input_arrays(...)")
        b, pos = self.batch_size, self._pos
        data = self._data[pos:pos + b]
        # Caffe reshapes the label top to batch x 1 x 1 x 1 in Forward.
        labels = self._labels[pos:pos + b].reshape(b, 1, 1, 1)
        self.last_indices = torch.arange(pos, pos + b, dtype=torch.long)
        self._pos = (pos + b) % self._data.shape[0]
        device = self.device
        # Copied out of the caller's arrays at each forward: the batch holds their values as
        # they are now (Caffe reads them in place), but the net never writes into them. A blob
        # array a program holds (d = net.blobs['data'].data) receives each new batch in place
        # (see HostMirror.refresh); as a view of the caller's rows it made the next forward
        # overwrite the rows it came from with the next batch's values.
        return data.to(device, copy=True), labels.to(device, copy=True)

    def state(self) -> Dict[str, object]:
        return {"pos": self._pos}

    def load_state(self, state: Dict[str, object]) -> None:
        pos = int(state["pos"])
        if not 0 <= pos <= MAX_SAMPLES:
            raise DataError(f"data state is out of range (pos {pos})", self.where,
                            "resume with a snapshot of this net")
        self._pos = pos


# ---------------------------------------------------------------------------------------------
# WindowData: refused
# ---------------------------------------------------------------------------------------------
@LAYERS.register("WindowData")
class WindowData(DataLayerBase):
    """R-CNN's window sampler; not supported (it raises at construction with what to use)."""

    num_tops = (0, None)

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        raise self.error(
            "WindowData is not supported by pycaffe_alt",
            "crop the windows beforehand (a script writing the crops plus a '<file> <label>' list) "
            "and read them with ImageData, or pack them into an LMDB with tools/convert_imageset "
            "and use Data")

    def forward(self):  # pragma: no cover - never constructed
        raise NotImplementedError
