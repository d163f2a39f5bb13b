"""``import caffe`` in processes a ``pycaffe-alt run`` program starts (multiprocessing spawn or
forkserver children, ``subprocess`` Pythons): pycaffe_alt under the name ``caffe``.
``pycaffe-alt run`` puts this folder's parent first on ``sys.path`` and ``PYTHONPATH``. A Python
that cannot import pycaffe_alt (another interpreter or environment) gets the next ``caffe`` on
its path instead, as if this folder were not there."""
import importlib
import os
import sys

try:
    import pycaffe_alt
except ImportError:
    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)  # or the usual ModuleNotFoundError
else:
    sys.modules[__name__] = pycaffe_alt
