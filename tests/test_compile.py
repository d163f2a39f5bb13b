"""torch.compile for nets: no graph breaks for LeNet, compiled = eager numerics, eager fallback."""
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pycaffe_alt as caffe
from pycaffe_alt.compile import CompiledNet, leading_sources
from pycaffe_alt.compile_ops import max_pool2d_with_indices
from pycaffe_alt.errors import NetError
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.prototxt import parse_text, read_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "tests", "fixtures", "golden", "nets", "lenet_loss")

TINY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def tiny(**kw):
    return caffe.Net(parse_text(TINY, caffe_pb2.NetParameter()), caffe.TRAIN, **kw)


def test_lenet_traces_as_one_graph():
    net = caffe.Net(read_net(os.path.join(LENET, "net.prototxt")), caffe.TRAIN)
    x = torch.zeros(net.blobs["data"].shape)
    label = torch.zeros(net.blobs["label"].shape)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(data=x, label=label)
    assert explained.graph_break_count <= 2, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def eager_compiled_pair(**kw):
    eager, compiled = tiny(**kw), tiny(compile=True, **kw)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def step(net, x, label):
    net.zero_grad(set_to_none=True)
    values = net(data=x, label=label, blobs=["ip2"])
    loss = net.loss(values)
    loss.backward()
    return values, loss.detach()


def test_compiled_pass_matches_eager():
    torch._dynamo.reset()
    eager, compiled = eager_compiled_pair()
    assert compiled.compiled
    g = torch.Generator().manual_seed(0)
    x = torch.randn(eager.blobs["data"].shape, generator=g)
    label = torch.tensor([0.0, 1.0, 2.0, 1.0])
    (v1, l1), (v2, l2) = step(eager, x, label), step(compiled, x, label)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v1["ip2"], v2["ip2"], rtol=1e-5, atol=1e-6)
    for (name, p1), p2 in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.compiled  # no fallback happened


def failing_compiler(fn):
    def run(*args, **kwargs):
        raise RuntimeError("backend exploded")
    return run


def test_compiler_failure_falls_back_to_eager_with_one_log_line(caplog):
    eager, net = eager_compiled_pair()
    net._compiled = CompiledNet(net, leading_sources(net.steps), net.outputs + net.loss_tops,
                                compiler=failing_compiler)
    x = torch.randn(net.blobs["data"].shape)
    label = torch.zeros(4)
    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        (_, l1), (_, l2) = step(eager, x, label), step(net, x, label)
        step(net, x, label)
    torch.testing.assert_close(l1, l2)
    lines = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(lines) == 1 and "backend exploded" in lines[0].getMessage()
    assert not net.compiled


def test_every_net_compiles_past_dynamos_recompile_limit():
    # Dynamo counts compiled graphs per code object (limit 8); each CompiledNet has its own, so
    # a process with many nets (solver nets, phases, notebooks) keeps compiling them all.
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    for k in range(limit + 2):
        net = caffe.Net(parse_text(TINY.replace("num_output: 5", f"num_output: {k + 4}"),
                                   caffe_pb2.NetParameter()), caffe.TRAIN)
        net._compiled = CompiledNet(net, leading_sources(net.steps), net.outputs + net.loss_tops,
                                    compiler=lambda fn: torch.compile(fn, backend=count))
        net(data=torch.randn(4, 2, 6, 6), label=torch.zeros(4))
    assert len(graphs) == limit + 2


def test_bad_label_in_compiled_net_raises_the_layers_error():
    net = tiny()
    net._compiled = CompiledNet(net, leading_sources(net.steps), net.outputs + net.loss_tops,
                                compiler=failing_compiler)
    with pytest.raises(NetError, match="label 7 is outside"):
        net.run({"data": torch.zeros(net.blobs["data"].shape),
                 "label": torch.tensor([0.0, 7.0, 0.0, 0.0])})


def test_solver_builds_compiled_nets(tmp_path):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(TINY)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n')
    solver = caffe.get_solver(str(solver_file), compile=True)
    assert solver.net.compiled
    assert solver.net.memory_format is torch.contiguous_format  # Inductor picks layouts itself
    np.testing.assert_array_equal(solver.net.params["conv"][0].data.shape, (3, 2, 3, 3))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("ceil", [False, True])
def test_opaque_max_pool_matches_aten_in_values_strides_and_gradient(fmt, ceil):
    x = torch.randn(2, 3, 7, 7).contiguous(memory_format=fmt).requires_grad_(True)
    # The fake (meta) outputs must have the real kernel's strides, and autograd must hold.
    torch.library.opcheck(torch.ops.pycaffe_alt.max_pool2d.default, (x, [2, 2], [2, 2], [0, 0], ceil))
    y, idx = max_pool2d_with_indices(x, (2, 2), (2, 2), (0, 0), ceil)
    ref, ref_idx = F.max_pool2d(x, 2, 2, 0, ceil_mode=ceil, return_indices=True)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx) and y.stride() == ref.stride()
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(got, want)


def graph_ops(net, grad: bool):
    """The ops in the graph Dynamo traces for a pass of ``net`` (no Inductor)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(net.blobs["data"].shape)
    label = torch.zeros(net.blobs["label"].shape)
    with torch.set_grad_enabled(grad):
        torch.compile(net, backend=capture)(data=x, label=label)
    return {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


def test_compiled_training_pass_calls_max_pooling_whole_on_the_cpu():
    # Inductor's own lowering of max pooling is several times slower on the CPU
    # (pycaffe_alt/compile_ops.py); a training trace calls the opaque op instead.
    net = tiny()
    assert torch.ops.pycaffe_alt.max_pool2d.default in graph_ops(net, grad=True)
    assert torch.ops.pycaffe_alt.max_pool2d.default not in graph_ops(net, grad=False)
    # torch.export (grad enabled, as a user may call it) gets the standard op: an exported
    # program must load and convert without pycaffe_alt.
    module = net.as_module(outputs=["ip2"], inputs=["data"])
    program = torch.export.export(module, (torch.randn(net.blobs["data"].shape),))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert not any("pycaffe_alt" in str(t) for t in targets), targets


@pytest.mark.parametrize("method", ["", "max_dense_unknowns: 0 cg_iter: 3"])
def test_exact_weight_steps_run_eagerly_in_a_compiled_solver(tmp_path, method):
    # An exact step reads intermediate blobs and differentiates twice: its passes run layer by
    # layer (Net.run(eager=True)) while the solver's net is compiled (it raised KeyError).
    from exact_case import teacher_files

    extra = ("alternation_param { weight_step: LEAST_SQUARES warmup_iter: 0 gap_iter: 1 "
             f"{method} }}")
    finals = []
    for compiled in (False, True):
        case = teacher_files(tmp_path / str(compiled), d=8, k=3, n=200, batch=50, max_iter=2,
                             extra=extra)
        solver = caffe.get_solver(str(case["solver"]), compile=compiled)
        solver.net.copy_from(str(case["weights"]))
        solver.step(2)
        assert solver.net.compiled == compiled
        finals.append(solver.net.params["hidden"][0].data.copy())
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-5, atol=1e-7)


def test_i_alternation_weight_steps_compile_as_one_graph_across_support_steps(tmp_path):
    # The stored supports are looked up between the data layers and the graph
    # (Layer.prepare_pass): the masked pass is one graph, and the next support step reuses it.
    from alternation_case import solver_param

    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    solver = caffe.get_solver(solver_param(tmp_path, "mode: INSTANCE gap_iter: 3",
                                           "max_iter: 12 display: 2"), compile=True)
    net = solver.net
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net._compiled = CompiledNet(net, leading_sources(net.steps), net.outputs + net.loss_tops,
                                compiler=lambda fn: torch.compile(fn, backend=count))
    solver.step(4)  # support step 1, then masked SGD (metered on display iterations)
    assert solver.support_steps == 2 and solver.phase == "weights"
    compiled = len(graphs)
    assert compiled == 2, [g.code for g in graphs]  # with and without the staleness count
    solver.step(8)
    assert solver.support_steps == 4
    assert len(graphs) == compiled  # no recompiles for later weight steps
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert net.compiled
    assert solver.last_staleness is not None and 0 <= solver.last_staleness["overall"] <= 1


def test_stored_masks_keep_the_activations_channels_last():
    # A mask (NCHW, from the store) times a channels-last input must stay channels-last, or
    # every later layer runs in the slow layout (max pooling 4x slower on this CPU).
    from pycaffe_alt.layers.support import HardThreshold

    net = caffe.Net(parse_text(TINY.replace(
        'layer { name: "pool"',
        'layer { name: "thr" type: "HardThreshold" bottom: "conv" top: "conv" }\n'
        'layer { name: "pool"'), caffe_pb2.NetParameter()), caffe.TRAIN,
        memory_format="channels_last")
    layer = net.layer_modules["thr"]
    assert isinstance(layer, HardThreshold)
    layer.set_mode("THRESHOLD")
    q_shape = (4, 3, 4, 4)
    mask = torch.rand(q_shape) > 0.5
    layer.fixed_support = lambda q: mask
    q = torch.randn(q_shape).contiguous(memory_format=torch.channels_last)
    for output in ("KEEP", "SHIFT"):
        layer.output = output
        out = layer(q)
        assert out.is_contiguous(memory_format=torch.channels_last), output
    layer.learn_beta_fixed, layer.output = True, "KEEP"
    assert layer(q).is_contiguous(memory_format=torch.channels_last)


def test_i_alternation_in_a_compiled_solver_matches_the_eager_one(tmp_path):
    # Support passes run layer by layer; the masked SGD passes compile as one graph (the mask
    # lookup runs before it, Layer.prepare_pass). Same weights as eager.
    from alternation_case import solver_param

    finals = []
    for compiled in (False, True):
        folder = tmp_path / str(compiled)
        folder.mkdir()
        solver = caffe.get_solver(solver_param(folder, "mode: INSTANCE gap_iter: 4",
                                               "max_iter: 8"), compile=compiled)
        solver.step(8)
        assert solver.support_steps == 2
        finals.append({n: p.detach().clone() for n, p in solver.net.named_parameters()})
    for name, p in finals[0].items():
        torch.testing.assert_close(finals[1][name], p, rtol=1e-4, atol=1e-6, msg=name)
