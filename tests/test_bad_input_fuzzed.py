"""Bad input found by a fuzz campaign: each case gave a traceback, a hang or a silently wrong
result before, and must now give one error naming the file, field, layer or blob."""
import os
import shutil

import numpy as np
import pytest

import pycaffe_alt as caffe
from bad_input_case import make_fifo, no_hang
from pycaffe_alt.errors import CaffeError, DataError, NetError, SolverError, WeightsError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text, read_net
from pycaffe_alt.solver.lr_policy import learning_rate
from pycaffe_alt.solver.snapshot import read_solverstate
from pycaffe_alt.weights import read_net_weights

HERE = os.path.dirname(os.path.abspath(__file__))
LENET = os.path.join(HERE, "fixtures", "golden", "nets", "lenet_loss")


def lenet(phase=caffe.TEST):
    return caffe.Net(os.path.join(LENET, "net.prototxt"),
                     os.path.join(LENET, "weights.caffemodel"), phase)


def net_from(text, phase=caffe.TEST):
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def corrupt_first(raw: bytes, text: bytes) -> bytes:
    """``raw`` with the first byte of ``text`` replaced by 0xff (not UTF-8)."""
    at = raw.index(text)
    return raw[:at] + b"\xff" + raw[at + 1:]


def test_caffemodel_with_a_non_utf8_layer_name_is_refused(tmp_path):
    # Before: the layer's weights silently did not load (its name no longer matched).
    raw = open(os.path.join(LENET, "weights.caffemodel"), "rb").read()
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(corrupt_first(raw, b"conv1"))
    with pytest.raises(WeightsError, match=r"layer\[\d+\]\.name is not valid UTF-8"):
        read_net_weights(str(bad))
    with pytest.raises(CaffeError, match="UTF-8"):
        read_net(str(bad))  # the binary NetParameter reader (draw_net, upgrades)


def test_solverstate_with_a_non_utf8_path_is_refused(tmp_path):
    state = caffe_pb2.SolverState(iter=3, learned_net="snap_iter_3.caffemodel")
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(corrupt_first(state.SerializeToString(), b"snap"))
    with pytest.raises(SolverError, match="learned_net is not valid UTF-8"):
        read_solverstate(str(bad))


@pytest.mark.parametrize("state, message", [
    (caffe_pb2.SolverState(iter=2**31 - 1), "largest int32"),
    (caffe_pb2.SolverState(iter=3, learned_net=""), "learned_net is empty"),
])
def test_solverstate_values_that_cannot_be_resumed(tmp_path, state, message):
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(state.SerializeToString())
    with pytest.raises(SolverError, match=message):
        read_solverstate(str(bad))


def test_lmdb_whose_data_file_is_a_fifo_does_not_hang(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    make_fifo(db, "data.mdb")
    net = tmp_path / "net.prototxt"
    net.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                   f'data_param {{ source: "{db}" batch_size: 2 backend: LMDB }} }}')
    with no_hang(20), pytest.raises(DataError, match="FIFO"):
        caffe.Net(str(net), caffe.TEST)


def test_decaying_sigmoid_rate_reaches_zero_instead_of_overflowing():
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="sigmoid", gamma=-0.2, stepsize=1)
    assert learning_rate(p, 100) > 0
    assert learning_rate(p, 3600) == 0.0  # math.exp overflowed here (OverflowError)
    assert learning_rate(p, 10**9) == 0.0


@pytest.mark.parametrize("field, value", [("momentum", 1.0), ("momentum2", 2.0),
                                          ("momentum", -0.1)])
def test_adam_rejects_hyper_parameters_it_cannot_run_with(tmp_path, field, value):
    net = tmp_path / "net.prototxt"
    shutil.copy(os.path.join(LENET, "net.prototxt"), net)
    p = caffe_pb2.SolverParameter(net=str(net), base_lr=0.01, type="Adam", momentum=0.9,
                                  momentum2=0.999, lr_policy="fixed")
    setattr(p, field, value)
    with pytest.raises(SolverError, match=f"Adam needs 0 <= {field} < 1"):
        caffe.get_solver(p)


def test_top_names_follow_caffes_one_source_rule():
    inputs = ('layer { name: "in" type: "Input" top: "data" top: "d2" '
              'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }')
    # Eltwise writing its second bottom: accumulated across forwards before.
    with pytest.raises(NetError, match="'d2' \\(top 0\\) is produced by more than one layer"):
        net_from(inputs + 'layer { name: "a" type: "Eltwise" bottom: "data" bottom: "d2" '
                          'top: "d2" }')
    with pytest.raises(NetError, match="'data' \\(top 1\\)"):
        net_from(inputs + 'layer { name: "s" type: "Slice" bottom: "data" top: "data" '
                          'top: "data" slice_param { axis: 1 slice_point: 1 } }')
    # In place (top i named as bottom i) stays allowed.
    net_from(inputs + 'layer { name: "r" type: "ReLU" bottom: "d2" top: "d2" }')


def test_a_layer_failing_after_a_reshape_names_itself():
    net = lenet()
    net.blobs["data"].reshape(4, 1, 28, 28)  # the label blob keeps its old batch size
    net.reshape()
    with pytest.raises(NetError, match=r"layer '\w+' \(type \w+\): failed on bottoms of shapes"):
        net.forward()


def test_blob_shapes_follow_caffes_limits():
    net = lenet()
    with pytest.raises(NetError, match="negative dimension"):
        net.blobs["data"].reshape(-1, 1, 28, 28)
    dims = " ".join("dim: 1" for _ in range(33))
    with pytest.raises(NetError, match="33 axes; Caffe allows at most 32"):
        net_from(f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} '
                 '} }')


@pytest.mark.parametrize("call, message", [
    (lambda n: n.forward(blobs=["nope"]), "no blob named 'nope'"),
    (lambda n: n.backward(diffs=["nope"]), "no blob named 'nope'"),
    (lambda n: n.backward(nope=np.zeros(1)), "no blob named 'nope'"),
    (lambda n: n.forward(data=np.zeros((2, 2, 5, 5))), "has shape \\(2, 2, 5, 5\\)"),
    (lambda n: n.forward(data="hello"), "not an array of numbers"),
    (lambda n: n.forward(conv1=np.zeros((2, 20, 24, 24))), "not an input of this net"),
    (lambda n: n.copy_from(None), r"copy_from\(\) takes a file path"),
])
def test_pycaffe_calls_with_bad_arguments_raise_caffe_errors(call, message):
    with pytest.raises(CaffeError, match=message):
        call(lenet())


@pytest.mark.parametrize("kwargs, message", [
    ({"phase": 7}, "caffe.TRAIN"), ({"phase": caffe.TEST, "stages": [1]}, "list of strings"),
    ({"phase": caffe.TEST, "level": "a"}, "integer"),
])
def test_net_constructor_arguments_are_checked(kwargs, message):
    with pytest.raises(TypeError, match=message):  # ArgumentTypeError: a TypeError and CaffeError
        caffe.Net(os.path.join(LENET, "net.prototxt"), **kwargs)


def test_set_random_seed_range():
    with pytest.raises(CaffeError, match="set_random_seed"):
        caffe.set_random_seed(2**80)
    caffe.set_random_seed(2**40)


def test_python_layer_module_that_does_not_compile_or_names_a_function(tmp_path, monkeypatch):
    (tmp_path / "broken_mod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    layer = ('layer {{ name: "p" type: "Python" bottom: "x" top: "y" '
             'python_param {{ module: "{}" layer: "{}" }} }}')
    inputs = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 } } }'
    for module, cls, message in (("broken_mod", "L", "does not compile"),
                                 ("os", "getcwd", "not a class")):
        with pytest.raises(NetError, match=message):
            caffe.Net(parse_text(inputs + layer.format(module, cls), caffe_pb2.NetParameter()),
                      caffe.TEST, allow_python=True)


def test_hdf5data_source_that_is_an_hdf5_file(tmp_path):
    import h5py

    h5 = tmp_path / "d.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = np.zeros((2, 3), np.float32)
    with pytest.raises(DataError, match="is an HDF5 file, not a list of them"):
        net_from(f'layer {{ name: "h" type: "HDF5Data" top: "data" '
                 f'hdf5_data_param {{ source: "{h5}" batch_size: 2 }} }}')


@pytest.mark.parametrize("dims, values", [((5, 5), [1.0, 2.0]), ((-1,), [1.0, 2.0, 3.0]),
                                          ((2 ** 32, 2 ** 32), [])])  # wraps to 0 in int64
def test_blobproto_whose_count_does_not_match_its_shape(dims, values):
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=dims), data=values)
    with pytest.raises(DataError, match="holds"):
        caffe.io.blobproto_to_array(blob)


def test_log_tools_say_what_a_bad_log_path_is(tmp_path):
    from pycaffe_alt.tools import parse_log, plot_training_log

    fifo = make_fifo(tmp_path)
    for path, message in ((fifo, "FIFO"), (str(tmp_path), "is a directory"),
                          (str(tmp_path / "none.log"), "does not exist")):
        with no_hang(20), pytest.raises(CaffeError, match=message):
            parse_log.main([path, str(tmp_path)])
        with no_hang(20), pytest.raises(CaffeError, match=message):
            plot_training_log.main(["0", str(tmp_path / "p.png"), path])


def test_include_and_exclude_error_names_the_file(tmp_path):
    net = tmp_path / "incl.prototxt"
    net.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } '
                   'include { phase: TEST } exclude { phase: TRAIN } }')
    with pytest.raises(NetError, match="incl.prototxt: layer 'in': specify either include"):
        caffe.Net(str(net), caffe.TEST)


@pytest.mark.parametrize("image, swap", [(np.zeros((8, 8, 4)), None), (np.zeros((8, 8)), None),
                                         (np.zeros((8, 8, 3)), (2, 1, 7))])
def test_transformer_with_an_image_that_does_not_fit(image, swap):
    t = caffe.io.Transformer({"data": (1, 3, 8, 8)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.zeros(3))
    if swap:
        t.set_channel_swap("data", swap)
    with pytest.raises(DataError, match="cannot preprocess an image of shape"):
        t.preprocess("data", image)


def test_resize_and_oversample_refuse_impossible_sizes():
    with pytest.raises(DataError, match="cannot resize"):
        caffe.io.resize_image(np.zeros((0, 8, 3)), (4, 4))
    with pytest.raises(DataError, match="cannot take 8 x 8 crops"):
        caffe.io.oversample([np.zeros((4, 4, 3))], (8, 8))


def test_parse_log_delimiter_must_be_one_character(tmp_path):
    from pycaffe_alt.tools import parse_log

    log = tmp_path / "train.log"
    log.write_text("I1203 10:00:00.000000  1 solver.cpp:218] Iteration 0, loss = 2.3\n")
    with pytest.raises(CaffeError, match="one character"):
        parse_log.main([str(log), str(tmp_path), "--delimiter", "abc"])


@pytest.mark.parametrize("tool, args", [
    ("test", ["--model", "m.prototxt", "--iterations", "3000000000"]),
    ("time_net", ["--model", "m.prototxt", "-iterations=-2147483649"]),
    ("train", ["--solver", "s.prototxt", "--level", "2147483648"]),
    ("convert_imageset", [".", "list.txt", "db", "--resize_width", "99999999999"]),
])
def test_int32_flags_refuse_values_gflags_would(tool, args, capsys):
    # Before: accepted, then a run that never ends or a failure far from the flag.
    import importlib

    main = importlib.import_module(f"pycaffe_alt.tools.{tool}").main
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "32-bit signed integer" in capsys.readouterr().err


def test_assigning_a_blob_array_of_the_wrong_shape_names_the_blob():
    net = lenet()
    net.blobs["data"].data = 0.5  # broadcasts, as numpy's assignment does
    assert float(net.blobs["data"].data.max()) == 0.5
    with pytest.raises(NetError, match=r"shape \(3, 3\) to Blob\('data'.*\)\.data"):
        net.blobs["data"].data = np.ones((3, 3))
    with pytest.raises(NetError, match=r"\.diff"):
        net.params["conv1"][0].diff = "not numbers"


def test_convert_imageset_with_an_empty_list_writes_nothing(tmp_path, capsys):
    from pycaffe_alt.tools.convert_imageset import main

    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(DataError, match="names no image"):
        main([str(tmp_path) + "/", str(tmp_path / "list.txt"), str(tmp_path / "db")])
    assert not (tmp_path / "db").exists()
    assert "wrote" not in capsys.readouterr().out


def test_convert_relu_with_corrupt_weights_writes_no_prototxt(tmp_path):
    from pycaffe_alt.tools.convert_relu import main

    (tmp_path / "bad.caffemodel").write_bytes(b"\xff\xff\xff garbage")
    out = tmp_path / "out.prototxt"
    with pytest.raises(CaffeError):
        main([os.path.join(LENET, "net.prototxt"), str(out), "--weights",
              str(tmp_path / "bad.caffemodel"), "--out-weights", str(tmp_path / "o.caffemodel")])
    assert not out.exists() and not (tmp_path / "o.caffemodel").exists()


def test_solverstate_naming_a_folder_as_its_weights_says_so(tmp_path):
    from pycaffe_alt.solver.snapshot import snapshot_companion

    (tmp_path / "snapdir").mkdir()
    with pytest.raises(SolverError, match="'.*snapdir' is a directory, not a file"):
        snapshot_companion(str(tmp_path / "snapdir"), str(tmp_path / "x.solverstate"),
                           "the weights", "keep them together")


# ---------------------------------------------------------------- second campaign (2026-12-03)
def test_a_layer_named_like_a_module_attribute_builds():
    # Before: TypeError from nn.Module.train() ("cannot assign 'bool' as child module").
    net = net_from("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "training" type: "ReLU" bottom: "data" top: "t" }""")
    net.blobs["data"].data[...] = -1.0
    assert float(net.forward()["t"].max()) == 0.0 and net.training is False


@pytest.mark.parametrize("to, out, message", [
    ("onnx", "pipe", "it is a FIFO"),
    ("pytorch", "code", r"does not end in \.py"),
    ("pytorch", "pt_dir.py", r"pt_dir\.pt is a directory"),
])
def test_convert_model_checks_every_output_path_before_writing(tmp_path, to, out, message):
    from pycaffe_alt.export import convert

    make_fifo(tmp_path)
    (tmp_path / "pt_dir.pt").mkdir()
    with no_hang(30), pytest.raises(CaffeError, match=message):
        convert(os.path.join(LENET, "net.prototxt"), os.path.join(LENET, "weights.caffemodel"),
                to=to, out=str(tmp_path / out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "pt_dir.pt"]


@pytest.mark.parametrize("field, message", [
    ("warmup_epochs: nan", "warm-up must be >= 0 and finite"),
    ("gap_epochs: inf", "the gap must be >= 0 and finite"),
    ("support_beta: nan", "support_beta must be >= 0 and finite"),
    ("min_improvement: nan", "min_improvement must be >= 0 and finite"),
])
def test_alternation_values_that_are_not_finite_are_refused(tmp_path, field, message):
    from alternation_case import solver_param
    from pycaffe_alt.alternation.solver import AlternationSolver

    with pytest.raises(SolverError, match=message):
        AlternationSolver(solver_param(tmp_path, field))


def test_sigmoid_policy_with_a_nan_gamma_is_refused():
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="sigmoid", gamma=float("nan"),
                                  stepsize=10)
    with pytest.raises(SolverError, match="gamma must be finite"):
        learning_rate(p, 1)


def test_forward_backward_all_with_a_scalar_loss_gives_one_value_per_batch():
    net = lenet()
    x = np.random.rand(3, 1, 28, 28).astype(np.float32)  # batch 2: two batches
    outs, diffs = net.forward_backward_all(data=x, label=np.zeros(3, np.float32))
    assert outs["loss"].shape == (2,) and np.all(np.isfinite(outs["loss"]))
    assert diffs["data"].shape == (3, 1, 28, 28)


def test_forward_all_refuses_inputs_of_different_lengths():
    with pytest.raises(NetError, match="different lengths: data 4, label 3"):
        lenet().forward_all(data=np.zeros((4, 1, 28, 28)), label=np.zeros(3))


def test_backward_over_a_reversed_range_runs_nothing():
    net = lenet(caffe.TRAIN)
    net.forward(data=np.random.rand(2, 1, 28, 28), label=np.array([1, 2]))
    before = net.params["conv1"][0].diff.copy()
    net.backward(start="conv1", end="ip2")  # Caffe's BackwardFromTo(0, 5): no layer
    np.testing.assert_array_equal(net.params["conv1"][0].diff, before)


def test_reshaping_a_blob_beyond_any_memory_names_it(monkeypatch):
    # Within Caffe's INT_MAX count (beyond it is round 19's BlobSizeError), beyond 1 GiB.
    net = lenet()
    monkeypatch.setattr("pycaffe_alt.blob_memory.physical_memory", lambda: 2 ** 30)
    with pytest.raises(NetError, match="blob 'data' of shape .* needs"):
        net.blobs["data"].reshape(2, 3, 10000, 10000)


def test_run_allow_python_lets_an_unchanged_program_import_its_layer_module(tmp_path):
    import subprocess
    import sys

    (tmp_path / "mylayer.py").write_text(
        "import caffe\nclass Double(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data\n"
        "    def backward(self, top, propagate_down, bottom): pass\n")
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "double" type: "Python" bottom: "x" top: "y" '
        'python_param { module: "mylayer" layer: "Double" } }\n')
    (tmp_path / "prog.py").write_text(
        "import caffe\nnet = caffe.Net('net.prototxt', caffe.TEST)\n"
        "net.blobs['x'].data[...] = [1, 3]\nprint(net.forward()['y'].tolist())\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    env.pop("PYCAFFE_ALT_ALLOW_PYTHON", None)
    run = [sys.executable, "-m", "pycaffe_alt.run"]
    refused = subprocess.run(run + ["prog.py"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and "run --allow-python" in refused.stderr
    allowed = subprocess.run(run + ["--allow-python", "prog.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "[[2.0, 6.0]]" in allowed.stdout, allowed.stderr


def test_cifar_labels_outside_the_datasets_classes_are_refused(tmp_path):
    import pickle

    from pycaffe_alt.tools.convert_cifar import read_split

    (tmp_path / "b").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                               b"labels": [3, 11]}))
    with pytest.raises(DataError, match="label 11 is outside cifar10's 10 classes"):
        read_split(str(tmp_path), "cifar10", "python", ["b"], "fine")


def test_mnist_image_file_with_no_pixels_is_refused(tmp_path):
    import struct

    from pycaffe_alt.tools.convert_mnist import convert

    (tmp_path / "img").write_bytes(struct.pack(">IIII", 2051, 5, 0, 28))
    (tmp_path / "lab").write_bytes(struct.pack(">II", 2049, 5) + bytes(5))
    with pytest.raises(DataError, match="5 x 0 x 28"):
        convert(str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "db"))
    assert not (tmp_path / "db").exists()


def test_save_and_share_with_name_a_wrong_argument():
    net = lenet()
    with pytest.raises(CaffeError, match="save\\(\\) takes a file path"):
        net.save(None)
    with pytest.raises(CaffeError, match="share_with\\(\\) takes another Net"):
        net.share_with("x")


# The default outputs follow Caffe's rule, so both name the in-place output that is the input.
@pytest.mark.parametrize("outputs, message", [(None, "also inputs"), (["data"], "also inputs")])
def test_export_of_a_net_with_nothing_between_input_and_output_is_refused(outputs, message):
    from pycaffe_alt.export import lower_net

    net = net_from("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "r" type: "ReLU" bottom: "data" top: "data" }""")
    with pytest.raises(NetError, match="nothing to export: .*" + message):
        lower_net(net, outputs)


def test_export_check_accepts_nan_where_the_net_gives_nan(tmp_path):
    # Before: "does not reproduce the net ... relative difference nan", blaming the exporter.
    from pycaffe_alt.export import convert

    (tmp_path / "n.prototxt").write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param '
        '{ num_output: 4 weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "p" type: "Power" bottom: "ip" top: "p" power_param { power: 0.5 } }\n')
    result = convert(str(tmp_path / "n.prototxt"), to="pytorch", out=str(tmp_path / "m.py"))
    assert os.path.exists(result.paths[0])


def test_a_nan_label_is_named_as_nan():
    # Before: "label -9223372036854775808 is outside ..." (NaN converted to INT64_MIN).
    with pytest.raises(NetError, match="label nan is outside the 10 classes"):
        lenet().forward(data=np.zeros((2, 1, 28, 28)), label=np.array([np.nan, 1]))


@pytest.mark.parametrize("call, message", [
    # Fuzz round 6 (2026-12-04): numpy/Python errors that named no argument before.
    (lambda: caffe.io.resize_image(np.zeros((4, 4, 3)), (float("nan"), 4)),
     r"resize_image\(\) new_dims must be a whole number"),
    (lambda: caffe.io.Transformer({"data": 5}), "input 'data' shape must be a sequence"),
    (lambda: caffe.io.Transformer({"data": "abcd"}), "input 'data' shape must be a sequence"),
    (lambda: caffe.io.Transformer({"data": (1, 3, 8, 8)}).set_transpose("data", None),
     r"set_transpose\(\) order must be a sequence"),
    (lambda: caffe.io.Transformer({"data": (1, 3, 8, 8)}).set_mean("data", np.zeros((3, 0, 8))),
     "mean of shape \\(3, 0, 8\\) is empty"),
    (lambda: caffe.io.Transformer({"data": (1, 3, 8, 8)}).set_mean("data", ["a", "b", "c"]),
     r"set_mean\(\) mean takes an array of numbers"),
    (lambda: caffe.io.Transformer({"data": (1, 3, 8, 8)}).preprocess("data", "abc"),
     r"preprocess\(\) data takes an array of numbers"),
    (lambda: caffe.set_device("a"), r"set_device\(\) device id must be a whole number"),
    (lambda: caffe.set_device(-2), "GPU number >= 0"),
    (lambda: caffe.Net(None, caffe.TEST), r"Net\(\) network_file takes a file path"),
    (lambda: caffe.to_proto(5), r"to_proto\(\) takes the tops"),
])
def test_pycaffe_helpers_name_a_bad_argument(call, message):
    with pytest.raises(CaffeError, match=message):
        call()


def test_a_stray_control_byte_in_a_text_prototxt_is_located(tmp_path):
    from pycaffe_alt.prototxt import read_net

    path = tmp_path / "nul.prototxt"
    path.write_bytes(b'layer { name: "da\x00ta" type: "Input" top: "data" '
                     b'input_param { shape { dim: 1 } } }\n')
    # It was reported as a corrupt binary NetParameter.
    with pytest.raises(CaffeError, match=r"nul.prototxt:1:18: control character 0x00"):
        read_net(str(path))


def test_parse_log_says_an_output_folder_is_a_file(tmp_path):
    from pycaffe_alt.tools import parse_log

    log = tmp_path / "a.log"
    log.write_text("I1204 solver.cpp:1] Iteration 10, loss = 0.5\n")
    (tmp_path / "notadir").write_text("x")
    with pytest.raises(CaffeError, match="is a file, not a folder"):
        parse_log.main([str(log), str(tmp_path / "notadir")])


def test_an_empty_batch_gives_caffes_loss_and_accuracy(tmp_path):
    # Caffe: loss 0 over its normalizer max(1, 0); the reference's accuracy 0 / 0. Both failed
    # inside torch (an ambiguous reshape of 0 elements, a min() of nothing).
    path = tmp_path / "empty.prototxt"
    path.write_text(
        'layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 0 dim: 3 } } }\n'
        'layer { name: "l" type: "Input" top: "l" input_param { shape { dim: 0 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "d" bottom: "l" top: "loss" }\n'
        'layer { name: "acc" type: "Accuracy" bottom: "d" bottom: "l" top: "acc" }\n')
    out = caffe.Net(str(path), caffe.TEST).forward()
    assert float(out["loss"]) == 0.0 and np.isnan(out["acc"])


# -- fuzz round 7 (2026-12-04): export arguments, state_dicts, layer edge values ---------------
def test_convert_state_dict_files_and_arguments_are_checked(tmp_path):
    import torch

    from pycaffe_alt.export import convert

    model = tmp_path / "m.prototxt"
    model.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                     'dim: 3 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                     'inner_product_param { num_output: 2 } }\n')
    out = str(tmp_path / "m.onnx")
    fifo = make_fifo(tmp_path)
    with no_hang(30), pytest.raises(WeightsError, match="FIFO"):  # torch.load waited forever
        convert(str(model), None, "onnx", out, state_dict=fifo)
    bad = tmp_path / "sd.pt"
    torch.save({"ip.weight": "not a tensor"}, bad)
    with pytest.raises(WeightsError, match="entries that are not tensors: ip.weight"):
        convert(str(model), None, "onnx", out, state_dict=str(bad))
    with pytest.raises(WeightsError, match="holds a int, not a state_dict"):
        convert(str(model), None, "onnx", out, state_dict=5)
    for kw, match in ((dict(verify=[0]), "1..4096"), (dict(verify=[-1]), "1..4096"),
                      (dict(shapes={"data": (1, 2.5)}), "whole number"),
                      (dict(shapes={"data": None}), "sequence of sizes"),
                      (dict(outputs=[5]), "takes blob names")):
        with pytest.raises(CaffeError, match=match):
            convert(str(model), None, "onnx", out, **kw)
    # A string of names is the CLI's comma-separated list, not its characters.
    assert convert(str(model), None, "onnx", out, outputs="ip", verify=False).outputs == ["ip"]


@pytest.mark.parametrize("layer,match", [
    ('type: "Clip" clip_param { min: nan max: 1 }', "must be numbers, not NaN"),
    ('type: "Upsample" upsample_param { scale_h: 3 }', "only one of scale_h/scale_w"),
])
def test_layer_values_round_7(layer, match):
    with pytest.raises(NetError, match=match):
        net_from('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 2 '
                 f'dim: 3 dim: 3 }} }} }}\nlayer {{ name: "l" bottom: "d" top: "t" {layer} }}')


def test_exp_with_a_huge_shift_is_inf_and_empty_batches_pass(tmp_path):
    # math.exp raised "math range error"; Caffe's exp gives inf. Normalize and flat ArgMax
    # failed on N = 0 (an ambiguous reshape); Caffe loops zero times.
    net = net_from('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 2 } } }\n'
                   'layer { name: "e" type: "Exp" bottom: "d" top: "e" exp_param { shift: 1000 } }')
    assert np.all(np.isinf(net.forward()["e"]))
    empty = net_from(
        'layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 0 dim: 3 dim: 2 dim: 2 } } }\n'
        'layer { name: "n" type: "Normalize" bottom: "d" top: "n" }\n'
        'layer { name: "a" type: "ArgMax" bottom: "d" top: "a" }')
    out = empty.forward()
    assert out["n"].shape == (0, 3, 2, 2) and out["a"].shape[0] == 0
