"""Fuzz round 12: the tools' less-visited flags, pycaffe-alt run, caffe.io, net surgery."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(args, cwd=None, timeout=120):
    """``python3 ARGS`` with this checkout first on the path, under a timeout (a hang fails)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("module, says", [
    (".", "'.' is a relative module name"),
    (".x", "'.x' is a relative module name"),
    ("json", "'json' is a package without a __main__ module"),
])
def test_run_m_of_a_relative_name_or_a_package_without_main_is_one_paragraph(tmp_path, module, says):
    # importlib's "no package specified" and runpy's "cannot be directly executed" ImportErrors
    # came with a traceback; python3 -m says both in one line.
    r = run_tool(["-m", "pycaffe_alt.run", "-m", module], cwd=tmp_path)
    assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, says", [
    (["--y", ""], "--y names no quantity to plot"),
    (["--y", ",,"], "--y names no quantity to plot"),
    (["--out", "{tmp}/figure.pdf"], "its name must end in .png"),
])
def test_plot_training_log_without_quantities_or_with_a_non_png_name_is_refused(tmp_path, args, says):
    # `--y ""` reached matplotlib's "Number of rows must be a positive integer" traceback; an
    # --out of figure.pdf was silently written as PNG bytes.
    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.tools import plot_training_log

    log = os.path.join(ROOT, "tests", "fixtures", "golden", "solvers", "sgd_fixed", "train.log")
    argv = [log, "--out", str(tmp_path / "figure.png")] + [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(CaffeError, match=says):
        plot_training_log.main(argv)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shape, label_shape", [((2, 5), (2,)), ((2, 5, 3, 3), (2, 1, 3, 3))])
def test_torchscript_export_with_a_softmax_loss_compiles(tmp_path, shape, label_shape):
    # On 2-D scores the generated code reshaped the label to `[n, 1] + []`, which TorchScript
    # types as a list of tensors: the conversion failed with "this is a bug in pycaffe_alt's
    # exporter" though docs/convert.md lists SoftmaxWithLoss for the torchscript format.
    from pycaffe_alt.export import convert

    dims = lambda s: " ".join(f"dim: {d}" for d in s)  # noqa: E731
    layer = ('type: "InnerProduct" inner_product_param { num_output: 4 axis: 1 '
             if len(shape) == 2 else 'type: "Convolution" convolution_param { num_output: 4 kernel_size: 1 ')
    proto = tmp_path / "loss.prototxt"
    proto.write_text(
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims(shape)} }} }} }}\n'
        f'layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ {dims(label_shape)} }} }} }}\n'
        f'layer {{ name: "score" {layer} weight_filler {{ type: "gaussian" std: 0.5 }} }} '
        'bottom: "data" top: "score" }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }\n')
    result = convert(str(proto), None, "torchscript", str(tmp_path / "loss.pt"), include_loss=True,
                     outputs=["loss"])
    assert result.outputs == ["loss"] and os.path.isfile(tmp_path / "loss.pt")


@pytest.mark.parametrize("to, out, flag", [("caffemodel", "net.prototxt", "--model"),
                                           ("onnx", "w.caffemodel", "--weights"),
                                           ("pytorch", "w.py", "--weights")])
def test_convert_model_never_writes_over_its_own_inputs(tmp_path, to, out, flag):
    # `--to caffemodel --out net.prototxt` replaced the net definition with binary weights, and
    # `--to onnx --out W.caffemodel` the weights with an ONNX file, without a word.
    import shutil

    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.tools import convert_model

    golden = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")
    shutil.copy(os.path.join(golden, "net.prototxt"), tmp_path / "net.prototxt")
    weights = "w.pt" if to == "pytorch" else "w.caffemodel"  # the .py's companion is NAME.pt
    shutil.copy(os.path.join(golden, "weights.caffemodel"), tmp_path / weights)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CaffeError, match=f"is the {flag} file the conversion reads"):
        convert_model.main(["--model", str(tmp_path / "net.prototxt"), "--weights",
                            str(tmp_path / weights), "--to", to, "--out", str(tmp_path / out)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("output", ["data.mdb", "lock.mdb"])
def test_compute_image_mean_does_not_write_over_its_input_database(tmp_path, output):
    # `compute_image_mean DB DB/data.mdb` replaced the database with its own mean and said
    # "written"; the next read of DB failed with MDB_INVALID.
    import shutil

    from pycaffe_alt.errors import DataError
    from pycaffe_alt.tools import compute_image_mean

    db = tmp_path / "db"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "golden", "data", "mnist_train_lmdb"), db)
    before = (db / output).read_bytes()
    with pytest.raises(DataError, match="is a file of the input database"):
        compute_image_mean.main([str(db), str(db / output)])
    assert (db / output).read_bytes() == before
    # A mean written next to the records, under its own name, is still fine (twice too).
    for _ in range(2):
        assert compute_image_mean.main([str(db), str(db / "mean.binaryproto")]) == 0


def test_caffe_io_helpers_name_their_bad_arguments():
    # numpy's "could not convert string to float", Python's "'NoneType' object is not
    # iterable" and scikit-image's "Spline interpolation order has to be in the range 0-5"
    # escaped; an interp_order of 7 passed silently for a constant image.
    import numpy as np

    import pycaffe_alt as caffe
    from pycaffe_alt.errors import ArgumentTypeError, DataError

    with pytest.raises(ArgumentTypeError, match=r"array_to_datum\(\) takes an array of numbers"):
        caffe.io.array_to_datum(np.array([[["a"]]]))
    # What pycaffe's arr.astype(float) takes still converts.
    assert list(caffe.io.array_to_datum(np.array([[["2"]]])).float_data) == [2.0]
    assert list(caffe.io.array_to_datum(np.array([[[1, 2.5]]], dtype=object)).float_data) == [1.0, 2.5]
    with pytest.raises(ArgumentTypeError, match="takes a list of arrays, got NoneType"):
        caffe.io.arraylist_to_blobprotovector_str(None)
    for image in (np.random.rand(4, 4, 3), np.zeros((4, 4, 3)), np.random.rand(4, 4, 2)):
        for order in (-1, 6):
            with pytest.raises(DataError, match=f"interp_order {order} is not a spline order"):
                caffe.io.resize_image(image, (2, 2), interp_order=order)
    with pytest.raises(ArgumentTypeError, match="interp_order must be a whole number"):
        caffe.io.resize_image(np.zeros((4, 4, 3)), (2, 2), interp_order="linear")
    assert caffe.io.resize_image(np.random.rand(4, 4, 3), (2, 2), interp_order=3).shape == (2, 2, 3)


def test_classifier_predict_names_a_bad_list_of_images(tmp_path):
    # predict(None) / a generator raised "has no len()", a nested list "'list' object has no
    # attribute 'shape'", and images of 1 then 3 (or 3 then 4) channels numpy's broadcast error.
    import numpy as np

    import pycaffe_alt as caffe
    from pycaffe_alt.errors import ArgumentTypeError, DataError

    proto = tmp_path / "deploy.prototxt"
    proto.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n')
    clf = caffe.Classifier(str(proto), None)
    rgb, grey = np.random.rand(10, 12, 3), np.random.rand(10, 12, 1)
    for bad in (None, (x for x in [rgb]), "abc"):
        with pytest.raises(ArgumentTypeError, match="takes a list of H x W x K images"):
            clf.predict(bad)
    for images, says in (([grey, rgb], "image 1 has 3 channels, image 0 has 1"),
                         ([rgb, np.random.rand(10, 12, 4)], "image 1 has 4 channels, image 0 has 3")):
        with pytest.raises(DataError, match=says):
            clf.predict(images)
    # What pycaffe runs still runs: nested lists, a grey image broadcast into a colour batch.
    assert clf.predict([rgb.tolist()]).shape == (1, 5)
    assert clf.predict([rgb, grey], oversample=False).shape == (2, 5)


PY_CLASSES = '''
import caffe


class NoReshape(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def forward(self, bottom, top):
        top[0].data[...] = 1


class NoForward(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)


class NotALayer:
    pass
'''


@pytest.mark.parametrize("cls, says", [
    ("NoReshape", "class '{mod}.NoReshape' does not define reshape"),
    ("NoForward", "class '{mod}.NoForward' does not define forward"),
    ("NotALayer", "class '{mod}.NotALayer' has no setup\\(\\) method"),
])
def test_a_python_layer_class_without_a_method_caffe_calls_is_one_paragraph(tmp_path, monkeypatch,
                                                                             cls, says):
    # The base class's NotImplementedError (and a plain class's AttributeError on 'setup') came
    # with a traceback through pycaffe_alt's python_layer.py, and named no layer at forward.
    import uuid

    from pycaffe_alt.tools import time_net

    mod = f"round12_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(PY_CLASSES)
    proto = tmp_path / "net.prototxt"
    proto.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
        f'layer {{ name: "py" type: "Python" bottom: "data" top: "out" python_param {{ module: "{mod}" '
        f'layer: "{cls}" }} }}\n')
    monkeypatch.chdir(tmp_path)
    from pycaffe_alt.errors import NetError
    try:
        with pytest.raises(NetError, match=says.format(mod=mod)) as info:
            time_net.main(["--model", str(proto), "--allow-python", "--iterations", "1"])
        assert "layer 'py' (type Python)" in str(info.value)
    finally:
        sys.modules.pop(mod, None)


TINY_TRAIN_NET = '''
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
'''


@pytest.mark.parametrize("fmt", ["HDF5", "BINARYPROTO"])
def test_restoring_a_snapshot_whose_weights_lack_a_layer_warns(tmp_path, fmt, caplog):
    # The layer kept its random initial values while its history was restored, without a word
    # (tools/test and convert_model warn about such weights since round 8).
    import h5py
    from google.protobuf import text_format

    import pycaffe_alt as caffe
    from pycaffe_alt.proto import caffe_pb2

    p = caffe_pb2.SolverParameter()
    text_format.Parse(TINY_TRAIN_NET, p.net_param)
    text_format.Parse('type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 4 random_seed: 1', p)
    p.snapshot_format = getattr(caffe_pb2.SolverParameter, fmt)
    p.snapshot_prefix = str(tmp_path / "snap")
    (tmp_path / "solver.prototxt").write_text(text_format.MessageToString(p))
    first = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    first.step(2)
    weights, state = first.snapshot()
    if fmt == "HDF5":
        with h5py.File(weights, "r+") as f:
            del f["data/ip2"]
    else:
        net_param = caffe_pb2.NetParameter()
        with open(weights, "rb") as f:
            net_param.ParseFromString(f.read())
        kept = [layer for layer in net_param.layer if layer.name != "ip2"]
        del net_param.layer[:]
        net_param.layer.extend(kept)
        with open(weights, "wb") as f:
            f.write(net_param.SerializeToString())
    second = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    caplog.clear()
    second.restore(state)
    assert "no weights for 1 of the net's 2 layers with parameters ('ip2')" in caplog.text
    caplog.clear()
    caffe.get_solver(str(tmp_path / "solver.prototxt")).restore(first.snapshot()[1])
    assert "no weights for" not in caplog.text


@pytest.mark.parametrize("field", ["support_batch_size: 2000000000 gap_iter: 1",
                                   "weight_step: CONVEX exact_batch_size: 2000000000"])
def test_alternation_pass_batches_beyond_memory_are_refused_when_the_solver_is_built(tmp_path, field):
    # A support pass of 2e9 records per batch (the dataset wrapped millions of times) filled
    # memory for minutes instead of failing.
    from alternation_case import solver_param

    from pycaffe_alt.alternation.solver import AlternationSolver
    from pycaffe_alt.errors import SolverError

    name = field.split()[-2].rstrip(":") if "exact" in field else "support_batch_size"
    with pytest.raises(SolverError, match=f"{name} 2000000000 makes the pass's 'data' batch "
                                          r".* more than the .* of memory"):
        AlternationSolver(solver_param(tmp_path, field))


def test_dsd_phases_longer_than_any_max_iter_do_not_ask_for_that_max_iter(tmp_path):
    # The hint said "set max_iter: 6442450941", a value max_iter (an int32) cannot hold.
    from test_dsd import dsd_param

    from pycaffe_alt.errors import SolverError
    from pycaffe_alt.solver.solver import get_solver

    big = 2 ** 31 - 1
    param = dsd_param(tmp_path, f"dense_iter: {big} sparse_iter: {big} redense_iter: {big} "
                                "prune_by: MAGNITUDE sparsity: 0.5")
    with pytest.raises(SolverError, match="= 6442450941") as info:
        get_solver(param)
    assert "set max_iter: 6442450941" not in str(info.value)
    assert "their sum must fit max_iter (at most 2147483647)" in str(info.value)


def test_a_negative_max_exact_patterns_is_named_as_such(tmp_path):
    # It was reported as "num_patterns 0 is more than max_exact_patterns (-5)".
    from convex_case import Case, fc_data

    from pycaffe_alt.errors import SolverError

    X, y = fc_data()
    with pytest.raises(SolverError, match=r"max_exact_patterns must be > 0, got -5"):
        Case(tmp_path, X, y, convex="max_exact_patterns: -5").run()


def test_an_idx_header_whose_size_wraps_int64_is_refused_as_truncated(tmp_path):
    # 2^31 x 2^16 x 2^16 bytes wrapped numpy's int64 product to a negative size, which passed
    # the truncation check and failed in numpy's reshape with a traceback.
    import struct

    from pycaffe_alt.errors import DataError
    from pycaffe_alt.tools import convert_mnist

    images, labels = tmp_path / "images.idx", tmp_path / "labels.idx"
    images.write_bytes(struct.pack(">IIII", 2051, 2 ** 31, 2 ** 16, 2 ** 16) + bytes(12))
    labels.write_bytes(struct.pack(">II", 2049, 3) + bytes(3))
    with pytest.raises(DataError, match=r"IDX file is truncated: header says 2147483648x65536x65536"):
        convert_mnist.convert(str(images), str(labels), str(tmp_path / "db"))
    assert not (tmp_path / "db").exists()


def test_a_mean_file_that_is_a_fifo_or_folder_is_not_called_a_weights_file(tmp_path):
    # "mean_file 'm' cannot be read: 'm' is a FIFO (named pipe), not a weights file".
    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.weights import read_binaryproto

    fifo = tmp_path / "mean.binaryproto"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(CaffeError) as info:
            read_binaryproto(str(path))
        assert "not a BlobProto file (.binaryproto)" in str(info.value)
        assert "weights file" not in str(info.value)


def test_convert_relu_refuses_one_file_for_both_outputs(tmp_path):
    # The converted weights were written over the converted prototxt and both "wrote" lines
    # were printed.
    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.tools import convert_relu

    golden = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")
    out = tmp_path / "out.prototxt"
    with pytest.raises(CaffeError, match="OUT.prototxt and --out-weights are the same file"):
        convert_relu.main([os.path.join(golden, "net.prototxt"), str(out), "--weights",
                           os.path.join(golden, "weights.caffemodel"), "--out-weights",
                           str(tmp_path / "." / "out.prototxt")])
    assert not list(tmp_path.iterdir())


def test_solver_and_draw_entry_points_name_arguments_of_the_wrong_type(tmp_path):
    # os.fspath's "expected str, bytes or os.PathLike object, not NoneType" and draw's
    # "'Net' object has no attribute 'name'" escaped as plain TypeError/AttributeError.
    import pycaffe_alt as caffe
    from pycaffe_alt import draw
    from pycaffe_alt.errors import ArgumentTypeError
    from pycaffe_alt.proto import caffe_pb2

    for call, says in ((lambda: caffe.get_solver(None), r"get_solver\(\) takes a file path"),
                       (lambda: caffe.get_solver(5), r"get_solver\(\) takes a file path"),
                       (lambda: caffe.SGDSolver(None), r"Solver\(\) takes a file path"),
                       (lambda: draw.draw_net_to_file(None, str(tmp_path / "n.dot")),
                        "caffe.draw takes a caffe_pb2.NetParameter, got NoneType"),
                       (lambda: draw.draw_net_to_file(caffe_pb2.NetParameter(), None),
                        r"draw_net_to_file\(\) takes a file path")):
        with pytest.raises(ArgumentTypeError, match=says):
            call()
    proto = tmp_path / "net.prototxt"
    proto.write_text('layer { name: "data" type: "Input" top: "data" '
                     'input_param { shape { dim: 1 dim: 2 } } }\n')
    with pytest.raises(ArgumentTypeError, match="caffe.draw takes a caffe_pb2.NetParameter, got Net"):
        draw.draw_net_to_file(caffe.Net(str(proto), caffe.TEST), str(tmp_path / "n.dot"))
    assert not list(tmp_path.glob("*.dot"))


def test_an_empty_site_dir_is_refused_not_taken_as_this_environment(tmp_path, monkeypatch):
    # `install-caffe-alias --site-dir ""` (an unset "$SITE") wrote the alias into this Python's
    # own site-packages; the uninstall removed it from there.
    from pycaffe_alt.errors import CaffeError
    from pycaffe_alt.tools import caffe_alias

    site = tmp_path / "site"  # stands for this Python's site-packages
    site.mkdir()
    monkeypatch.setattr(caffe_alias, "default_site_dir", lambda: str(site))
    for main in (caffe_alias.install_main, caffe_alias.uninstall_main):
        with pytest.raises(CaffeError, match="--site-dir is empty"):
            main(["--site-dir", ""])
    assert not list(site.iterdir())
    (tmp_path / "afile").write_text("")
    with pytest.raises(CaffeError, match="'.*afile' is not a folder"):
        caffe_alias.install_main(["--site-dir", str(tmp_path / "afile")])


def test_path_refusals_say_an_before_vowel_sounds(tmp_path):
    # "is a directory, not a image list", "not a IDX file", "not a HDF5 weights file".
    from pycaffe_alt.errors import DataError
    from pycaffe_alt.fileio import check_input_path

    for what, says in (("image list", "not an image list"), ("IDX file", "not an IDX file"),
                       ("HDF5 weights file", "not an HDF5 weights file"),
                       ("weights file", "not a weights file")):
        with pytest.raises(DataError, match=f"is a directory, {says}\n"):
            check_input_path(str(tmp_path), DataError, what)


def test_convert_shape_for_a_data_layers_label_alone_names_the_missing_data_top(tmp_path):
    # The data top got the label's shape (N,) and conv1 failed with "axis 1 is out of range for
    # a 1-axis bottom".
    from pycaffe_alt.errors import NetError
    from pycaffe_alt.export import convert

    case = os.path.join(ROOT, "tests", "fixtures", "golden", "solvers", "sgd_fixed")
    with pytest.raises(NetError, match="--shape gives label but not 'data', the data top of Data "
                                       "layer 'mnist'"):
        convert(os.path.join(case, "net.prototxt"), os.path.join(case, "init.caffemodel"), "onnx",
                str(tmp_path / "net.onnx"), shapes={"label": (2,)})
    assert not list(tmp_path.iterdir())
