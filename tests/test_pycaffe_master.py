"""pycaffe master behaviours, each written from what BVLC's python/caffe documents and does:
Net.backward(start=, end=) and its return value, backward without a forward, NetSpec's
TypeError, caffe.coord_map, Python-layer exceptions and the no-flag rule, caffe._caffe /
caffe.pycaffe, the ImageNet mean file, resize_image for any channel count."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt import layers as L
from pycaffe_alt import params as P
from pycaffe_alt.coord_map import (AxisMismatchException, UndefinedMapException, compose,
                                   coord_map, coord_map_from_to, crop, inverse)
from pycaffe_alt.errors import CaffeError, NetError
from pycaffe_alt.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """name: 'small' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 4 channels: 2 height: 3 width: 3 num: 4 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 3 kernel_size: 2 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    caffe.set_random_seed(3)
    return caffe.Net(str(path), caffe.TRAIN)


# ------------------------------------------------------------------ Net.backward
def test_backward_end_returns_the_bottom_diffs_of_end(net):
    # pycaffe: outputs = bottom_names[end] + diffs when end is given; the diff is W^T g.
    g = np.random.RandomState(0).randn(*net.blobs["ip"].diff.shape).astype(np.float32)
    net.forward()
    net.blobs["ip"].diff[...] = g
    out = net.backward(start="ip", end="ip")
    assert set(out) == {"conv"}
    w = net.params["ip"][0].data
    expected = (g @ w).reshape(net.blobs["conv"].data.shape)
    np.testing.assert_allclose(out["conv"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.blobs["conv"].diff, expected, rtol=1e-4, atol=1e-5)
    assert set(net.backward(start="ip", end="ip", diffs=["ip"])) == {"conv", "ip"}


def test_backward_without_end_returns_the_input_diffs_plus_diffs(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text("name: 'd' force_backward: true input: 'x' input_shape { dim: 2 dim: 3 }\n"
                    "layer { type: 'InnerProduct' name: 'ip' bottom: 'x' top: 'y'\n"
                    "  inner_product_param { num_output: 2 weight_filler { type: 'constant' value: 1 } } }\n")
    net = caffe.Net(str(path), caffe.TEST)
    net.forward(x=np.ones((2, 3), np.float32))
    out = net.backward(diffs=["y"], y=np.ones((2, 2), np.float32))
    assert set(out) == {"x", "y"}
    np.testing.assert_allclose(out["x"], np.full((2, 3), 2.0))


CONV_RELU = """name: 'cr' force_backward: true input: 'data' input_shape { dim: 1 dim: 2 dim: 6 dim: 6 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }
layer { name: 'conv2' type: 'Convolution' bottom: 'conv1' top: 'conv2'
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { name: 'relu2' type: 'ReLU' bottom: 'conv2' top: 'conv2' }
layer { name: 'conv3' type: 'Convolution' bottom: 'conv2' top: 'conv3'
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: 'gaussian' std: 0.5 } } }
"""


def test_layer_by_layer_backward_through_in_place_relus(tmp_path):
    # fzliu/style-transfer's loop: backward(start=layer, end=next_layer) segment by segment,
    # adding to each segment's diff. Caffe's BackwardFromTo runs exactly the layers of the
    # range: a ReLU below the range does not mask the conv1 diff, one in the range does, and a
    # backward that starts at conv1 ignores relu1 above it. It crashed ("backward through the
    # graph a second time") and masked the first diff.
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_input
    path = tmp_path / "net.prototxt"
    path.write_text(CONV_RELU)
    caffe.set_random_seed(3)
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.RandomState(0).randn(1, 2, 6, 6).astype(np.float32)
    net.forward(data=x)
    data = {k: b.data.copy() for k, b in net.blobs.items()}
    w = {k: torch.tensor(v[0].data.copy()) for k, v in net.params.items()}
    b = {k: torch.tensor(v[1].data.copy()) for k, v in net.params.items()}
    r1 = F.conv2d(torch.tensor(x), w["conv1"], b["conv1"]).clamp(min=0)
    r2 = F.conv2d(r1, w["conv2"], b["conv2"]).clamp(min=0)

    net.blobs["conv3"].diff[...] = 1
    net.backward(start="conv3", end="conv2")  # conv3, relu2, conv2
    g2 = conv2d_input(r2.shape, w["conv3"], torch.ones(1, 2, 2, 2)) * (r2 > 0)
    np.testing.assert_allclose(net.blobs["conv2"].diff, g2.numpy(), atol=1e-5)
    np.testing.assert_allclose(net.blobs["conv1"].diff, conv2d_input(r1.shape, w["conv2"], g2),
                               atol=1e-5)  # relu1 is below the range: no mask
    net.blobs["conv2"].diff[...] += 0.5
    net.backward(start="conv2", end="conv1")  # conv2, relu1, conv1
    g1 = conv2d_input(r1.shape, w["conv2"], g2 + 0.5) * (r1 > 0)
    np.testing.assert_allclose(net.blobs["conv1"].diff, g1.numpy(), atol=1e-5)
    net.blobs["conv1"].diff[...] *= 2
    net.backward(start="conv1")  # conv1 only: relu1 above it takes no part
    np.testing.assert_allclose(net.blobs["data"].diff,
                               conv2d_input((1, 2, 6, 6), w["conv1"], 2 * g1), atol=1e-5)
    for name, value in data.items():  # backward never changes blob data
        np.testing.assert_array_equal(net.blobs[name].data, value)


def test_backward_from_each_layer_of_an_in_place_chain(tmp_path):
    # conv -> BatchNorm -> Scale -> ReLU, all in place: backward(start=X) seeds X's own
    # output, so the layers above X take no part (Caffe's BackwardFromTo), in any order of
    # calls; the blob's data stays the ReLU output throughout.
    path = tmp_path / "chain.prototxt"
    path.write_text("""name: 'c' force_backward: true input: 'data' input_shape { dim: 2 dim: 2 dim: 4 dim: 4 }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: 'gaussian' std: 0.5 } } }
layer { name: 'bn1' type: 'BatchNorm' bottom: 'conv1' top: 'conv1' batch_norm_param { use_global_stats: true } }
layer { name: 'scale1' type: 'Scale' bottom: 'conv1' top: 'conv1' scale_param { filler { value: -2 } } }
layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }
layer { name: 'ip' type: 'InnerProduct' bottom: 'conv1' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.5 } } }
""")
    net = caffe.Net(str(path), caffe.TEST)
    net.params["bn1"][0].data[...] = 0.1  # mean 0.1, variance 1 (scale factor 1)
    net.params["bn1"][1].data[...] = 1
    net.params["bn1"][2].data[...] = 1
    net.forward(data=np.random.RandomState(0).randn(2, 2, 4, 4).astype(np.float32))
    data = net.blobs["conv1"].data.copy()
    positive = data > 0
    inv_std = 1 / np.sqrt(1 + 1e-5)
    expected = {"relu1": -2 * inv_std * positive, "scale1": np.full(data.shape, -2 * inv_std),
                "bn1": np.full(data.shape, inv_std)}
    for order in (["relu1", "scale1", "bn1"], ["relu1", "bn1", "scale1", "relu1"]):
        for start in order:
            net.blobs["conv1"].diff[...] = 1
            net.backward(start=start)
            np.testing.assert_allclose(net.blobs["conv1"].diff, expected[start], atol=1e-5)
            np.testing.assert_array_equal(net.blobs["conv1"].data, data)


IN_PLACE_CHAINS = {
    # conv -> BatchNorm -> Scale -> ReLU, all in place on 'conv1' (a ResNet block's start):
    # BatchNorm's factor 1/sqrt(4) and Scale's signed factors make a skipped or doubled layer
    # show in the diffs.
    "bn_scale_relu": ["bn1", "scale1", "relu1"],
    # conv -> ReLU -> Dropout (TEST: identity), in place: Dropout's backward alone must not
    # apply the ReLU mask.
    "relu_dropout": ["relu1", "drop1"],
}
CHAIN_LAYERS = {
    "bn1": "layer { name: 'bn1' type: 'BatchNorm' bottom: 'conv1' top: 'conv1' "
           "batch_norm_param { use_global_stats: true } }",
    "scale1": "layer { name: 'scale1' type: 'Scale' bottom: 'conv1' top: 'conv1' "
              "scale_param { bias_term: true } }",
    "relu1": "layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }",
    "drop1": "layer { name: 'drop1' type: 'Dropout' bottom: 'conv1' top: 'conv1' }",
}


def _chain_net(tmp_path, chain):
    path = tmp_path / "chain.prototxt"
    path.write_text("name: 'c' force_backward: true input: 'data' "
                    "input_shape { dim: 2 dim: 2 dim: 4 dim: 4 }\n"
                    "layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1' "
                    "convolution_param { num_output: 3 kernel_size: 3 "
                    "weight_filler { type: 'gaussian' std: 0.5 } } }\n"
                    + "\n".join(CHAIN_LAYERS[n] for n in chain) +
                    "\nlayer { name: 'ip' type: 'InnerProduct' bottom: 'conv1' top: 'ip' "
                    "inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.5 } } }\n")
    caffe.set_random_seed(1)
    net = caffe.Net(str(path), caffe.TEST)
    if "bn1" in chain:
        net.params["bn1"][0].data[...] = 0.3
        net.params["bn1"][1].data[...] = 4.0
        net.params["bn1"][2].data[...] = 1
    if "scale1" in chain:
        net.params["scale1"][0].data[...] = [-2, 1.5, 3]
        net.params["scale1"][1].data[...] = [0.5, -0.25, 1]
    return net


def _caffe_backward_from_to(net, x, names, start, end, blob_diffs, param_diffs):
    """Caffe's Net::BackwardFromTo by hand: layers start..end, highest first, each a VJP at the
    input it read in the forward, reading its top's diff and overwriting its bottom's (one blob
    for an in-place chain); parameter diffs add up. Returns the new blob and parameter diffs."""
    import torch
    import torch.nn.functional as F
    w = {k: [torch.tensor(b.data.copy()) for b in v] for k, v in net.params.items()}

    def channel(v):
        return v.view(1, -1, 1, 1)

    fns = {
        "conv1": lambda a, p: F.conv2d(a, p[0], p[1]),
        "bn1": lambda a, p: (a - channel(w["bn1"][0])) / torch.sqrt(channel(w["bn1"][1]) + 1e-5),
        "scale1": lambda a, p: a * channel(p[0]) + channel(p[1]),
        "relu1": lambda a, p: a.clamp(min=0),
        "drop1": lambda a, p: a,  # TEST phase
        "ip": lambda a, p: F.linear(a.reshape(a.shape[0], -1), p[0], p[1]),
    }
    learned = {"conv1": w["conv1"], "scale1": w.get("scale1", []), "ip": w["ip"]}
    inputs, t = {}, torch.tensor(x)
    for n in names:
        inputs[n] = t
        t = fns[n](t, learned.get(n, []))
    blob_diffs, param_diffs = dict(blob_diffs), {k: list(v) for k, v in param_diffs.items()}
    for n in reversed(names[names.index(end):names.index(start) + 1]):
        a = inputs[n].clone().requires_grad_(True)
        p = [q.clone().requires_grad_(True) for q in learned.get(n, [])]
        top, bottom = ("ip", "conv1") if n == "ip" else ("conv1", "data" if n == "conv1" else "conv1")
        grads = torch.autograd.grad(fns[n](a, p), [a] + p, torch.tensor(blob_diffs[top]))
        blob_diffs[bottom] = grads[0].numpy()
        for i, g in enumerate(grads[1:]):
            param_diffs[n][i] = param_diffs[n][i] + g.numpy()
    return blob_diffs, param_diffs


@pytest.mark.parametrize("chain", sorted(IN_PLACE_CHAINS))
@pytest.mark.parametrize("whole_first", [False, True], ids=["fresh", "after_backward"])
def test_backward_from_to_every_pair_of_an_in_place_chain(tmp_path, chain, whole_first):
    # Every (start, end) of conv -> in-place chain -> InnerProduct leaves the blob and
    # parameter diffs Caffe's BackwardFromTo leaves: a start inside the chain seeds that
    # layer's own output (the layers above it take no part), the diff is the gradient of what
    # the range's lowest layer read, and after a whole backward (graph spent) the range is
    # recorded again from what its first layer read, not from the chain's final data (it
    # masked by the ReLU for Dropout alone, doubled BatchNorm's factor, or raised torch's
    # "backward through the graph a second time").
    names = ["conv1"] + IN_PLACE_CHAINS[chain] + ["ip"]
    x = np.random.RandomState(0).randn(2, 2, 4, 4).astype(np.float32)
    learned = ["conv1", "scale1", "ip"]
    for hi, start in enumerate(names):
        for end in names[:hi + 1]:
            net = _chain_net(tmp_path, IN_PLACE_CHAINS[chain])
            net.forward(data=x)
            if whole_first:
                net.backward()
            data = {b: net.blobs[b].data.copy() for b in net.blobs}
            rs = np.random.RandomState(5)
            for b in net.blobs:
                net.blobs[b].diff[...] = rs.randn(*net.blobs[b].diff.shape)
            blob_diffs = {b: net.blobs[b].diff.copy() for b in net.blobs}
            param_diffs = {k: [p.diff.copy() for p in net.params[k]] for k in learned
                           if k in net.params}
            want_blobs, want_params = _caffe_backward_from_to(
                net, x, names, start, end, blob_diffs, param_diffs)
            net.backward(start=start, end=end)
            where = f"{chain} backward(start={start!r}, end={end!r})"
            for b in net.blobs:
                np.testing.assert_allclose(net.blobs[b].diff, want_blobs[b], atol=1e-4,
                                           err_msg=f"{where}: blob {b}")
                np.testing.assert_array_equal(net.blobs[b].data, data[b])
            for k, diffs in want_params.items():
                for i, want in enumerate(diffs):
                    np.testing.assert_allclose(net.params[k][i].diff, want, atol=1e-4,
                                               err_msg=f"{where}: {k} param {i}")


def test_backward_across_the_start_of_a_partial_forward_in_a_chain(tmp_path):
    # forward(start='scale1') reads the chain's buffer (the last pass's ReLU output), and
    # Caffe's backward over relu1..conv1 then passes Scale's bottom diff to BatchNorm: the
    # layers below keep their diffs (with a positive Scale and no bias the ReLU mask is the
    # same), where the upper layers of the last pass were counted again (conv1's weight diff
    # doubled) and the input leaf of that pass was replaced (a zero data diff).
    def run(partial):
        net = _chain_net(tmp_path, IN_PLACE_CHAINS["bn_scale_relu"])
        net.params["scale1"][0].data[...] = 2.0
        net.params["scale1"][1].data[...] = 0.0
        net.forward(data=np.random.RandomState(0).randn(2, 2, 4, 4).astype(np.float32))
        if partial:
            net.forward(start="scale1", end="relu1")
        net.blobs["conv1"].diff[...] = 1
        net.backward(start="relu1", end="conv1")
        return [net.params["conv1"][0].diff.copy(), net.blobs["data"].diff.copy(),
                net.blobs["conv1"].diff.copy()]

    for got, want in zip(run(True), run(False)):
        assert np.abs(want).sum() > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_partial_forward_in_a_chain_keeps_infinite_values_of_the_layer_below(tmp_path):
    # The pass from 'tanh1' reads the buffer (the last TanH output); an inf the layer below
    # once wrote must not reach it as NaN (the gradient is routed to that layer's output).
    path = tmp_path / "inf.prototxt"
    path.write_text("force_backward: true input: 'data' input_shape { dim: 1 dim: 2 }\n"
                    "layer { name: 'ip1' type: 'InnerProduct' bottom: 'data' top: 'ip1' "
                    "inner_product_param { num_output: 2 } }\n"
                    "layer { name: 'tanh1' type: 'TanH' bottom: 'ip1' top: 'ip1' }\n"
                    "layer { name: 'ip2' type: 'InnerProduct' bottom: 'ip1' top: 'ip2' "
                    "inner_product_param { num_output: 1 } }\n")
    net = caffe.Net(str(path), caffe.TRAIN)
    net.params["ip1"][0].data[...] = [[np.inf, 0.0], [0.0, 1.0]]
    net.params["ip2"][0].data[...] = 1.0
    net.forward(data=np.array([[1.0, 0.5]], np.float32))
    np.testing.assert_allclose(net.blobs["ip1"].data, [[1.0, np.tanh(0.5)]], rtol=1e-6)
    net.forward(start="tanh1")
    np.testing.assert_allclose(net.blobs["ip1"].data, np.tanh([[1.0, np.tanh(0.5)]]), rtol=1e-6)


@pytest.mark.parametrize("start,end", [("scale1", "bn1"), ("relu1", "bn1"), ("relu1", "scale1")])
def test_ranged_backward_in_a_chain_after_a_forward_without_a_graph(tmp_path, start, end):
    # A forward under torch.no_grad() records no graph: the backward replays the range from
    # what its first layer read in that forward, not from the chain's final (ReLU) data.
    import torch

    def run(no_grad):
        net = _chain_net(tmp_path, IN_PLACE_CHAINS["bn_scale_relu"])
        x = np.random.RandomState(0).randn(2, 2, 4, 4).astype(np.float32)
        if no_grad:
            with torch.no_grad():
                net.forward(data=x)
        else:
            net.forward(data=x)
        net.blobs["conv1"].diff[...] = 1
        net.backward(start=start, end=end)
        return net.blobs["conv1"].diff.copy(), net.params["scale1"][0].diff.copy()

    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_deploy_net_keeps_one_value_per_in_place_chain(tmp_path):
    # No layer of a TEST net without force_backward runs backward: the outputs a chain's later
    # in-place layers overwrite are freed after the pass (Caffe's chain is one buffer); a net
    # that can run backward keeps them for a ranged backward.
    import gc
    import weakref

    def conv_output_alive(force_backward):
        net = _chain_net(tmp_path, IN_PLACE_CHAINS["bn_scale_relu"])
        if not force_backward:
            text = (tmp_path / "chain.prototxt").read_text().replace("force_backward: true", "")
            (tmp_path / "deploy.prototxt").write_text(text)
            net = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
        seen = []
        net.layer_dict["conv1"].module.register_forward_hook(
            lambda mod, inp, out: seen.append(weakref.ref(out)))
        net.forward(data=np.ones((2, 2, 4, 4), np.float32))
        gc.collect()
        return seen[0]() is not None

    assert conv_output_alive(force_backward=True)
    assert not conv_output_alive(force_backward=False)


def test_backward_works_without_a_forward_first(net):
    # Caffe's Backward reads the blobs; BVLC's tests call net.backward() right after Net().
    g = np.ones(net.blobs["ip"].diff.shape, np.float32)
    net.blobs["ip"].diff[...] = g
    data_before = net.blobs["data"].data.copy()
    out = net.backward(start="ip", end="ip")
    np.testing.assert_allclose(out["conv"], (g @ net.params["ip"][0].data).reshape(
        net.blobs["conv"].data.shape), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(net.blobs["data"].data, data_before)  # no new batch drawn


def test_clear_param_diffs_and_apply_update(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the solver's paths are relative to the working directory
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        "net: 'net.prototxt' base_lr: 0.1 lr_policy: 'fixed' max_iter: 1 solver_mode: CPU "
        "snapshot_prefix: 'snap'")
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    net = solver.net
    net.forward()
    net.backward()
    diff = net.params["ip"][0].diff.copy()
    before = net.params["ip"][0].data.copy()
    assert np.abs(diff).max() > 0
    solver.apply_update()  # SGD: w -= lr * diff (no momentum, no decay)
    np.testing.assert_allclose(net.params["ip"][0].data, before - 0.1 * diff, rtol=1e-5, atol=1e-6)
    net.clear_param_diffs()
    assert not net.params["ip"][0].diff.any()


# ------------------------------------------------------------------ NetSpec
def test_netspec_function_input_that_is_not_a_top_is_a_type_error():
    data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$") as e:
        L.Silence(data, ntop=0)
    assert isinstance(e.value, CaffeError)  # and one of ours
    L.Silence(*data, ntop=0)


# ------------------------------------------------------------------ coord_map
def fcn(pad=100, ks=3, stride=1, dstride=2):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 30, 30]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.pool, num_output=2, kernel_size=2 * dstride, stride=dstride)
    return n


def test_layer_maps():
    n = fcn(pad=1, ks=3, stride=2)
    ax, a, b = coord_map(n.conv.fn)  # scale 1/s, shift (p - (k-1)/2)/s
    assert ax == 1 and a == 0.5 and b == 0.0
    ax, a, b = coord_map(n.up.fn)  # scale s, shift (k-1)/2 - p
    assert ax == 1 and a == 2 and b == 1.5
    assert coord_map(L.ReLU(n.conv).fn)[0] is None
    with pytest.raises(UndefinedMapException):
        coord_map(L.InnerProduct(n.conv, num_output=3).fn)
    assert compose((1, np.array([2.0]), np.array([1.0])), inverse((1, np.array([2.0]), np.array([1.0]))))[1] == 1
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))


def test_coord_map_and_crop_align_an_upsampled_map_with_the_input():
    n = fcn(pad=100)
    ax, a, b = coord_map_from_to(n.up, n.data)
    assert ax == 1 and np.all(a == 1) and np.all(b == -100)
    n.score = crop(n.up, n.data)
    proto = n.to_proto()
    layer = proto.layer[-1]
    assert layer.type == "Crop" and layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [100]
    net = caffe.Net(caffe_pb2.NetParameter.FromString(proto.SerializeToString()), caffe.TEST)
    assert net.forward()["score"].shape == (1, 2, 30, 30)
    # Through the Crop the offset adds up (pycaffe's crop-of-crop).
    n.crop2 = L.Crop(n.up, n.data, axis=2, offset=5)
    assert np.all(coord_map_from_to(n.crop2, n.data)[2] == -100 + 5)


def test_rectangular_and_nd_kernels_map_per_axis():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=[3, 5], pad=[1, 0])
    ax, a, b = coord_map_from_to(n.conv, n.data)
    assert np.all(a == 1) and list(b) == [0, 2]  # a scalar stride maps both axes alike


def test_crop_errors_are_pycaffes():
    n = fcn()
    n.other = L.Input(shape=dict(dim=[1, 1, 30, 30]))
    with pytest.raises(RuntimeError, match="Could not compute map between tops"):
        coord_map_from_to(n.up, n.other)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.pool, n.data)
    n2 = fcn(pad=0, ks=5)  # the upsampled map is smaller than the input
    with pytest.raises(AssertionError, match="cannot crop negative offset") as e:
        crop(n2.up, n2.data)
    assert isinstance(e.value, CaffeError)


# ------------------------------------------------------------------ Python layers
class TimesTen(caffe.Layer):
    """y = 10 x (defined here: this module is imported, so no flag is needed)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class Raises(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("setup refused")


class NotALayer:
    def __init__(self, param=None):
        raise AssertionError("must not be constructed")


def python_net(module, layer):
    return ("name: 'p' force_backward: true input: 'x' input_shape { dim: 2 dim: 3 }\n"
            f"layer {{ type: 'Python' name: 'l' bottom: 'x' top: 'y'\n"
            f"  python_param {{ module: '{module}' layer: '{layer}' }} }}\n")


def test_python_layer_from_an_imported_module_runs_without_a_flag(tmp_path):
    path = tmp_path / "p.prototxt"
    path.write_text(python_net(__name__, "TimesTen"))
    net = caffe.Net(str(path), caffe.TEST)
    net.blobs["x"].diff[...] = 0
    net.blobs["y"].diff[...] = 1
    out = net.backward()  # pycaffe: backward right after Net()
    np.testing.assert_allclose(out["x"], np.full((2, 3), 10.0))
    assert net.forward(x=np.ones((2, 3), np.float32))["y"].max() == 10


def test_python_layer_that_would_import_code_needs_the_flag(tmp_path, monkeypatch):
    module = "i14_never_imported_layers"
    (tmp_path / f"{module}.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.prototxt"
    path.write_text(python_net(module, "Anything"))
    with pytest.raises(NetError) as e:
        caffe.Net(str(path), caffe.TEST)
    msg = str(e.value)
    assert "not imported" in msg and "allow_python=True" in msg and "--allow-python" in msg
    assert module not in sys.modules
    # An imported module whose class is not a caffe.Layer (here: a plain class, or os.system)
    # is refused as well, and nothing is constructed or called.
    for mod, cls in ((__name__, "NotALayer"), ("os", "system")):
        path.write_text(python_net(mod, cls))
        with pytest.raises(NetError, match="not a caffe.Layer subclass"):
            caffe.Net(str(path), caffe.TEST)


def test_python_layer_exception_reaches_the_caller(tmp_path):
    path = tmp_path / "p.prototxt"
    path.write_text(python_net(__name__, "Raises"))
    with pytest.raises(RuntimeError, match="setup refused"):
        caffe.Net(str(path), caffe.TEST)


def test_python_layer_in_the_running_script(tmp_path):
    # `python3 my_layers.py` (or `pycaffe-alt run my_layers.py`) whose prototxt names
    # module 'my_layers': the script is __main__, already running, so no flag is needed.
    script = tmp_path / "my_layers.py"
    script.write_text(textwrap.dedent("""
        import sys, numpy as np, caffe
        class Plus1(caffe.Layer):
            def setup(self, bottom, top): pass
            def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top): top[0].data[...] = bottom[0].data + 1
        if __name__ == "__main__":
            open("p.prototxt", "w").write(
                "input: 'x' input_shape { dim: 1 dim: 2 } layer { type: 'Python' name: 'l' "
                "bottom: 'x' top: 'y' python_param { module: 'my_layers' layer: 'Plus1' } }")
            net = caffe.Net("p.prototxt", caffe.TEST)
            print("Y", net.forward(x=np.zeros((1, 2), np.float32))["y"].tolist())
    """))
    r = subprocess.run([sys.executable, "-m", "pycaffe_alt.run", str(script)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Y [[1.0, 1.0]]" in r.stdout


# ------------------------------------------------------------------ module layout, files
def test_caffe_underscore_caffe_and_pycaffe_modules():
    from pycaffe_alt import _caffe, pycaffe
    for name in ("Net", "Layer", "get_solver", "layer_type_list", "Timer", "NCCL", "log",
                 "init_log", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed",
                 "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
                 "set_multiprocess", "has_nccl", "SGDSolver", "AdamSolver", "__version__"):
        assert getattr(_caffe, name) is getattr(caffe, name), name
    for name in pycaffe.__all__:
        assert getattr(pycaffe, name) is getattr(caffe, name), name
    from pycaffe_alt.blob import Blob, BlobVec
    from pycaffe_alt.layers.python_layer import PyBlob, PyBlobVec
    assert _caffe.Blob is Blob and _caffe.BlobVec is BlobVec and issubclass(PyBlobVec, BlobVec)
    # One Blob and one BlobVec type as in pycaffe: BN-merging scripts (MobileNet-SSD merge_bn.py)
    # test type(net.params[k]) is caffe._caffe.BlobVec and skip layers otherwise.
    net = caffe.Net(caffe_pb2.NetParameter(layer=[
        caffe_pb2.LayerParameter(name="x", type="Input", top=["x"],
                                 input_param=caffe_pb2.InputParameter(shape=[caffe_pb2.BlobShape(dim=[1, 2])])),
        caffe_pb2.LayerParameter(name="ip", type="InnerProduct", bottom=["x"], top=["y"],
                                 inner_product_param=caffe_pb2.InnerProductParameter(num_output=2))]),
        caffe.TEST)
    assert type(net.params["ip"]) is _caffe.BlobVec
    assert isinstance(net.params["ip"][0], _caffe.Blob) and isinstance(net.blobs["y"], _caffe.Blob)
    assert isinstance(PyBlob(np.zeros(2)), _caffe.Blob)
    assert _caffe.SolverParameter is caffe_pb2.SolverParameter


def test_imagenet_mean_file_ships_with_the_package():
    from pycaffe_alt.imagenet import BGR_MEAN, MEAN_FILE, ilsvrc_2012_mean
    assert MEAN_FILE == os.path.join(os.path.dirname(caffe.__file__), "imagenet",
                                     "ilsvrc_2012_mean.npy")
    mean = np.load(MEAN_FILE)
    assert mean.shape == (3, 256, 256) and mean.dtype == np.float64
    np.testing.assert_allclose(mean.mean(1).mean(1), [104.00698793, 116.66876762, 122.67891434])
    np.testing.assert_array_equal(mean, ilsvrc_2012_mean())
    assert BGR_MEAN[0] < BGR_MEAN[1] < BGR_MEAN[2]


def test_resize_image_any_channel_count():
    im = np.random.RandomState(0).rand(6, 8, 4).astype(np.float32)
    out = caffe.io.resize_image(im, (12, 16))
    assert out.shape == (12, 16, 4) and out.dtype == np.float32
    # scipy's zoom (order 1) keeps the corners.
    np.testing.assert_allclose(out[0, 0], im[0, 0], atol=1e-6)
    np.testing.assert_allclose(out[-1, -1], im[-1, -1], atol=1e-6)


def test_timer_follows_caffes_timer():
    import time

    timer = caffe.Timer()
    assert timer.ms == 0.0  # never run
    timer.start()
    time.sleep(0.01)
    first = timer.ms  # reading stops a running timer (Caffe's Timer::MilliSeconds)
    time.sleep(0.01)
    assert first >= 10 and timer.ms == first
    timer.start()
    time.sleep(0.01)
    timer.start()  # ignored while running
    timer.stop()
    assert timer.ms >= 10


def test_load_image_errors_are_oserrors_as_in_pycaffe(tmp_path):
    # pycaffe's load_image (skimage imread) raises FileNotFoundError / OSError; programs catch
    # IOError. Ours are those and CaffeErrors.
    with pytest.raises(FileNotFoundError) as e:
        caffe.io.load_image(str(tmp_path / "missing.jpg"))
    assert isinstance(e.value, CaffeError) and "missing.jpg" in str(e.value)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(IOError) as e:
        caffe.io.load_image(str(tmp_path / "bad.jpg"))
    assert isinstance(e.value, CaffeError) and "cannot read the image" in str(e.value)
