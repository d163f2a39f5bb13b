"""convert_relu: the converted net (RELU_BIAS) computes the original function; folding rules."""
import logging
import math

import pytest
import torch

import pycaffe_alt
from pycaffe_alt import prototxt
from pycaffe_alt.layers import TEST
from pycaffe_alt.proto import caffe_pb2
from pycaffe_alt.tools.convert_relu import convert_net, main

@pytest.fixture(autouse=True)
def _restore_logger():
    """main() installs the CLI's log handler (no propagation); undo it for the tests that follow."""
    logger = logging.getLogger("pycaffe_alt")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


def _random_weights(net, seed: int) -> None:
    """He-scaled random weights and non-zero biases (so that folding the bias matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            scale = math.sqrt(2.0 / fan_in) if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# The ReLU originals of Caffe's LeNet and of ALL-CNN-C (models/ ships them in hard-threshold form).
LENET = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 stride: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param { num_output: 500 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


def _allcnn_c() -> str:
    convs = [(96, 3, 1, 1), (96, 3, 1, 1), (96, 3, 1, 2), (192, 3, 1, 1), (192, 3, 1, 1),
             (192, 3, 1, 2), (192, 3, 0, 1), (192, 1, 0, 1), (10, 1, 0, 1)]
    text = ['name: "ALL_CNN_C"',
            'layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }']
    bottom = "data"
    for i, (n, k, pad, stride) in enumerate(convs, 1):
        text.append(f'layer {{ name: "conv{i}" type: "Convolution" bottom: "{bottom}" '
                    f'top: "conv{i}" convolution_param {{ num_output: {n} kernel_size: {k} '
                    f'pad: {pad} stride: {stride} }} }}')
        text.append(f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}')
        bottom = f"conv{i}"
    text.append('layer { name: "pool" type: "Pooling" bottom: "conv9" top: "pool" '
                'pooling_param { pool: AVE global_pooling: true } }')
    return "\n".join(text)


@pytest.mark.parametrize("model,blob", [("lenet", "ip2"), ("allcnn_c", "pool")])
@pytest.mark.parametrize("fold", [False, True])
def test_converted_net_same_function(tmp_path, model, blob, fold):
    deploy = str(tmp_path / "deploy.prototxt")
    with open(deploy, "w") as f:
        f.write(LENET if model == "lenet" else _allcnn_c())
    net = pycaffe_alt.Net(deploy, TEST)
    _random_weights(net, seed=7)
    weights = str(tmp_path / "in.caffemodel")
    net.save(weights)
    out_proto, out_weights = str(tmp_path / "ht.prototxt"), str(tmp_path / "ht.caffemodel")
    args = [deploy, out_proto, "--weights", weights, "--out-weights", out_weights]
    assert main(args + (["--fold-bias"] if fold else [])) == 0
    converted = prototxt.read_net(out_proto)
    types = [layer.type for layer in converted.layer]
    assert "ReLU" not in types and "HardThreshold" in types
    net2 = pycaffe_alt.Net(out_proto, out_weights, TEST)
    x = torch.rand(net.blobs["data"].shape, generator=torch.Generator().manual_seed(3))
    ref = net(data=x, blobs=[blob])[blob]
    got = net2(data=x, blobs=[blob])[blob]
    assert ref.abs().max() > 0
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    hts = [m for m in net2.layer_modules.values() if m.type == "HardThreshold"]
    convs = {n: m for n, m in net2.layer_modules.items() if m.type in ("Convolution", "InnerProduct")}
    if fold:
        # beta = -bias and the biases are zero; some beta is non-zero, so the fold did something.
        assert any(h.beta.abs().max() > 0 for h in hts)
        assert all((m.bias == 0).all() for n, m in convs.items()
                   if any(l.name.startswith("relu") and l.bottom[0] == n for l in converted.layer))
        # The function also matches in THRESHOLD/SHIFT form (eq. 2 = ReLU(q - beta)).
        for h in hts:
            h.set_mode("THRESHOLD")
            h.output = "SHIFT"
        assert (net2(data=x, blobs=[blob])[blob] - ref).abs().max() <= 1e-5 * ref.abs().max()
    else:
        assert all((h.beta == 0).all() for h in hts)


def _param(text: str):
    return prototxt.parse_text(text, caffe_pb2.NetParameter())


NET = """
layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 3 } }
layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "r2" }
layer { name: "side" type: "Power" bottom: "ip2" top: "side" }
layer { name: "leaky" type: "ReLU" bottom: "r2" top: "r2" relu_param { negative_slope: 0.1 } }
"""


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_fold_rules_and_lr_mults():
    # Our own handler: the CLI's setup_logging stops propagation to pytest's caplog.
    collect = _Collect()
    logger = logging.getLogger("pycaffe_alt")
    logger.addHandler(collect)
    try:
        out, plan = convert_net(_param(NET), fold_bias=True)
    finally:
        logger.removeHandler(collect)
    by = {layer.name: layer for layer in out.layer}
    assert [(c.relu, c.producer, c.folded) for c in plan] == [("relu1", "ip1", True),
                                                               ("relu2", "ip2", False)]
    # Folded: beta learns like the bias did; the bias is frozen.
    assert by["relu1"].param[0].lr_mult == 2 and by["relu1"].param[0].decay_mult == 0
    assert by["ip1"].param[1].lr_mult == 0 and by["ip1"].param[1].decay_mult == 0
    # Not folded ('ip2' is also read by 'side'): beta frozen at 0, the bias keeps its role.
    assert by["relu2"].param[0].lr_mult == 0
    assert len(by["ip2"].param) == 0  # untouched
    assert by["leaky"].type == "ReLU"
    text = "\n".join(collect.lines)
    assert "'relu2': bias not folded" in text and "also read by side" in text
    assert "'leaky' is a leaky ReLU" in text


def test_no_fold_keeps_producer_params():
    out, plan = convert_net(_param(NET), fold_bias=False)
    by = {layer.name: layer for layer in out.layer}
    assert by["ip1"].param[1].lr_mult == 2
    assert by["relu1"].hard_threshold_param.mode == caffe_pb2.HardThresholdParameter.RELU_BIAS
    assert all(not c.folded for c in plan)


def test_mode_and_output_flags(tmp_path):
    src = tmp_path / "n.prototxt"
    src.write_text(NET)
    dst = tmp_path / "o.prototxt"
    assert main([str(src), str(dst), "--mode", "THRESHOLD", "--output", "SHIFT"]) == 0
    layer = [l for l in prototxt.read_net(str(dst)).layer if l.name == "relu1"][0]
    assert layer.hard_threshold_param.mode == caffe_pb2.HardThresholdParameter.THRESHOLD
    assert layer.hard_threshold_param.output == caffe_pb2.HardThresholdParameter.SHIFT
    with pytest.raises(SystemExit):
        main([str(src), str(dst), "--weights", "w.caffemodel"])  # --out-weights missing
