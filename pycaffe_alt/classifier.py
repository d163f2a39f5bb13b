"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that classifies H x W x K images.

Images are resized to ``image_dims``, then either cut into pycaffe's ten crops (four corners and
the centre, plus their mirrors; predictions averaged) or centre-cropped to the net's input size,
preprocessed by a :class:`~pycaffe_alt.io.Transformer` (transpose to K x H x W, channel swap, raw
scale, mean, input scale) and run through the net in batches of the net's batch size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import io as caffe_io
from .errors import ArgumentTypeError, DataError
from .net import Net
from .phase import TEST


def input_transformer(net: Net, mean: Optional[np.ndarray] = None,
                      input_scale: Optional[float] = None, raw_scale: Optional[float] = None,
                      channel_swap: Optional[Sequence[int]] = None) -> caffe_io.Transformer:
    """The Transformer pycaffe's Classifier and Detector configure for the net's first input:
    H x W x K images in, K x H x W out, then the optional steps that were given."""
    in_ = net.inputs[0] if net.inputs else None
    if in_ is None:
        raise DataError("the net has no Input layer to feed images to", where=net.source,
                        hint="use a deploy prototxt whose first layer is an Input layer")
    transformer = caffe_io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


def center_crop(images: np.ndarray, crop_dims: Sequence[int]) -> np.ndarray:
    """The centre ``crop_dims`` window of an N x H x W x K batch; the window's corners are the
    centre -/+ half the crop, truncated to integers (pycaffe's centre-only prediction)."""
    center = np.array(images.shape[1:3], dtype=float) / 2.0
    half = np.asarray(crop_dims, dtype=float) / 2.0
    y0, x0 = (center - half).astype(int)
    y1, x1 = (center + half).astype(int)
    return images[:, y0:y1, x0:x1, :]


def _dims_given(image_dims) -> bool:
    """pycaffe's ``if not image_dims``: None, 0 (``caffe.TRAIN`` passed third) and an empty
    sequence mean the net's own input size (an array counts as given when it holds sizes)."""
    if isinstance(image_dims, np.ndarray):
        return image_dims.size > 0
    return bool(image_dims)


def _image_size(image_dims) -> Optional[tuple]:
    """``image_dims`` as (height, width) of positive ints, or None when it is not one."""
    try:
        size = tuple(int(d) for d in image_dims)
    except (TypeError, ValueError):
        return None
    return size if len(size) == 2 and min(size) >= 1 else None


class Classifier(Net):
    """pycaffe's ``caffe.Classifier(model_file, pretrained_file, image_dims=None, mean=None,
    input_scale=None, raw_scale=None, channel_swap=None)``: a TEST-phase Net; ``image_dims``
    (H, W) is the size images are resized to before cropping (default: the net's input size).
    Other keywords (``device=``) go to :class:`~pycaffe_alt.net.Net`."""

    def __init__(self, model_file, pretrained_file, image_dims: Optional[Sequence[int]] = None,
                 mean: Optional[np.ndarray] = None, input_scale: Optional[float] = None,
                 raw_scale: Optional[float] = None, channel_swap: Optional[Sequence[int]] = None,
                 **net_kwargs):
        super().__init__(model_file, TEST, weights=pretrained_file, **net_kwargs)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        # pycaffe keeps image_dims as given (`if not image_dims: image_dims = self.crop_dims`) and
        # only predict() resizes to it, so a program that passes caffe.TEST third as for a Net
        # (Classifier(deploy, weights, caffe.TEST, mean=...)) builds the net and uses it through
        # forward(): a size that is not (height, width) is refused by predict(), not here.
        # Read again by every predict(), as pycaffe's: a program may set it between calls.
        self.image_dims = image_dims if _dims_given(image_dims) else self.crop_dims

    def _checked_image_size(self) -> tuple:
        size = _image_size(self.image_dims)
        if size is None:
            dims = self.image_dims
            raise DataError(f"image_dims {dims!r} is not (height, width) of positive sizes",
                            where="Classifier.predict",
                            hint="e.g. image_dims=(256, 256); the net's crop is "
                            f"{tuple(int(d) for d in self.crop_dims)}. Classifier(model, weights, "
                            "caffe.TEST) passes caffe.TEST as image_dims: a Classifier is always "
                            "TEST phase, leave it out")
        return size

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class probabilities (N x C, the net's first output) of N H x W x K images; with
        ``oversample`` the average over ten crops, else the centre crop only."""
        if isinstance(inputs, (str, bytes)) or not hasattr(inputs, "__len__"):
            raise ArgumentTypeError(f"Classifier.predict() takes a list of H x W x K images, "
                                    f"got {type(inputs).__name__}")
        if len(inputs) == 0:
            raise DataError("predict() got no images", where="Classifier",
                            hint="pass a list of H x W x K arrays (caffe.io.load_image)")
        inputs = [np.asarray(image) for image in inputs]  # nested lists too
        for i, image in enumerate(inputs):
            if image.ndim != 3:
                raise DataError(f"image {i} has shape {image.shape}, not H x W x K",
                                where="Classifier.predict",
                                hint="caffe.io.load_image(path, color=False) gives H x W x 1")
            # The batch takes image 0's channel count; a 1-channel image is broadcast into it as
            # in pycaffe, any other count failed in numpy's broadcast.
            if image.shape[2] not in (1, inputs[0].shape[2]):
                raise DataError(f"image {i} has {image.shape[2]} channels, image 0 has "
                                f"{inputs[0].shape[2]}", where="Classifier.predict",
                                hint="give images of one kind (all colour or all grey)")
        size = self._checked_image_size()
        resized = np.zeros((len(inputs),) + size + (inputs[0].shape[2],), dtype=np.float32)
        for ix, image in enumerate(inputs):
            resized[ix] = caffe_io.resize_image(image, size)
        crops = caffe_io.oversample(resized, self.crop_dims) if oversample \
            else center_crop(resized, self.crop_dims)
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
