"""Caffe's recurrent layers (RNN, LSTM, LSTMUnit) against independent references.

The LSTM is checked against torch.nn.LSTM (Caffe's gate order input, forget, output, candidate
permuted to torch's input, forget, candidate, output), the RNN against its equations written out,
LSTMUnit's hand-written backward against autograd; the state rules (carried across forwards,
reset by cont = 0), parameter order and the random stream's advance follow Caffe's
recurrent_layer.cpp / lstm_layer.cpp / rnn_layer.cpp.
"""
import numpy as np
import pytest
import torch

import pycaffe_alt as caffe
from pycaffe_alt import caffe_rng
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers.recurrent import lstm_unit
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text

T, N, D, H = 4, 3, 5, 6
UNIFORM = 'weight_filler { type: "uniform" min: -0.5 max: 0.5 } ' \
          'bias_filler { type: "uniform" min: -0.5 max: 0.5 }'


def recurrent_net(kind="LSTM", static=0, expose=False, extra_layers="", phase=caffe.TRAIN,
                  t=T, force_backward=True):
    bottoms = 'bottom: "x" bottom: "cont"'
    shapes = f"shape {{ dim: {t} dim: {N} dim: {D} }} shape {{ dim: {t} dim: {N} }}"
    tops = 'top: "x" top: "cont"'
    if static:
        bottoms += ' bottom: "xs"'
        shapes += f" shape {{ dim: {N} dim: {static} }}"
        tops += ' top: "xs"'
    states = ("h0", "c0") if kind == "LSTM" else ("h0",)
    out_tops = 'top: "y"'
    if expose:
        for s in states:
            bottoms += f' bottom: "{s}"'
            shapes += f" shape {{ dim: 1 dim: {N} dim: {H} }}"
            tops += f' top: "{s}"'
        out_tops += "".join(f' top: "{s}_T"' for s in states)
    text = f"""
    force_backward: {str(force_backward).lower()}
    layer {{ name: "in" type: "Input" {tops} input_param {{ {shapes} }} }}
    layer {{ name: "rec" type: "{kind}" {bottoms} {out_tops}
      recurrent_param {{ num_output: {H} {UNIFORM} {'expose_hidden: true' if expose else ''} }} }}
    {extra_layers}
    """
    return caffe.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def caffe_to_torch_gates(w):
    """Caffe's (i, f, o, g) row blocks -> torch.nn.LSTM's (i, f, g, o)."""
    i, f, o, g = w.chunk(4, dim=0)
    return torch.cat([i, f, g, o])


def torch_lstm(net):
    w_xc, b_c, w_hc = (torch.from_numpy(b.data.copy()) for b in net.params["rec"])
    ref = torch.nn.LSTM(D, H)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(caffe_to_torch_gates(w_xc))
        ref.weight_hh_l0.copy_(caffe_to_torch_gates(w_hc))
        ref.bias_ih_l0.copy_(caffe_to_torch_gates(b_c))
        ref.bias_hh_l0.zero_()
    return ref


def run(net, x, cont, **extra):
    net.blobs["x"].data[...] = x
    net.blobs["cont"].data[...] = cont
    for name, value in extra.items():
        net.blobs[name].data[...] = value
    return net.forward()


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((T, N, D)).astype(np.float32)


def test_lstm_matches_torch_lstm_and_cont_zero_restarts_a_stream(x):
    net = recurrent_net()
    assert [tuple(b.data.shape) for b in net.params["rec"]] == [(4 * H, D), (4 * H,), (4 * H, H)]
    cont = np.ones((T, N), np.float32)
    cont[0] = 0
    cont[2, 1] = 0  # stream 1 starts a new sequence at step 2
    y = run(net, x, cont)["y"].copy()
    ref = torch_lstm(net)
    with torch.no_grad():
        whole, _ = ref(torch.from_numpy(x))
        tail, _ = ref(torch.from_numpy(x[2:, 1:2]))
    np.testing.assert_allclose(y[:, [0, 2]], whole.numpy()[:, [0, 2]], atol=2e-6)
    np.testing.assert_allclose(y[:2, 1], whole.numpy()[:2, 1], atol=2e-6)
    np.testing.assert_allclose(y[2:, 1], tail.numpy()[:, 0], atol=2e-6)


def test_state_is_carried_across_forwards_until_cont_is_zero(x):
    net = recurrent_net(phase=caffe.TEST)
    start = np.ones((T, N), np.float32)
    start[0] = 0
    first = run(net, x, start)["y"].copy()
    second = run(net, x, np.ones((T, N), np.float32))["y"].copy()
    ref = torch_lstm(net)
    with torch.no_grad():
        both, _ = ref(torch.from_numpy(np.concatenate([x, x])))
    np.testing.assert_allclose(first, both.numpy()[:T], atol=2e-6)
    np.testing.assert_allclose(second, both.numpy()[T:], atol=2e-6)
    again = run(net, x, start)["y"]  # cont = 0 restarts every stream
    np.testing.assert_allclose(again, first, atol=1e-7)


def test_lstm_gradients_match_torch_lstm(x):
    net = recurrent_net()
    cont = np.ones((T, N), np.float32)
    cont[0] = 0
    run(net, x, cont)
    top = np.random.default_rng(1).standard_normal((T, N, H)).astype(np.float32)
    net.blobs["y"].diff[...] = top
    net.backward()
    ref = torch_lstm(net)
    xt = torch.from_numpy(x).requires_grad_(True)
    y, _ = ref(xt)
    y.backward(torch.from_numpy(top))
    np.testing.assert_allclose(net.blobs["x"].diff, xt.grad.numpy(), atol=2e-5)
    np.testing.assert_allclose(net.params["rec"][0].diff,
                               caffe_to_torch_gates(ref.weight_ih_l0.grad).numpy(), atol=2e-5)
    # torch (i, f, g, o) -> Caffe (i, f, o, g): apply the same swap back
    w_hh = ref.weight_hh_l0.grad.chunk(4)
    np.testing.assert_allclose(net.params["rec"][2].diff,
                               torch.cat([w_hh[0], w_hh[1], w_hh[3], w_hh[2]]).numpy(), atol=2e-5)
    assert not np.any(net.blobs["cont"].diff)  # no gradient into the sequence indicators


def test_rnn_follows_its_equations_with_static_input_and_exposed_state(x):
    net = recurrent_net("RNN", static=2, expose=True)
    names = [tuple(b.data.shape) for b in net.params["rec"]]
    assert names == [(H, D), (H,), (H, 2), (H, H), (H, H), (H,)]
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((N, 2)).astype(np.float32)
    h0 = rng.standard_normal((1, N, H)).astype(np.float32)
    cont = np.ones((T, N), np.float32)
    cont[1, 0] = 0
    out = run(net, x, cont, xs=xs, h0=h0)
    w_xh, b_h, w_s, w_hh, w_ho, b_o = (b.data.astype(np.float64) for b in net.params["rec"])
    h = h0[0].astype(np.float64)
    for t in range(T):
        h = np.tanh((cont[t][:, None] * h) @ w_hh.T + x[t] @ w_xh.T + b_h + xs @ w_s.T)
        np.testing.assert_allclose(out["y"][t], np.tanh(h @ w_ho.T + b_o), atol=2e-6)
    np.testing.assert_allclose(out["h0_T"][0], h, atol=2e-6)


def test_lstm_static_input_and_exposed_state(x):
    net = recurrent_net(static=3, expose=True)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((N, 3)).astype(np.float32)
    h0, c0 = (rng.standard_normal((1, N, H)).astype(np.float32) for _ in range(2))
    out = run(net, x, np.ones((T, N), np.float32), xs=xs, h0=h0, c0=c0)
    w_xc, b_c, w_s, w_hc = (b.data.astype(np.float64) for b in net.params["rec"])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h, c = h0[0].astype(np.float64), c0[0].astype(np.float64)
    for t in range(T):
        z = h @ w_hc.T + x[t] @ w_xc.T + b_c + xs @ w_s.T
        i, f, o, g = sig(z[:, :H]), sig(z[:, H:2 * H]), sig(z[:, 2 * H:3 * H]), np.tanh(z[:, 3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
        np.testing.assert_allclose(out["y"][t], h, atol=2e-6)
    np.testing.assert_allclose(out["h0_T"][0], h, atol=2e-6)
    np.testing.assert_allclose(out["c0_T"][0], c, atol=2e-6)


def test_no_gradient_through_exposed_state(x):
    # Caffe shares the data, not the diff, of exposed state bottoms and tops.
    net = recurrent_net(expose=True)
    rng = np.random.default_rng(8)
    run(net, x, np.ones((T, N), np.float32), h0=rng.standard_normal((1, N, H)),
        c0=rng.standard_normal((1, N, H)))
    net.blobs["y"].diff[...] = 0
    net.blobs["h0_T"].diff[...] = 1  # would reach x through h_T if it flowed
    net.blobs["c0_T"].diff[...] = 1
    net.backward()
    assert not np.any(net.blobs["x"].diff)
    assert not np.any(net.blobs["h0"].diff) and not np.any(net.blobs["c0"].diff)
    net.blobs["y"].diff[...] = 1
    net.backward()
    assert np.any(net.blobs["x"].diff) and not np.any(net.blobs["h0"].diff)


def test_lstm_unit_backward_is_the_derivative_for_binary_cont():
    g = torch.Generator().manual_seed(4)
    c_prev = torch.randn(1, N, H, dtype=torch.float64, generator=g, requires_grad=True)
    gates = torch.randn(1, N, 4 * H, dtype=torch.float64, generator=g, requires_grad=True)
    cont = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: lstm_unit(a, b, cont), (c_prev, gates))


def test_lstm_unit_layer(x):
    text = f"""
    force_backward: true
    layer {{ name: "in" type: "Input" top: "c" top: "g" top: "cont"
      input_param {{ shape {{ dim: 1 dim: {N} dim: {H} }} shape {{ dim: 1 dim: {N} dim: {4 * H} }}
                    shape {{ dim: 1 dim: {N} }} }} }}
    layer {{ name: "unit" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont"
      top: "c_next" top: "h" }}
    """
    net = caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TRAIN)
    rng = np.random.default_rng(5)
    c, gates = rng.standard_normal((1, N, H)), rng.standard_normal((1, N, 4 * H))
    net.blobs["c"].data[...] = c
    net.blobs["g"].data[...] = gates
    net.blobs["cont"].data[...] = [[1, 0, 1]]
    out = net.forward()
    i = 1 / (1 + np.exp(-gates[..., :H]))
    f = np.array([1, 0, 1])[None, :, None] / (1 + np.exp(-gates[..., H:2 * H]))
    o = 1 / (1 + np.exp(-gates[..., 2 * H:3 * H]))
    c_next = f * c + i * np.tanh(gates[..., 3 * H:])
    np.testing.assert_allclose(out["c_next"], c_next, atol=2e-6)
    np.testing.assert_allclose(out["h"], o * np.tanh(c_next), atol=2e-6)


def test_fillers_advance_the_stream_as_caffes_unrolled_net_does():
    # Caffe fills W_hc once per time step (each step's InnerProduct fills before sharing), so
    # a layer after the LSTM draws after T fills of W_hc.
    after = ('layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z" '
             'inner_product_param { num_output: 2 axis: 2 '
             'weight_filler { type: "uniform" min: -1 max: 1 } } }')
    caffe_rng.seed(7)
    net = recurrent_net(extra_layers=after, t=3)
    caffe_rng.seed(7)
    expected = [torch.empty(4 * H, D), torch.empty(4 * H), torch.empty(4 * H, H)]
    from pycaffe_alt.fillers import fill
    filler = caffe_pb2.FillerParameter(type="uniform", min=-0.5, max=0.5)
    for t in expected:
        fill(t, filler)
    for _ in range(2):
        fill(torch.empty(4 * H, H), filler)
    ip = torch.empty(2, H)
    fill(ip, caffe_pb2.FillerParameter(type="uniform", min=-1, max=1))
    for got, want in zip(net.params["rec"], expected):
        np.testing.assert_array_equal(got.data, want.numpy())
    np.testing.assert_array_equal(net.params["ip"][0].data, ip.numpy())


def test_weights_save_and_load(tmp_path, x):
    net = recurrent_net()
    path = str(tmp_path / "rec.caffemodel")
    net.save(path)
    other = recurrent_net()
    other.copy_from(path)
    for a, b in zip(net.params["rec"], other.params["rec"]):
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("change, message", [
    ("recurrent_param { num_output: 0 }", "needs num_output > 0"),
    ("cont_shape", "bottom cont has shape"),
    ("expose_without_state", "takes bottoms x, cont"),
])
def test_bad_recurrent_layers_name_the_layer(change, message):
    cont = f"shape {{ dim: {T} dim: {N} }}"
    rec = f"recurrent_param {{ num_output: {H} }}"
    if change == "cont_shape":
        cont = f"shape {{ dim: {T} dim: {N + 1} }}"
    elif change.startswith("recurrent_param"):
        rec = change
    elif change == "expose_without_state":
        rec = f"recurrent_param {{ num_output: {H} expose_hidden: true }}"
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" top: "cont"
      input_param {{ shape {{ dim: {T} dim: {N} dim: {D} }} {cont} }} }}
    layer {{ name: "rec" type: "LSTM" bottom: "x" bottom: "cont" top: "y" {rec} }}
    """
    with pytest.raises(NetError, match=f"layer 'rec'.*{message}|{message}") as e:
        caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)
    assert "rec" in str(e.value)


def test_time_steps_cannot_change_after_setup(x):
    net = recurrent_net(phase=caffe.TEST)
    net.blobs["x"].reshape(T + 1, N, D)
    net.blobs["cont"].reshape(T + 1, N)
    with pytest.raises(NetError, match="time steps"):
        net.forward()


def test_lstm_unit_rejects_wrong_gate_width():
    text = f"""
    layer {{ name: "in" type: "Input" top: "c" top: "g" top: "cont"
      input_param {{ shape {{ dim: 1 dim: {N} dim: {H} }} shape {{ dim: 1 dim: {N} dim: {3 * H} }}
                    shape {{ dim: 1 dim: {N} }} }} }}
    layer {{ name: "unit" type: "LSTMUnit" bottom: "c" bottom: "g" bottom: "cont"
      top: "c_next" top: "h" }}
    """
    with pytest.raises(NetError, match="layer 'unit'.*4 x"):
        caffe.Net(parse_text(text, caffe_pb2.NetParameter()), caffe.TEST)


def test_a_solver_trains_an_lstm(tmp_path):
    # Predict at each step whether the running sum of a +-1 stream is positive: loss falls.
    net = tmp_path / "net.prototxt"
    net.write_text(f"""
    layer {{ name: "data" type: "Input" top: "x" top: "cont" top: "label"
      input_param {{ shape {{ dim: 8 dim: 16 dim: 1 }} shape {{ dim: 8 dim: 16 }}
        shape {{ dim: 8 dim: 16 }} }} }}
    layer {{ name: "rec" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
      recurrent_param {{ num_output: 8 {UNIFORM} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "h" top: "score"
      inner_product_param {{ num_output: 2 axis: 2 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
      softmax_param {{ axis: 2 }} }}
    """)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net}"\nbase_lr: 0.5\nlr_policy: "fixed"\nmax_iter: 60\n'
                           'random_seed: 1\nmomentum: 0.9\n')
    solver = caffe.get_solver(str(solver_file))
    rng = np.random.default_rng(6)
    losses = []
    for _ in range(60):
        x = np.sign(rng.standard_normal((8, 16, 1))).astype(np.float32)
        solver.net.blobs["x"].data[...] = x
        solver.net.blobs["label"].data[...] = (np.cumsum(x[..., 0], axis=0) > 0)
        cont = np.ones((8, 16), np.float32)
        cont[0] = 0
        solver.net.blobs["cont"].data[...] = cont
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_netspec_writes_an_lstm_net_that_builds():
    from pycaffe_alt.net_spec import NetSpec, layers as L

    n = NetSpec()
    n.x, n.cont = L.Input(shape=[dict(dim=[T, N, D]), dict(dim=[T, N])], ntop=2)
    n.h = L.LSTM(n.x, n.cont, recurrent_param=dict(num_output=H,
                                                   weight_filler=dict(type="xavier")))
    n.y = L.InnerProduct(n.h, num_output=2, axis=2)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    assert [tuple(b.data.shape) for b in net.params["h"]] == [(4 * H, D), (4 * H,), (4 * H, H)]
    assert net.forward()["y"].shape == (T, N, 2)


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_a_second_backward_of_one_pass_keeps_the_carried_state(kind, x):
    # Caffe's Backward reads what the Forward stored; running the layer again for a second
    # backward started from this pass's final state (other diffs, other top data) and moved
    # the carried state on, so the next forward differed from a net that never backwarded twice.
    net, ref = recurrent_net(kind), recurrent_net(kind)
    for mine, theirs in zip(net.params["rec"], ref.params["rec"]):
        theirs.data[...] = mine.data
    cont = np.ones((T, N), np.float32)
    run(net, x, cont)
    y = run(net, x, cont)["y"].copy()  # starts from the first pass's final state
    diffs = []
    for _ in range(2):
        net.blobs["y"].diff[...] = 1
        diffs.append(net.backward()["x"].copy())
    np.testing.assert_array_equal(diffs[0], diffs[1])
    np.testing.assert_array_equal(net.blobs["y"].data, y)
    for _ in range(3):
        expected = run(ref, x, cont)["y"].copy()
    np.testing.assert_allclose(run(net, x, cont)["y"], expected, rtol=1e-6, atol=1e-6)
