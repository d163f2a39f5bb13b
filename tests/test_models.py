"""Every shipped model and solver prototxt builds, runs and says what models/README.md says.

- models/generate.py's output equals the committed files (no hand edits that drift);
- each deploy net builds, a batch-1 forward on random data gives probabilities summing to 1, and
  its learnable parameter count matches the published figure of the architecture;
- each train_val net builds in TRAIN and TEST with its Data layers swapped for Input layers of
  the same tops and shapes (the LMDBs are not in CI), forward (+ backward for the small models) on
  random data; LeNet also from the real embedded mnist5k LMDBs;
- the nets are in the paper's hard-threshold form (no ReLU; a thresholded Convolution /
  InnerProduct / Scale has no bias);
- each solver parses, names an existing net, covers its test set exactly, and the alternation /
  DSD solvers carry their parameters.
"""
import glob
import importlib.util
import math
import os
import sys

import pytest
import torch

import pycaffe_alt
from pycaffe_alt import prototxt
from pycaffe_alt.layers import TEST, TRAIN
from pycaffe_alt.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOYS = sorted(glob.glob(os.path.join(ROOT, "models", "*", "deploy.prototxt")))
TRAIN_VALS = sorted(glob.glob(os.path.join(ROOT, "models", "*", "train_val.prototxt")))
SOLVERS = sorted(glob.glob(os.path.join(ROOT, "solvers", "*.prototxt")))
IMAGENET = {"googlenet", "vgg16", "resnet18"}

# The LMDBs the project's tools write (data/*/get_*, convert_cifar, convert_mnist, mnist5k) or
# models/README.md tells users to make: record shape (C, H, W) and record count.
DATASETS = {
    "data/mnist5k/mnist5k_train_lmdb": ((1, 28, 28), 4000),
    "data/mnist5k/mnist5k_test_lmdb": ((1, 28, 28), 1000),
    "data/mnist/mnist_train_lmdb": ((1, 28, 28), 60000),
    "data/mnist/mnist_test_lmdb": ((1, 28, 28), 10000),
    "data/cifar10/cifar10_train_lmdb": ((3, 32, 32), 50000),
    "data/cifar10/cifar10_test_lmdb": ((3, 32, 32), 10000),
    "data/cifar100/cifar100_train_lmdb": ((3, 32, 32), 50000),
    "data/cifar100/cifar100_test_lmdb": ((3, 32, 32), 10000),
    "data/svhn/svhn_train_lmdb": ((3, 32, 32), 604388),
    "data/svhn/svhn_test_lmdb": ((3, 32, 32), 26032),
    "data/ilsvrc12/ilsvrc12_train_lmdb": ((3, 256, 256), 1281167),
    "data/ilsvrc12/ilsvrc12_val_lmdb": ((3, 256, 256), 50000),
}

# Learnable parameters (BatchNorm statistics excluded) against the published architecture:
# (reference count, relative tolerance, where the reference comes from).
PARAM_COUNTS = {
    "lenet": (431080, 0.0, "Caffe's examples/mnist LeNet (same layers; thresholds replace biases)"),
    "allcnn_a": (1.28e6, 0.03, "Table 2 of the paper (ALL-CNN-A 1.28M)"),
    "allcnn_b": (1.35e6, 0.05, "Table 2 of the paper (ALL-CNN-B 1.35M)"),
    "allcnn_c": (1.37e6, 0.01, "Springenberg et al. 1.3M; exact count 1,369,738"),
    "allcnn_c_cifar100": (1387108, 0.0, "All-CNN-C with 100 class maps"),
    "nin_svhn": (0.97e6, 0.01, "the NIN CIFAR-10 model zoo net (paper: ~1M)"),
    "nin_mnist": (241386, 0.0, "NIN with halved widths (our choice, models/README.md)"),
    "googlenet": (6998552, 0.0, "BVLC bvlc_googlenet deploy (~7M)"),
    "vgg16": (138357544, 0.0, "VGG-16 configuration D (138M)"),
    "resnet18": (11689512, 0.001, "ResNet-18, 11.7M (2 BN shifts merge into one threshold per "
                                  "projection block: -896)"),
}


def _name(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


def _load_generator():
    spec = importlib.util.spec_from_file_location("models_generate",
                                                  os.path.join(ROOT, "models", "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def learnable_count(net) -> int:
    return sum(p.numel() for m in net.layer_modules.values() if m.type != "BatchNorm"
               for p in m.parameters())


def with_inputs(param: caffe_pb2.NetParameter, batch: int) -> caffe_pb2.NetParameter:
    """The net with each Data layer replaced by an Input layer of the same tops and shapes.

    Shape: (batch, C, crop, crop) with crop_size, else the dataset's record shape; the label is
    (batch,). Include/exclude rules stay, so stages still pick the right pair.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    for layer in out.layer:
        if layer.type != "Data":
            continue
        source = layer.data_param.source
        assert source in DATASETS, f"layer {layer.name} reads {source}, not a project LMDB path"
        (c, h, w), _ = DATASETS[source]
        crop = layer.transform_param.crop_size
        if crop:
            h = w = crop
        tops = list(layer.top)
        layer.type = "Input"
        layer.ClearField("data_param")
        layer.ClearField("transform_param")
        layer.input_param.shape.add().dim.extend([batch, c, h, w])
        if len(tops) > 1:
            layer.input_param.shape.add().dim.append(batch)
    return out


def _classes(param: caffe_pb2.NetParameter) -> int:
    """Number of classes: the outputs of the last Convolution / InnerProduct."""
    last = [l for l in param.layer if l.type in ("Convolution", "InnerProduct")][-1]
    return (last.convolution_param.num_output if last.type == "Convolution"
            else last.inner_product_param.num_output)


def _random_inputs(net, classes: int, gen: torch.Generator):
    feeds = {}
    for name in net.inputs:
        shape = tuple(net.blobs[name].shape)
        if name == "label":
            feeds[name] = torch.randint(0, classes, shape, generator=gen).float()
        else:
            feeds[name] = torch.randn(shape, generator=gen)
    return feeds


def _unit_batchnorm_statistics(net) -> None:
    """Stored BatchNorm statistics of a trained net (mean 0, variance 1). A fresh net has
    variance 0 and factor 0, so TEST (global statistics) divides by sqrt(eps) at every
    BatchNorm and ResNet-18 overflows: Caffe would do the same on an untrained net."""
    with torch.no_grad():
        for m in net.layer_modules.values():
            if m.type == "BatchNorm":
                m.variance.fill_(1.0)
                m.scale_factor.fill_(1.0)


# ------------------------------------------------------------------------------- generator
def test_generated_files_match_generator():
    expected = _load_generator().expected_files()
    stale = [rel for rel, text in expected.items()
             if not os.path.isfile(os.path.join(ROOT, rel))
             or open(os.path.join(ROOT, rel)).read() != text]
    assert not stale, f"run python3 models/generate.py; stale: {stale}"
    shipped = {os.path.relpath(p, ROOT) for p in DEPLOYS + TRAIN_VALS + SOLVERS}
    assert shipped == set(expected), f"not generated: {sorted(shipped - set(expected))}"
    assert {"lenet", "allcnn_a", "allcnn_b", "allcnn_c", "nin_mnist", "nin_svhn", "googlenet",
            "vgg16", "resnet18"} <= {_name(p) for p in DEPLOYS}


# ------------------------------------------------------------------------------- form
@pytest.mark.parametrize("path", DEPLOYS + TRAIN_VALS, ids=lambda p: os.path.relpath(p, ROOT))
def test_hard_threshold_form(path):
    param = prototxt.read_net(path)
    types = [l.type for l in param.layer]
    assert "ReLU" not in types and types.count("HardThreshold") >= 3
    producer = {}
    for layer in param.layer:
        if layer.type == "HardThreshold":
            assert layer.hard_threshold_param.mode == caffe_pb2.HardThresholdParameter.RELU_BIAS
            assert list(layer.top) == list(layer.bottom), "in place, as the ReLU it replaces"
            src = producer[layer.bottom[0]]
            assert src.type in ("Convolution", "InnerProduct", "Scale", "Eltwise"), src.name
            if src.type == "Convolution":
                assert not src.convolution_param.bias_term, f"{src.name}: beta plays the bias"
            elif src.type == "InnerProduct":
                assert not src.inner_product_param.bias_term, f"{src.name}: beta plays the bias"
            elif src.type == "Scale":
                assert not src.scale_param.bias_term, f"{src.name}: beta plays the BN shift"
        for t in layer.top:
            if t not in layer.bottom:
                producer[t] = layer
    if _name(path) in IMAGENET | {"lenet"}:
        # Only the classifier keeps a bias: its output feeds no threshold.
        biased = [l.name for l in param.layer
                  if (l.type == "Convolution" and l.convolution_param.bias_term)
                  or (l.type == "InnerProduct" and l.inner_product_param.bias_term)]
        assert all("classifier" in n or n in ("ip2", "fc8", "fc1000") for n in biased), biased


# ------------------------------------------------------------------------------- deploy
@pytest.mark.parametrize("path", DEPLOYS, ids=_name)
def test_deploy_builds_and_gives_probabilities(path):
    name = _name(path)
    net = pycaffe_alt.Net(path, TEST)
    data = net.inputs[0]
    shape = list(net.blobs[data].shape)
    if shape[0] != 1:
        net.blobs[data].reshape(1, *shape[1:])
        net.reshape()
    assert net.outputs == ["prob"]
    x = torch.rand(net.blobs[data].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prob = net(**{data: x})["prob"]
    assert prob.shape[0] == 1 and torch.isfinite(prob).all()
    total = prob.reshape(1, -1).sum(dim=1)
    assert torch.allclose(total, torch.ones(1), atol=1e-5)
    # Parameter count against the published one (counted here to build VGG-16 only once).
    ref, tol, why = PARAM_COUNTS[name]
    count = learnable_count(net)
    assert abs(count - ref) <= tol * ref, f"{name}: {count} parameters, reference {ref} ({why})"


# ------------------------------------------------------------------------------- train_val
@pytest.mark.parametrize("path", TRAIN_VALS, ids=_name)
def test_train_val_builds_in_both_phases(path):
    name = _name(path)
    param = prototxt.read_net(path)
    small = name not in IMAGENET
    swapped = with_inputs(param, batch=2 if small else 1)
    classes = _classes(param)
    gen = torch.Generator().manual_seed(2)
    for phase in (TRAIN, TEST):
        net = pycaffe_alt.Net(swapped, phase)
        if phase == TEST:
            _unit_batchnorm_statistics(net)
        assert "label" in net.inputs and "data" in net.inputs
        feeds = _random_inputs(net, classes, gen)
        out = net(**feeds)
        loss = net.loss(out)
        assert torch.isfinite(loss) and loss > 0
        if phase == TEST:
            assert any(k.startswith("accuracy") or "top-1" in k for k in out), list(out)
        elif small:
            loss.backward()
            first = next(m for m in net.layer_modules.values() if m.type == "Convolution")
            assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
            betas = [m.beta for m in net.layer_modules.values() if m.type == "HardThreshold"]
            assert betas and all(b.grad is not None for b in betas)
        del net


@pytest.mark.parametrize("stage,size", [("augment", 28)])
def test_allcnn_augment_stage_crops(stage, size):
    param = with_inputs(prototxt.read_net(os.path.join(ROOT, "models/allcnn_c/train_val.prototxt")), 1)
    for phase in (TRAIN, TEST):
        plain = pycaffe_alt.Net(param, phase)
        aug = pycaffe_alt.Net(param, phase, stages=[stage])
        assert tuple(plain.blobs["data"].shape) == (1, 3, 32, 32)
        assert tuple(aug.blobs["data"].shape) == (1, 3, size, size)
    raw = prototxt.read_net(os.path.join(ROOT, "models/allcnn_c/train_val.prototxt"))
    mirrors = {(r.phase, tuple(r.stage)): l.transform_param.mirror
               for l in raw.layer if l.type == "Data" for r in l.include}
    assert mirrors[(TRAIN, ("augment",))] and not mirrors[(TEST, ("augment",))]


def test_googlenet_aux_heads_only_in_train_val():
    tv = prototxt.read_net(os.path.join(ROOT, "models/googlenet/train_val.prototxt"))
    dep = prototxt.read_net(os.path.join(ROOT, "models/googlenet/deploy.prototxt"))
    losses = {l.name: [round(w, 6) for w in l.loss_weight]
              for l in tv.layer if l.type == "SoftmaxWithLoss"}
    assert losses == {"loss1/loss": [0.3], "loss2/loss": [0.3], "loss3/loss3": []}
    assert not any(l.name.startswith(("loss1/", "loss2/")) for l in dep.layer)


def test_lenet_trains_on_embedded_mnist5k(monkeypatch):
    """The real Data layers of the embedded default: both phases read the shipped LMDBs."""
    from pycaffe_alt.data.mnist5k import ensure_mnist5k_lmdb

    monkeypatch.chdir(ROOT)
    ensure_mnist5k_lmdb()
    path = os.path.join(ROOT, "models/lenet/train_val.prototxt")
    for phase, batch in ((TRAIN, 64), (TEST, 100)):
        net = pycaffe_alt.Net(path, phase)
        out = net.forward()
        assert net.blobs["data"].data.shape == (batch, 1, 28, 28)
        labels = net.blobs["label"].data
        assert 0 <= labels.min() and labels.max() <= 9 and len(set(labels.tolist())) > 5
        assert 0.0 <= float(net.blobs["data"].data.min()) and float(net.blobs["data"].data.max()) < 1.0
        assert math.isfinite(float(out["loss"]))


# ------------------------------------------------------------------------------- solvers
def _data_layers(param, phase: int, stages):
    state = caffe_pb2.NetState(phase=phase, stage=list(stages))
    from pycaffe_alt.netstate import layer_included

    return [l for l in param.layer if l.type == "Data" and layer_included(l, state, "<test>")]


@pytest.mark.parametrize("path", SOLVERS, ids=os.path.basename)
def test_solver_parses_and_names_existing_net(path):
    s = prototxt.read_solver(path)
    base = os.path.basename(path)[:-len(".prototxt")]
    assert s.net and os.path.isfile(os.path.join(ROOT, s.net)), s.net
    model = s.net.split("/")[1]
    assert base.startswith(model) and s.net == f"models/{model}/train_val.prototxt"
    assert s.snapshot_prefix == f"snapshots/{model}/{base}"
    assert s.solver_mode == caffe_pb2.SolverParameter.CPU
    assert s.max_iter > 0 and 0 < s.test_interval <= s.max_iter and s.base_lr > 0
    net = prototxt.read_net(os.path.join(ROOT, s.net))
    stages = list(s.train_state.stage)
    train, test = _data_layers(net, TRAIN, stages), _data_layers(net, TEST, stages)
    assert len(train) == 1 and len(test) == 1, "exactly one Data layer per phase and state"
    if s.test_state:
        assert list(s.test_state[0].stage) == stages
    # test_iter x test batch covers the test set once (the last batch may wrap around).
    _, n_test = DATASETS[test[0].data_param.source]
    seen = s.test_iter[0] * test[0].data_param.batch_size
    assert n_test <= seen < n_test + test[0].data_param.batch_size
    kind = next(k for k in ("dsd_magnitude", "dsd", "balt", "alt", "sgd") if base.endswith("_" + k))
    if kind in ("alt", "balt"):
        want = "BATCH" if kind == "balt" else "INSTANCE"
        assert s.type == "Alternation" and s.HasField("alternation_param")
        a = s.alternation_param
        assert caffe_pb2.AlternationParameter.Mode.Name(a.mode) == want and a.base_type == "SGD"
        # The paper: a few warm-up epochs of SGD, then gaps of 4-50 epochs.
        assert 0 < a.warmup_epochs <= 10 and 4 <= a.gap_epochs <= 50
    elif kind.startswith("dsd"):
        d = s.dsd_param
        assert s.HasField("dsd_param") and d.sparse_iter > 0 and d.redense_iter > 0
        assert d.dense_iter + d.sparse_iter + d.redense_iter == s.max_iter
        if kind == "dsd":
            assert d.prune_by == caffe_pb2.DSDParameter.SUPPORT and not d.sparsity
            assert s.alternation_param.mode == caffe_pb2.AlternationParameter.BATCH
        else:
            assert d.prune_by == caffe_pb2.DSDParameter.MAGNITUDE
            assert all(0.3 <= r <= 0.5 for r in d.sparsity) and d.sparsity
    else:
        assert kind == "sgd" and s.type == "SGD"


def test_solver_set_is_complete():
    names = {os.path.basename(p)[:-len(".prototxt")] for p in SOLVERS}
    for m in ("lenet", "allcnn_a", "allcnn_b", "allcnn_c", "allcnn_c_aug", "allcnn_c_cifar100",
              "nin_mnist", "nin_svhn"):
        assert {f"{m}_sgd", f"{m}_alt", f"{m}_balt"} <= names, m
    for m in IMAGENET:
        assert {f"{m}_sgd", f"{m}_dsd", f"{m}_dsd_magnitude"} <= names, m


def test_main_jobs():
    """The embedded default runs in a few CPU minutes; the main job is ALL-CNN-C on CIFAR-10."""
    s = prototxt.read_solver(os.path.join(ROOT, "solvers/lenet_alt.prototxt"))
    net = prototxt.read_net(os.path.join(ROOT, s.net))
    (train,) = _data_layers(net, TRAIN, [])
    assert train.data_param.source == "data/mnist5k/mnist5k_train_lmdb"
    assert s.max_iter * train.data_param.batch_size <= 2000 * 64
    assert s.max_iter // s.test_interval >= 3, "a few test lines"
    epoch = 4000 / train.data_param.batch_size
    a = s.alternation_param
    assert (a.warmup_epochs + a.gap_epochs) * epoch < s.max_iter, "at least one support step"
    c = prototxt.read_solver(os.path.join(ROOT, "solvers/allcnn_c_alt.prototxt"))
    (ctrain,) = _data_layers(prototxt.read_net(os.path.join(ROOT, c.net)), TRAIN, [])
    assert ctrain.data_param.source == "data/cifar10/cifar10_train_lmdb"
    assert c.alternation_param.mode == caffe_pb2.AlternationParameter.INSTANCE
