"""Round 11 of third-party pycaffe programs run unchanged, aimed at programs built around
caffe.io and data: SSD detection, FCN training and inference, an LMDB written from Python and
trained on, feature extraction loops, SegNet's BN statistics and BVLC's fine-tuning notebook.
Behaviours they rely on, each checked with a small program of our own written after the real
one's pattern."""
import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import NetError

CLASSIFIER = """name: 'cls'
input: 'data' input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'fc7' type: 'InnerProduct' bottom: 'conv1' top: 'fc7'
  inner_product_param { num_output: 6 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'fc8' type: 'InnerProduct' bottom: 'fc7' top: 'fc8'
  inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { name: 'prob' type: 'Softmax' bottom: 'fc8' top: 'prob' }
"""


def test_legacy_dims_of_inner_product_blobs_pad_on_the_right(tmp_path):
    # shelhamer/fcn.berkeleyvision.org surgery.expand_score reads the old class count as
    # net.params[layer][0].num, and scripts size their feature arrays by
    # net.blobs['fc7'].channels: Caffe's Blob::LegacyShape gives axis i of the shape and 1 past
    # the last axis, so a (N, K) top has num N and channels K, an InnerProduct weight (O, I)
    # has num O and channels I, a bias (O,) has num O.
    (tmp_path / "cls.prototxt").write_text(CLASSIFIER)
    net = caffe.Net(str(tmp_path / "cls.prototxt"), caffe.TEST)
    fc7 = net.blobs["fc7"]
    assert (fc7.num, fc7.channels, fc7.height, fc7.width) == (2, 6, 1, 1)
    assert (net.blobs["prob"].num, net.blobs["prob"].channels) == (2, 3)
    w, b = net.params["fc8"]
    assert (w.num, w.channels, w.height, w.width) == (3, 6, 1, 1)
    assert (b.num, b.channels) == (3, 1)
    conv = net.blobs["conv1"]
    assert (conv.num, conv.channels, conv.height, conv.width) == (2, 4, 4, 4)
    # expand_score's pattern: the first old_cl rows of a wider classifier take the old ones.
    new = caffe.Net(str(tmp_path / "cls.prototxt"), caffe.TEST)
    old_cl = net.params["fc8"][0].num
    new.params["fc8"][0].data[:old_cl][...] = 0
    assert not new.params["fc8"][0].data.any()
    # Caffe CHECK-fails on more than four axes; here a NetError names the blob.
    fc7.reshape(1, 2, 3, 4, 5)
    with pytest.raises(NetError, match=r"'fc7'.*5 axes"):
        fc7.num
