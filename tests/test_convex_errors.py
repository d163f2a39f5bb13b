"""Nets and settings the Convex solver refuses: one clear paragraph naming the layer or field,
before anything is written; and the solver through tools/train (no cvxpy needed here)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from convex_case import CNN, DATA, FC, Case, fc_data
from pycaffe_alt.errors import SolverError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IP1 = ('layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" '
       'inner_product_param { num_output: 10 } }\n')
RELU = 'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'
IP = ('layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" '
      'inner_product_param {{ num_output: {out} }} }}\n')
EUCLID = 'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "label" top: "loss" }\n'

BAD_NETS = {
    "two_relu_layers": (IP1 + RELU.format(name="relu1", blob="ip1") +
                        IP.format(name="ip2", bottom="ip1", top="ip2", out=10) +
                        RELU.format(name="relu2", blob="ip2") +
                        IP.format(name="ip3", bottom="ip2", top="out", out=1) + EUCLID,
                        "relu2", "ONE ReLU layer"),
    "softmax_loss": (IP1 + RELU.format(name="relu1", blob="ip1") +
                     IP.format(name="ip2", bottom="ip1", top="out", out=2) +
                     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" '
                     'bottom: "label" top: "loss" }\n', "loss", "EuclideanLoss"),
    "no_relu": (IP1 + IP.format(name="ip2", bottom="ip1", top="out", out=1) + EUCLID,
                "ip2", "ReLU"),
    "sigmoid": (IP1 + 'layer { name: "sig" type: "Sigmoid" bottom: "ip1" top: "ip1" }\n' +
                IP.format(name="ip2", bottom="ip1", top="out", out=1) + EUCLID, "sig", "ReLU"),
    "leaky": (IP1 + 'layer { name: "leaky" type: "ReLU" bottom: "ip1" top: "ip1" '
              'relu_param { negative_slope: 0.1 } }\n' +
              IP.format(name="ip2", bottom="ip1", top="out", out=1) + EUCLID,
              "leaky", "negative_slope"),
}


def _text(body: str) -> str:
    return DATA.replace("{{", "{").replace("}}", "}").replace("{batch}", "4") + body


def _expect(case: Case, layer: str, words: str):
    with pytest.raises(SolverError) as e:
        case.run()
    text = str(e.value)
    assert f"'{layer}'" in text and words in text, text
    assert "\n  hint:" in text and "Traceback" not in text
    assert not os.path.exists(os.path.dirname(case.prefix)) or \
        not os.listdir(os.path.dirname(case.prefix))


@pytest.mark.parametrize("name", sorted(BAD_NETS))
def test_nets_that_do_not_fit_name_the_layer(tmp_path, name):
    body, layer, words = BAD_NETS[name]
    X, y = fc_data()
    _expect(Case(tmp_path, X, y, net_text=_text(body)), layer, words)


def test_max_pooling_and_local_average_pooling_are_refused(tmp_path):
    X = np.random.default_rng(0).standard_normal((4, 1, 4, 4)).astype(np.float32)
    y = np.ones((4, 1), np.float32)
    text = CNN.format(src="{src}", batch=2, hidden=4, bias1="true", bias2="true", outputs=1)
    maxpool = text.replace("pool: AVE", "pool: MAX")
    (tmp_path / "a").mkdir()
    _expect(Case(tmp_path / "a", X, y, net_text=maxpool), "pool1", "MAX pooling")
    local = text.replace("global_pooling: true", "kernel_size: 2 stride: 1")
    (tmp_path / "b").mkdir()
    _expect(Case(tmp_path / "b", X, y, net_text=local), "pool1", "vector-output")


def test_input_layer_and_zero_bias_decay_are_refused(tmp_path):
    X, y = fc_data()
    text = FC.format(src="{src}", batch=4, hidden=10, bias1="true", bias2="true", outputs=1)
    (tmp_path / "a").mkdir()
    frozen = text.replace('type: "InnerProduct" bottom: "data" top: "ip1"',
                          'type: "InnerProduct" bottom: "data" top: "ip1" param { } '
                          'param { decay_mult: 0 }')
    _expect(Case(tmp_path / "a", X, y, net_text=frozen), "ip1", "seminorm")
    (tmp_path / "b").mkdir()
    inputs = ('layer { name: "input" type: "Input" top: "data" top: "label" input_param { '
              'shape { dim: 8 dim: 2 } shape { dim: 8 dim: 1 } } }\n') + \
        text[text.index('layer { name: "ip1"'):]
    _expect(Case(tmp_path / "b", X, y, net_text=inputs), "input", "Input layer")


@pytest.mark.parametrize("convex, words", [
    ("rho: -1", "rho must be finite and > 0"),
    ("rho: inf", "rho must be finite and > 0"),
    ("method: SAMPLED num_patterns: 1000000000", "more than max_exact_patterns"),
    ("num_patterns: -3", "num_patterns must be >= 0"),
    ("relaxation: 2.5", "relaxation must be in (0, 2)"),
    ("max_exact_patterns: 0", "max_exact_patterns must be > 0"),
    # inf tolerances "converged" at iteration 1 with a 94% duality gap (fuzz round 8).
    ("abs_tol: inf", "abs_tol must be finite and >= 0"),
    ("rel_tol: inf", "rel_tol must be finite and >= 0"),
    ("gap_tol: inf", "gap_tol must be finite and >= 0"),
])
def test_bad_convex_param_values(tmp_path, convex, words):
    X, y = fc_data()
    case = Case(tmp_path, X, y, convex=convex)
    with pytest.raises(SolverError) as e:
        case.run()
    assert words in str(e.value) and "convex_param" in str(e.value)


def test_no_weight_decay_and_too_many_patterns(tmp_path):
    X, y = fc_data()
    sub = tmp_path / "a"
    sub.mkdir()
    with pytest.raises(SolverError, match="weight_decay 0"):
        Case(sub, X, y, wd=0).run()
    case = Case(tmp_path, X, y, convex="max_exact_patterns: 20")
    with pytest.raises(SolverError, match="58 arrangement patterns, more than max_exact"):
        case.run()


def test_too_few_hidden_units_says_how_many_and_writes_nothing(tmp_path):
    X, y = fc_data()
    case = Case(tmp_path, X, y, hidden=1, convex="rho: 0.03", max_iter=300)
    with pytest.raises(SolverError, match=r"needs \d+ hidden units but layer 'ip1' has "
                       r"num_output 1") as e:
        case.run()
    assert "set num_output:" in str(e.value)
    assert not os.path.exists(os.path.dirname(case.prefix)) or \
        not any(f.endswith(".caffemodel") for f in os.listdir(os.path.dirname(case.prefix)))


def _train(solver_path: str, cwd: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train"), "--solver",
                           solver_path], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_tools_train_runs_the_convex_solver_and_sgd_fine_tunes_its_model(tmp_path):
    X, y = fc_data()
    case = Case(tmp_path, X, y, hidden=40, convex="method: ADMM rho: 0.03", max_iter=400,
                display=200)
    out = _train(case.solver_path, str(tmp_path))
    assert out.returncode == 0, out.stderr
    log = out.stderr + out.stdout
    assert "Iteration 200, objective = " in log and "lower bound = " in log and "gap = " in log
    assert "primal residual = " in log and "dual residual = " in log
    model = f"{case.prefix}_iter_400.caffemodel"
    assert os.path.isfile(model)
    # SGD fine-tuning reads it (Caffe's --weights) and starts from the written objective.
    from pycaffe_alt.solver.solver import get_solver

    sgd = tmp_path / "sgd.prototxt"
    sgd.write_text(f'net: "{case.net_path}" type: "SGD" base_lr: 0.0001 lr_policy: "fixed" '
                   f'max_iter: 1 weight_decay: 0.01 solver_mode: CPU\n')
    solver = get_solver(str(sgd), weights=(model,))
    assert abs(case.objective(net=solver.net.double()) - case.objective(model)) < 1e-9


def test_tools_train_reports_a_bad_net_in_one_paragraph(tmp_path):
    body, _, _ = BAD_NETS["softmax_loss"]
    X, y = fc_data()
    case = Case(tmp_path, X, y, net_text=_text(body))
    out = _train(case.solver_path, str(tmp_path))
    assert out.returncode != 0
    assert "SoftmaxWithLoss" in out.stderr and "Traceback" not in out.stderr


def test_memory_data_reads_the_same_training_set_as_hdf5(tmp_path):
    X, y = fc_data()
    hdf5 = Case(tmp_path, X, y, batch=3, hidden=60, convex="rho: 0.03", max_iter=200)
    a = hdf5.run()
    memory = tmp_path / "memory.prototxt"
    text = open(hdf5.net_path).read()
    start = text.index("layer {", 1)        # everything after the HDF5Data layer
    memory.write_text('layer { name: "data" type: "MemoryData" top: "data" top: "label" '
                      'memory_data_param { batch_size: 4 channels: 2 height: 1 width: 1 } }\n'
                      + text[start:])
    solver_text = open(hdf5.solver_path).read().replace(hdf5.net_path, str(memory)) \
        .replace(hdf5.prefix, str(tmp_path / "mem"))
    (tmp_path / "mem_solver.prototxt").write_text(solver_text)
    from pycaffe_alt.solver.solver import get_solver

    b = get_solver(str(tmp_path / "mem_solver.prototxt"))
    b.net.set_input_arrays(X.reshape(8, 2, 1, 1), y.reshape(8))
    b.solve()
    assert np.array_equal(a.problem.Z.numpy(), b.problem.Z.numpy())
    assert np.array_equal(a.problem.y.numpy(), b.problem.y.numpy())
    assert abs(a.result.objective - b.result.objective) <= 1e-12 * a.result.objective


def test_lenet_is_refused_for_its_second_convolution_not_its_max_pooling(tmp_path):
    """LeNet (conv1 -> pool1 MAX -> conv2 ...) switched to type "Convex": the hint "use pool:
    AVE" would not make it fit; the refusal names conv2, the second hidden layer."""
    text = open(os.path.join(ROOT, "solvers", "lenet_sgd.prototxt")).read()
    assert 'type: "SGD"' in text and 'net: "models/lenet/train_val.prototxt"' in text
    text = text.replace('type: "SGD"', 'type: "Convex"').replace(
        'snapshot_prefix: "snapshots/lenet/lenet_sgd"', f'snapshot_prefix: "{tmp_path}/lenet"')
    solver = tmp_path / "lenet_convex.prototxt"
    solver.write_text(text)
    out = _train(str(solver), ROOT)
    assert out.returncode != 0
    assert "layer 'conv2'" in out.stderr and "second hidden layer" in out.stderr, out.stderr
    assert "pool: AVE" not in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["lenet_convex.prototxt"]


def test_starting_weights_are_refused_not_ignored(tmp_path):
    """--weights (tools/train) and the solver file's weights field name a start the Convex solver
    cannot use: one paragraph, before anything is read or written."""
    X, y = fc_data()
    case = Case(tmp_path, X, y, hidden=10, convex="rho: 0.1", max_iter=5)
    model = tmp_path / "start.caffemodel"   # a valid model of this net (was read, then unused)
    import pycaffe_alt
    from pycaffe_alt.layers import TRAIN

    pycaffe_alt.Net(case.net_path, TRAIN).save(str(model))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train"), "--solver",
                          case.solver_path, "--weights", str(model)], cwd=str(tmp_path),
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "starting weights" in out.stderr and "--weights" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(os.path.dirname(case.prefix))
    with open(case.solver_path, "a") as f:
        f.write(f'weights: "{model}"\n')
    with pytest.raises(SolverError, match="starting weights") as e:
        case.run()
    assert "weights" in str(e.value).split("\n")[0] and "\n  hint:" in str(e.value)
