"""Caffe layer types, one module per family; importing this package registers them all.

Families: vision (convolution, pooling), neuron (element-wise activations), norm (batch norm,
scale, normalisation), structure (blob plumbing, inner product), recurrent (RNN, LSTM,
LSTMUnit), loss (losses and accuracy), output (HDF5Output),
input/data (net inputs and data readers), python_layer (user code, opt-in), ssd (the SSD
detector's layers), support (the paper's HardThreshold and SupportMask), forks (layers of
well-known Caffe forks that need no new caffe.proto fields: Axpy, ConvolutionDepthwise).
"""
import importlib

from ..registry import LAYERS
from .base import TEST, TRAIN, Layer, LayerContext

# Each module registers its types with LAYERS on import; a module that does not exist yet is
# simply skipped so families can land one at a time.
for _family in ("input", "vision", "neuron", "norm", "structure", "recurrent", "loss", "data",
                "output", "python_layer", "ssd", "support", "forks"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:  # only a missing family module is tolerated
        if _e.name != f"{__name__}.{_family}":
            raise

__all__ = ["LAYERS", "Layer", "LayerContext", "TRAIN", "TEST"]
