"""Structure layers: Caffe golden parity, float64 gradchecks, Caffe's shape rules and errors."""
import pytest
import torch

from layer_check import gradcheck_layer, make_layer
from pycaffe_alt.errors import NetError
from pycaffe_alt.layers import TRAIN

# Parity with Caffe's outputs and gradients: tests/test_golden.py runs the golden cases ip_*,
# eltwise_*, concat_*, slice_*, split_fanout, flatten, reshape, crop, tile, reduction_*,
# argmax*, embed, filter, batch_reindex and nets/shared_params through the Net.


def rand(*shape):
    return torch.randn(shape, dtype=torch.float64)


def randomize_blobs(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.blobs:
            p.normal_()


# -- gradchecks --------------------------------------------------------------------------------
GRADCHECKS = [  # (layer text, bottom shapes)
    ('type: "InnerProduct" inner_product_param { num_output: 3 }', [(2, 3, 2, 2)]),
    ('type: "InnerProduct" inner_product_param { num_output: 3 axis: -2 transpose: true }', [(2, 3, 4)]),
    ('type: "InnerProduct" inner_product_param { num_output: 2 axis: 2 bias_term: false }', [(2, 3, 4, 2)]),
    ('type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3), (2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 2 coeff: -0.5 }', [(2, 3), (2, 3)]),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3), (2, 3), (2, 3)]),
    ('type: "Concat" concat_param { axis: -1 }', [(2, 3), (2, 1), (2, 2)]),
    ('type: "Slice" top: "a" top: "b" top: "c" slice_param { axis: 1 slice_point: 1 slice_point: 3 }',
     [(2, 5, 2)]),
    ('type: "Split" top: "a" top: "b"', [(2, 3)]),
    ('type: "Flatten"', [(2, 3, 2, 2)]),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }', [(2, 3, 2)]),
    ('type: "Crop" crop_param { axis: 1 offset: 1 }', [(2, 4, 5), (2, 2, 3)]),
    ('type: "Tile" tile_param { axis: 1 tiles: 3 }', [(2, 2, 3)]),
    ('type: "Reduction" reduction_param { operation: SUM axis: 1 coeff: 2 }', [(2, 3, 2)]),
    ('type: "Reduction" reduction_param { operation: ASUM axis: -1 }', [(2, 3, 2)]),
    ('type: "Reduction" reduction_param { operation: SUMSQ coeff: -1 }', [(2, 3, 2)]),
    ('type: "Reduction" reduction_param { operation: MEAN axis: 2 }', [(2, 3, 4)]),
]


@pytest.mark.parametrize("text,shapes", GRADCHECKS)
def test_gradcheck(text, shapes):
    torch.manual_seed(0)
    layer = make_layer(text, shapes)
    randomize_blobs(layer)
    xs = [rand(*s) for s in shapes]
    grad = [True] * len(xs)
    if layer.type == "Crop":
        grad[1] = False  # the reference bottom only gives a shape
    assert gradcheck_layer(layer, xs, grad_inputs=grad)


def test_gradcheck_embed_params():
    layer = make_layer('type: "Embed" embed_param { input_dim: 5 num_output: 3 }', [(2, 4)])
    randomize_blobs(layer)
    idx = torch.tensor([[0, 4, 4, 1], [2, 2, 0, 3]], dtype=torch.float64)
    assert gradcheck_layer(layer, [idx], grad_inputs=[False])


def test_gradcheck_batch_reindex_and_filter():
    br = make_layer('type: "BatchReindex"', [(3, 2, 2), (5,)])
    idx = torch.tensor([2.0, 0.0, 2.0, 1.0, 2.0])
    assert gradcheck_layer(br, [rand(3, 2, 2), idx], grad_inputs=[True, False])
    flt = make_layer('type: "Filter" top: "a" top: "b"', [(4, 3), (4, 2, 2), (4, 1)])
    sel = torch.tensor([[1.0], [0.0], [3.0], [0.0]])
    assert gradcheck_layer(flt, [rand(4, 3), rand(4, 2, 2), sel], grad_inputs=[True, True, False])


# -- InnerProduct ----------------------------------------------------------------------------------
def test_inner_product_shapes_and_values():
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 4 axis: 2 }', [(2, 3, 5, 2)])
    assert layer.weight.shape == (4, 10) and layer.bias.shape == (4,)
    assert layer.top_shapes([(2, 3, 5, 2)]) == [(2, 3, 4)]
    t = make_layer('type: "InnerProduct" inner_product_param { num_output: 4 transpose: true }', [(2, 6)])
    assert t.weight.shape == (6, 4)
    randomize_blobs(t)
    x = torch.randn(2, 6)
    assert torch.allclose(t(x), x @ t.weight + t.bias)
    nb = make_layer('type: "InnerProduct" inner_product_param { num_output: 2 bias_term: false }', [(1, 3)])
    assert len(nb.blobs) == 1 and nb.blob_names[:1] == ("weight",)


def test_inner_product_fillers():
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 3 '
                       'weight_filler { type: "constant" value: 2 } '
                       'bias_filler { type: "constant" value: -1 } }',
                       [(2, 4)])
    assert torch.all(layer.weight == 2) and torch.all(layer.bias == -1)


def test_inner_product_errors():
    with pytest.raises(NetError, match="under_test.*num_output"):
        make_layer('type: "InnerProduct"', [(2, 3)])
    with pytest.raises(NetError, match="axis 4 is out of range"):
        make_layer('type: "InnerProduct" inner_product_param { num_output: 2 axis: 4 }', [(2, 3)])
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 2 }', [(2, 3)])
    with pytest.raises(NetError, match="expect 3"):
        layer(torch.zeros(2, 4))


# -- Eltwise -------------------------------------------------------------------------------------------
def test_eltwise_max_ties_follow_caffe():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', [(3,)] * 3)
    a = torch.tensor([1.0, 2.0, 0.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    c = torch.tensor([0.0, 2.0, 0.0], requires_grad=True)
    y = layer(a, b, c)
    assert y.tolist() == [1.0, 2.0, 0.0]
    y.backward(torch.tensor([10.0, 20.0, 30.0]))
    # Caffe: bottom 0 wins over bottom 1 only when strictly greater (a tie goes to bottom 1); later
    # bottoms win only when strictly greater than the running maximum.
    assert a.grad.tolist() == [0.0, 20.0, 0.0]
    assert b.grad.tolist() == [10.0, 0.0, 30.0]
    assert c.grad.tolist() == [0.0, 0.0, 0.0]


def test_eltwise_sum_and_prod_values():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    s = make_layer('type: "Eltwise" eltwise_param { coeff: 2 coeff: 0.5 }', [(2,), (2,)])
    assert s(a, b).tolist() == [3.5, 3.5]
    p = make_layer('type: "Eltwise" eltwise_param { operation: PROD }', [(2,), (2,)])
    assert p(a, b).tolist() == [3.0, -2.0]


def test_eltwise_errors():
    with pytest.raises(NetError, match=r"under_test.*\(2, 3\).*\(2, 4\)"):
        make_layer('type: "Eltwise"', [(2, 3), (2, 4)])
    with pytest.raises(NetError, match="one coeff per bottom"):
        make_layer('type: "Eltwise" eltwise_param { coeff: 1 }', [(2,), (2,)])
    with pytest.raises(NetError, match="only for operation SUM"):
        make_layer('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 1 }', [(2,), (2,)])


# -- Concat, Slice, Split --------------------------------------------------------------------------------
def test_concat_axes():
    legacy = make_layer('type: "Concat" concat_param { concat_dim: 0 }', [(1, 2), (3, 2)])
    assert legacy.top_shapes([(1, 2), (3, 2)]) == [(4, 2)]
    default = make_layer('type: "Concat"', [(2, 1, 3), (2, 2, 3)])
    assert default.top_shapes([(2, 1, 3), (2, 2, 3)]) == [(2, 3, 3)]
    with pytest.raises(NetError, match="both axis and concat_dim"):
        make_layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 2), (2, 2)])
    with pytest.raises(NetError, match="except on axis 1"):
        make_layer('type: "Concat"', [(2, 2, 3), (2, 2, 4)])


def test_slice_shapes_and_errors():
    even = make_layer('type: "Slice" top: "a" top: "b" slice_param { slice_dim: 0 }', [(4, 3)])
    assert even.top_shapes([(4, 3)]) == [(2, 3), (2, 3)]
    x = torch.arange(12.0).reshape(2, 6)
    pts = make_layer('type: "Slice" top: "a" top: "b" top: "c" slice_param { axis: -1 slice_point: 2 '
                     'slice_point: 5 }', [(2, 6)])
    a, b, c = pts(x)
    assert a.tolist() == [[0, 1], [6, 7]] and b.shape == (2, 3) and c.tolist() == [[5], [11]]
    with pytest.raises(NetError, match="evenly"):
        make_layer('type: "Slice" top: "a" top: "b" top: "c"', [(2, 4)])
    with pytest.raises(NetError, match="one slice_point fewer"):
        make_layer('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }', [(2, 4)])
    with pytest.raises(NetError, match="increase strictly"):
        make_layer('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 3 slice_point: 2 }',
                   [(2, 4)])


def test_split_copies():
    layer = make_layer('type: "Split" top: "a" top: "b" top: "c"', [(2,)])
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    tops = layer(x)
    assert len(tops) == 3 and all(torch.equal(t, x) for t in tops)
    sum(t * (i + 1) for i, t in enumerate(tops)).sum().backward()
    assert x.grad.tolist() == [6.0, 6.0]


# -- Flatten, Reshape, Crop, Tile ---------------------------------------------------------------------
def test_flatten_shapes():
    x = torch.zeros(2, 3, 4, 5)
    assert make_layer('type: "Flatten"', [x.shape])(x).shape == (2, 60)
    mid = make_layer('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [x.shape])
    assert mid(x).shape == (2, 12, 5)
    assert make_layer('type: "Flatten" flatten_param { axis: -2 }', [x.shape])(x).shape == (2, 3, 20)
    with pytest.raises(NetError, match="in-place"):
        make_layer('type: "Flatten" bottom: "x" top: "x"', [x.shape])
    with pytest.raises(NetError, match="end_axis"):
        make_layer('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [x.shape])


@pytest.mark.parametrize("spec,bottom,expected", [
    ("shape { dim: 0 dim: -1 dim: 2 }", (2, 3, 4, 2), (2, 12, 2)),
    ("shape { dim: 6 dim: 0 dim: 0 }", (2, 3, 4, 5), None),          # bottom count 120 != 6*3*4
    ("shape { dim: -1 } axis: 1", (2, 3, 4), (2, 12)),
    ("shape { dim: 3 dim: 4 } axis: 1 num_axes: 1", (2, 12, 5), (2, 3, 4, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3), (2, 3, 1)),      # insert a trailing axis
    ("shape { dim: 1 } axis: 0 num_axes: 0", (2, 3), (1, 2, 3)),       # insert a leading axis
    ("shape { dim: 0 dim: 1 dim: 0 } axis: 1", (2, 3, 4), None),  # a 0 with no bottom axis to copy
    ("shape { dim: -1 dim: -1 }", (2, 3), None),
    ("shape { dim: -1 dim: 5 }", (2, 3), None),
    ("shape { dim: 2 } axis: 1 num_axes: 3", (2, 3), None),
])
def test_reshape_rules(spec, bottom, expected):
    text = f'type: "Reshape" reshape_param {{ {spec} }}'
    if expected is None:
        with pytest.raises(NetError, match="under_test.*cannot reshape"):
            make_layer(text, [bottom])
    else:
        layer = make_layer(text, [bottom])
        x = torch.arange(float(torch.tensor(bottom).prod())).reshape(bottom)
        y = layer(x)
        assert y.shape == expected and torch.equal(y.flatten(), x.flatten())


def test_reshape_follows_batch_size_and_refuses_in_place():
    layer = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 4)])
    assert layer(torch.zeros(5, 3, 4)).shape == (5, 12)
    with pytest.raises(NetError, match="in-place"):
        make_layer('type: "Reshape" bottom: "x" top: "x" reshape_param { shape { dim: -1 } }', [(2, 3)])


def test_crop_offsets():
    x = torch.arange(2 * 3 * 6 * 7.0).reshape(2, 3, 6, 7)
    ref = torch.zeros(2, 3, 4, 3)
    one = make_layer('type: "Crop" crop_param { offset: 1 }', [x.shape, ref.shape])
    assert torch.equal(one(x, ref), x[:, :, 1:5, 1:4])
    each = make_layer('type: "Crop" crop_param { axis: -2 offset: 2 offset: 3 }', [x.shape, ref.shape])
    assert torch.equal(each(x, ref), x[:, :, 2:6, 3:6])
    none = make_layer('type: "Crop" crop_param { axis: 1 }', [x.shape, (2, 2, 4, 3)])
    assert torch.equal(none(x, torch.zeros(2, 2, 4, 3)), x[:, :2, :4, :3])
    with pytest.raises(NetError, match="out of bounds"):
        make_layer('type: "Crop" crop_param { offset: 3 }', [x.shape, ref.shape])
    with pytest.raises(NetError, match="one offset for all"):
        make_layer('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [x.shape, ref.shape])


def test_tile_layout():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    layer = make_layer('type: "Tile" tile_param { axis: 0 tiles: 2 }', [x.shape])
    assert layer(x).tolist() == [[1, 2], [3, 4], [1, 2], [3, 4]]
    layer = make_layer('type: "Tile" tile_param { axis: -1 tiles: 2 }', [x.shape])
    assert layer(x).tolist() == [[1, 2, 1, 2], [3, 4, 3, 4]]
    with pytest.raises(NetError, match="tiles"):
        make_layer('type: "Tile"', [x.shape])


# -- Reduction, ArgMax ---------------------------------------------------------------------------------
def test_reduction_values():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 6.0]])
    def red(spec):
        return make_layer(f'type: "Reduction" reduction_param {{ {spec} }}', [x.shape])(x)
    assert red("operation: SUM").shape == ()  # axis 0 reduces everything to a scalar
    assert red("operation: SUM").item() == 9.0
    assert red("operation: ASUM axis: 1").tolist() == [6.0, 15.0]
    assert red("operation: SUMSQ axis: 1 coeff: 0.5").tolist() == [7.0, 38.5]
    assert red("operation: MEAN axis: -1").tolist() == pytest.approx([2.0 / 3, 7.0 / 3])


def test_argmax_ties_and_layouts():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    # Caffe sorts (value, index) pairs descending: equal values put the larger index first.
    y = make_layer('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x.shape])(x)
    assert y.shape == (1, 2, 3)
    assert y.tolist() == [[[2.0, 0.0, 3.0], [3.0, 3.0, 2.0]]]
    x4 = torch.randn(2, 5, 3, 2)
    y4 = make_layer('type: "ArgMax"', [x4.shape])(x4)
    assert y4.shape == (2, 1, 1, 1)
    assert torch.equal(y4.flatten(), x4.reshape(2, -1).argmax(1).float())
    ya = make_layer('type: "ArgMax" argmax_param { axis: 1 top_k: 2 }', [x4.shape])(x4)
    assert ya.shape == (2, 2, 3, 2) and ya.dtype == torch.float32
    assert torch.equal(ya[:, 0], x4.argmax(1).float())
    yv = make_layer('type: "ArgMax" argmax_param { axis: -1 out_max_val: true }', [x4.shape])(x4)
    assert torch.equal(yv[..., 0], x4.max(-1).values)
    with pytest.raises(NetError, match="top_k 7 exceeds"):
        make_layer('type: "ArgMax" argmax_param { axis: 1 top_k: 7 }', [x4.shape])


# -- Embed, BatchReindex, Filter ------------------------------------------------------------------------
def test_embed_lookup_and_range():
    layer = make_layer('type: "Embed" embed_param { input_dim: 4 num_output: 2 bias_term: false '
                       'weight_filler { type: "uniform" } }', [(3,)])
    assert layer.weight.shape == (4, 2) and len(layer.blobs) == 1
    idx = torch.tensor([3.0, 0.0, 3.0])
    assert torch.equal(layer(idx), layer.weight[[3, 0, 3]])
    assert layer.top_shapes([(2, 5)]) == [(2, 5, 2)]
    assert not layer.allow_force_backward(0)
    for bad in (4.0, -1.0, 1.5):
        with pytest.raises(NetError, match="under_test.*index"):
            layer(torch.tensor([0.0, bad]))


def test_batch_reindex_accumulates_and_checks():
    layer = make_layer('type: "BatchReindex"', [(3, 2), (4,)])
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    y = layer(x, torch.tensor([2.0, 2.0, 0.0, 2.0]))
    assert y.tolist() == [[5, 6], [5, 6], [1, 2], [5, 6]]
    y.sum().backward()
    assert x.grad.tolist() == [[1, 1], [0, 0], [3, 3]]
    with pytest.raises(NetError, match="outside"):
        layer(x, torch.tensor([3.0]))
    with pytest.raises(NetError, match="1-D"):
        make_layer('type: "BatchReindex"', [(3, 2), (4, 1)])


def test_filter_selects_items():
    layer = make_layer('type: "Filter" top: "y"', [(4, 2), (4,)])
    assert not layer.shape_by_fake_run
    assert layer.top_shapes([(4, 2), (4,)]) == [(4, 2)]  # before data, the full batch (as Caffe)
    x = torch.arange(8.0).reshape(4, 2).requires_grad_(True)
    y = layer(x, torch.tensor([0.0, 1.0, 0.0, 2.0]))
    assert y.tolist() == [[2, 3], [6, 7]]
    y.sum().backward()
    assert x.grad.tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert not layer.allow_force_backward(1)
    with pytest.raises(NetError, match="selector"):
        make_layer('type: "Filter" top: "y"', [(4, 2), (3,)])
    with pytest.raises(NetError, match="one top per bottom"):
        make_layer('type: "Filter" top: "y" top: "z"', [(4, 2), (4,)])


# -- Silence, DummyData, Parameter ------------------------------------------------------------------------
def test_silence():
    layer = make_layer('type: "Silence"', [(2, 3), (4,)])
    assert layer(torch.zeros(2, 3), torch.zeros(4)) == ()
    assert layer.top_shapes([(2, 3), (4,)]) == []


def test_dummy_data_fillers():
    layer = make_layer('type: "DummyData" top: "a" top: "b" dummy_data_param { '
                       'shape { dim: 2 dim: 3 } shape { dim: 4 } '
                       'data_filler { type: "constant" value: 7 } data_filler { type: "gaussian" } }', [])
    assert layer.top_shapes([]) == [(2, 3), (4,)]
    a1, b1 = layer()
    a2, b2 = layer()
    assert torch.all(a1 == 7) and torch.equal(a1, a2)  # constant: the same every pass
    assert not torch.equal(b1, b2)  # other fillers draw anew at each forward, as in Caffe
    assert layer.double()()[0].dtype == torch.float64
    zeros = make_layer('type: "DummyData" top: "a" '
                       'dummy_data_param { num: 2 channels: 3 height: 1 width: 2 }', [])
    z = zeros()
    assert z.shape == (2, 3, 1, 2) and torch.all(z == 0)
    legacy = make_layer('type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 num: 3 channels: 1 '
                        'height: 1 width: 5 }', [])
    assert legacy.top_shapes([]) == [(2, 1, 1, 5), (3, 1, 1, 5)]


@pytest.mark.parametrize("spec,match", [
    ('shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1', "both shape and the legacy"),
    ('shape { dim: 2 } shape { dim: 2 } shape { dim: 3 }', "shapes for 2 tops"),
    ('shape { dim: 2 } data_filler { type: "nope" }', "unknown data_filler"),
    ('num: 2 channels: 1 height: 1', "'width' values"),
])
def test_dummy_data_errors(spec, match):
    with pytest.raises(NetError, match=match):
        make_layer(f'type: "DummyData" top: "a" top: "b" dummy_data_param {{ {spec} }}', [])


def test_parameter_layer_exposes_its_blob():
    layer = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], TRAIN)
    assert layer.top_shapes([]) == [(2, 3)] and len(layer.blobs) == 1
    assert torch.all(layer.blobs[0] == 0)
    with torch.no_grad():
        layer.blobs[0].fill_(1.5)
    top = layer()
    assert torch.all(top == 1.5)
    (top * 2).sum().backward()
    assert torch.all(layer.blobs[0].grad == 2)


def test_crop_without_crop_param_warns_that_hed_offsets_are_not_worked_out(caplog):
    # HED's fork computes Crop offsets from the layers' geometry; BVLC (and we) crop at 0.
    import logging

    with caplog.at_level(logging.WARNING, logger="pycaffe_alt"):
        make_layer('type: "Crop"', [(1, 2, 8, 8), (1, 2, 5, 5)])
        make_layer('type: "Crop" crop_param { offset: 1 }', [(1, 2, 8, 8), (1, 2, 5, 5)])
        make_layer('type: "Crop"', [(1, 2, 5, 5), (1, 2, 5, 5)])
    warnings = [r for r in caplog.records if "HED" in r.getMessage()]
    assert len(warnings) == 1 and "offset 0" in warnings[0].getMessage()
