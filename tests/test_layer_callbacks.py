"""pycaffe master's per-layer callbacks (net.before_forward & co., pycaffe_alt/layer_callbacks.py):
Caffe's order, where the backward ones fall, the solver's training pass, BVLC's train.py timing."""

import numpy as np
import pytest

import pycaffe_alt as caffe
from lenet_case import lenet, lenet_solver
from pycaffe_alt.errors import CaffeError

KINDS = ("before_forward", "after_forward", "before_backward", "after_backward")


def record(net):
    events = []
    for kind in KINDS:
        getattr(net, kind)(lambda i, kind=kind: events.append((kind, i)))
    return events


def caffe_order(kinds, indices):
    return [(k, i) for i in indices for k in kinds]


def test_every_layer_in_caffes_order():
    # Net::ForwardFromTo: before(i), Forward, after(i) for i up; BackwardFromTo: the same from
    # the top down, for every layer, also those with no backward (data, label).
    net = lenet()
    events = record(net)
    n = len(net.layers)
    net.forward()
    assert events == caffe_order(KINDS[:2], range(n))
    events.clear()
    net.backward()
    assert events == caffe_order(KINDS[2:], reversed(range(n)))
    events.clear()
    net.forward(start="conv2", end="ip1")
    names = list(net._layer_names)
    assert events == caffe_order(KINDS[:2], range(names.index("conv2"), names.index("ip1") + 1))
    events.clear()
    net.backward(start="ip2", end="pool1")
    assert events == caffe_order(KINDS[2:], range(names.index("ip2"), names.index("pool1") - 1, -1))


def test_a_layers_backward_callbacks_surround_its_gradient():
    # One autograd pass runs the backward; before_backward(i) comes when layer i's top gradient
    # is ready and after_backward(i) once its parameter diffs are made.
    net = lenet()
    names = list(net._layer_names)
    seen = {}

    def has_diff(i):
        params = net.params.get(names[i])
        return None if params is None else bool(np.abs(params[0].diff).sum() > 0)

    net.before_backward(lambda i: seen.setdefault(("before", names[i]), has_diff(i)))
    net.after_backward(lambda i: seen.setdefault(("after", names[i]), has_diff(i)))
    net.forward()
    net.clear_param_diffs()
    net.backward()
    for layer in ("conv1", "conv2", "ip1", "ip2"):
        assert seen[("before", layer)] is False and seen[("after", layer)] is True, layer


def test_the_solvers_training_pass_calls_them(tmp_path):
    # BVLC's python/train.py --timing registers them on solver.net and times solver.step().
    solver = lenet_solver(tmp_path, iter_size=2)
    net = solver.net
    events = record(net)
    fprop = [caffe.Timer() for _ in net.layers]
    bprop = [caffe.Timer() for _ in net.layers]
    net.before_forward(lambda layer: fprop[layer].start())
    net.after_forward(lambda layer: fprop[layer].stop())
    net.before_backward(lambda layer: bprop[layer].start())
    net.after_backward(lambda layer: bprop[layer].stop())
    solver.step(1)
    n = len(net.layers)
    one_pass = caffe_order(KINDS[:2], range(n)) + caffe_order(KINDS[2:], reversed(range(n)))
    assert events == one_pass * 2  # iter_size 2: two forward/backward passes
    conv = list(net._layer_names).index("conv1")
    assert fprop[conv].ms > 0 and bprop[conv].ms > 0


def test_a_compiled_net_runs_its_layers_one_by_one_for_the_callbacks():
    net = lenet(compile=True)
    events = record(net)
    net.forward()
    assert events == caffe_order(KINDS[:2], range(len(net.layers)))


def test_a_callback_that_is_not_callable_is_refused():
    net = lenet()
    with pytest.raises(CaffeError, match=r"net.after_backward\(\) needs a callable") as e:
        net.after_backward(3)
    assert "lambda layer" in str(e.value)


def test_an_exception_in_a_callback_leaves_no_hook_behind():
    net = lenet()
    calls, failed = [], []

    def fail_once(i):
        calls.append(i)
        if not failed:
            failed.append(i)
            raise RuntimeError("stop")

    net.before_backward(fail_once)
    net.forward()
    with pytest.raises(RuntimeError, match="stop"):
        net.backward()
    calls.clear()
    net.backward()  # one call per layer: no hook of the failed backward fires again
    assert calls == list(reversed(range(len(net.layers))))


def test_nccl_of_one_solver_changes_nothing(tmp_path):
    # BVLC's python/train.py on one device: new_uid, NCCL(solver, uid), bcast, then the NCCL
    # object as a solver callback and as the net's layer-wise after_backward reduce.
    plain, reduced = lenet_solver(tmp_path), lenet_solver(tmp_path)
    uid = caffe.NCCL.new_uid()
    assert isinstance(uid, bytes) and uid != caffe.NCCL.new_uid()
    nccl = caffe.NCCL(reduced, uid)
    nccl.bcast()
    reduced.add_callback(nccl)
    reduced.net.after_backward(nccl)
    plain.step(3)
    reduced.step(3)
    for name, blobs in plain.net.params.items():
        for a, b in zip(blobs, reduced.net.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(CaffeError, match="needs a solver"):
        caffe.NCCL(plain.net, uid)
