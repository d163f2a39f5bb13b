"""Shared by the bad-input and fuzz tests: a watchdog, special files and small fixtures."""
import contextlib
import os
import shutil
import signal

from train_case import GOLDEN

MNIST_LMDB = os.path.join(GOLDEN, "data", "mnist_train_lmdb")
PHOTOS = os.path.join(GOLDEN, "data", "photos")
PHOTOS_LIST = os.path.join(GOLDEN, "data", "photos.txt")
SGD_CASE = os.path.join(GOLDEN, "solvers", "sgd_fixed")


@contextlib.contextmanager
def no_hang(seconds: float = 20.0):
    """Fail (TimeoutError) instead of hanging when the block runs longer than ``seconds``.

    A read blocked on a FIFO is interrupted by the signal, so a regression of the path checks
    fails the test instead of stalling the suite.
    """
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def make_fifo(folder, name: str = "pipe") -> str:
    path = os.path.join(str(folder), name)
    os.mkfifo(path)
    return path


def truncated_lmdb(folder, size: int = 300000, name: str = "trunc_lmdb") -> str:
    """A copy of the MNIST fixture LMDB whose data.mdb is cut to ``size`` bytes (not to zero)."""
    path = os.path.join(str(folder), name)
    shutil.copytree(MNIST_LMDB, path)
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.truncate(size)
    return path


def data_net(folder, source: str, workers: int = 0, name: str = "data_net.prototxt") -> str:
    """A TEST-phase net reading ``source`` through a Data layer (with ``workers`` processes)."""
    path = os.path.join(str(folder), name)
    extra = f" workers: {workers}" if workers else ""
    with open(path, "w") as f:
        f.write(f'layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param '
                f'{{ scale: 0.00390625 }} data_param {{ source: "{source}" batch_size: 4 '
                f'backend: LMDB{extra} }} }}\n'
                'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                'inner_product_param { num_output: 3 } }\n'
                'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" '
                'top: "loss" }\n')
    return path


def input_net(folder, layers: str, shape=(1, 3, 4, 4), name: str = "input_net.prototxt") -> str:
    """A net of an Input blob ``data`` of ``shape`` followed by ``layers`` (prototxt text)."""
    path = os.path.join(str(folder), name)
    dims = " ".join(f"dim: {d}" for d in shape)
    with open(path, "w") as f:
        f.write(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n')
        f.write(layers + "\n")
    return path
