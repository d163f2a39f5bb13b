"""benchmarks/gpu_check.py in its CPU mode (what CI can run): parity cases, a training-speed row
per precision, the data pipeline, one table."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_prints_one_table(capsys):
    gpu_check = load_gpu_check()
    rc = gpu_check.main(["--cpu", "--quick", "--cases", "3", "--nets", "lenet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3/3 golden cases within tolerance" in out
    assert "train lenet fp32" in out and "train lenet amp bf16" in out
    assert "data pipeline" in out and "img/s" in out


def test_resnet50_prototxt_matches_the_hand_written_module():
    gpu_check = load_gpu_check()
    import pycaffe_alt as caffe
    from pycaffe_alt.proto import caffe_pb2
    from pycaffe_alt.prototxt import parse_text

    net = caffe.Net(parse_text(gpu_check.resnet50_prototxt(1, 32), caffe_pb2.NetParameter()),
                    caffe.TEST)
    hand = gpu_check.ResNet50()
    convs = [p for n, p in hand.named_parameters() if p.dim() == 4]
    ours = [blobs[0] for name, blobs in net.params.items() if net.layer_dict[name].type == "Convolution"]
    assert len(convs) == len(ours) == 53  # 49 in the main path + 4 projections
    assert sorted(tuple(p.shape) for p in convs) == sorted(b.shape for b in ours)
    assert net.blobs["fc"].shape == (1, 10)
