"""Round 9 of third-party pycaffe programs run unchanged, aimed at programs that read and
transform models (batch-norm merging, weight dumpers, net surgery): behaviours they rely on,
each checked with a small program of our own written after the real one's pattern."""
import numpy as np

import pycaffe_alt as caffe

NET = """name: 'tiny'
layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 2 dim: 6 } } }
layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc'
  inner_product_param { num_output: 4 weight_filler { type: 'gaussian' } } }
"""


def test_param_reshape_keeps_the_values_that_fit(tmp_path):
    # Net-surgery scripts (e.g. copying GoogLeNet weights into a two-branch net) call
    # net.params[k][i].reshape(*shape) before writing; Caffe's Blob::Reshape keeps the blob's
    # memory while the new count fits its capacity, so a same-shape reshape changes nothing and
    # a smaller one keeps the leading values. A larger one is new, zeroed memory.
    (tmp_path / "net.prototxt").write_text(NET)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    w = net.params["fc"][0].data.copy()
    net.params["fc"][0].reshape(4, 6)
    np.testing.assert_array_equal(net.params["fc"][0].data, w)
    net.params["fc"][0].reshape(2, 6)
    np.testing.assert_array_equal(net.params["fc"][0].data, w[:2])
    net.params["fc"][0].reshape(5, 6)
    assert net.params["fc"][0].data.shape == (5, 6)
    assert not net.params["fc"][0].data.any()
