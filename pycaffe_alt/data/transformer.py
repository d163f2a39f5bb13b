"""Caffe's ``DataTransformer`` as pure functions on numpy arrays.

A data layer turns each record (a C,H,W image, uint8 or float) into a float32 sample with the
``transform_param`` of its layer. Caffe's order per sample (data_transformer.cpp, ``Transform``):

1. decode an encoded record, in colour or grey when ``force_color``/``force_gray`` is set;
2. draw ``mirror`` (one coin flip, only when ``mirror: true``), then the crop offsets (random in
   TRAIN, centre ``(H - crop) // 2`` in TEST);
3. for every output pixel, ``(pixel - mean) * scale``, where the mean is the ``mean_value`` of its
   channel or the ``mean_file`` blob cropped with the data's offsets; the result is written
   mirrored when the coin said so. A raw Datum reads the mean at the pixel's *source* position
   (the mean flips with the pixels); a decoded image (encoded record, ImageData file) goes through
   the reference build's ``cv::Mat`` transform, which reads it at the *output* position (the mean
   stays unflipped): :func:`mean_window`.

All arithmetic is float32 as in Caffe (``Dtype`` = float), so results are bit-identical.

Random numbers come from a ``rand(n)`` function handed in by the caller (Caffe's
``DataTransformer::Rand``: the next raw 32-bit number of the transformer's own mt19937, mod n; the
input pipeline keeps that stream), so the functions here stay pure.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

# Fields of TransformationParameter that only the SSD fork's AnnotatedData layer implements; a
# plain data layer must not silently ignore them.
_SSD_ONLY_FIELDS = ("resize_param", "noise_param", "emit_constraint", "crop_h", "crop_w",
                    "distort_param", "expand_param")


@dataclass(frozen=True)
class TransformSpec:
    """A layer's ``transform_param``, validated and with its mean loaded.

    ``mean`` is the ``mean_file`` blob as a float32 C,H,W array (or None); ``mean_values`` the
    ``mean_value`` list (empty, one for all channels, or one per channel). ``train`` is the
    layer's phase, which decides random versus centre crops.
    """

    scale: np.float32 = np.float32(1)
    mirror: bool = False
    crop_size: int = 0
    mean: Optional[np.ndarray] = None
    mean_values: Tuple[np.float32, ...] = ()
    force_color: bool = False
    force_gray: bool = False
    train: bool = False

    @property
    def is_identity(self) -> bool:
        """True when a sample is only converted to float32 (no crop, mirror, mean or scale)."""
        return (not self.mirror and not self.crop_size and self.mean is None
                and not self.mean_values and self.scale == 1)


def load_mean_file(path: str, where: str) -> np.ndarray:
    """A mean ``.binaryproto`` (BlobProto from compute_image_mean) as a C,H,W float32 array."""
    from ..errors import WeightsError
    from ..weights import read_binaryproto

    if not os.path.lexists(path):
        raise DataError(f"mean_file {path!r} does not exist (looked in {os.getcwd()})", where,
                        "create it with tools/compute_image_mean <lmdb> <file.binaryproto>, or "
                        "fix the path (relative paths are taken from the current directory, as in "
                        "Caffe)")
    try:
        values = read_binaryproto(path).astype(np.float32, copy=False)
    except WeightsError as e:
        raise DataError(f"mean_file {path!r} cannot be read: {e.what}", where,
                        "a mean file is a BlobProto written by tools/compute_image_mean") from None
    dims = list(values.shape)
    # Caffe's mean blob is 1,C,H,W; keep the last three axes (a 3-d shape is accepted too).
    if len(dims) == 4 and dims[0] > 1:
        # DataTransformer checks only channels(), height() and width() and reads the mean from
        # the start of the blob: a blob of several images works as its first one.
        from ..log import get_logger

        get_logger().warning("%s: mean_file %r holds %d images (shape %s); Caffe uses the first "
                             "one, and so do we", where, path, dims[0], tuple(dims))
        values = values[:1]
        dims = [1] + dims[1:]
    if len(dims) == 4 and dims[0] == 1:
        dims = dims[1:]
    if not np.isfinite(values).all():
        raise DataError(f"mean_file {path!r} holds non-finite values (NaN or inf)", where,
                        "re-create it with tools/compute_image_mean")
    if len(dims) != 3 or values.size == 0:
        raise DataError(f"mean_file {path!r} holds a blob of shape {dims} with {values.size} "
                        "values; a 1xCxHxW mean is needed", where,
                        "make it with tools/compute_image_mean on the same LMDB")
    return values.reshape(dims)


def spec_from_param(tp, train: bool, where: str) -> TransformSpec:
    """Validate a ``TransformationParameter`` (Caffe's DataTransformer constructor checks)."""
    for name in _SSD_ONLY_FIELDS:
        if tp.HasField(name):
            raise DataError(f"transform_param.{name} is not supported by this layer type", where,
                            "it belongs to the SSD fork's AnnotatedData layer; remove it or "
                            "preprocess the images beforehand")
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise DataError("transform_param sets both mean_file and mean_value", where,
                        "keep one of them (Caffe refuses both)")
    if tp.force_color and tp.force_gray:
        raise DataError("transform_param sets both force_color and force_gray", where,
                        "keep at most one of them")
    # Non-finite values would train to "the loss became nan", blamed on the solver.
    if not np.isfinite(tp.scale):
        raise DataError(f"transform_param.scale is {tp.scale}", where, "give a finite scale")
    if not all(np.isfinite(v) for v in tp.mean_value):
        raise DataError(f"transform_param.mean_value {list(tp.mean_value)} is not finite", where,
                        "give finite mean values")
    mean = load_mean_file(tp.mean_file, where) if tp.HasField("mean_file") else None
    return TransformSpec(scale=np.float32(tp.scale), mirror=bool(tp.mirror),
                         crop_size=int(tp.crop_size), mean=mean,
                         mean_values=tuple(np.float32(v) for v in tp.mean_value),
                         force_color=bool(tp.force_color), force_gray=bool(tp.force_gray),
                         train=bool(train))


def output_shape(spec: TransformSpec, image_shape: Tuple[int, int, int], where: str
                 ) -> Tuple[int, int, int]:
    """C,H,W of the transformed sample for a C,H,W record (Caffe's ``InferBlobShape``), with the
    checks Caffe makes in ``Transform`` (crop fits, mean matches, mean_value count)."""
    c, h, w = (int(d) for d in image_shape)
    crop = spec.crop_size
    if c <= 0:
        raise DataError(f"record has {c} channels", where, "the record is empty or corrupt")
    if crop and (h < crop or w < crop):
        raise DataError(f"crop_size {crop} is larger than the {h}x{w} record", where,
                        "lower crop_size or resize the images when creating the dataset")
    if spec.mean is not None and spec.mean.shape != (c, h, w):
        raise DataError(f"mean_file has shape {spec.mean.shape} but the record is {(c, h, w)}",
                        where, "the mean must come from the same dataset (before cropping); "
                        "remake it with tools/compute_image_mean")
    if spec.mean_values and len(spec.mean_values) not in (1, c):
        raise DataError(f"{len(spec.mean_values)} mean_value entries for a {c}-channel record",
                        where, "give one mean_value for all channels or one per channel")
    return (c, crop, crop) if crop else (c, h, w)


def needs_random(spec: TransformSpec) -> bool:
    """Whether transforming draws random numbers (Caffe's ``InitRand`` condition)."""
    return spec.mirror or (spec.train and spec.crop_size > 0)


def draws_per_record(spec: TransformSpec) -> int:
    """How many numbers Caffe's transformer draws per record: the mirror coin when ``mirror``
    is set, and the two crop offsets in TRAIN with ``crop_size`` (data_transformer.cpp)."""
    return int(spec.mirror) + 2 * int(spec.train and spec.crop_size > 0)


def draw_params(spec: TransformSpec, rand: Optional[Callable[[int], int]], height: int,
                width: int) -> Tuple[bool, int, int]:
    """(mirror, h_off, w_off) for one sample, drawn in Caffe's order with ``rand(n)`` (Caffe's
    DataTransformer::Rand: the next raw number mod n): the mirror coin first, then the row
    offset, then the column offset."""
    # Caffe flips at random whenever mirror is set, whatever the phase (data_transformer.cpp
    # draws Rand(2) without looking at phase_); only the crop position depends on the phase.
    mirror = bool(spec.mirror and rand(2))
    crop = spec.crop_size
    if not crop:
        return mirror, 0, 0
    if spec.train:
        h_off = int(rand(height - crop + 1))
        w_off = int(rand(width - crop + 1))
    else:
        h_off, w_off = (height - crop) // 2, (width - crop) // 2
    return mirror, h_off, w_off


def rand_from(values: Iterable[int]) -> Callable[[int], int]:
    """Caffe's ``Rand(n)`` over a sequence of raw 32-bit draws: each call takes the next one."""
    it = iter(values)
    return lambda n: next(it) % n


def place_pixels(out: np.ndarray, image: np.ndarray, mirror: bool, h_off: int, w_off: int) -> None:
    """Copy the (cropped, mirrored) pixels of the C,H,W ``image`` into ``out`` as float32."""
    _, oh, ow = out.shape
    src = image[:, h_off:h_off + oh, w_off:w_off + ow]
    if mirror:
        src = src[:, :, ::-1]
    # uint8 -> float32 is exact; float records are already float32.
    np.copyto(out, src, casting="unsafe")


def mean_window(mirror: bool, h_off: int, w_off: int, decoded: bool) -> Tuple[bool, int, int]:
    """Where a sample reads the ``mean_file``: ``(flip the mean, h_off, w_off)``.

    Caffe's Datum path reads the mean at each pixel's *source* position, so a mirrored sample
    sees the mean mirrored with it. Images that go through the ``cv::Mat`` path (encoded
    records, ImageData's files) are different in the reference build (the SSD fork's
    ``DataTransformer::Transform(const cv::Mat&, ...)``): its mean index uses the mirrored
    *output* column (``w_idx_real``), so the mean stays unflipped while the pixels flip. BVLC
    master reads the source column there too; the fork is what the fixtures' Caffe runs.
    """
    return (mirror and not decoded, h_off, w_off)


def normalize_batch(data: np.ndarray, spec: TransformSpec,
                    offsets: Sequence[Tuple[bool, int, int]]) -> None:
    """Subtract the mean and apply the scale to placed pixels ``data`` (N,C,h,w) in place.

    Equals Caffe's per-pixel ``(pixel - mean[source position]) * scale`` written to the mirrored
    position: subtracting the crop of the mean and then flipping both is the same thing. A mean
    file is cropped (and flipped) per sample with that sample's ``(flip, h_off, w_off)``
    (:func:`mean_window`).
    """
    _, _, oh, ow = data.shape
    if spec.mean is not None:
        for out, (mirror, h_off, w_off) in zip(data, offsets):
            mean = spec.mean[:, h_off:h_off + oh, w_off:w_off + ow]
            out -= mean[:, :, ::-1] if mirror else mean
    elif spec.mean_values:
        # One value serves every channel (Caffe replicates it).
        data -= np.asarray(spec.mean_values, dtype=np.float32).reshape(1, -1, 1, 1)
    if spec.scale != 1:
        data *= np.float32(spec.scale)


def transform_into(out: np.ndarray, image: np.ndarray, spec: TransformSpec, mirror: bool,
                   h_off: int, w_off: int) -> None:
    """Write the transformed C,H,W ``image`` into ``out`` (float32, C,h,w of the output shape)."""
    place_pixels(out, image, mirror, h_off, w_off)
    normalize_batch(out[None], spec, [(mirror, h_off, w_off)])


def transform(image: np.ndarray, spec: TransformSpec, rand: Optional[Callable[[int], int]],
              where: str = "transform") -> np.ndarray:
    """One C,H,W record -> float32 C,h,w sample (draws its own mirror/crop with ``rand``)."""
    shape = output_shape(spec, image.shape, where)
    out = np.empty(shape, dtype=np.float32)
    mirror, h_off, w_off = draw_params(spec, rand, image.shape[1], image.shape[2])
    transform_into(out, image, spec, mirror, h_off, w_off)
    return out
