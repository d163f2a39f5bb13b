"""Round 16 of third-party pycaffe programs run unchanged, aimed at face-detection cascades,
prototxt surgery, classifiers and mean-file converters: the many binaryproto-to-npy mean
converters (RodriguezAndres/Pascal-VOC-2012, convert_binaryproto2npy.py:
np.array(caffe.io.blobproto_to_array(blob))[0] saved with np.save), whose result pycaffe gives as
float64, as BVLC's own python/caffe/imagenet/ilsvrc_2012_mean.npy made that way is. Also run
this round without a divergence found: JFDA's four-stage face detector with its real prototxts,
caffemodels and images (luoyetx/Joint-Face-Detection-and-Alignment, jfda/detector.py: the
data blob reshaped per pyramid scale and per batch of crops, caffe.Net(proto, caffe.TEST,
weights=...); boxes as in the repository's own img/test3_stage4.jpg), latent replay's prototxt
surgery and training loop (lrzpellegrini/Latent-Replay, Project Source/rehe_lat_surgery.py and
inc_training_Core50.py: Input layers per phase, an extra Input concatenated on axis 0 before the
stop layer, copy_from, share_weights, clear_param_diffs, backward(end=stop layer),
apply_update), and an MNIST caffe.Classifier over load_image(color=False)
(jklhj222/caffe_LeNet, test/caffe_test.py). Behaviours they rely on, each checked with a small
program of our own written after the real one's pattern."""
import numpy as np

import pycaffe_alt as caffe
from pycaffe_alt.proto import caffe_pb2


def test_mean_binaryproto_converts_to_a_float64_array(tmp_path):
    # convert_binaryproto2npy.py's pattern on a compute_image_mean-style blob (legacy
    # num/channels/height/width): pycaffe's np.array(blob.data) holds Python floats, so the mean
    # is float64 whatever protobuf's own container offers numpy.
    mean = (np.arange(3 * 4 * 5, dtype=np.float32) / 7).reshape(1, 3, 4, 5)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=5)
    blob.data.extend(mean.ravel().tolist())
    blob.diff.extend((-mean).ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())

    parsed = caffe.proto.caffe_pb2.BlobProto()
    parsed.ParseFromString((tmp_path / "mean.binaryproto").read_bytes())
    arr = np.array(caffe.io.blobproto_to_array(parsed))
    np.save(str(tmp_path / "mean.npy"), arr[0])
    out = np.load(str(tmp_path / "mean.npy"))
    assert out.dtype == np.float64 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, mean[0].astype(np.float64))
    # the per-channel means programs take from it are the float64 ones
    np.testing.assert_array_equal(out.mean(1).mean(1),
                                  mean[0].astype(np.float64).mean(1).mean(1))
    assert caffe.io.blobproto_to_array(parsed, return_diff=True).dtype == np.float64
    vec = caffe.io.arraylist_to_blobprotovector_str([mean[0]])
    assert caffe.io.blobprotovector_str_to_arraylist(vec)[0].dtype == np.float64
