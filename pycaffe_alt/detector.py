"""pycaffe's ``caffe.Detector``: R-CNN style windowed detection with a TEST-phase Net.

Each window (ymin, xmin, ymax, xmax) of an image is cropped, optionally with ``context_pad``
pixels of surrounding context (the R-CNN warp: the box is enlarged so that, once warped to the
net input, a ``context_pad`` border is context; parts outside the image are filled with the mean
in raw image space), warped to the net's input size, preprocessed and classified in batches.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import io as caffe_io
from .classifier import input_transformer
from .errors import ArgumentTypeError, ArrayShapeError, CaffeError, DataError, integer_argument
from .net import Net
from .phase import TEST

Window = Sequence[int]


def _numeric(value) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def context_box(window: Window, crop_size: int, context_pad: int) -> np.ndarray:
    """The window grown so that ``context_pad`` of ``crop_size`` warped pixels are context, as
    (ymin, xmin, ymax, xmax) rounded to integers (may lie outside the image)."""
    box = np.asarray(window, dtype=float)
    scale = crop_size / (1.0 * crop_size - context_pad * 2)
    half_h = (box[2] - box[0] + 1) / 2.0
    half_w = (box[3] - box[1] + 1) / 2.0
    center = (box[0] + half_h, box[1] + half_w)
    return np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))


def _image_windows(entry: object, index: int) -> Tuple[str, List[np.ndarray]]:
    """One ``(filename, windows)`` entry of detect_windows' list, or an ArrayShapeError (a
    ValueError, as pycaffe's unpacking raises) naming the entry."""
    try:
        fname, windows = entry  # type: ignore[misc]
        return fname, [np.asarray(w) for w in windows]
    except (TypeError, ValueError):
        raise ArrayShapeError(f"entry {index} is not a (filename, windows) pair: {entry!r}"[:300],
                              where="Detector.detect_windows",
                              hint="give [(filename, [(ymin, xmin, ymax, xmax), ...]), ...]") \
            from None


class Detector(Net):
    """pycaffe's ``caffe.Detector(model_file, pretrained_file, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None, context_pad=None)``; other keywords (``device=``) go to
    :class:`~pycaffe_alt.net.Net`."""

    def __init__(self, model_file, pretrained_file, mean: Optional[np.ndarray] = None,
                 input_scale: Optional[float] = None, raw_scale: Optional[float] = None,
                 channel_swap: Optional[Sequence[int]] = None,
                 context_pad: Optional[int] = None, **net_kwargs):
        super().__init__(model_file, TEST, weights=pretrained_file, **net_kwargs)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Iterable[Tuple[str, Sequence[Window]]]
                       ) -> List[Dict[str, object]]:
        """Classify every window of every image: ``[(filename, [window, ...]), ...]`` in,
        ``[{'window', 'prediction', 'filename'}, ...]`` out, in the same order."""
        images_windows = [_image_windows(entry, i) for i, entry in enumerate(images_windows)]
        crops = []
        for fname, windows in images_windows:
            image = caffe_io.load_image(fname).astype(np.float32)
            crops.extend(self.crop(image, w) for w in windows)
        if not crops:
            return []
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, c) for c in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections, ix = [], 0
        for fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix],
                                   "filename": fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames: Sequence[str]) -> List[Dict[str, object]]:
        """Detection over Selective Search proposals; needs the (MATLAB-based)
        ``selective_search_ijcv_with_python`` package, as pycaffe does."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise CaffeError("detect_selective_search needs the selective_search_ijcv_with_python "
                             "package (and MATLAB), which is not installed", where="Detector",
                             hint="compute proposals elsewhere and call "
                                  "detect_windows([(filename, windows), ...])") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im: np.ndarray, window: Window) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of an H x W x K image, with context padding when
        configured (then exactly the net's input size, mean-filled outside the image)."""
        values = np.asarray(window, dtype=np.float64) if _numeric(window) else None
        if values is None or values.shape != (4,) or not np.all(np.isfinite(values)):
            raise DataError(f"a window is 4 finite numbers (ymin, xmin, ymax, xmax), got "
                            f"{window!r}"[:200], where="Detector.crop")
        window = values.astype(int)
        if not self.context_pad:
            im_h, im_w = im.shape[:2]
            named = tuple(int(v) for v in window)
            if window.min() < 0:
                # pycaffe slices with it: a negative coordinate counts from the far edge, so the
                # crop is another part of the image (or empty), never the window meant.
                raise DataError(f"window {named} has a negative coordinate",
                                where="Detector.crop", hint="give windows in pixels of the "
                                f"{im_h} x {im_w} image: 0 <= ymin < ymax, 0 <= xmin < xmax")
            crop = im[window[0]:window[2], window[1]:window[3]]
            if crop.size == 0:
                raise DataError(f"window {named} holds no pixel of the {im_h} x {im_w} "
                                "image", where="Detector.crop",
                                hint="ymin < ymax and xmin < xmax, inside the image")
            return crop
        crop_size = self.blobs[self.inputs[0]].width  # R-CNN assumes square inputs
        box = context_box(window, crop_size, self.context_pad)
        full_h, full_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        scale_h, scale_w = crop_size / full_h, crop_size / full_w
        pad_y = int(round(max(0, -box[0]) * scale_h))  # warped pixels that fall off the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise DataError(f"window {tuple(window)} lies outside the {im_h} x {im_w} image",
                            where="Detector.crop")
        crop_h = min(int(round(clip_h * scale_h)), crop_size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), crop_size - pad_x)
        b = box.astype(int)
        context = caffe_io.resize_image(im[b[0]:b[2], b[1]:b[3]], (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad: Optional[int]) -> None:
        """Set the crop size (the net input as H x W x K) and ``context_pad``; with context, the
        mean is taken back to raw image space (undo transpose, channel swap, raw scale) to fill
        the parts of a context box outside the image."""
        in_ = self.inputs[0]
        t = self.transformer
        inv_transpose = [t.transpose[in_][i] for i in t.transpose[in_]]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_transpose]
        if context_pad is not None:
            context_pad = integer_argument(context_pad, "Detector context_pad")
            crop_size = self.blobs[in_].width
            if not 0 <= 2 * context_pad < crop_size:
                # The warped window would have no pixels left for the window itself (pycaffe
                # divides by zero at half the crop size).
                raise ArgumentTypeError(f"Detector context_pad must be in 0..{(crop_size - 1) // 2} "
                                        f"for the net's {crop_size}-pixel input, got {context_pad}")
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = t.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(inv_transpose)
        order = t.channel_swap.get(in_)
        if order is not None:
            crop_mean = crop_mean[:, :, [list(order).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = t.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
