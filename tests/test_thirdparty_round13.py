"""Round 13 of third-party pycaffe programs run unchanged, aimed at training programs driven
from Python: a hand-written SGD loop over net.forward/backward (nitnelave/pycaffe_tutorial,
"03 Custom solver"), online hard-triplet mining between solver.step(1) calls on a three-branch
net sharing its weights by param name (thanhmvu/CaffeLeNetMNIST,
triplet/train_triplet_lenet_mnist.py), and a SolverWrapper feeding a Python data layer through
solver.net.layers[0] into Python sampling and loss layers, with its own net.save snapshots
(hizhangp/triplet, train.py). Behaviours they rely on, each checked with a small program of our
own written after the real one's pattern."""
import math

import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

import pycaffe_alt as caffe

LENET = """name: 'LeNet'
layer { name: 'mnist' type: 'Data' top: 'data' top: 'label' include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: '{dir}/train_lmdb' batch_size: 8 backend: LMDB } }
layer { name: 'mnist' type: 'Data' top: 'data' top: 'label' include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: '{dir}/test_lmdb' batch_size: 10 backend: LMDB } }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 5 stride: 2 weight_filler { type: 'xavier' } } }
layer { name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: 'ip2' type: 'InnerProduct' bottom: 'pool1' top: 'ip2'
  inner_product_param { num_output: 4 weight_filler { type: 'xavier' } } }
layer { name: 'accuracy' type: 'Accuracy' bottom: 'ip2' bottom: 'label' top: 'accuracy'
  include { phase: TEST } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip2' bottom: 'label' top: 'loss' }
"""


def _write_lmdb(path: str, n: int, rs: np.random.RandomState) -> None:
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            k = i % 4
            img = rs.randint(0, 40, (1, 16, 16)).astype(np.uint8)
            img[0, (k // 2) * 8:(k // 2) * 8 + 8, (k % 2) * 8:(k % 2) * 8 + 8] = 250
            txn.put(b"%08d" % i, caffe.io.array_to_datum(img, k).SerializeToString())
    env.close()


def _image_batches(db_path: str, shape: tuple):
    # The notebook's image_generator/batch_generator: Datums read back with py-lmdb, the mean
    # 128 taken off, one reused array per batch (Python 3 ends a generator with return).
    env = lmdb.open(db_path, readonly=True)
    with env.begin() as txn:
        images = [caffe.io.datum_to_array(caffe.proto.caffe_pb2.Datum.FromString(v))
                  for _, v in txn.cursor()]
    env.close()
    res = np.zeros(shape)
    for start in range(0, len(images) - shape[0] + 1, shape[0]):
        res[...] = np.asarray(images[start:start + shape[0]], dtype=np.float32) - 128
        yield res


def test_custom_sgd_loop_over_forward_backward_with_a_shared_test_net(tmp_path):
    # nitnelave/pycaffe_tutorial "03 Custom solver.ipynb" (ran unchanged on a tiny MNIST-like
    # LMDB but for CAFFE_ROOT, CPU mode, np.asfarray -> np.asarray and PEP 479's StopIteration):
    # it writes each batch into the data blob, but net.forward() runs from the Data layer, which
    # overwrites it with the next LMDB batch (Net::Forward starts at layer 0), so training runs
    # on the Data layer's images and labels. Diffs are cleared by writing
    # net.blob_loss_weights[layer name] (0 for every layer with params, whose top is named as
    # the layer) into every param diff, since Caffe's backward accumulates param gradients.
    rs = np.random.RandomState(0)
    _write_lmdb(str(tmp_path / "train_lmdb"), 32, rs)
    _write_lmdb(str(tmp_path / "test_lmdb"), 20, rs)
    (tmp_path / "lenet.prototxt").write_text(LENET.replace("{dir}", str(tmp_path)))
    caffe.set_random_seed(0)
    net = caffe.Net(str(tmp_path / "lenet.prototxt"), caffe.TRAIN)
    test_net = caffe.Net(str(tmp_path / "lenet.prototxt"), caffe.TEST)
    net.share_with(test_net)

    def test_network():
        accuracy = loss = batches = 0
        for batch in _image_batches(str(tmp_path / "test_lmdb"), test_net.blobs["data"].data.shape):
            batches += 1
            test_net.blobs["data"].data[...] = batch
            test_net.forward()
            accuracy += test_net.blobs["accuracy"].data
            loss += test_net.blobs["loss"].data
        return accuracy / batches, loss / batches

    acc0, loss0 = test_network()
    iter_num, base_lr, gamma, power, losses = 0, 0.1, 1e-4, 0.75, []
    for epoch in range(6):
        for batch in _image_batches(str(tmp_path / "train_lmdb"), net.blobs["data"].data.shape):
            iter_num += 1
            net.blobs["data"].data[...] = batch
            net.forward()
            if iter_num == 1:  # the Data layer's batch, scaled, replaced the program's one
                assert net.blobs["data"].data.min() >= 0 and net.blobs["data"].data.max() < 1
            for name, l in zip(net._layer_names, net.layers):
                for b in l.blobs:
                    b.diff[...] = net.blob_loss_weights[name]
            net.backward()
            learning_rate = base_lr * math.pow(1 + gamma * iter_num, -power)
            before = [b.data.copy() for l in net.layers for b in l.blobs]
            for l in net.layers:
                for b in l.blobs:
                    b.data[...] -= learning_rate * b.diff
            after = [b for l in net.layers for b in l.blobs]
            for old, new in zip(before, after):
                np.testing.assert_allclose(new.data, old - learning_rate * new.diff, rtol=1e-5,
                                           atol=1e-7)
            losses.append(float(net.blobs["loss"].data))
    assert iter_num == 24 and len(net.layers[1].blobs) == 2
    assert net.blob_loss_weights["conv1"] == 0 and net.blob_loss_weights["loss"] == 1
    # share_with: the test net reads the trained weights, no copy made
    np.testing.assert_array_equal(test_net.params["ip2"][0].data, net.params["ip2"][0].data)
    acc, loss = test_network()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) and loss < loss0 and acc >= acc0
    net.save(str(tmp_path / f"lenet_iter_{iter_num}.caffemodel"))
    back = caffe.Net(str(tmp_path / "lenet.prototxt"), str(tmp_path / "lenet_iter_24.caffemodel"),
                     caffe.TEST)
    np.testing.assert_array_equal(back.params["conv1"][0].data, net.params["conv1"][0].data)


class TripletMnistLoss(caffe.Layer):
    """thanhmvu/CaffeLeNetMNIST triplet_mnist_loss_layer.py (after hizhangp/triplet): the hinge
    on margin + |a-p|^2 - |a-n|^2 averaged over the batch, param_str read with eval."""

    def setup(self, bottom, top):
        self.margin = eval(self.param_str)["margin"]
        top[0].reshape(1)

    def forward(self, bottom, top):
        a, p, n = (np.array(b.data) for b in bottom)
        dist = self.margin + np.sum((a - p) ** 2, axis=1) - np.sum((a - n) ** 2, axis=1)
        self.residual_list = np.asarray(dist > 0.0, dtype=np.float64)
        top[0].data[...] = np.sum(np.maximum(dist, 0.0)) / bottom[0].num

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            a, p, n = (np.array(b.data) for b in bottom)
            coeff = 2.0 * top[0].diff / bottom[0].num
            r = np.diag(self.residual_list)
            bottom[0].diff[...] = coeff * np.dot(r, n - p)
            bottom[1].diff[...] = coeff * np.dot(r, p - a)
            bottom[2].diff[...] = coeff * np.dot(r, a - n)

    def reshape(self, bottom, top):
        pass


def _branch(tag: str) -> str:
    return f"""
layer {{ name: 'conv1_{tag}' type: 'Convolution' bottom: 'data_{tag}' top: 'conv1_{tag}'
  param {{ name: 'conv1_w' lr_mult: 1 }} param {{ name: 'conv1_b' lr_mult: 2 }}
  convolution_param {{ num_output: 4 kernel_size: 5 stride: 2 weight_filler {{ type: 'xavier' }} }} }}
layer {{ name: 'feat_{tag}' type: 'InnerProduct' bottom: 'conv1_{tag}' top: 'feat_{tag}'
  param {{ name: 'feat_w' lr_mult: 1 }} param {{ name: 'feat_b' lr_mult: 2 }}
  inner_product_param {{ num_output: 2 weight_filler {{ type: 'xavier' }} }} }}"""


def test_hard_triplet_mining_reshapes_the_solver_net_between_steps(tmp_path, monkeypatch):
    # thanhmvu/CaffeLeNetMNIST triplet/train_triplet_lenet_mnist.py (ran unchanged on 28x28 PNGs
    # but for py3 prints, list(dict.keys()) for random.sample, np.float, and .data[0] where
    # NumPy 2 refuses a (1,) array as an element): an Input-fed three-branch net sharing
    # conv1_w/feat_w by name, each batch written into the data blobs before solver.step(1), then
    # hard triplets found by reshaping the data blobs to one image, net.forward(), and back.
    # Caffe's Step tests at iteration 0 (test_initialization), displays at iter % display == 0
    # before the update, snapshots at ++iter % snapshot == 0; the loss blob the program stores
    # after mining holds the last single-triplet loss, not the step's.
    monkeypatch.chdir(tmp_path)
    train = "name: 'triplet'\n" + "".join(
        f"layer {{ name: 'data' type: 'Input' top: 'data_anchor' top: 'data_pos' top: 'data_neg'"
        f" input_param {{ shape {{ dim: {n} dim: 1 dim: 16 dim: 16 }} }} include {{ phase: {ph} }} }}\n"
        for n, ph in ((4, "TRAIN"), (2, "TEST")))
    train += "".join(_branch(t) for t in ("anchor", "pos", "neg"))
    train += (f"\nlayer {{ name: 'loss' type: 'Python' bottom: 'feat_anchor' bottom: 'feat_pos'"
              f" bottom: 'feat_neg' top: 'loss' python_param {{ module: '{__name__}'"
              f" layer: 'TripletMnistLoss' param_str: \"{{'margin': 0.2}}\" }} loss_weight: 1 }}\n")
    (tmp_path / "train_test.prototxt").write_text(train)
    (tmp_path / "snap").mkdir()
    (tmp_path / "solver.prototxt").write_text(
        "net: 'train_test.prototxt'\ntest_iter: 2\ntest_interval: 500\nbase_lr: 0.01\n"
        "momentum: 0.9\nweight_decay: 0\nlr_policy: 'inv'\ngamma: 0.0001\npower: 0.75\n"
        "display: 2\nmax_iter: 50000\nsnapshot: 2\nsnapshot_prefix: 'snap/triplet'\n")
    caffe.set_random_seed(3)
    solver = caffe.SGDSolver("solver.prototxt")
    net = solver.net
    rs = np.random.RandomState(2)

    def image(k: int) -> np.ndarray:  # preprocess(load_image(path)): 'L' image times 1/256
        img = rs.randint(0, 200, (16, 16)).astype(np.float32)
        img[(k // 2) * 8:(k // 2) * 8 + 8, (k % 2) * 8:(k % 2) * 8 + 8] /= 2
        return img * 0.00390625

    def rand_triplet():
        label, label_neg = rs.choice(4, 2, replace=False)
        return [image(label), image(label), image(label_neg)]

    names = ["data_anchor", "data_pos", "data_neg"]

    def is_hard(triplet) -> bool:
        shape = net.blobs[names[0]].data.shape
        for i, name in enumerate(names):
            net.blobs[name].reshape(1, *shape[1:])
            net.blobs[name].data[...] = triplet[i]
        net.forward()
        hard = net.blobs["loss"].data > 0
        for name in names:
            net.blobs[name].reshape(*shape)
        return bool(hard)

    next_batch = [rand_triplet() for _ in range(4)]
    train_loss = []
    for it in range(4):
        for i, (anc, pos, neg) in enumerate(next_batch):
            net.blobs["data_anchor"].data[i, ...] = anc
            net.blobs["data_pos"].data[i, ...] = pos
            net.blobs["data_neg"].data[i, ...] = neg
        w0 = net.params["conv1_anchor"][0].data.copy()
        solver.step(1)
        if it == 0:
            # one diff for the three sharing layers; after SGDSolver::ComputeUpdateValue it
            # holds the update itself (lr * gradient + momentum * history), which Net::Update
            # took off the data
            diff = net.params["conv1_anchor"][0].diff
            np.testing.assert_array_equal(diff, net.params["conv1_neg"][0].diff)
            assert np.abs(diff).max() > 0
            np.testing.assert_allclose(net.params["conv1_anchor"][0].data, w0 - diff,
                                       rtol=1e-5, atol=1e-8)
            # the test net ran at iteration 0 on its all-zero Input blobs: every branch gives
            # the same feature, so the loss is the margin
            assert np.allclose(solver.test_nets[0].blobs["loss"].data, 0.2)
        next_batch = []
        while len(next_batch) < 4:
            triplet = None
            while triplet is None or not is_hard(triplet):
                triplet = rand_triplet()
            next_batch.append(triplet)
        assert net.blobs["loss"].data[0] > 0 and net.blobs["feat_anchor"].data.shape == (1, 2)
        assert net.blobs["data_anchor"].data.shape == (4, 1, 16, 16)
        train_loss.append(net.blobs["loss"].data[0])
    assert solver.iter == 4 and len(train_loss) == 4
    for tag in ("pos", "neg"):
        np.testing.assert_array_equal(net.params[f"conv1_{tag}"][0].data,
                                      net.params["conv1_anchor"][0].data)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == [
        "triplet_iter_2.caffemodel", "triplet_iter_2.solverstate",
        "triplet_iter_4.caffemodel", "triplet_iter_4.solverstate"]


class FaceDataLayer(caffe.Layer):
    """hizhangp/triplet data_layer.py: samples handed in after set-up by set_data(), called on
    solver.net.layers[0]; CUT_SIZE images of one person in a row, reshuffled at each epoch."""

    def setup(self, bottom, top):
        self.batch_size, self._index = 6, 0
        top[0].reshape(self.batch_size, 3, 8, 8)
        top[1].reshape(self.batch_size)

    def set_data(self, data):
        self._data = data
        self.epochs = 1

    def forward(self, bottom, top):
        if self._index + self.batch_size > len(self._data["sample"]):
            self._index = 0
            self.epochs += 1
        rows = self._data["sample"][self._index:self._index + self.batch_size]
        self._index += self.batch_size
        top[0].data[...] = [self._data["images"][i] for i in rows]
        top[1].data[...] = [self._data["labels"][i] for i in rows]

    def backward(self, top, propagate_down, bottom):
        pass

    def reshape(self, bottom, top):
        pass


class L2NormLayer(caffe.Layer):
    """hizhangp/triplet l2norm_layer.py (sklearn's normalize written out)."""

    def setup(self, bottom, top):
        top[0].reshape(bottom[0].num, bottom[0].data.shape[1])

    def forward(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        top[0].data[...] = bottom[0].data / np.linalg.norm(bottom[0].data, axis=1)[:, None]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            norm = np.linalg.norm(bottom[0].data, axis=1)[:, np.newaxis]
            td, bd = top[0].diff, bottom[0].data
            bottom[0].diff[...] = (td * norm - (bd * td).sum(axis=1)[:, None] * bd / norm) / norm ** 2

    def reshape(self, bottom, top):
        pass


class TripletSampleLayer(caffe.Layer):
    """hizhangp/triplet tripletsample_layer.py: one (anchor, positive, negative) row per pair of
    same-label images, so its tops are reshaped in forward() to a count known only then."""

    def setup(self, bottom, top):
        for t in top:
            t.reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        data, labels = np.array(bottom[0].data), np.array(bottom[1].data)
        self.index_map = [[i, j, int(np.flatnonzero(labels != labels[i])[0])]
                          for i in range(len(labels)) for j in range(len(labels))
                          if i != j and labels[i] == labels[j]]
        for k, t in enumerate(top):
            t.reshape(len(self.index_map), data.shape[1])
            t.data[...] = data[[row[k] for row in self.index_map]]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom_diff = np.zeros(bottom[0].diff.shape)
            for i, row in enumerate(self.index_map):
                for k in range(3):
                    bottom_diff[row[k]] += top[k].diff[i]
            bottom[0].diff[...] = bottom_diff

    def reshape(self, bottom, top):
        pass


class TripletLayer(TripletMnistLoss):
    """hizhangp/triplet tripletloss_layer.py: the same loss, param_str read with yaml."""

    def setup(self, bottom, top):
        import yaml  # PyYAML: the program's own dependency (the test skips without it)

        self.margin = yaml.safe_load(self.param_str)["margin"]
        top[0].reshape(1)


def test_solver_wrapper_feeds_a_python_data_layer_through_solver_net_layers(tmp_path, monkeypatch):
    # hizhangp/triplet train.py (ran unchanged on three tiny "persons" but for Python 3 fixes in
    # its layers, yaml.safe_load, and its VGG-16 body shrunk to conv/pool/fc7): the pre-trained
    # weights come in by solver.net.copy_from, the data by solver.net.layers[0].set_data (pycaffe
    # hands back the Python layer object itself), the loss is read from solver.net.blobs['loss']
    # after each step(1), and snapshots are net.save(prefix + '_iter_{solver.iter}').
    pytest.importorskip("yaml")  # the program parses its layers' param_str with PyYAML
    monkeypatch.chdir(tmp_path)
    body = """name: 'VGG_FACE_16_layers'
layer { name: 'data' type: 'Python' top: 'data' top: 'labels'
  python_param { module: '{mod}' layer: 'FaceDataLayer' } }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: 'xavier' } } }
layer { name: 'fc7' type: 'InnerProduct' bottom: 'conv1' top: 'fc7'
  inner_product_param { num_output: 8 weight_filler { type: 'xavier' } } }
""".replace("{mod}", __name__)
    head = """layer { name: 'fc9_1' type: 'InnerProduct' bottom: 'fc7' top: 'fc9_1'
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 0 decay_mult: 0 }
  inner_product_param { num_output: 4 weight_filler { type: 'xavier' }
  bias_filler { type: 'constant' value: 0.5 } } }
layer { name: 'norm2' type: 'Python' bottom: 'fc9_1' top: 'norm2'
  python_param { module: '{mod}' layer: 'L2NormLayer' } }
layer { name: 'tripletsample' type: 'Python' bottom: 'norm2' bottom: 'labels'
  top: 'anchor' top: 'positive' top: 'negative'
  python_param { module: '{mod}' layer: 'TripletSampleLayer' } }
layer { name: 'tripletloss' type: 'Python' bottom: 'anchor' bottom: 'positive' bottom: 'negative'
  top: 'loss' python_param { module: '{mod}' layer: 'TripletLayer' param_str: "'margin': 0.2" }
  loss_weight: 1 }
""".replace("{mod}", __name__)
    (tmp_path / "train.prototxt").write_text(body + head)
    (tmp_path / "solver.prototxt").write_text(
        "net: 'train.prototxt'\nbase_lr: 0.1\nlr_policy: 'step'\ngamma: 0.1\nstepsize: 20000\n"
        "display: 2\nmax_iter: 50000\nmomentum: 0.9\nweight_decay: 0.0005\nsnapshot: 1000000\n"
        "snapshot_prefix: 'data/models/vggnet_triplet'\n")
    caffe.set_random_seed(5)
    pre = caffe.SGDSolver("solver.prototxt")
    pre.net.save("softmax.caffemodel")
    caffe.set_random_seed(6)  # a different draw, so copy_from is seen to replace it
    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.copy_from("softmax.caffemodel")
    np.testing.assert_array_equal(solver.net.params["conv1"][0].data, pre.net.params["conv1"][0].data)
    rs = np.random.RandomState(0)
    labels = np.repeat(np.arange(3), 4)
    images = rs.rand(12, 3, 8, 8).astype(np.float32) + labels[:, None, None, None]
    sample = [i for person in rs.permutation(3) for i in np.flatnonzero(labels == person)]
    solver.net.layers[0].set_data({"images": images, "labels": labels, "sample": sample})
    layer = solver.net.layers[0]
    assert layer.type == "Python" and layer.batch_size == 6 and layer.epochs == 1
    solver_param = caffe.proto.caffe_pb2.SolverParameter()
    with open("solver.prototxt") as f:
        text_format.Merge(f.read(), solver_param)
    out = tmp_path / "data" / "models" / "triplet"
    out.mkdir(parents=True)
    bias = solver.net.params["fc9_1"][1].data.copy()
    written, rows, last = [], [], -1
    while solver.iter < 5:
        solver.step(1)
        if solver.iter % 3 == 0:
            last = solver.iter
            name = solver_param.snapshot_prefix.split("/")[-1] + f"_iter_{solver.iter}.caffemodel"
            solver.net.save(str(out / name))
            written.append(name)
        rows.append((solver.iter - 1, float(solver.net.blobs["loss"].data[0])))
        # 6 images of 4 + 2 of one person: the triplet tops were resized in forward to the
        # 4*3 + 2*1 same-person ordered pairs of the batch
        sampler = solver.net.layers[list(solver.net._layer_names).index("tripletsample")]
        assert len(sampler.index_map) == 14 and solver.net.blobs["anchor"].data.shape == (14, 4)
    if last != solver.iter:
        name = solver_param.snapshot_prefix.split("/")[-1] + f"_iter_{solver.iter}.caffemodel"
        solver.net.save(str(out / name))
        written.append(name)
    assert written == ["vggnet_triplet_iter_3.caffemodel", "vggnet_triplet_iter_5.caffemodel"]
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4] and layer.epochs == 3
    # fc9_1's bias has lr_mult 0: the solver leaves it; the loss reached conv1 through
    # the Python sample and norm layers
    np.testing.assert_array_equal(solver.net.params["fc9_1"][1].data, bias)
    assert not np.array_equal(solver.net.params["conv1"][0].data, pre.net.params["conv1"][0].data)
    back = caffe.Net("train.prototxt", str(out / written[-1]), caffe.TEST)
    np.testing.assert_array_equal(back.params["conv1"][0].data, solver.net.params["conv1"][0].data)
