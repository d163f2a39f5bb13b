"""Layers that write what reaches them to files: ``HDF5Output``.

``HDF5Output`` (hdf5_output_param { file_name }) takes two bottoms, data and label, and has no
tops. As in Caffe (hdf5_output_layer.cpp), the file is created (truncated) when the net is built
and holds the float datasets ``data`` and ``label`` in Caffe's legacy 4-axis shape (num,
channels, height, width: a (N, C) bottom is written (N, C, 1, 1)), so ``HDF5Data`` reads it back.
Caffe writes one batch and then aborts on the next forward (the dataset already exists); here
every forward appends its rows, and the file is flushed after each, so a test run dumps all its
batches and the file is readable while the net runs. No gradient flows back.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import torch

from ..errors import NetError
from ..fileio import check_output_path
from ..registry import LAYERS
from .base import Layer, Shape, legacy_shape


@LAYERS.register("HDF5Output")
class HDF5Output(Layer):
    """Appends each batch's data and label bottoms to an HDF5 file (see the module notes)."""

    num_bottoms = (2, 2)
    num_tops = (0, 0)
    blob_names = ()

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.file_name = param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("has no file name", "set hdf5_output_param { file_name: 'out.h5' }")
        self._check(bottom_shapes)
        # A directory, FIFO or device in the file's place (h5py would block on a FIFO).
        try:
            check_output_path(self.file_name, NetError)
        except NetError as e:
            raise self.error(e.what, e.hint) from None
        folder = os.path.dirname(os.path.abspath(self.file_name))
        if not os.path.isdir(folder):
            raise self.error(f"cannot create '{self.file_name}': folder '{folder}' does not "
                             "exist", "give the path of a file in an existing folder")
        import h5py

        try:
            with h5py.File(self.file_name, "w"):
                pass  # created (truncated) at setup, as Caffe's H5Fcreate(H5F_ACC_TRUNC)
        except OSError as e:
            raise self.error(f"cannot create '{self.file_name}': {e}",
                             "check that the folder is writable") from None
        self.rows_written = 0

    def _check(self, shapes: Sequence[Shape]) -> None:
        data, label = (tuple(s) for s in shapes)
        for what, shape in (("data", data), ("label", label)):
            if not 1 <= len(shape) <= 4:
                raise self.error(f"{what} bottom has shape {shape}; Caffe writes (num, channels, "
                                 "height, width), so at most 4 axes", "reshape or flatten it first")
        if data[0] != label[0]:
            raise self.error(f"data and label bottoms have {data[0]} and {label[0]} rows",
                             "both must have the same batch size")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        self._check(bottom_shapes)
        return []

    @property
    def replays_exactly(self) -> bool:
        return False  # each forward appends rows to the file; Caffe's Backward writes none

    def forward(self, data: torch.Tensor, label: torch.Tensor):
        self._check([data.shape, label.shape])
        import h5py

        arrays = {name: t.detach().to("cpu", torch.float32).contiguous().numpy().reshape(
            legacy_shape(t.shape)) for name, t in (("data", data), ("label", label))}
        try:
            with h5py.File(self.file_name, "a") as h5:
                for name, a in arrays.items():
                    if name not in h5:
                        h5.create_dataset(name, data=a, maxshape=(None,) + a.shape[1:],
                                          chunks=True)
                        continue
                    ds = h5[name]
                    if ds.shape[1:] != a.shape[1:]:
                        raise self.error(f"{name} rows of shape {a.shape[1:]} cannot follow the "
                                         f"{ds.shape[1:]} rows already in '{self.file_name}'",
                                         "keep the bottoms' shapes (but the batch size) fixed")
                    ds.resize(ds.shape[0] + a.shape[0], axis=0)
                    ds[-a.shape[0]:] = a
        except OSError as e:
            raise self.error(f"cannot write '{self.file_name}': {e}") from None
        self.rows_written += int(data.shape[0])
        return ()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, file_name={self.file_name!r}"


__all__ = ["HDF5Output", "legacy_shape"]
