"""Caffe protobuf schema (package ``caffe``) for pycaffe_alt.

``caffe.proto`` is wire- and text-format compatible with BVLC Caffe, adds the
SSD fork's detection layers (LayerParameter fields 200-207) and pycaffe_alt's
own fields (numbers 5200-5299). ``caffe_pb2`` is the generated module.

To regenerate ``caffe_pb2.py`` after editing ``caffe.proto``::

    pip install grpcio-tools
    python3 -m pycaffe_alt.proto.generate

tests/test_proto.py checks that the committed module matches a fresh build.
"""

import importlib

__all__ = ["caffe_pb2"]


def __getattr__(name):
    # Imported lazily so that ``python3 -m pycaffe_alt.proto.generate`` still
    # runs when caffe_pb2.py is missing or stale.
    if name == "caffe_pb2":
        module = importlib.import_module(".caffe_pb2", __name__)
        globals()[name] = module
        return module
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
