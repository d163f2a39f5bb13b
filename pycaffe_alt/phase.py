"""Caffe's two phases, importable without torch.

They are integers equal to ``caffe_pb2.TRAIN``/``caffe_pb2.TEST`` (enum ``Phase`` in
caffe.proto), so either may be passed wherever a phase is expected (``Net(file, caffe.TEST)``,
``include=dict(phase=caffe.TEST)``). Like pycaffe's boost.python enum, ``str()`` gives the name:
py-faster-rcnn's Python layers read ``str(self.phase)`` as a config key ('TRAIN' / 'TEST').
"""
_NAMES = ("TRAIN", "TEST")


class Phase(int):
    """A phase: an int (0 TRAIN, 1 TEST) whose str() and repr() are its name."""

    def __new__(cls, value: int) -> "Phase":
        value = int(value)
        if value not in (0, 1):
            raise ValueError(f"a phase is 0 (TRAIN) or 1 (TEST), got {value}")
        return super().__new__(cls, value)

    def __str__(self) -> str:
        return _NAMES[int(self)]

    __repr__ = __str__

    def __reduce__(self):
        return (Phase, (int(self),))


TRAIN = Phase(0)
TEST = Phase(1)

__all__ = ["Phase", "TRAIN", "TEST"]
