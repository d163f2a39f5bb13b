"""Caffe's two phases as plain integers, importable without torch.

They equal ``caffe_pb2.TRAIN``/``caffe_pb2.TEST`` (enum ``Phase`` in caffe.proto), so either may be
passed wherever a phase is expected (``Net(file, caffe.TEST)``, ``include=dict(phase=caffe.TEST)``).
"""
TRAIN = 0
TEST = 1

__all__ = ["TRAIN", "TEST"]
