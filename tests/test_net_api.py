"""The pycaffe Net surface and the nn.Module view of the same net."""
import os
import weakref

import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt.blob import same_bits
from pycaffe_alt.errors import NetError, WeightsError
from pycaffe_alt.prototxt import parse_text
from pycaffe_alt.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")

STAGED = """
name: "staged"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "deploy_only" type: "ReLU" bottom: "ip" top: "r" include { stage: "deploy" } }
layer { name: "train_only" type: "TanH" bottom: "ip" top: "t" include { phase: TRAIN } }
layer { name: "lvl" type: "Sigmoid" bottom: "ip" top: "s" include { min_level: 2 } }
layer { name: "not_x" type: "AbsVal" bottom: "ip" top: "a" exclude { stage: "x" } }
"""


def net_from_text(text, phase=caffe.TEST, **kw):
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase, **kw)


@pytest.fixture
def lenet():
    return caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                     caffe.TRAIN)


def test_pycaffe_constructor_signatures():
    p = os.path.join(LENET, "net.prototxt")
    w = os.path.join(LENET, "weights.caffemodel")
    a = caffe.Net(p, w, caffe.TEST)
    b = caffe.Net(p, caffe.TEST, weights=w)
    np.testing.assert_array_equal(a.params["conv1"][0].data, b.params["conv1"][0].data)
    with pytest.raises(TypeError):
        caffe.Net(p)


def test_netstate_filtering_phase_stage_level():
    names = lambda n: [l.name for l in n.layers]  # noqa: E731
    assert names(net_from_text(STAGED)) == ["data", "ip", "not_x"]
    assert names(net_from_text(STAGED, caffe.TRAIN)) == ["data", "ip", "train_only", "not_x"]
    assert "deploy_only" in names(net_from_text(STAGED, stages=["deploy"]))
    assert "not_x" not in names(net_from_text(STAGED, stages=["x"]))
    assert "lvl" in names(net_from_text(STAGED, level=2))


def test_blobs_data_and_diff_write_through(lenet):
    blob = lenet.blobs["data"]
    assert blob.shape == (2, 1, 28, 28) and blob.count == 2 * 28 * 28
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 1, 28, 28)
    held = blob.data  # pycaffe habit: keep the array, write into it, run
    held[...] = 0.5
    lenet.blobs["label"].data[...] = [1, 3]
    lenet.forward()
    assert np.all(lenet._values["data"].detach().numpy() == 0.5)
    lenet.blobs["conv1"].diff[...] = 2.0
    assert float(lenet._diffs["conv1"].mean()) == 2.0


def test_params_write_through_changes_output(lenet):
    lenet.blobs["data"].data[...] = np.random.rand(2, 1, 28, 28)
    lenet.forward()
    before = lenet.blobs["ip2"].data.copy()
    lenet.params["ip2"][1].data[...] += 1.0
    lenet.forward()
    np.testing.assert_allclose(lenet.blobs["ip2"].data, before + 1.0, rtol=1e-5)


def test_loss_diff_starts_at_loss_weight(lenet):
    assert lenet.blob_loss_weights["loss"] == 1.0
    assert float(lenet.blobs["loss"].diff) == 1.0


def test_reshape_propagates(lenet):
    lenet.blobs["data"].reshape(5, 1, 28, 28)
    lenet.blobs["label"].reshape(5)
    lenet.reshape()
    assert lenet.blobs["ip2"].shape == (5, 10)
    lenet.blobs["data"].data[...] = 0
    lenet.forward()
    assert lenet.blobs["ip2"].data.shape == (5, 10)


def test_forward_kwargs_start_end_and_blobs(lenet):
    x = np.random.rand(2, 1, 28, 28).astype(np.float32)
    out = lenet.forward(data=x, label=np.array([0, 1]))
    assert set(out) == {"loss"}
    part = lenet.forward(end="pool1")
    assert list(part) == ["pool1"]
    rest = lenet.forward(start="conv2", blobs=["ip1"])
    assert set(rest) == {"loss", "ip1"}
    with pytest.raises(NetError, match="no layer named"):
        lenet.forward(end="nope")
    with pytest.raises(NetError, match="batch size"):
        lenet.forward(data=np.zeros((3, 1, 28, 28)))


def test_forward_to_a_middle_layer_keeps_the_blobs_above_it(lenet):
    # Caffe's ForwardFromTo(0, end) runs layers 0..end only: ip2 and the loss keep the values
    # of the last full pass (pycaffe tutorials read them after a partial pass).
    lenet.forward(data=np.random.rand(2, 1, 28, 28).astype(np.float32), label=np.array([0, 1]))
    ip2, loss = lenet.blobs["ip2"].data.copy(), float(lenet.blobs["loss"].data)
    conv1 = lenet.blobs["conv1"].data.copy()
    lenet.blobs["data"].data[...] = 0
    lenet.forward(end="conv1")
    assert not np.array_equal(lenet.blobs["conv1"].data, conv1)  # conv1 did run again
    np.testing.assert_array_equal(lenet.blobs["ip2"].data, ip2)
    assert float(lenet.blobs["loss"].data) == loss != 0


def test_backward_reads_the_labels_the_blobs_hold_when_it_runs():
    # Caffe's SoftmaxWithLoss::Backward reads bottom[1] when it runs: FGSM-style programs
    # forward with a dummy label, then write the target label and call backward() alone.
    def grads(net):
        net.backward()
        return (net.blobs["data"].diff.copy(), net.params["ip1"][0].diff.copy(),
                net.blobs["ip2"].diff.copy())

    x = np.random.RandomState(3).rand(2, 1, 28, 28).astype(np.float32)
    nets = [caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                      caffe.TRAIN) for _ in range(3)]
    fresh, rewritten, held = nets
    fresh.forward(data=x, label=np.array([4, 9]))
    want = grads(fresh)
    rewritten.forward(data=x, label=np.array([0, 0]))
    rewritten.blobs["label"].data[...] = [4, 9]
    for a, b in zip(grads(rewritten), want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    label = held.blobs["label"].data  # an array taken before the forward, written after it
    held.forward(data=x, label=np.array([1, 1]))
    label[...] = [4, 9]
    for a, b in zip(grads(held), want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_label_rewrite_is_a_change_of_bits():
    """What backward() counts as a rewritten label: any bit changed (NaN written again is no
    change; -0.0 for 0.0 is one, which only re-records the same graph)."""
    nan = torch.tensor([float("nan"), 1.0])
    assert same_bits(nan, nan.clone())
    assert not same_bits(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]))
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not same_bits(torch.zeros(2), torch.zeros(3))
    assert not same_bits(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert same_bits(torch.tensor([3, 4]), torch.tensor([3, 4]))
    assert not same_bits(torch.tensor([3, 4]), torch.tensor([3, 5]))
    strided = torch.arange(8.0)[::2]
    assert same_bits(strided, strided.clone()) and same_bits(strided.half(), strided.half())


def test_backward_matches_autograd_and_accumulates(lenet):
    x = np.random.rand(2, 1, 28, 28).astype(np.float32)
    lenet.forward(data=x, label=np.array([2, 7]))
    diffs = lenet.backward()
    assert set(diffs) == {"data", "label"}
    g1 = lenet.params["conv1"][0].diff.copy()
    # The same gradient by plain autograd on the tensor path.
    ref = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN)
    outs = ref(data=torch.from_numpy(x), label=torch.tensor([2.0, 7.0]))
    ref.loss({**ref._values, **outs}).backward()
    np.testing.assert_allclose(g1, ref.params["conv1"][0].diff, rtol=1e-5, atol=1e-7)
    assert np.abs(lenet.blobs["data"].diff).sum() > 0  # force_backward: input diffs exist
    lenet.forward()
    lenet.backward()  # Caffe accumulates parameter diffs until the solver clears them
    np.testing.assert_allclose(lenet.params["conv1"][0].diff, 2 * g1, rtol=1e-5, atol=1e-7)


def test_a_pass_frees_the_last_passs_blobs_before_making_new_ones(lenet):
    """Two passes' activations are never alive at once: by the time a pass reaches 'conv1',
    the previous pass's value of 'ip2' is gone (peak memory, see docs/performance.md), while
    the diffs of the last backward stay readable over the forward, as Caffe's do."""
    x = np.random.rand(2, 1, 28, 28).astype(np.float32)
    lenet.forward(data=x, label=np.array([2, 7]))
    lenet.backward()
    diff = lenet.blobs["ip2"].diff.copy()
    old_value = weakref.ref(lenet.blob_value("ip2"))
    alive = {}
    conv1 = lenet.layer_modules["conv1"]
    pre = conv1.register_forward_pre_hook(lambda m, args: alive.setdefault("value", old_value()))
    lenet.forward()
    pre.remove()
    assert alive["value"] is None
    assert np.abs(diff).sum() > 0
    np.testing.assert_array_equal(lenet.blobs["ip2"].diff, diff)


def test_arrays_a_user_holds_stay_the_blobs_memory_across_passes(lenet):
    """pycaffe's arrays are views of blob memory that later passes write into (Caffe's blobs
    keep their memory): a feature array taken once, the arrays of a forward() result and held
    diffs all show the next pass, and fresh reads return that same memory (BVLC's net_surgery
    notebook prints its post-surgery mean through an array taken before the surgery)."""
    x = np.random.rand(2, 1, 28, 28).astype(np.float32)
    out = lenet.forward(data=x, label=np.array([2, 7]))
    conv1, loss = lenet.blobs["conv1"].data, out["loss"]
    lenet.backward()
    ip2_diff, conv1_diff = lenet.blobs["ip2"].diff, lenet.blobs["conv1"].diff
    lenet.params["conv1"][1].data[...] += 1.0  # surgery: every conv1 output moves by one
    before = conv1.copy()
    lenet.forward(data=x)
    np.testing.assert_allclose(conv1, before + 1.0, rtol=1e-5, atol=1e-5)
    assert np.shares_memory(conv1, lenet.blobs["conv1"].data)
    assert np.shares_memory(loss, lenet.blobs["loss"].data) and loss == lenet.blobs["loss"].data
    new_x = x[::-1].copy()
    lenet.forward(data=new_x, label=np.array([7, 2]))
    lenet.backward()
    with torch.enable_grad():  # the diffs of this second batch, from autograd directly
        check = caffe.Net(os.path.join(LENET, "net.prototxt"), caffe.TRAIN)
        check.load_state_dict(lenet.state_dict())
        check.forward(data=new_x, label=np.array([7, 2]))
        check.backward()
    np.testing.assert_allclose(ip2_diff, check.blobs["ip2"].diff, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(conv1_diff, check.blobs["conv1"].diff, rtol=1e-5, atol=1e-8)
    assert np.shares_memory(ip2_diff, lenet.blobs["ip2"].diff)


def test_a_write_into_a_held_array_feeds_a_pass_that_starts_above_it(lenet):
    x = np.random.rand(2, 1, 28, 28).astype(np.float32)
    lenet.forward(data=x, label=np.array([2, 7]))
    pool2 = lenet.blobs["pool2"].data
    lenet.forward(data=x)  # the held array is now a copy of the blob's value
    pool2[...] = 0.0
    lenet.forward(start="ip1")
    bias = lenet.params["ip2"][1].data
    relu_of_bias = np.maximum(lenet.params["ip1"][1].data, 0)
    expected = relu_of_bias @ lenet.params["ip2"][0].data.T + bias
    np.testing.assert_allclose(lenet.blobs["ip2"].data, np.tile(expected, (2, 1)), rtol=1e-5,
                               atol=1e-6)


def test_forward_all_batches_and_trims():
    net = caffe.Net(os.path.join(ROOT, "models", "lenet", "deploy.prototxt"), caffe.TEST)
    net.blobs["data"].reshape(4, 1, 28, 28)
    net.reshape()
    x = np.random.rand(10, 1, 28, 28).astype(np.float32)
    out = net.forward_all(data=x)
    assert out["prob"].shape == (10, 10)
    single = net.forward(data=np.concatenate([x[8:10], x[:2]]))
    np.testing.assert_allclose(out["prob"][8:10], single["prob"][:2], rtol=1e-5)


def test_save_copy_from_roundtrip(tmp_path, lenet):
    path = str(tmp_path / "m.caffemodel")
    lenet.params["ip1"][0].data[...] = 0.25
    lenet.save(path)
    other = caffe.Net(os.path.join(LENET, "net.prototxt"), caffe.TEST)
    other.copy_from(path)
    assert np.all(other.params["ip1"][0].data == 0.25)


SAVED = """
name: "saved"
force_backward: true
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "half" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "half" loss_weight: 0.5 }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" phase: TRAIN }
"""


def test_save_writes_what_caffe_net_to_proto_writes(tmp_path):
    # Caffe's Net::ToProto writes the name and the layers only (no state, no force_backward);
    # every layer carries the phase Net::Init gave it (the net's, where the layer sets none)
    # and a loss layer the loss_weight: 1 LossLayer::LayerSetUp added (a real Caffe model, ARM's
    # quantized_cifar10_m4_iter_70000.caffemodel, has both).
    net = net_from_text(SAVED, caffe.TEST)
    path = str(tmp_path / "m.caffemodel")
    net.save(path)
    saved = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    assert [f.name for f, _ in saved.ListFields()] == ["name", "layer"]
    assert saved.name == "saved"
    phases = {l.name: l.phase for l in saved.layer}
    assert phases == {"data": caffe.TEST, "ip": caffe.TEST, "loss": caffe.TEST,
                      "half": caffe.TEST, "acc": caffe.TRAIN}
    weights = {l.name: list(l.loss_weight) for l in saved.layer}
    assert weights == {"data": [], "ip": [], "loss": [1.0], "half": [0.5], "acc": []}
    assert [len(l.blobs) for l in saved.layer] == [0, 2, 0, 0, 0]
    # The net's own definition is left as it was, and the file still loads as a net.
    assert not net.net_param.layer[2].loss_weight and net.net_param.HasField("state")
    again = net_from_text(str(saved), caffe.TEST)
    np.testing.assert_array_equal(again.params["ip"][0].data, net.params["ip"][0].data)


def test_share_with_uses_the_same_tensors(lenet):
    other = caffe.Net(os.path.join(LENET, "net.prototxt"), caffe.TEST)
    other.share_with(lenet)
    lenet.params["conv1"][0].data[...] = 3.0
    assert np.all(other.params["conv1"][0].data == 3.0)


def test_names_and_views(lenet):
    assert lenet._layer_names[:3] == ["data", "label", "conv1"]
    assert lenet.layer_dict["conv1"].type == "Convolution"
    assert len(lenet.layers[2].blobs) == 2 and lenet.layers[2].blobs[0].shape == (20, 1, 5, 5)
    assert lenet.inputs == ["data", "label"]
    assert lenet.outputs == ["loss"]
    assert lenet.top_names["conv1"] == ["conv1"] and lenet.bottom_names["loss"] == ["ip2", "label"]
    assert "SoftmaxWithLoss" in caffe.layer_type_list()


def test_is_an_nn_module_with_layer_named_state_dict(lenet):
    assert isinstance(lenet, torch.nn.Module)
    keys = list(lenet.state_dict())
    assert keys[:4] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    opt = torch.optim.SGD(lenet.parameters(), lr=0.01)
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([1.0, 2.0])
    first = None
    for _ in range(5):
        opt.zero_grad()
        out = lenet(data=x, label=y)
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["loss"].detach())
    assert float(lenet(data=x, label=y)["loss"].detach()) < first


def test_param_sharing_by_name_and_mismatch():
    text = """
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 3 } } }
    layer { name: "p" type: "InnerProduct" bottom: "a" top: "p" param { name: "w" } inner_product_param { num_output: 2 } }
    layer { name: "q" type: "InnerProduct" bottom: "a" top: "q" param { name: "w" } inner_product_param { num_output: %d } }
    """
    net = net_from_text(text % 2)
    assert net.layer_dict["p"].module.weight is net.layer_dict["q"].module.weight
    assert len(net.learnable_params) == 3  # shared weight once, two biases
    with pytest.raises(NetError, match="cannot share param 'w'"):
        net_from_text(text % 3)
    # PERMISSIVE: same count, other shape ((2, 6) and (3, 4)); it built, then every forward
    # failed with a matrix-shape error.
    permissive = """
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 6 } } }
    layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 dim: 4 } } }
    layer { name: "p" type: "InnerProduct" bottom: "a" top: "p" param { name: "w" } inner_product_param { num_output: 2 } }
    layer { name: "q" type: "InnerProduct" bottom: "b" top: "q" param { name: "w" share_mode: PERMISSIVE } inner_product_param { num_output: 3 } }
    """
    with pytest.raises(NetError, match="shared PERMISSIVE between shapes"):
        net_from_text(permissive)


def test_duplicate_top_is_an_error():
    with pytest.raises(NetError, match="more than one layer"):
        net_from_text("""
        layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 } } }
        layer { name: "b" type: "AbsVal" bottom: "a" top: "x" }
        layer { name: "c" type: "AbsVal" bottom: "a" top: "x" }""")


REPEATED_NAMES = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y1"
            inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y2"
            inner_product_param { num_output: 2 weight_filler { type: "constant" value: 2 } } }
    layer { name: "abs" type: "AbsVal" bottom: "y1" top: "z1" }
    layer { name: "abs" type: "AbsVal" bottom: "y2" top: "z2" }"""


def test_repeated_layer_names_build_and_run_as_in_caffe(tmp_path):
    # Caffe's Net::Init does not check layer names (BVLC's mnist_autoencoder has two "loss"
    # layers); pycaffe's name-keyed dicts keep the first position and the last layer.
    net = net_from_text(REPEATED_NAMES)
    assert net._layer_names == ["in", "ip", "ip", "abs", "abs"]
    assert len(net.layers) == 5 and list(net.layer_dict) == ["in", "ip", "abs"]
    assert net.top_names["ip"] == ["y2"] and net._top_ids(1) == [1] and net._top_ids(2) == [2]
    assert float(net.params["ip"][0].data[0, 0]) == 2.0
    net.blobs["x"].data[...] = 1
    out = net.forward()
    np.testing.assert_allclose(out["z1"], 3.0)
    np.testing.assert_allclose(out["z2"], 6.0)
    # Saved in layer order, each layer with its own blobs; copied back as Caffe's
    # CopyTrainedLayersFrom does: each stored layer into the first layer of its name.
    path = str(tmp_path / "repeated.caffemodel")
    net.save(path)
    stored = [(layer.name, layer.blobs[0].data[0]) for layer in
              caffe_pb2.NetParameter.FromString(open(path, "rb").read()).layer
              if layer.blobs]
    assert stored == [("ip", 1.0), ("ip", 2.0)]
    other = net_from_text(REPEATED_NAMES.replace("value: 1", "value: 5").replace("value: 2", "value: 7"))
    other.copy_from(path)
    assert [float(v.blobs[0].data[0, 0]) for v in other.layers if v.blobs] == [2.0, 7.0]
    with pytest.raises(WeightsError, match="two layers named 'ip' have parameters"):
        net.save_hdf5(str(tmp_path / "repeated.h5"))
    # The exported module runs every layer of a repeated name (named ip, ip_1 there).
    module = net.as_module(outputs=["z1", "z2"])
    assert module.layer_names == ["ip", "ip_1", "abs", "abs_1"]
    x = torch.randn(2, 3)
    z1, z2 = module(x)
    np.testing.assert_allclose(z2.detach().numpy(), 2 * z1.detach().numpy(), rtol=1e-6)


def test_repeated_names_take_weights_where_caffe_puts_them(tmp_path):
    import h5py

    net = net_from_text(REPEATED_NAMES)
    # HDF5 weights go to the *last* layer of a name (CopyTrainedLayersFromHDF5 looks names up in
    # layer_names_index_, where the last layer of a name wins), whatever the file is called.
    h5 = str(tmp_path / "weights.caffemodel")  # an HDF5 file without the .h5 suffix
    with h5py.File(h5, "w") as f:
        f["data/ip/0"] = np.full((2, 3), 9, np.float32)
        f["data/ip/1"] = np.zeros(2, np.float32)
    net.copy_from(h5)
    assert [float(v.blobs[0].data[0, 0]) for v in net.layers if v.blobs] == [1.0, 9.0]
    net.load_hdf5(h5)
    assert [float(v.blobs[0].data[0, 0]) for v in net.layers if v.blobs] == [1.0, 9.0]
    # A binary caffemodel named .h5 is still a binary caffemodel (Caffe tests the content).
    binary = str(tmp_path / "binary.h5")
    net.save(binary)
    other = net_from_text(REPEATED_NAMES.replace("value: 1", "value: 5"))
    assert other.copy_from(binary) == ["ip"]
    # Both stored 'ip' layers were copied into the first 'ip', the last copy winning.
    assert [float(v.blobs[0].data[0, 0]) for v in other.layers if v.blobs] == [9.0, 2.0]
    # share_with: each of the other net's layers into the first layer of its name here, so
    # the first 'ip' here ends with the other's last 'ip' (ShareTrainedLayersWith).
    mine = net_from_text(REPEATED_NAMES.replace("value: 1", "value: 3").replace("value: 2", "value: 4"))
    mine.share_with(other)
    assert [float(v.blobs[0].data[0, 0]) for v in mine.layers if v.blobs] == [2.0, 4.0]


SHARED = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "a" type: "InnerProduct" bottom: "x" top: "ya" param { name: "w" }
            inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" std: 1 } } }
    layer { name: "r" type: "ReLU" bottom: "ya" top: "ya" }
    layer { name: "b" type: "InnerProduct" bottom: "ya" top: "yb" param { name: "w" }
            inner_product_param { num_output: 3 bias_term: false } }"""


def test_hdf5_weights_have_a_group_per_layer_and_owned_blobs_only(tmp_path):
    import h5py

    net = net_from_text(SHARED)
    path = str(tmp_path / "w.h5")
    net.save_hdf5(path)
    with h5py.File(path, "r") as f:  # Net::ToHDF5: every layer, blobs only where owned
        assert list(f["data"]) == ["a", "b", "in", "r"]
        assert list(f["data/a"]) == ["0"] and list(f["data/b"]) == [] and list(f["data/r"]) == []
    other = net_from_text(SHARED)
    other.load_hdf5(path)  # 'b' has no dataset: it shares 'a''s weights, which fill it
    np.testing.assert_array_equal(other.params["b"][0].data, net.params["a"][0].data)
    # The same file loaded where 'b' owns its weights: a blob is missing, as Caffe says.
    unshared = net_from_text(SHARED.replace('param { name: "w" }\n            inner_product_param { num_output: 3 bias_term: false } }',
                                            'inner_product_param { num_output: 3 bias_term: false } }'))
    with pytest.raises(WeightsError, match="layer 'b': blob 0 is not in the file"):
        unshared.load_hdf5(path)


def test_weights_for_a_layer_without_parameters_are_an_error(tmp_path):
    # Caffe: CHECK_EQ(target_blobs.size(), source_layer.blobs_size()) "Incompatible number of
    # blobs" -- silently dropping the stored weights would leave the user's model untrained.
    net = net_from_text(REPEATED_NAMES)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    plain = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "AbsVal" bottom: "x" top: "y" }""")
    with pytest.raises(WeightsError, match="layer 'ip': the file has 2 blob\\(s\\), the net expects 0"):
        plain.copy_from(path)


def test_lr_mult_zero_param_gets_no_gradient():
    net = net_from_text("""
    force_backward: false
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 2 dim: 2 } } }
    layer { name: "p" type: "InnerProduct" bottom: "a" top: "p" param { lr_mult: 0 } param { lr_mult: 1 }
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
    layer { name: "l" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "l" }""", caffe.TRAIN)
    net.blobs["a"].data[...] = 1
    net.forward()
    net.backward()
    assert np.all(net.params["p"][0].diff == 0) and np.any(net.params["p"][1].diff != 0)
    assert np.all(net.blobs["a"].diff == 0)  # no force_backward: inputs get no diff


def test_in_place_layer_on_an_input_blob_keeps_the_fed_value():
    net = net_from_text("""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "drop" type: "Dropout" bottom: "data" top: "data" }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }""")
    for value in (1.0, 2.0):
        net.blobs["data"].data[...] = value
        out = net.forward()
        np.testing.assert_allclose(out["ip"], np.full((2, 2), 3 * value))


def test_weights_written_into_the_net_definition_are_loaded(tmp_path):
    # Caffe's Layer constructor loads LayerParameter.blobs (and skips the fillers); they were
    # ignored, so a NetParameter holding its weights built a net of filler values.
    net = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 }
            blobs { shape { dim: 2 dim: 3 } data: [1, 2, 3, 4, 5, 6] } blobs { shape { dim: 2 } data: [7, 8] } }""")
    np.testing.assert_array_equal(net.params["ip"][0].data, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(net.params["ip"][1].data, [7, 8])
    path = str(tmp_path / "w.caffemodel")
    net.params["ip"][1].data[...] = [-1, -2]
    net.save(path)
    again = caffe.Net(caffe_pb2.NetParameter.FromString(open(path, "rb").read()), caffe.TEST)
    np.testing.assert_array_equal(again.params["ip"][1].data, [-1, -2])
    with pytest.raises(WeightsError, match="layer 'ip': the file has 1 blob"):
        net_from_text("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 }
                blobs { shape { dim: 2 dim: 3 } data: [1, 2, 3, 4, 5, 6] } }""")
    with pytest.raises(WeightsError, match="shape mismatch"):
        net_from_text("""
        layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 bias_term: false }
                blobs { shape { dim: 3 dim: 2 } data: [1, 2, 3, 4, 5, 6] } }""")


def test_param_blob_lists_cannot_be_replaced_by_arrays():
    net = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }""")
    with pytest.raises(TypeError, match="cannot be changed"):
        net.params["ip"][0] = np.zeros(3)
    with pytest.raises(TypeError):
        net.layers[1].blobs.append(np.zeros(3))
    assert net.params["ip"][0].data.shape == (2, 3) and len(net.params["ip"]) == 2


@pytest.mark.parametrize("value,match", [(None, "got None"), (3.0, "single number"),
                                         ([np.ones((3,)), np.ones((4,))], "not an array of numbers")])
def test_forward_and_forward_all_refuse_none_scalars_and_ragged_lists(value, match):
    net = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }""")
    # None became NaN everywhere and a number was broadcast over the batch, silently.
    with pytest.raises(NetError, match=match):
        net.forward(x=value)
    with pytest.raises(NetError, match=match):
        net.forward_all(x=value)


def test_double_makes_later_blobs_double_too():
    # Input blobs first touched after net.double() (and every blob of a net without
    # parameters) follow the conversion, as docs/pycaffe.md says.
    net = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }""")
    net.double()
    net.blobs["x"].data[...] = 1 / 3
    out = net.forward()
    assert net.blobs["x"].data.dtype == np.float64 and out["y"].dtype == np.float64
    plain = net_from_text("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "a" type: "AbsVal" bottom: "x" top: "y" }""")
    plain.double().to("cpu")  # a later device move keeps the float type
    plain.blobs["x"].data[...] = 1 / 3
    assert plain.forward()["y"].dtype == np.float64
    assert plain.forward()["y"][0, 0] == 1 / 3  # no float32 rounding on the way


def test_every_path_argument_takes_str_bytes_or_pathlike(tmp_path):
    """One rule for paths (save_hdf5 of bytes raised tempfile's TypeError; Net(model, bytes
    weights, phase) printed only the signature; load_hdf5 and Net(bytes) already took them)."""
    import pathlib

    from pycaffe_alt.errors import ArgumentTypeError

    model = tmp_path / "m.prototxt"
    model.write_text('layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 3 } } }\n'
                     'layer { name: "p" type: "InnerProduct" bottom: "a" top: "p" '
                     'inner_product_param { num_output: 2 } }')
    net = caffe.Net(str(model), caffe.TEST)
    w = bytes(tmp_path / "w.caffemodel")
    net.save(w)
    net.save_hdf5(bytes(tmp_path / "w.h5"))
    assert net.copy_from(pathlib.Path(os.fsdecode(w))) == ["p"]
    net.load_hdf5(bytes(tmp_path / "w.h5"))
    again = caffe.Net(bytes(model), w, caffe.TEST)
    assert np.array_equal(again.params["p"][0].data, net.params["p"][0].data)
    for call in (lambda: net.save(5), lambda: net.copy_from(None), lambda: net.save_hdf5(""),
                 lambda: net.load_hdf5(3.5)):
        with pytest.raises(ArgumentTypeError, match="takes a file path"):
            call()


def test_forward_from_a_middle_layer_reads_what_the_blobs_hold(tmp_path):
    """Caffe's ForwardFromTo runs on whatever the bottoms hold: zeros on a fresh net, the
    last values otherwise (a KeyError came out of Net.run before)."""
    net = net_from_text("""
    layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "p" type: "InnerProduct" bottom: "a" top: "p" inner_product_param { num_output: 4
      bias_filler { type: "constant" value: 0.5 } } }
    layer { name: "q" type: "InnerProduct" bottom: "p" top: "q" inner_product_param { num_output: 2
      bias_filler { type: "constant" value: 0.25 } } }
    """)
    out = net.forward(start="q")
    np.testing.assert_allclose(out["q"], np.full((2, 2), 0.25))  # zeros through q's weights
    net.blobs["p"].data[...] = 1.0
    expected = net.params["q"][0].data.sum(1) + 0.25
    np.testing.assert_allclose(net.forward(start="q")["q"], np.tile(expected, (2, 1)), rtol=1e-6)


def test_a_program_without_init_log_stays_quiet(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "legacy.prototxt"
    model.write_text('input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4\n'
                     'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    code = f"import pycaffe_alt as caffe; caffe.Net({str(model)!r}, caffe.TEST)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=root))
    # The legacy-input upgrade note went to stderr through Python's last-resort handler.
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host copies of GPU blobs)")
def test_reading_gpu_weights_between_forward_and_backward():
    # On a GPU .data is a host copy pushed back before the next computation; the push must not
    # count as an in-place change of a weight the forward saved for its backward.
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN, device="cuda")
    net.forward(data=np.random.rand(2, 1, 28, 28).astype(np.float32), label=np.array([1, 2]))
    w = net.params["conv1"][0].data.copy()
    net.backward()
    np.testing.assert_array_equal(net.params["conv1"][0].data, w)
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


def test_pycaffe_backward_after_a_torch_backward_of_the_module_form():
    # The module form's graph is the caller's: after a torch backward freed it, a pycaffe
    # backward says what to do (not torch's "backward through the graph a second time");
    # running the layers again would update BatchNorm averages twice and draw new Dropout masks.
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3.0, 5.0])
    net.loss(net(data=x, label=y)).backward()
    with pytest.raises(NetError, match="freed this pass's graph") as e:
        net.backward()
    assert "retain_graph=True" in str(e.value)
    net.forward(data=x.numpy(), label=y.numpy())  # a new pass: backward works again
    net.clear_param_diffs()
    net.backward()
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


@pytest.mark.parametrize("read_blobs", [False, True], ids=["", "after a blob read"])
def test_pycaffe_backward_leaves_the_callers_graph_alone(read_blobs):
    # A tensor the caller computed (here from a leaf of its own) and fed to the module form:
    # pycaffe's backward fills the net's diffs and stops at the net's input, as Caffe's Backward
    # ends at the input blob; the caller's leaf gets no gradient from it. Reading the input
    # blobs gives pycaffe its own copies, but the pass's graph still starts from the caller's
    # tensor (its leaf got a gradient).
    net = caffe.Net(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                    caffe.TRAIN)
    scale = torch.ones((), requires_grad=True)
    net(data=torch.rand(2, 1, 28, 28) * scale, label=torch.tensor([3.0, 5.0]))
    if read_blobs:
        assert net.blobs["data"].data.shape == (2, 1, 28, 28) and net.blobs["label"].data.size == 2
    net.backward()
    assert scale.grad is None
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


def test_a_layers_own_phase_wins_over_the_nets():
    # Caffe's Net::Init sets a layer's phase from the net's only when the layer sets none
    # (Bayesian SegNet samples with Dropout layers marked TRAIN in its TEST net); the layer
    # keeps it when the net switches with train()/eval().
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 500 } } }\n'
            'layer { name: "own" type: "Dropout" bottom: "x" top: "own" phase: TRAIN }\n'
            'layer { name: "net" type: "Dropout" bottom: "x" top: "net" }\n'
            'layer { name: "off" type: "Dropout" bottom: "x" top: "off" phase: TEST }\n')
    for phase in (caffe.TEST, caffe.TRAIN):
        net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase)
        for switch in (None, net.eval, net.train):
            if switch is not None:
                switch()
            net.forward(x=np.ones((4, 500), np.float32))
            dropped = {n: float((net.blobs[n].data == 0).mean()) for n in ("own", "net", "off")}
            assert 0.3 < dropped["own"] < 0.7 and dropped["off"] == 0.0, (phase, switch, dropped)
            net_trains = phase == caffe.TRAIN if switch is None else switch == net.train
            assert (dropped["net"] > 0.3) == net_trains


def test_a_loss_layer_with_two_tops_needs_a_loss_weight_per_top():
    # Caffe's LossLayer adds one loss_weight (1) when none is given; SetLossWeights then CHECKs
    # one value per top, so a SoftmaxWithLoss with a probability top needs both weights.
    head = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 2 } } }\n')
    two = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" top: "p"'
    with pytest.raises(NetError, match="2 tops and no loss_weight") as e:
        caffe.Net(parse_text(head + two + " }", caffe_pb2.NetParameter()), caffe.TEST)
    assert "loss_weight: 1" in str(e.value)
    net = caffe.Net(parse_text(head + two + " loss_weight: 1 loss_weight: 0 }",
                               caffe_pb2.NetParameter()), caffe.TEST)
    assert net.loss_tops == ["l"]
