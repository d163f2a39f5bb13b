"""The environment's request that nets keep every blob in C-order NCHW memory
(``pycaffe-alt run --nchw``).

By default a 4-D convolution net on the CPU stores its activations channels-last
(:mod:`pycaffe_alt.memory_format`), and pycaffe's ``.data``/``.diff`` of those blobs are strided
views of that memory. Element and slice writes go through, but a program that merges the batch
and channel axes in a reshape (``blob.diff.reshape(n, -1)[...] = g``) writes into a copy, and
``arr.shape = (n, -1)`` or ``arr.view(np.uint8)`` refuse a strided array; Caffe's arrays are
C-order, where all of them work. With ``PYCAFFE_ALT_NCHW=1`` a net whose format is "auto" (every
net an unchanged program builds) keeps the plain layout instead, at the cost of the faster
convolutions. Kept apart from :mod:`pycaffe_alt.memory_format` so that the launcher can set it
without importing torch (as :mod:`pycaffe_alt.cpu_fallback`).
"""
from .env_switch import switch_is_on

# Inherited by child processes, which build nets of their own.
NCHW_ENV = "PYCAFFE_ALT_NCHW"


def nchw_requested() -> bool:
    """Whether the environment asks "auto" nets for C-order NCHW blobs (1, true, yes or on)."""
    return switch_is_on(NCHW_ENV)
