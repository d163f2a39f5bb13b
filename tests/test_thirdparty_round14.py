"""Round 14 of third-party pycaffe programs run unchanged, aimed at programs that read a net's
structure and generate code, prototxt or weights from it: a Caffe-to-SystemC generator walking
net._top_ids/_bottom_ids/_inputs/_outputs/_blobs by index (hilbertw/model-caffe, gen-wire.py,
gen-blob-cpp.py with net_wrapper.py) and a draw_net script whose picture of a net's blobs follows
pycaffe's get_pydot_graph (0mariwest/Qrcode-Detect, src/caffe/draw.py, checked against BVLC's
draw.py through a recording pydot). Also run this round without a divergence found: Fabrik's
JSON-to-prototxt NetSpec exporter over its 57 layer types (Cloud-CV/Fabrik,
ide/utils/jsonToPrototxt.py, compared with BVLC's net_spec.py), an fc-to-conv converter that
rewrites the prototxt through caffe_pb2/text_format and transplants weights with .flat, an HDF5
ball-tracker regression trainer feeding Input blobs between solver.step(1) calls and testing with
test_nets[0].forward(start=...), weights copied from a TRAIN-phase deploy net into solver.net
(Vertical-Beach/ai-edge-contest4, FPN/train_signate.py), a caffemodel pickled from
net.layer_dict, a mean.binaryproto written with array_to_blobproto. Behaviours they rely on, each
checked with a small program of our own written after the real one's pattern."""
import numpy as np

import pycaffe_alt as caffe

BRANCHES = """name: 'mini'
layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: 'conv1' type: 'Convolution' bottom: 'data' top: 'conv1'
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' }
layer { name: 'b1' type: 'Convolution' bottom: 'conv1' top: 'b1' convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: 'b2' type: 'InnerProduct' bottom: 'conv1' top: 'b2' inner_product_param { num_output: 5 } }
layer { name: 'pool' type: 'Pooling' bottom: 'b1' top: 'pool' pooling_param { pool: AVE global_pooling: true } }
layer { name: 'prob' type: 'Softmax' bottom: 'b2' top: 'prob' }
"""


def _producer(net, blob_id, below):
    # gen-wire.py's find_in_top: the last layer below `below` whose tops hold the blob.
    for i in range(below - 1, -1, -1):
        if blob_id in net._top_ids(i):
            return i
    return -1


def test_input_and_output_index_lists_name_blobs_by_position(tmp_path):
    # pycaffe's net._inputs / net._outputs are Net::input_blob_indices() / output_blob_indices()
    # (_caffe.cpp): positions in net._blob_names / net._blobs, which the generator indexes with
    # (`net._blob_names[id]`, `input_blobs.push_back(blobs[id])`) and looks up in _top_ids.
    path = tmp_path / "mini.prototxt"
    path.write_text(BRANCHES)
    net = caffe.Net(str(path), caffe.TEST)
    names = list(net._blob_names)
    assert all(isinstance(i, int) for i in net._inputs + net._outputs)
    assert [names[i] for i in net._inputs] == net.inputs == ["data"]
    # Outputs in Caffe's order (its std::set of unconsumed blob names).
    assert [names[i] for i in net._outputs] == net.outputs == ["pool", "prob"]
    assert [net._layer_names[_producer(net, i, len(net.layers))] for i in net._inputs] == ["data"]
    assert [net._layer_names[_producer(net, i, len(net.layers))] for i in net._outputs] == \
        ["pool", "prob"]
    # gen-blob-cpp.py: one line per blob with its legacy 4-axis shape, then each layer's wiring.
    shapes = [(b.num, b.channels, b.height, b.width) for b in net._blobs]
    assert shapes[names.index("b2")] == (1, 5, 1, 1)
    assert shapes[names.index("conv1")] == (1, 4, 6, 6)
    wiring = {net._layer_names[i]: ([names[t] for t in net._top_ids(i)],
                                    [names[b] for b in net._bottom_ids(i)])
              for i in range(len(net.layers))}
    assert wiring["relu1"] == (["conv1"], ["conv1"])
    assert wiring["prob"] == (["prob"], ["b2"])
    # The lists are fresh copies: a program appending to one changes nothing in the net.
    net._inputs.append(99)
    assert net.inputs == ["data"] and len(net._inputs) == 1
    net.blobs["data"].data[...] = np.ones((1, 3, 8, 8), np.float32)
    assert net.forward()["prob"].shape == (1, 5)


DETECT = """name: 'det'
layer { name: 'data' type: 'Input' top: 'data' input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: 'conv' type: 'Convolution' bottom: 'data' top: 'conv' convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: 'relu' type: 'ReLU' bottom: 'conv' top: 'conv' }
layer { name: 'fc' type: 'InnerProduct' bottom: 'conv' top: 'fc' inner_product_param { num_output: 2 } }
layer { name: 'act' type: 'Sigmoid' bottom: 'fc' top: 'fc' }
layer { name: 'prob' type: 'Softmax' bottom: 'conv' top: 'prob' }
"""


def test_draw_net_styles_a_blob_as_the_last_layer_touching_it_left_it(tmp_path):
    # 0mariwest/Qrcode-Detect src/caffe/draw.py: text_format.Merge a deploy prototxt into a
    # NetParameter and caffe.draw.draw_net_to_file(net, file, 'LR'). pycaffe's get_pydot_graph
    # keeps one node per blob, replaced at each use: a bottom makes it a grey octagon, a top a
    # plain node. So a blob no layer reads after writing it (the outputs 'prob' and, written last
    # by an in-place layer, 'fc') is drawn plain, and one read last ('data', 'conv') styled.
    import re

    from google.protobuf import text_format

    import pycaffe_alt.draw

    net = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(DETECT, net)
    out = tmp_path / "net.dot"
    pycaffe_alt.draw.draw_net_to_file(net, str(out), "LR")
    nodes = dict(re.findall(r'^\s*"(\w+)_blob" \[(.*)\];$', out.read_text(), re.M))
    assert sorted(nodes) == ["conv", "data", "fc", "prob"]
    assert 'shape="octagon"' in nodes["data"] and 'shape="octagon"' in nodes["conv"]
    assert nodes["prob"] == 'label="prob"' and nodes["fc"] == 'label="fc"'
