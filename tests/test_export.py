"""Export formats (issue 13): each written file reloads in a fresh process and reproduces the Net.

Nets: LeNet (models/lenet), GoogLeNet (models/googlenet, 224x224: its 7x7 pool5 needs the full
size) and a ResNet block with BatchNorm/Scale, all with random weights, plus
tests/fixtures/export_zoo.prototxt (every layer kind the exporters write, in odd geometries) and
tests/fixtures/export_forks.prototxt (the layers of SENet, ShuffleNet, PSPNet, FCN and SSD).

Per format, every net is exported once (module-scoped fixture) and one subprocess reloads all of
them and runs two batch sizes; the outputs are compared here with the Net's own layers
(``net.as_module``) at relative difference <= 1e-5 (max |a - b| / max |b|). The torchscript,
export and pytorch files are run with ``python -I`` from a scratch directory behind an import
blocker, and the child first checks that ``import pycaffe_alt`` fails there (the editable install
would otherwise make it importable from anywhere).
"""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pycaffe_alt import Net
from pycaffe_alt.errors import CaffeError, NetError, WeightsError
from pycaffe_alt.export import as_module, convert, lower_net, state_dict_to_caffemodel
from pycaffe_alt.phase import TEST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BATCHES = (1, 3)
REL_TOL = 1e-5

RESNET_BLOCK = """
name: "ResBlock"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 stride: 2 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "proj" type: "Convolution" bottom: "data" top: "proj"
  convolution_param { num_output: 16 kernel_size: 1 stride: 2 bias_term: false } }
layer { name: "bn_proj" type: "BatchNorm" bottom: "proj" top: "proj" }
layer { name: "scale_proj" type: "Scale" bottom: "proj" top: "proj" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "proj" bottom: "conv2" top: "sum" }
layer { name: "thr" type: "HardThreshold" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

# name -> (prototxt, outputs compared)
NETS = {
    "lenet": (os.path.join(ROOT, "models", "lenet", "deploy.prototxt"), ["prob", "ip2"]),
    "googlenet": (os.path.join(ROOT, "models", "googlenet", "deploy.prototxt"),
                  ["prob", "loss3/classifier", "inception_3a/output"]),
    "resblock": (None, ["prob", "fc", "sum"]),
    "zoo": (os.path.join(FIXTURES, "export_zoo.prototxt"), ["prob", "scaled", "cat", "gpool", "deconv"]),
    "forks": (os.path.join(FIXTURES, "export_forks.prototxt"),
              ["flat", "prior", "thr1", "am", "swish1", "axpy", "log1", "segbn"]),
}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "export": ".pt2", "pytorch": ".py"}

# The child process: blocks pycaffe_alt (torch-only formats), loads each file with its runtime,
# runs the saved inputs and saves the outputs.
CHILD = r'''
import json, sys
import numpy as np
BLOCK = sys.argv[2] == "block"
if BLOCK:
    class _NoPycaffeAlt:
        def find_spec(self, name, path=None, target=None):
            if name == "pycaffe_alt" or name.startswith("pycaffe_alt."):
                raise ModuleNotFoundError("No module named " + repr(name))
    sys.meta_path.insert(0, _NoPycaffeAlt())
    try:
        import pycaffe_alt  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("pycaffe_alt is importable in the child")
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    fmt, path = job["format"], job["path"]
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda *xs: sess.run(job["outputs"], dict(zip(job["inputs"], [x.numpy() for x in xs])))
    else:
        import torch
        if fmt == "torchscript":
            model = torch.jit.load(path)
        elif fmt == "export":
            model = torch.export.load(path).module()
        else:
            import importlib.util, os
            sys.path.insert(0, os.path.dirname(path))
            spec = importlib.util.spec_from_file_location("generated_net", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            model = mod.load()
        def run(*xs):
            with torch.no_grad():
                out = model(*xs)
            out = (out,) if isinstance(out, torch.Tensor) else out
            return [o.numpy() for o in out]
    import torch
    for batch, files in job["feeds"].items():
        xs = [torch.from_numpy(np.load(f)) for f in files]
        for i, y in enumerate(run(*xs)):
            np.save(f"{job['out']}_{batch}_{i}.npy", np.asarray(y))
print("ok")
'''


def randomize(net, seed=0):
    """Random weights of a sensible scale; BatchNorm statistics with a scale factor of 2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.layer_modules.values():
            if module.type == "BatchNorm":
                module.mean.copy_(torch.randn(module.mean.shape, generator=gen))
                module.variance.copy_(torch.rand(module.variance.shape, generator=gen) * 3 + 0.5)
                module.scale_factor.fill_(2.0)
                continue
            if module.type == "BN" and hasattr(module, "variance"):  # PSPNet's: positive variance
                for p in module.blobs:
                    p.copy_(torch.randn(p.shape, generator=gen))
                module.variance.copy_(torch.rand(module.variance.shape, generator=gen) * 3 + 0.5)
                continue
            for p in module.blobs:
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def nets(workdir):
    """name -> (prototxt path, caffemodel path, Net with those weights, outputs)."""
    out = {}
    for i, (name, (proto, outputs)) in enumerate(NETS.items()):
        if proto is None:
            proto = str(workdir / f"{name}.prototxt")
            with open(proto, "w") as f:
                f.write(RESNET_BLOCK)
        net = randomize(Net(proto, TEST), seed=i)
        weights = str(workdir / f"{name}.caffemodel")
        net.save(weights)
        out[name] = (proto, weights, net, outputs)
    return out


@pytest.fixture(scope="module")
def feeds(nets, workdir):
    """name -> {batch: (input arrays, reference outputs from the Net's own layers)}."""
    out = {}
    gen = torch.Generator().manual_seed(1)
    for name, (_, _, net, outputs) in nets.items():
        module = net.as_module(outputs=outputs)
        out[name] = {}
        for batch in BATCHES:
            xs = [torch.randn((batch,) + s[1:], generator=gen) for s in module.input_shapes.values()]
            with torch.no_grad():
                ref = module(*xs)
            out[name][batch] = ([x.numpy() for x in xs], [r.numpy() for r in ref])
    return out


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _export_and_run(fmt, nets, feeds, workdir):
    """Export every net to ``fmt`` (no in-process check), run all in one fresh process."""
    jobs, paths = [], {}
    for name, (proto, weights, net, outputs) in nets.items():
        path = str(workdir / f"{name}_{fmt}{SUFFIX[fmt]}")
        result = convert(proto, weights, fmt, path, outputs=outputs, verify=False)
        assert result.outputs == outputs
        paths[name] = path
        feed_files = {}
        for batch, (xs, _) in feeds[name].items():
            feed_files[batch] = []
            for i, x in enumerate(xs):
                f = str(workdir / f"{name}_in_{batch}_{i}.npy")
                np.save(f, x)
                feed_files[batch].append(f)
        jobs.append(dict(format=fmt, path=path, inputs=list(result.inputs), outputs=outputs,
                         feeds=feed_files, out=str(workdir / f"{name}_{fmt}_out")))
    job_file = workdir / f"jobs_{fmt}.json"
    job_file.write_text(json.dumps(jobs))
    child = workdir / "child.py"
    child.write_text(CHILD)
    scratch = workdir / f"scratch_{fmt}"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    block = "allow" if fmt == "onnx" else "block"
    proc = subprocess.run([sys.executable, "-I", str(child), str(job_file), block], cwd=str(scratch),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for job, name in zip(jobs, nets):
        results[name] = {b: [np.load(f"{job['out']}_{b}_{i}.npy") for i in range(len(job["outputs"]))]
                         for b in BATCHES}
    return paths, results


@pytest.fixture(scope="module", params=["onnx", "torchscript", "export", "pytorch"])
def exported_format(request, nets, feeds, workdir):
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
    paths, results = _export_and_run(request.param, nets, feeds, workdir)
    return request.param, paths, results


@pytest.mark.parametrize("name", list(NETS))
def test_format_reproduces_net_in_fresh_process(exported_format, feeds, name):
    fmt, _, results = exported_format
    for batch in BATCHES:
        _, refs = feeds[name][batch]
        got = results[name][batch]
        assert len(got) == len(refs)
        for out_name, g, r in zip(NETS[name][1], got, refs):
            assert g.shape == r.shape, (fmt, name, out_name, batch)
            assert _rel(g, r) <= REL_TOL, (fmt, name, out_name, batch, _rel(g, r))


def test_onnx_uses_standard_operators(nets, workdir):
    onnx = pytest.importorskip("onnx")
    seen = {}
    for name in ("googlenet", "resblock", "zoo"):
        proto, weights, _, outputs = nets[name]
        path = str(workdir / f"{name}_ops.onnx")
        convert(proto, weights, "onnx", path, outputs=outputs, verify=False)
        model = onnx.load(path)
        assert model.opset_import[0].version == 17
        assert [i.name for i in model.graph.input] == ["data"]
        assert [o.name for o in model.graph.output] == outputs
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        seen[name] = [n.op_type for n in model.graph.node]
    # GoogLeNet's LRN and ResNet's BatchNorm+Scale are single standard nodes, not arithmetic.
    assert seen["googlenet"].count("LRN") == 2 and "Pow" not in seen["googlenet"]
    assert seen["resblock"].count("BatchNormalization") == 3
    assert "Mul" not in seen["resblock"] and "Sqrt" not in seen["resblock"]
    # 57 convolutions, 13 max pools, each a single node.
    assert seen["googlenet"].count("Conv") == 57 and seen["googlenet"].count("MaxPool") == 13


def test_generated_code_is_torch_only_and_readable(nets, workdir):
    proto, weights, _, outputs = nets["resblock"]
    path = str(workdir / "resblock_read.py")
    result = convert(proto, weights, "pytorch", path, outputs=outputs, verify=False)
    assert result.paths == [path, str(workdir / "resblock_read.pt")]
    source = open(path).read()
    imports = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module.split(".")[0])
    assert imports <= {"os", "typing", "torch"}
    # One attribute per layer with a module; BatchNorm+Scale folded into one BatchNorm2d.
    assert "self.conv1 = nn.Conv2d(8, 16" in source
    assert "self.bn1 = nn.BatchNorm2d(16" in source and "self.scale1" not in source
    assert "# bn1 (BatchNorm+Scale (scale1))" in source
    assert "def load(" in source
    zoo_proto, zoo_weights, _, zoo_outputs = nets["zoo"]
    zoo = str(workdir / "zoo_read.py")
    convert(zoo_proto, zoo_weights, "pytorch", zoo, outputs=zoo_outputs, verify=False)
    zoo_source = open(zoo).read()
    # torch's pooling where it gives Caffe's windows (ceil_mode), explicit pads where it cannot.
    assert "ceil_mode=True" in zoo_source and "nn.ConstantPad2d" in zoo_source


def test_convert_checks_the_written_file(nets, workdir):
    proto, weights, _, outputs = nets["lenet"]
    result = convert(proto, weights, "pytorch", str(workdir / "lenet_checked.py"), outputs=outputs)
    assert set(result.max_rel_error) == {1, 3}
    assert all(e <= REL_TOL for errs in result.max_rel_error.values() for e in errs.values())
    assert "checked with the generated load() at batch 3" in result.summary()


def test_weight_formats_and_state_dict_round_trip(nets, workdir):
    proto, weights, net, _ = nets["resblock"]
    for fmt in ("caffemodel", "h5"):
        path = str(workdir / f"resblock_copy.{fmt}")
        convert(proto, weights, fmt, path)
        again = Net(proto, TEST, weights=path)
        for key, value in net.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), (fmt, key)
    # The reverse: a PyTorch state_dict (net.state_dict() naming) into a caffemodel.
    state = {k: v.clone() + 1.0 for k, v in net.state_dict().items()}
    sd_path = str(workdir / "resblock_state.pt")
    torch.save(state, sd_path)
    back = str(workdir / "resblock_from_state.caffemodel")
    state_dict_to_caffemodel(proto, sd_path, back)
    again = Net(proto, TEST, weights=back)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key], value), key
    # ... and the same through the tool, as DataParallel would save it ('module.' prefix).
    torch.save({"module." + k: v for k, v in state.items()}, sd_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_model"),
                           "--model", proto, "--state-dict", sd_path, "--to", "caffemodel",
                           "--out", back], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(Net(proto, TEST, weights=back).state_dict()["fc.weight"], state["fc.weight"])


def test_state_dict_that_does_not_fit_is_one_clear_error(nets, workdir):
    proto, _, net, _ = nets["resblock"]
    state = dict(net.state_dict())
    state.pop("conv1.weight")
    state["fc.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        state_dict_to_caffemodel(proto, state, str(workdir / "never.caffemodel"))
    text = str(err.value)
    assert "missing: conv1.weight" in text and "not in the net: extra.weight" in text
    assert "fc.weight: (3, 3) for (10, 16)" in text
    assert not os.path.exists(workdir / "never.caffemodel")


UNSUPPORTED = """
name: "Odd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "am" type: "ArgMax" bottom: "conv" top: "am" argmax_param { axis: 1 top_k: 2 } }
layer { name: "mvn" type: "MVN" bottom: "conv" top: "mvn" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "relu" }
"""


def test_unsupported_layers_fail_clearly(workdir):
    proto = str(workdir / "odd.prototxt")
    with open(proto, "w") as f:
        f.write(UNSUPPORTED)
    with pytest.raises(NetError) as err:
        convert(proto, None, "onnx", str(workdir / "odd.onnx"))
    text = str(err.value)
    assert "'am' (ArgMax: only the index of the maximum" in text and "'mvn' (MVN)" in text
    assert "--outputs" in text
    assert not os.path.exists(workdir / "odd.onnx")
    # Outputs that do not need them convert.
    result = convert(proto, None, "pytorch", str(workdir / "odd.py"), outputs=["relu"])
    assert result.outputs == ["relu"]
    # The tool: one paragraph, no traceback, exit status 1.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_model"), "--model",
                           proto, "--to", "torchscript", "--out", str(workdir / "odd.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "ArgMax" in proc.stderr and "Traceback" not in proc.stderr
    from pycaffe_alt.tools.convert_model import parse_shapes

    assert parse_shapes(["data=2,3,8,8"]) == {"data": (2, 3, 8, 8)}
    for bad in ("data", "data=", "data=1,x", "data=0,3"):
        with pytest.raises(CaffeError, match="BLOB=D0,D1"):
            parse_shapes([bad])
    with pytest.raises(CaffeError, match="does not exist"):
        convert(proto, None, "onnx", str(workdir / "no_such_dir" / "odd.onnx"), outputs=["relu"])
    with pytest.raises(CaffeError, match="is a directory"):
        convert(proto, None, "pytorch", str(workdir), outputs=["relu"])
    with pytest.raises(NetError, match="no Input or data layer"):
        convert(proto, None, "onnx", str(workdir / "odd.onnx"), shapes={"conv": (1, 4, 6, 6)})


def test_data_layers_become_inputs_losses_dropped_unless_asked(workdir):
    proto = os.path.join(ROOT, "models", "lenet", "train_val.prototxt")
    shapes = {"data": (2, 1, 28, 28)}
    result = convert(proto, None, "pytorch", str(workdir / "lenet_tv.py"), shapes=shapes)
    assert list(result.inputs) == ["data"] and result.outputs == ["ip2"]
    # With the loss: the label becomes an input and the file computes Caffe's loss.
    net = randomize(_lenet_tv_net(proto, shapes), 3)
    weights = str(workdir / "lenet_tv.caffemodel")
    net.save(weights)
    res = convert(proto, weights, "pytorch", str(workdir / "lenet_tv_loss.py"), shapes=shapes,
                  include_loss=True, outputs=["loss"])
    assert list(res.inputs) == ["data", "label"]
    assert all(e <= REL_TOL for errs in res.max_rel_error.values() for e in errs.values())
    x = torch.randn(2, 1, 28, 28)
    label = torch.tensor([3.0, 7.0])
    with torch.no_grad():
        ref = net.as_module(outputs=["loss"], include_loss=True)(x, label)
    sys.path.insert(0, str(workdir))
    try:
        import lenet_tv_loss
    finally:
        sys.path.remove(str(workdir))
    with torch.no_grad():
        got = lenet_tv_loss.load()(x, label)
    assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref))


def _lenet_tv_net(proto, shapes):
    from pycaffe_alt import prototxt
    from pycaffe_alt.export.convert import apply_shapes

    return Net(apply_shapes(prototxt.read_net(proto), shapes), TEST)


def test_as_module_shares_parameters_and_exports_with_dynamic_batch(nets):
    _, _, net, _ = nets["lenet"]
    module = net.as_module(outputs=["ip2", "prob"])
    assert module.input_names == ["data"] and module.output_names == ["ip2", "prob"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ip2, prob = module(x)
        ref = net(data=x)
        assert torch.equal(prob, ref["prob"])
        assert {id(p) for p in module.parameters()} == {id(p) for p in net.parameters()}
        net.params["ip2"][1].data[...] += 1.0  # a pycaffe-style edit shows in the module
        assert torch.allclose(module(x)[0], ip2 + 1.0, atol=1e-6)
        net.params["ip2"][1].data[...] -= 1.0
    # torch.export with a dynamic batch from a batch-2 example, then batch 1 and 5 run.
    from pycaffe_alt.export import dynamic_batch_shapes
    ep = torch.export.export(module, module.example_inputs(2),
                             dynamic_shapes=dynamic_batch_shapes(module, 1))
    for b in (1, 5):
        xb = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(ep.module()(xb)[1], module(xb)[1], atol=1e-6)
    # cutting the net: inputs at an inner blob
    head = as_module(net, outputs=["prob"], inputs=["ip1"])
    assert head.input_names == ["ip1"] and [type(m).__name__ for m in head.layers] == [
        "InnerProduct", "Softmax"]


def test_onnx_missing_is_a_clear_message(nets, workdir, monkeypatch):
    proto, weights, _, _ = nets["lenet"]
    monkeypatch.setitem(sys.modules, "onnx", None)  # "import onnx" now raises ImportError
    with pytest.raises(CaffeError) as err:
        convert(proto, weights, "onnx", str(workdir / "none.onnx"))
    assert "pip install onnx" in str(err.value)


def test_graph_lowering_drops_and_folds(nets):
    _, _, net, _ = nets["resblock"]
    graph = lower_net(net)
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("batch_norm") == 3 and "affine" not in kinds
    assert graph.outputs == ["prob"] and list(graph.inputs) == ["data"]


IN_PLACE_ON_INPUT = """name: "in_place_on_input"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "relu0" type: "ReLU" bottom: "data" top: "data" }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.mark.parametrize("fmt", ["torchscript", "pytorch"])
def test_in_place_layer_on_an_input_is_exported_and_checked(workdir, fmt):
    # The check used to plan its reference with the inputs named (a cut), which leaves out an
    # in-place layer on the Input top: every correct file was reported as a mismatch.
    proto = workdir / "in_place_on_input.prototxt"
    proto.write_text(IN_PLACE_ON_INPUT)
    net = Net(str(proto), TEST)
    result = convert(net, to=fmt, out=str(workdir / f"in_place_on_input_{fmt}.py"))
    assert all(e <= REL_TOL for errs in result.max_rel_error.values() for e in errs.values())
    assert [op.kind for op in lower_net(net).ops] == ["relu", "conv"]


NON_ASCII_AND_SCALAR_SCALE = """name: "names"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "свёртка" type: "Convolution" bottom: "data" top: "выход"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "sc" type: "Scale" bottom: "выход" top: "s" scale_param { num_axes: 0 bias_term: true } }
"""


def test_torchscript_takes_non_ascii_names_and_a_scalar_scale(workdir):
    # Both made torch.jit.script / jit.load fail with a traceback: non-ASCII attribute names are
    # serialized as escapes the loader rejects, and Scale num_axes: 0 gave an empty list attribute.
    proto = workdir / "names.prototxt"
    proto.write_text(NON_ASCII_AND_SCALAR_SCALE, encoding="utf-8")
    net = Net(str(proto), TEST)
    net.params["sc"][0].data[...] = 1.5
    net.params["sc"][1].data[...] = -0.25
    result = convert(net, to="torchscript", out=str(workdir / "names.pt"))
    assert all(e <= REL_TOL for errs in result.max_rel_error.values() for e in errs.values())
    code = (workdir / "names_code.py")
    convert(net, to="pytorch", out=str(code))
    assert "# свёртка (Convolution)" in code.read_text(encoding="utf-8")


def test_a_scripting_failure_is_one_message(workdir, monkeypatch):
    from pycaffe_alt.export import torchscript

    def refuse(graph, path):
        raise RuntimeError("\nModule 'X' has no attribute 'y'\n  File ...")
    monkeypatch.setattr(torchscript, "write", refuse)
    proto = workdir / "in_place_on_input.prototxt"
    proto.write_text(IN_PLACE_ON_INPUT)
    with pytest.raises(CaffeError, match="could not write the torchscript form .*has no attribute"):
        convert(str(proto), to="torchscript", out=str(workdir / "refused.pt"))


POOL_MASK = """
name: "encoder"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "pool_mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv" type: "Convolution" bottom: "pool" top: "conv"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "up" type: "Upsample" bottom: "conv" bottom: "pool_mask" top: "up"
  upsample_param { scale: 2 } }
"""


def test_a_pooling_mask_nobody_reads_is_not_needed(workdir):
    # ENet's and SegNet's encoders: MAX pooling with a mask top only the decoder's unpooling
    # reads. Cut before the unpooling, the pooling exports as a plain max pool.
    proto = str(workdir / "encoder.prototxt")
    with open(proto, "w") as f:
        f.write(POOL_MASK)
    result = convert(proto, None, "onnx", str(workdir / "enc.onnx"), outputs=["conv"])
    assert result.outputs == ["conv"]
    with pytest.raises(NetError, match="'pool' \\(Pooling: the argmax mask top\\)"):
        convert(proto, None, "onnx", str(workdir / "enc.onnx"), outputs=["pool_mask"])


STAGED = """
name: "staged"
layer { name: "train_data" type: "Input" top: "data" include { phase: TEST stage: "train-set" }
  input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "test_data" type: "Input" top: "data" include { phase: TEST stage: "test-set" }
  input_param { shape { dim: 1 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "deep" type: "ReLU" bottom: "conv" top: "deep" include { min_level: 1 } }
"""


def test_convert_builds_the_net_in_the_stages_and_level_given(workdir):
    # BVLC's mnist_autoencoder keeps its TEST data layers under stages: without a stage the net
    # has no data; a stage picks one of them, a level adds layers.
    proto = str(workdir / "staged.prototxt")
    with open(proto, "w") as f:
        f.write(STAGED)
    with pytest.raises(NetError, match="data"):
        convert(proto, None, "onnx", str(workdir / "s.onnx"))
    small = convert(proto, None, "onnx", str(workdir / "s.onnx"), stages="train-set")
    assert small.inputs == {"data": (1, 2, 4, 4)} and small.outputs == ["conv"]
    deep = convert(proto, None, "pytorch", str(workdir / "s.py"), stages=["test-set"], level=1)
    assert deep.inputs == {"data": (1, 2, 6, 6)} and deep.outputs == ["deep"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_model"), "--model",
                           proto, "--to", "onnx", "--out", str(workdir / "t.onnx"), "--stage",
                           "test-set", "--level", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "deep" in proc.stdout


REPEATED_NAMES = """
name: "hed_like"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 2 kernel_size: 3 pad: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "crop" type: "Crop" bottom: "a" bottom: "data" top: "ca" crop_param { offset: 1 } }
layer { name: "conv_1" type: "Convolution" bottom: "data" top: "b"
  convolution_param { num_output: 2 kernel_size: 1 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "crop" type: "Crop" bottom: "b" bottom: "data" top: "cb" crop_param { offset: 1 } }
layer { name: "conv" type: "Eltwise" bottom: "ca" bottom: "cb" top: "sum" }
"""


def test_repeated_layer_names_export_under_numbered_names(workdir):
    # Caffe accepts repeated layer names (HED's five Crop layers are all 'crop'); the exported
    # forms name operators after layers, so the second of a name becomes name_1, skipping a
    # name the net already has (conv_1 here: the Eltwise named conv becomes conv_2).
    from pycaffe_alt.export.graph import export_names

    assert export_names(["a", "a", "a_1", "b", "a"]) == ["a", "a_2", "a_1", "b", "a_3"]
    proto = str(workdir / "repeated.prototxt")
    with open(proto, "w") as f:
        f.write(REPEATED_NAMES)
    net = Net(proto, TEST)
    graph = lower_net(net)
    assert [op.name for op in graph.ops] == ["conv", "crop", "conv_1", "crop_1", "conv_2"]
    for to, out in (("onnx", "r.onnx"), ("pytorch", "r.py"), ("torchscript", "r.pt")):
        result = convert(net, None, to, str(workdir / out))
        assert result.outputs == ["sum"]
    x = torch.randn(1, 2, 9, 9)
    np.testing.assert_allclose(as_module(net)(x).detach().numpy(),
                               net(data=x)["sum"].detach().numpy(), rtol=1e-6, atol=1e-6)


CUT_AND_IN_PLACE = """
name: "cut"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }
layer { name: "slice" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { axis: 1 } }
layer { name: "c1" type: "Convolution" bottom: "a" top: "c1"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "b" top: "c2"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
"""


def test_default_outputs_follow_caffe_and_a_cut_may_take_one_top(workdir):
    # Round 9: a head ending in an in-place layer was left out of the default outputs (Caffe's
    # net.outputs has it); a cut at one top of a Slice asked for the Slice's input; an input
    # named but not read was dropped silently.
    proto = str(workdir / "cut.prototxt")
    with open(proto, "w") as f:
        f.write(CUT_AND_IN_PLACE)
    net = Net(proto, TEST)
    assert net.outputs == ["c1", "c2"]
    assert convert(net, None, "onnx", str(workdir / "all.onnx")).outputs == ["c1", "c2"]
    cut = convert(net, None, "onnx", str(workdir / "cut.onnx"), outputs=["c1"], inputs=["a"])
    assert cut.inputs == {"a": (1, 2, 6, 6)}
    with pytest.raises(NetError, match="input\\(s\\) data are not read"):
        convert(net, None, "onnx", str(workdir / "x.onnx"), outputs=["c1"], inputs=["a", "data"])
    # The Slice is kept for 'b': a fed 'a' would be overwritten by it (review).
    with pytest.raises(NetError, match="also made by layer 'slice'"):
        convert(net, None, "onnx", str(workdir / "y.onnx"), outputs=["c1", "c2"],
                inputs=["a", "data"])


def test_weights_sharing_no_layer_name_are_refused_unless_allowed(workdir):
    proto = workdir / "in_place_on_input.prototxt"
    proto.write_text(IN_PLACE_ON_INPUT)
    weights = str(workdir / "in_place_on_input.caffemodel")
    Net(str(proto), TEST).save(weights)
    renamed = workdir / "renamed.prototxt"
    renamed.write_text(IN_PLACE_ON_INPUT.replace('"conv"', '"conv_renamed"'))
    with pytest.raises(WeightsError, match="random initial weights"):
        convert(str(renamed), weights, to="pytorch", out=str(workdir / "renamed.py"))
    with pytest.raises(WeightsError):
        convert(str(renamed), weights, to="caffemodel", out=str(workdir / "renamed.caffemodel"))
    assert not os.path.exists(workdir / "renamed.py")
    result = convert(str(renamed), weights, to="pytorch", out=str(workdir / "renamed.py"),
                     allow_unmatched_weights=True)
    assert result.paths


def test_errors_name_the_prototxt_when_shapes_are_given(workdir):
    proto = workdir / "small_pool.prototxt"
    proto.write_text('layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 '
                     'dim: 8 dim: 8 } } }\nlayer { name: "p" type: "Pooling" bottom: "data" top: "z" '
                     'pooling_param { kernel_size: 5 } }\n')
    with pytest.raises(NetError) as info:
        convert(str(proto), to="pytorch", out=str(workdir / "small_pool.py"),
                shapes={"data": (1, 3, 4, 4)})
    assert info.value.where.startswith(str(proto)) and "<net_param>" not in str(info.value)
    net = convert(str(proto), to="pytorch", out=str(workdir / "small_pool.py"),
                  shapes={"data": (1, 3, 6, 6)})
    assert net.paths


def test_fork_layers_lower_to_their_own_operators(nets, workdir):
    """SENet/ShuffleNet/PSPNet/FCN/SSD layers become standard ONNX operators; a PriorBox
    output is a constant of batch 1; what needs the batch axis moved is refused by name."""
    proto, weights, _, outputs = nets["forks"]
    path = str(workdir / "forks_ops.onnx")
    convert(proto, weights, "onnx", path, outputs=outputs, verify=False)
    from pycaffe_alt.export.onnx import op_counts

    _, counts = op_counts(path)
    for op in ("Split", "Slice", "Resize", "Transpose", "ReduceSum", "Softplus", "Clip",
               "ArgMax", "BatchNormalization"):
        assert counts.get(op), (op, counts)
    import onnx

    model = onnx.load(path)
    prior = [o for o in model.graph.output if o.name == "prior"][0]
    assert [d.dim_value for d in prior.type.tensor_type.shape.dim] == [1, 2, 784]
    bad = {
        "crop_batch": 'layer { name: "c" type: "Crop" bottom: "data" bottom: "ref" top: "c" '
                      'crop_param { axis: 0 offset: 0 } }',
        "permute_batch": 'layer { name: "c" type: "Permute" bottom: "data" top: "c" '
                         'permute_param { order: 1 order: 0 } }',
        "slice_batch": 'layer { name: "c" type: "Slice" bottom: "data" top: "c" top: "d" '
                       'slice_param { axis: 0 } }',
    }
    head = ('name: "b" layer { name: "data" type: "Input" top: "data" input_param { shape '
            '{ dim: 4 dim: 3 dim: 6 dim: 6 } } } layer { name: "ref" type: "Input" top: "ref" '
            'input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }\n')
    for key, layer in bad.items():
        p = workdir / f"{key}.prototxt"
        p.write_text(head + layer)
        with pytest.raises(NetError, match=r"'c' \((Crop|Permute|Slice): .*batch"):
            convert(str(p), None, "onnx", str(workdir / f"{key}.onnx"), outputs=["c"])


def test_odd_constants_and_inputs_export_or_are_refused_by_name(workdir):
    """Fuzz round 7: infinite layer constants were written as bare `inf` into the generated
    code (NameError); a scale input without a batch axis and a 0-axis input failed in the
    check or wrote a model the runtime could not load."""
    clip = workdir / "clip_inf.prototxt"
    clip.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                    'dim: 4 dim: 3 dim: 3 } } }\nlayer { name: "c" type: "Clip" bottom: "data" '
                    'top: "c" clip_param { min: -inf max: inf } }\n')
    for fmt in ("pytorch", "torchscript"):
        result = convert(str(clip), None, fmt, str(workdir / f"clip_inf{SUFFIX[fmt]}"),
                         allow_unmatched_weights=True)
        assert result.outputs == ["c"]
    head = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 '
            'dim: 4 dim: 5 } } }\n')
    for name, extra, match in (
            ("nobatch", 'layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 4 '
                        'dim: 5 } } }\nlayer { name: "sc" type: "Scale" bottom: "data" bottom: "s" '
                        'top: "o" scale_param { axis: -2 } }\n', "scale input 's' has no batch axis"),
            ("scalar", 'layer { name: "s" type: "Input" top: "s" input_param { shape { } } }\n'
                       'layer { name: "sc" type: "Scale" bottom: "data" bottom: "s" top: "o" }\n',
             "input\\(s\\) s have no axes")):
        path = workdir / f"{name}.prototxt"
        path.write_text(head + extra)
        with pytest.raises(NetError, match=match):
            convert(str(path), None, "onnx", str(workdir / f"{name}.onnx"))
    # The 0-axis input itself takes one number through pycaffe's forward.
    net = Net(str(workdir / "scalar.prototxt"), TEST)
    out = net.forward(data=np.ones((2, 3, 4, 5), np.float32), s=np.float32(3.0))
    assert np.all(out["o"] == 3.0)


def test_a_class_weighted_loss_is_refused_not_exported_unweighted(workdir):
    path = workdir / "weighted.prototxt"
    path.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" '
        'loss_param { weight_by_label_freqs: true class_weighting: 1 class_weighting: 2 '
        'class_weighting: 3 } }\n')
    with pytest.raises(NetError, match="SegNet's class_weighting"):
        convert(str(path), None, "pytorch", str(workdir / "weighted.py"), include_loss=True)
