"""The Python layer: opt-in refusal, import errors, pycaffe-style user classes in the torch graph."""
from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

import pycaffe_alt as caffe
from layer_check import gradcheck_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import LAYERS, TEST, TRAIN, LayerContext
from pycaffe_alt.layers.python_layer import PythonLayerBase
from pycaffe_alt.proto import caffe_pb2

USER_CODE = textwrap.dedent('''
    import numpy as np

    class Double:
        """y = factor * x, factor from param_str; a hand-written backward."""
        def setup(self, bottom, top):
            self.factor = float(self.param_str or 2)
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
        def forward(self, bottom, top):
            top[0].data[...] = self.factor * bottom[0].data
        def backward(self, top, propagate_down, bottom):
            self.seen_propagate_down = list(propagate_down)
            if propagate_down[0]:
                bottom[0].diff[...] = self.factor * top[0].diff

    class ChannelScale:
        """y[n, c] = x[n, c] * w[c] with a learnable blob w."""
        def setup(self, bottom, top):
            self.blobs.add_blob(bottom[0].channels)
            self.blobs[0].data[...] = 1.5
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].shape)
        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data * self.blobs[0].data[None, :]
        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = top[0].diff * self.blobs[0].data[None, :]
            self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum(0)

    class Source:
        """No bottoms, two tops (a data-layer style Python layer); reports the phase."""
        def setup(self, bottom, top):
            pass
        def reshape(self, bottom, top):
            top[0].reshape(2, 3, 4, 5)
            top[1].reshape(2)
        def forward(self, bottom, top):
            t = top[0]
            top[0].data[...] = np.arange(t.count).reshape(t.num, t.channels, t.height, t.width)
            top[1].data[...] = self.phase

    class Reshaper:
        """Reshapes its top (or adds a blob) to the shape given in param_str."""
        def setup(self, bottom, top):
            if self.param_str.startswith("blob"):
                self.blobs.add_blob(*eval(self.param_str[4:]))
        def reshape(self, bottom, top):
            if not self.param_str.startswith("blob"):
                top[0].reshape(*eval(self.param_str))

    class Broken:
        def setup(self, bottom, top):
            raise ValueError("param_str must be a number")
        def reshape(self, bottom, top):
            pass
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user layer module in a temp dir that is the working directory (Caffe imports from cwd)."""
    name = f"user_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def python_layer(module: str, cls: str, bottom_shapes, *, tops=("y",), param_str: str = "",
                 allow: bool = True, phase: int = TEST):
    param = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "py" type: "Python" python_param {{ module: "{module}" layer: "{cls}" '
                      f'param_str: "{param_str}" }}', param)
    param.top.extend(tops)
    return LAYERS.get("Python")(param, [tuple(s) for s in bottom_shapes],
                                LayerContext(phase=phase, allow_python=allow))


def test_refused_unless_allowed(user_module):
    with pytest.raises(NetError) as info:
        python_layer(user_module, "Double", [(2, 3)], allow=False)
    msg = str(info.value)
    for part in ("'py'", user_module, "Double", "allow_python=True", "--allow-python"):
        assert part in msg
    assert user_module not in sys.modules  # nothing was imported


def test_import_error_names_the_module(user_module):
    with pytest.raises(NetError, match="cannot import module 'no_such_layers_mod'"):
        python_layer("no_such_layers_mod", "X", [(2, 3)])
    with pytest.raises(NetError, match="has no 'Missing'"):
        python_layer(user_module, "Missing", [(2, 3)])
    # Found, but its own import fails: the hint names what is missing, not the layer's file.
    (Path.cwd() / "needs_dep_layers.py").write_text("import dep_not_installed_xyz\n")
    with pytest.raises(NetError) as info:
        python_layer("needs_dep_layers", "X", [(2, 3)])
    assert "imports 'dep_not_installed_xyz'" in str(info.value)
    assert "put needs_dep_layers.py" not in str(info.value)
    with pytest.raises(NetError, match="put pkg_nowhere/sub.py in the working directory"):
        python_layer("pkg_nowhere.sub", "X", [(2, 3)])


def test_module_error_at_import_reaches_the_caller_with_a_note(user_module):
    # The module's own code fails while it is imported: its exception goes on unchanged, as a
    # setup error does, with a note naming the layer (the traceback named only the file).
    (Path.cwd() / "failing_layers_mod.py").write_text("ratio = 1 / 0\n")
    try:
        with pytest.raises(ZeroDivisionError) as info:
            python_layer("failing_layers_mod", "X", [(2, 3)])
    finally:
        sys.modules.pop("failing_layers_mod", None)
    assert any("Python layer 'py'" in note and "failing_layers_mod" in note
               for note in getattr(info.value, "__notes__", []))


def test_python_layer_phase_prints_its_name(user_module):
    # py-faster-rcnn's ProposalLayer: cfg_key = str(self.phase) # either 'TRAIN' or 'TEST'
    layer = python_layer(user_module, "Source", [], tops=("data", "phase"), phase=TEST)
    assert str(layer.user.phase) == "TEST" and layer.user.phase == 1 == caffe.TEST
    assert str(caffe.TRAIN) == "TRAIN" and caffe.TRAIN == 0


def test_setup_error_reaches_the_caller_unchanged_with_a_note(user_module):
    # pycaffe lets the layer's own exception through (BVLC test_python_layer.test_exception).
    with pytest.raises(ValueError, match="param_str must be a number") as info:
        python_layer(user_module, "Broken", [(2, 3)])
    assert any("Python layer 'py'" in note and "Broken" in note
               for note in getattr(info.value, "__notes__", []))


def test_forward_backward_and_param_str(user_module):
    layer = python_layer(user_module, "Double", [(2, 3)], param_str="3")
    assert layer.top_shapes([(2, 3)]) == [(2, 3)]
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, 1.0]], requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, 3 * x.detach())
    (y * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert torch.equal(x.grad, 3 * torch.arange(6.0).reshape(2, 3))
    assert layer.user.seen_propagate_down == [True]
    # A later forward must not overwrite the earlier output (Caffe reuses top arrays; we copy).
    y2 = layer(torch.ones(2, 3))
    assert torch.equal(y, 3 * x.detach()) and torch.equal(y2, torch.full((2, 3), 3.0))


def test_gradcheck_through_user_backward(user_module):
    layer = python_layer(user_module, "Double", [(2, 3)])
    assert gradcheck_layer(layer, [torch.randn(2, 3)])


def test_user_blobs_become_parameters(user_module):
    layer = python_layer(user_module, "ChannelScale", [(2, 3)])
    assert [tuple(p.shape) for p in layer.blobs] == [(3,)]
    assert torch.equal(layer.blobs[0].detach(), torch.full((3,), 1.5))
    x = torch.randn(2, 3)
    assert torch.allclose(layer(x), 1.5 * x)
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([1.0, 2.0, 3.0]))  # e.g. a solver update
    assert torch.allclose(layer(x), x * torch.tensor([1.0, 2.0, 3.0]))
    assert gradcheck_layer(layer, [torch.randn(2, 3)])  # includes the parameter blob


def test_no_bottom_layer_with_two_tops_and_phase(user_module):
    layer = python_layer(user_module, "Source", [], tops=("data", "phase"), phase=TRAIN)
    assert layer.top_shapes([]) == [(2, 3, 4, 5), (2,)]
    data, phase = layer()
    assert torch.equal(data.flatten(), torch.arange(120.0)) and torch.equal(phase, torch.zeros(2))
    test_layer = python_layer(user_module, "Source", [], tops=("data", "phase"), phase=TEST)
    assert torch.equal(test_layer()[1], torch.ones(2))


def test_python_layer_base_class_defaults():
    base = PythonLayerBase("p")
    assert base.param == "p" and base.param_str == "" and len(base.blobs) == 0
    base.blobs.add_blob(2, 3)
    assert base.blobs[0].shape == (2, 3) and base.blobs[0].count == 6 and base.blobs[0].height == 1
    with pytest.raises(NotImplementedError):
        base.forward([], [])


def test_net_layers_hand_out_the_users_layer_object(user_module, tmp_path):
    # pycaffe's net.layers[i] is the user's object: py-faster-rcnn feeds its data layer with
    # net.layers[0].set_roidb(...), and its fork names the parameter string param_str_.
    import pycaffe_alt as caffe
    path = tmp_path / "net.prototxt"
    path.write_text(f'layer {{ name: "src" type: "Python" top: "a" top: "b" python_param {{ '
                    f'module: "{user_module}" layer: "Source" param_str: "cfg" }} }}\n')
    net = caffe.Net(str(path), caffe.TEST, allow_python=True)
    view = net.layers[0]
    assert view.type == "Python" and view.param_str == "cfg" and view.param_str_ == "cfg"
    view.module.user.set_roidb = lambda roidb: setattr(view.module.user, "roidb", roidb)
    view.set_roidb([1, 2])
    assert view.roidb == [1, 2]
    with pytest.raises(AttributeError):
        view.no_such_method
    view.threshold = 0.5  # written to the user's object, as on pycaffe's
    assert view.module.user.threshold == 0.5
    # Programs test the class of pycaffe's object (hizhangp/triplet's data layer checks).
    assert isinstance(view, type(view.module.user)) and view.__class__ is type(view.module.user)
    assert not isinstance(net.layers[0], int)


@pytest.mark.parametrize("module,cls", [(".rel", "X"), ("..rel", "X"), ("a..b", "X"), ("x.", "X"),
                                        ("ok", "not a name")])
def test_module_and_layer_must_be_python_names(module, cls):
    # '.rel' reached importlib, which raised a TypeError about relative imports.
    with pytest.raises(NetError, match="both must be Python names"):
        python_layer(module, cls, [(2, 3)])


@pytest.mark.parametrize("param_str,needle", [
    ("(-1, 3)", "negative dimension"),
    ("(2.5, 3)", "integer dimensions"),
    ("(100000, 100000, 1000)", "INT_MAX"),  # Caffe's limit, before any memory check
    ("blob(-2,)", "negative dimension"),
    ("blob(1.5,)", "integer dimensions"),
])
def test_python_layer_reshape_checks_like_blob_reshape(user_module, param_str, needle):
    # numpy's ValueError/MemoryError, or a silent cut of 2.5 to 2, before.
    with pytest.raises(NetError, match=needle):
        python_layer(user_module, "Reshaper", [(2, 3)], param_str=param_str)


def test_a_python_data_layer_does_not_keep_the_backwards_graph(user_module, tmp_path):
    # A pycaffe backward keeps the pass's graph only when running the layers again would
    # differ (Layer.replays_exactly). A data layer is never run again to record a graph, so a
    # Python data layer (FCN's voc_layers) must not keep every pass's graph alive.
    import gc
    import weakref

    import numpy as np

    import pycaffe_alt as caffe

    path = tmp_path / "net.prototxt"
    path.write_text(f'force_backward: true\n'
                    f'layer {{ name: "src" type: "Python" top: "a" top: "b" python_param {{ '
                    f'module: "{user_module}" layer: "Source" }} }}\n'
                    'layer { name: "ip" type: "InnerProduct" bottom: "a" top: "y" '
                    'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }\n'
                    'layer { name: "l" type: "Reduction" bottom: "y" top: "l" loss_weight: 1 }\n')
    net = caffe.Net(str(path), caffe.TRAIN, allow_python=True)

    class Saved:  # what the graph holds for its backward
        def __init__(self, t):
            self.t = t

    saved = []

    def pack(t):
        box = Saved(t)
        saved.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        net.forward()
    net.backward()
    gc.collect()
    assert saved and not any(ref() is not None for ref in saved)
    before = net.params["ip"][0].diff.copy()
    net.backward()  # recorded again: the same gradient once more
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * before, rtol=1e-6)
