"""``import caffe`` in processes a ``pycaffe-alt run`` program starts (multiprocessing spawn or
forkserver children, ``subprocess`` Pythons): pycaffe_alt under the name ``caffe``.
``pycaffe-alt run`` puts this folder's parent first on ``sys.path`` and ``PYTHONPATH``."""
import sys

import pycaffe_alt

sys.modules[__name__] = pycaffe_alt
