"""Fuzz round 15: layer callbacks and NCCL of one solver, solver-level call sequences, the
tools' unusual but valid invocations."""
import numpy as np
import pytest

from lenet_case import lenet, lenet_solver


def pass_state(net):
    """Every blob's data and diff and every parameter's data and diff after a pass."""
    state = {}
    for name, blob in net.blobs.items():
        state[name], state[name + ".diff"] = blob.data.copy(), blob.diff.copy()
    for name, blobs in net.params.items():
        for i, p in enumerate(blobs):
            state[f"{name}[{i}]"], state[f"{name}[{i}].diff"] = p.data.copy(), p.diff.copy()
    return state


@pytest.mark.parametrize("kind", ["before_forward", "after_forward"])
def test_a_forward_run_from_a_forward_callback_leaves_the_outer_pass_right(kind):
    # A callback that runs net.forward() inside the pass (Caffe's ForwardFromTo allows it: the
    # blobs then hold that pass's values, which the outer pass's next layers read). The outer
    # pass's record of in-place outputs was replaced by the inner one's: ip1's diff (ip1 is
    # rewritten in place by relu1) came out as the gradient of a value no loss depends on.
    plain = lenet()
    plain.forward()
    plain.backward()
    net = lenet()
    ran = []

    def forward_once(layer):
        if layer == 4 and not ran:
            ran.append(layer)
            net.forward()

    getattr(net, kind)(forward_once)
    net.forward()
    net.backward()
    assert ran == [4]
    got, want = pass_state(net), pass_state(plain)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("kind, layer", [("after_forward", 5), ("before_backward", 5),
                                         ("after_backward", 8), ("before_forward", 9)])
def test_a_backward_run_from_a_callback_inside_a_pass_is_refused_by_name(kind, layer):
    # It failed with "a torch backward on the outputs of the module call freed this pass's
    # graph", about a module call the user never made; the net must work afterwards.
    from pycaffe_alt.errors import NetError

    plain = lenet()
    plain.forward()
    plain.backward()
    net = lenet()
    fired = []

    def backward_once(i):
        if i == layer and not fired:
            fired.append(i)
            net.backward()

    getattr(net, kind)(backward_once)
    with pytest.raises(NetError) as info:
        net.forward()
        net.backward()
    message = str(info.value)
    assert f"backward() called from a {kind} callback (layer '{net._layer_names[layer]}'" in \
        message and "module call" not in message, message
    net.clear_param_diffs()
    net.forward()
    net.backward()  # the callback fired once: no more backward from inside
    got, want = pass_state(net), pass_state(plain)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_backward_from_the_last_after_backward_callback_accumulates_again():
    # Once the autograd pass is over (the bottom layer's after_backward), a backward is Caffe's
    # second BackwardFromTo: the parameter diffs accumulate twice.
    plain = lenet()
    plain.forward()
    plain.backward()
    net = lenet()
    fired = []
    net.after_backward(lambda i: i == 0 and not fired and (fired.append(i) or net.backward()))
    net.forward()
    net.backward()
    for name, blobs in plain.params.items():
        for a, b in zip(net.params[name], blobs):
            np.testing.assert_allclose(a.diff, 2 * b.diff, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("iter_size", [0, -2])
def test_iter_size_set_below_one_between_steps_is_a_solver_error(tmp_path, iter_size):
    # solver.param is writable (pycaffe's is a copy, ours the live message); iter_size 0 ran no
    # pass and failed with "'NoneType' object has no attribute 'detach'".
    from pycaffe_alt.errors import SolverError

    solver = lenet_solver(tmp_path)
    solver.step(1)
    solver.param.iter_size = iter_size
    with pytest.raises(SolverError, match=rf"iter_size must be >= 1 \(got {iter_size}"):
        solver.step(1)
    assert solver.iter == 1
    solver.param.iter_size = 1
    solver.step(1)
    assert solver.iter == 2
