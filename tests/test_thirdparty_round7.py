"""Round 7 of third-party pycaffe programs run unchanged: behaviours those programs rely on,
each checked with a small program of our own written after the real one's pattern."""
import numpy as np

import pycaffe_alt as caffe

# A linear regression fed through MemoryData, as in aspratyush/pycaffe-examples
# (assignments/models/conv_prac2.prototxt).
MEMORY_NET = """name: 'LinearReg'
layer { name: 'input' type: 'MemoryData' top: 'data' top: 'actual'
  memory_data_param { batch_size: 2 channels: 1 height: 1 width: 2 } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'predicted'
  inner_product_param { num_output: 1 weight_filler { type: 'constant' value: 1 } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'predicted' bottom: 'actual' top: 'loss' }
"""


def memory_net(tmp_path):
    path = tmp_path / "memory.prototxt"
    path.write_text(MEMORY_NET)
    return caffe.Net(str(path), caffe.TRAIN)


def test_memory_data_reads_the_callers_arrays_in_place(tmp_path):
    # Caffe's MemoryDataLayer::Reset keeps pointers into the arrays pycaffe hands it: a
    # program that refills the same float32 buffers (a replay memory, a sliding window) and
    # calls forward() again without another set_input_arrays sees the new rows.
    net = memory_net(tmp_path)
    data = np.zeros((4, 1, 1, 2), np.float32)
    labels = np.zeros(4, np.float32)
    net.set_input_arrays(data, labels)
    net.forward()
    assert net.blobs["loss"].data == 0
    data[2:] = 3.0       # the rows of the next batch, refilled in place
    labels[2:] = 1.0
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, np.full((2, 1, 1, 2), 3.0))
    np.testing.assert_array_equal(net.blobs["actual"].data.ravel(), [1.0, 1.0])
    np.testing.assert_allclose(net.blobs["loss"].data, 0.5 * 2 * 25 / 2)


def test_memory_data_copies_arrays_pycaffe_would_refuse(tmp_path):
    # float64 or Fortran-order arrays are not what Caffe can point at; they are read as a
    # float32 copy taken at set_input_arrays.
    net = memory_net(tmp_path)
    data = np.ones((2, 1, 1, 2), np.float64)
    labels = np.ones(2, np.float64)
    net.set_input_arrays(data, labels)
    data[...] = 5.0
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, np.ones((2, 1, 1, 2)))


def test_memory_data_held_blob_array_does_not_overwrite_the_callers_rows(tmp_path):
    # A program holding net.blobs['data'].data across forwards (to look at the batch) gets
    # each new batch in that array; the net must not write the caller's own rows: the second
    # forward copied rows 2..3 over rows 0..1 of the array given to set_input_arrays.
    net = memory_net(tmp_path)
    data = np.arange(8, dtype=np.float32).reshape(4, 1, 1, 2)
    labels = np.arange(4, dtype=np.float32)
    net.set_input_arrays(data, labels)
    net.forward()
    held = net.blobs["data"].data
    held_labels = net.blobs["actual"].data
    net.forward()
    np.testing.assert_array_equal(data.ravel(), np.arange(8))
    np.testing.assert_array_equal(labels, np.arange(4))
    np.testing.assert_array_equal(held.ravel(), [4, 5, 6, 7])
    np.testing.assert_array_equal(held_labels.ravel(), [2, 3])
    net.forward()  # wraps around to the caller's first rows, as they are
    np.testing.assert_array_equal(net.blobs["data"].data.ravel(), [0, 1, 2, 3])
