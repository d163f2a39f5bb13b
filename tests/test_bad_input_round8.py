"""Fuzz round 8: inputs that ran forever, were accepted silently or were not named."""
import os

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import ArgumentTypeError, CaffeError, DataError, SolverError
from pycaffe_alt.mixed_precision import MixedPrecision
from pycaffe_alt.proto import caffe_pb2
from bad_input_case import make_fifo, no_hang
from train_case import HERE

ROOT = os.path.dirname(HERE)
LENET = os.path.join(ROOT, "models", "lenet")


def test_an_infinite_fp16_loss_scale_is_refused():
    # With loss_scale inf every step overflowed and was skipped: "Optimization Done", nothing learnt.
    param = caffe_pb2.SolverParameter(precision=caffe_pb2.SolverParameter.FP16,
                                      loss_scale=float("inf"))
    with pytest.raises(SolverError, match="loss_scale must be finite"):
        MixedPrecision.from_solver_param(param, None, "solver.prototxt")


def test_step_beyond_caffes_iteration_counter_is_refused(tmp_path):
    # pycaffe's Step(int) takes a C int: step(2**63) trained until killed.
    solver = tmp_path / "s.prototxt"
    solver.write_text(f'net: "{LENET}/train_val.prototxt" test_iter: 1 test_interval: 100000 '
                      f'max_iter: 10 base_lr: 0.01 lr_policy: "fixed" display: 0 '
                      f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU')
    s = caffe.get_solver(str(solver))
    for iters in (2 ** 31, 2 ** 63):
        with pytest.raises(SolverError, match="2\\^31 - 1"):
            s.step(iters)
    assert s.iter == 0


def test_a_datum_with_negative_dimensions_is_refused_by_name():
    datum = caffe_pb2.Datum(channels=-1, height=-4, width=4, data=bytes(16))
    with pytest.raises(DataError, match="negative dimension"):
        caffe.io.datum_to_array(datum)


def test_net_level_beyond_int32_is_refused_by_name():
    with pytest.raises(ArgumentTypeError, match="level must be a 32-bit integer"):
        caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST, level=2 ** 31)


def test_a_weights_file_that_cannot_be_upgraded_is_named(tmp_path):
    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    good = tmp_path / "w.caffemodel"
    net.save(str(good))
    mixed = caffe_pb2.NetParameter.FromString(good.read_bytes())
    mixed.layers.add().name = "ip2"  # both 'layer' and V1 'layers' entries
    bad = tmp_path / "mixed.caffemodel"
    bad.write_bytes(mixed.SerializeToString())
    with pytest.raises(CaffeError) as err:
        net.copy_from(str(bad))
    assert str(err.value).startswith(str(bad)) and "'layers'" in str(err.value)


def test_draw_net_output_paths_are_checked(tmp_path):
    # A folder or a missing folder gave tracebacks, a FIFO blocked forever.
    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    (tmp_path / "out.dot").mkdir()
    fifo = make_fifo(tmp_path, "pipe.dot")
    for out, words in ((tmp_path / "out.dot", "directory"), (tmp_path / "no" / "x.dot", "does not exist"),
                       (fifo, "FIFO")):
        with no_hang(), pytest.raises(CaffeError, match=words):
            caffe.draw.draw_net_to_file(net.net_param, str(out))
    caffe.draw.draw_net_to_file(net.net_param, str(tmp_path / "ok.dot"))
    assert (tmp_path / "ok.dot").read_text().startswith("digraph")


def test_tensor_forward_checks_names_keeps_the_callers_tensor_and_undoes_a_refused_pass():
    import torch

    from pycaffe_alt.errors import NetError

    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    x = np.random.RandomState(0).rand(1, 1, 28, 28).astype(np.float32)
    saved = x.copy()
    net.forward(data=torch.from_numpy(x))
    # A later pycaffe write goes into the blob's own memory, not into the caller's tensor.
    net.forward(data=np.zeros((1, 1, 28, 28), np.float32))
    net.blobs["data"].data[...] = 5
    np.testing.assert_array_equal(x, saved)
    for kwargs, words in ((dict(dat=torch.rand(1, 1, 28, 28)), "not a blob of this net"),
                          (dict(conv1=torch.rand(1, 20, 24, 24)), "not an input")):
        with pytest.raises(NetError, match=words):
            net.forward(**kwargs)
    with pytest.raises(CaffeError):
        net.forward(data=torch.zeros(1, 1, 4, 4))
    assert net.blobs["data"].data.shape == (1, 1, 28, 28)
    assert net.forward(data=np.zeros((1, 1, 28, 28), np.float32))["prob"].shape == (1, 10)


def test_hdf5_files_with_external_links_are_refused(tmp_path):
    # h5py follows an external link when the name is read: one to a FIFO blocked forever.
    import h5py

    from pycaffe_alt.errors import SolverError, WeightsError
    from pycaffe_alt.solver.snapshot import read_solverstate_h5, read_weights_h5

    fifo = make_fifo(tmp_path)
    weights = tmp_path / "w.h5"
    with h5py.File(weights, "w") as f:
        f["data/conv1/0"] = h5py.ExternalLink(fifo, "/x")
    state = tmp_path / "s.solverstate.h5"
    with h5py.File(state, "w") as f:
        f["iter"] = 3
        f["current_step"] = 0
        f["history/0"] = h5py.ExternalLink(fifo, "/x")
    rows = tmp_path / "rows.h5"
    with h5py.File(rows, "w") as f:
        f["data"] = h5py.ExternalLink(fifo, "/x")
        f["label"] = np.zeros(4, np.float32)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{rows}\n")
    with no_hang():
        with pytest.raises(WeightsError, match="keeps data in other files"):
            read_weights_h5(str(weights))
        with pytest.raises(SolverError, match="keeps data in other files"):
            read_solverstate_h5(str(state))
        net = tmp_path / "net.prototxt"
        net.write_text(f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" '
                       f'hdf5_data_param {{ source: "{listing}" batch_size: 2 }} }}')
        with pytest.raises(DataError, match="keeps data in other files"):
            caffe.Net(str(net), caffe.TRAIN)


def test_convert_relu_checks_both_outputs_before_writing_either(tmp_path):
    from pycaffe_alt.tools import convert_relu

    proto = tmp_path / "in.prototxt"
    proto.write_text('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 '
                     'dim: 4 dim: 4 } } }\nlayer { name: "c" type: "Convolution" bottom: "d" top: "c" '
                     'convolution_param { num_output: 2 kernel_size: 1 } }\n'
                     'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n')
    caffe.Net(str(proto), caffe.TEST).save(str(tmp_path / "in.caffemodel"))
    (tmp_path / "wdir").mkdir()
    for bad in (tmp_path / "wdir", tmp_path / "missing" / "w.caffemodel"):
        with pytest.raises(CaffeError, match="cannot write"):
            convert_relu.main(["--weights", str(tmp_path / "in.caffemodel"), "--out-weights",
                               str(bad), str(proto), str(tmp_path / "out.prototxt")])
        assert not (tmp_path / "out.prototxt").exists()


@pytest.mark.parametrize("layer, words", [
    ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: nan } '
     'inner_product_param { num_output: 2 } }', "lr_mult nan"),
    ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { decay_mult: inf } '
     'inner_product_param { num_output: 2 } }', "decay_mult inf"),
    ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" loss_weight: nan '
     'inner_product_param { num_output: 2 } }', "loss_weight"),
    ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: -1 } }',
     "eps -1"),
    ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: nan } }',
     "eps nan"),
])
def test_non_finite_net_values_are_refused_by_layer(layer, words):
    # They trained to "the loss became nan", blamed on the solver's base_lr.
    from pycaffe_alt.errors import NetError
    from pycaffe_alt.prototxt import parse_text

    text = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
    with pytest.raises(NetError, match=words) as err:
        caffe.Net(parse_text(text + layer, caffe_pb2.NetParameter()), caffe.TRAIN)
    assert "layer '" in str(err.value)


def test_non_finite_transform_values_and_means_are_refused(tmp_path):
    from pycaffe_alt.data.transformer import load_mean_file, spec_from_param
    from pycaffe_alt.weights import array_to_blob

    for tp in (caffe_pb2.TransformationParameter(scale=float("nan")),
               caffe_pb2.TransformationParameter(mean_value=[1.0, float("inf")])):
        with pytest.raises(DataError, match="finite"):
            spec_from_param(tp, True, "layer 'data'")
    mean = tmp_path / "mean.binaryproto"
    mean.write_bytes(array_to_blob(np.full((1, 3, 2, 2), np.nan, np.float32)).SerializeToString())
    with pytest.raises(DataError, match="non-finite"):
        load_mean_file(str(mean), "layer 'data'")


def test_scoring_a_net_some_layers_of_which_got_no_weights_warns(tmp_path):
    # A caffemodel cut at a layer boundary parses; tools/test scored random layers silently.
    import subprocess
    import sys

    from pycaffe_alt.weights import uncovered_warning

    assert uncovered_warning(["w"], ["a", "b"], ["a", "b"]) is None
    assert uncovered_warning(["w"], [], ["a", "b"]) is None  # nothing matched: its own error
    assert "no weights for 1 of the net's 2" in uncovered_warning(["w"], ["a"], ["a", "b"])
    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "full.caffemodel"))
    full = caffe_pb2.NetParameter.FromString((tmp_path / "full.caffemodel").read_bytes())
    cut = caffe_pb2.NetParameter()
    cut.layer.extend([lp for lp in full.layer if lp.name == "conv1"])
    (tmp_path / "cut.caffemodel").write_bytes(cut.SerializeToString())
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_model"), "--model",
                        os.path.join(LENET, "deploy.prototxt"), "--weights",
                        str(tmp_path / "cut.caffemodel"), "--to", "caffemodel", "--out",
                        str(tmp_path / "out.caffemodel")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no weights for 6 of the net's 7 layers" in r.stderr and "'conv2'" in r.stderr


def test_small_round8_checks(tmp_path):
    import argparse

    from pycaffe_alt.tools.cli import positive_seconds
    from pycaffe_alt.tools.plot_training_log import save_figure

    for bad in ("-5", "nan", "inf", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_seconds(bad)
    assert positive_seconds("2.5") == 2.5
    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    out = net.forward(blobs="ip1")  # one name, not its letters
    assert set(out) == {"prob", "ip1"}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fifo = make_fifo(tmp_path)
    with no_hang(), pytest.raises(CaffeError, match="FIFO"):
        save_figure(plt.figure(), fifo)


def test_hdf5_datasets_stored_in_other_files_are_refused(tmp_path):
    # Round 9: external storage and virtual datasets read another file too (a FIFO hung).
    import h5py

    from pycaffe_alt.errors import WeightsError
    from pycaffe_alt.solver.snapshot import read_weights_h5

    fifo = make_fifo(tmp_path)
    ext = tmp_path / "ext.h5"
    with h5py.File(ext, "w") as f:
        f.create_dataset("data/conv1/0", shape=(4,), dtype="f4", external=[(fifo, 0, 16)])
    virtual = tmp_path / "vds.h5"
    with h5py.File(virtual, "w") as f:
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(fifo, "x", shape=(4,))
        f.create_virtual_dataset("data/conv1/0", layout)
    with no_hang():
        for path, words in ((ext, "external file"), (virtual, "virtual dataset")):
            with pytest.raises(WeightsError, match=words):
                read_weights_h5(str(path))


def test_round9_pycaffe_passes(tmp_path):
    # A tensor-form pass then a pycaffe backward (fresh net: AttributeError before); an in-place
    # blob's diff from that pass; forward(end=) then backward reads the new lower blobs; a
    # refused tensor pass leaves every blob as it was; diffs='name' is one name.
    import torch

    from pycaffe_alt.prototxt import parse_text

    text = ('force_backward: true\n'
            'layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 3 '
            'dim: 1 dim: 8 dim: 8 } shape { dim: 3 } } }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { '
            'num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { '
            'num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    caffe.set_random_seed(0)
    param = parse_text(text, caffe_pb2.NetParameter())
    a, b = caffe.Net(param, caffe.TRAIN), caffe.Net(param, caffe.TRAIN)
    for p, q in zip(a.learnable_params, b.learnable_params):
        q.param.data.copy_(p.param.data)
    rs = np.random.RandomState(1)
    x, x2, lab = rs.rand(3, 1, 8, 8), rs.rand(3, 1, 8, 8), np.array([0, 1, 2])
    a.forward(data=torch.from_numpy(x).float().requires_grad_(), label=torch.from_numpy(lab).float())
    a.backward()
    b.forward(data=x, label=lab)
    b.backward()
    for name in ("conv", "data", "ip"):
        np.testing.assert_allclose(a.blobs[name].diff, b.blobs[name].diff, rtol=1e-5, atol=1e-6)
    assert set(b.backward(diffs="conv")) == {"conv", "data", "label"}
    with pytest.raises(ArgumentTypeError):
        b.backward(diffs=b"conv")
    # forward(end=) then backward: the gradients are those of the new data throughout.
    c = caffe.Net(param, caffe.TRAIN)
    for p, q in zip(a.learnable_params, c.learnable_params):
        q.param.data.copy_(p.param.data)
    c.forward(data=x, label=lab)
    c.forward(data=x2, end="ip")
    c.backward()
    d = caffe.Net(param, caffe.TRAIN)
    for p, q in zip(a.learnable_params, d.learnable_params):
        q.param.data.copy_(p.param.data)
    d.forward(data=x2, label=lab)
    d.backward()
    np.testing.assert_allclose(c.params["ip"][0].diff, d.params["ip"][0].diff, rtol=1e-5, atol=1e-7)
    assert np.abs(c.blobs["conv"].diff).sum() > 0
    # A refused tensor pass leaves every blob as it was.
    before = {k: v.data.copy() for k, v in d.blobs.items()}
    with pytest.raises(CaffeError):
        d.forward(data=torch.rand(3, 1, 10, 10))
    for k, v in d.blobs.items():
        np.testing.assert_array_equal(v.data, before[k])


def test_list_labels_are_ascii_decimals(tmp_path):
    # Python's int() took "1_0" as 10 and other scripts' digits; Caffe's atoi reads 1 and 0.
    from pycaffe_alt.layers.data import parse_image_list
    from pycaffe_alt.tools.convert_imageset import read_list_file

    for label in ("1_0", "\\uff12", "\\u0661"):
        listing = tmp_path / "list.txt"
        listing.write_text(f"a.png {label.encode().decode('unicode_escape')}\n", encoding="utf-8")
        with pytest.raises(DataError, match="list.txt:1"):
            parse_image_list(str(listing), "layer 'data'")
        with pytest.raises(DataError, match="list.txt:1"):
            read_list_file(str(listing))
    listing.write_text("a.png -3\nb c.png +4\n")
    assert parse_image_list(str(listing), "x") == [("a.png", -3), ("b c.png", 4)]


def test_convert_stages_and_the_cpu_switch_values(tmp_path, monkeypatch):
    from pycaffe_alt.cpu_fallback import GPU_AS_CPU_ENV, gpu_requests_run_on_cpu
    from pycaffe_alt.export import convert

    for value, on in (("1", True), (" true", True), ("YES", True), ("on", True), ("0", False),
                      ("", False), ("no", False)):
        monkeypatch.setenv(GPU_AS_CPU_ENV, value)
        assert gpu_requests_run_on_cpu() is on, value
    out = str(tmp_path / "m.caffemodel")
    assert convert(os.path.join(LENET, "deploy.prototxt"), None, "caffemodel", out,
                   stages=None).paths == [out]
    with pytest.raises(ArgumentTypeError, match="stages"):
        convert(os.path.join(LENET, "deploy.prototxt"), None, "caffemodel", out, stages=123)


def test_the_external_data_check_works_on_h5py_before_3_11(tmp_path, monkeypatch):
    # setup.py admits h5py 3.0; Group.visititems_links is 3.11+ (review of round 8).
    import h5py

    from pycaffe_alt.errors import WeightsError
    from pycaffe_alt.solver.snapshot import read_weights_h5

    monkeypatch.delattr(h5py.Group, "visititems_links", raising=False)
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f["data/conv1/0"] = np.zeros(3, np.float32)
        f["data/conv1/loop"] = f["data"]  # a hard-link cycle is walked once
        f["data/ip/0"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    with pytest.raises(WeightsError, match="'data/ip/0' links to"):
        read_weights_h5(str(path))


def test_review_replays_touch_only_what_changed():
    # A rewritten label re-records only the layers that read it (a BatchNorm above an
    # auxiliary loss updated its averages twice); forward(end=) then backward keeps the
    # Dropout masks below end; a tensor pass with end= then a pycaffe backward records the
    # layers above end again.
    import torch

    from pycaffe_alt.prototxt import parse_text

    text = ('layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 4 '
            'dim: 6 } shape { dim: 4 } } }\n'
            'layer { name: "ip0" type: "InnerProduct" bottom: "data" top: "h" inner_product_param { '
            'num_output: 8 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "drop" type: "Dropout" bottom: "h" top: "h" }\n'
            'layer { name: "aux" type: "InnerProduct" bottom: "h" top: "a" inner_product_param { '
            'num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "aux_loss" type: "SoftmaxWithLoss" bottom: "a" bottom: "label" top: "l1" }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "h" top: "b" }\n'
            'layer { name: "ip1" type: "InnerProduct" bottom: "b" top: "o" inner_product_param { '
            'num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "o" bottom: "label" top: "l2" }\n')
    param = parse_text(text, caffe_pb2.NetParameter())
    caffe.set_random_seed(2)
    net = caffe.Net(param, caffe.TRAIN)
    x = np.random.RandomState(0).rand(4, 6)
    net.forward(data=x, label=np.array([0, 1, 2, 0]))
    h = net.blobs["h"].data.copy()
    net.blobs["label"].data[...] = [2, 2, 1, 1]
    net.backward()
    assert float(net.params["bn"][2].data[0]) == 1.0  # one moving-average update, not two
    dropped = h == 0
    assert dropped.any() and (net.blobs["h"].diff[dropped] == 0).all()  # the forward's mask
    net.forward(data=x, label=np.array([0, 1, 2, 0]))
    net.forward(data=x, end="drop")
    mask = net.blobs["h"].data == 0  # this pass's Dropout mask
    net.backward()
    assert mask.any() and (net.blobs["h"].diff[mask] == 0).all()
    # Tensor form with end=, then a pycaffe backward: the upper layers are recorded again.
    net2 = caffe.Net(param, caffe.TEST)
    net2.forward(data=x, label=np.array([0, 1, 2, 0]))
    net2.forward(data=torch.from_numpy(2 * x).float(), end="ip0")
    net2.backward()
    ref = caffe.Net(param, caffe.TEST)
    for p, q in zip(net2.learnable_params, ref.learnable_params):
        q.param.data.copy_(p.param.data)
    ref.forward(data=2 * x, label=np.array([0, 1, 2, 0]))
    ref.backward()
    np.testing.assert_allclose(net2.params["ip1"][0].diff, ref.params["ip1"][0].diff,
                               rtol=1e-5, atol=1e-7)


def test_copy_from_logs_the_source_layers_it_ignores(tmp_path, caplog):
    # Caffe's CopyTrainedLayersFrom logs "Ignoring source layer X": fine-tuners read it to spot
    # a renamed layer that kept its initial weights.
    import logging

    net = caffe.Net(os.path.join(LENET, "deploy.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "w.caffemodel"))
    full = caffe_pb2.NetParameter.FromString((tmp_path / "w.caffemodel").read_bytes())
    for lp in full.layer:
        if lp.name == "ip2":
            lp.name = "ip2_old"
    (tmp_path / "renamed.caffemodel").write_bytes(full.SerializeToString())
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        net.copy_from(str(tmp_path / "renamed.caffemodel"))
    assert [r.getMessage() for r in caplog.records if "Ignoring" in r.getMessage()] == \
        ["Ignoring source layer ip2_old"]
