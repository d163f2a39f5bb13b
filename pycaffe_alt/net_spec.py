"""Writing nets in Python: pycaffe's ``caffe.NetSpec``, ``caffe.layers``, ``caffe.params``.

``L.Convolution(bottom, kernel_size=5, num_output=20)`` records a layer and returns its output(s)
as :class:`Top` objects; assigning them to a :class:`NetSpec` attribute names them
(``n.conv1 = ...`` names the blob and the layer ``conv1``); ``n.to_proto()`` turns everything
reachable into a ``caffe_pb2.NetParameter`` (``str()`` of it is prototxt text).

Keyword arguments go where pycaffe puts them: a name ending in ``param`` (``transform_param``,
``param=[dict(lr_mult=1)]``) is a LayerParameter field; any other name goes into the layer type's
own parameter message (``Convolution`` -> ``convolution_param``, found from caffe.proto's field
and message names the way pycaffe's ``param_name_dict`` does) when that message has the field,
else onto the LayerParameter (``loss_weight``, ``include``, ``name``). ``ntop=k`` gives k tops,
``ntop=0`` a layer without tops, ``in_place=True`` writes the top over the bottom.

Unnamed blobs and layers are named ``<Type><count>`` in the order they are reached, as pycaffe
names them; a layer is named after its first top.

Beyond pycaffe (each case is an error there): tuples count as lists; protobuf messages may be
passed as values (``weight_filler=caffe_pb2.FillerParameter(...)``); Deconvolution/Im2col take
``convolution_param`` keywords and RNN/LSTM ``recurrent_param`` ones; unknown keywords raise a
:class:`~pycaffe_alt.errors.NetError` naming the layer and keyword (also an AttributeError,
TypeError or ValueError where pycaffe raises that).
"""
from __future__ import annotations

import numbers
from collections import Counter, OrderedDict
from functools import lru_cache
from typing import Any, Dict, List, Tuple, Union

from .errors import (ArgumentTypeError, NetAttributeError, NetError, NetTypeError,
                     NetValueError)
from .proto import caffe_pb2

# Layer types that read another type's parameter message (Caffe's layer sources say which).
_SHARED_PARAM = {"Deconvolution": "convolution", "Im2col": "convolution",
                 "RNN": "recurrent", "LSTM": "recurrent"}


@lru_cache(maxsize=None)
def param_name_dict() -> Dict[str, str]:
    """Layer type name -> prefix of its ``<prefix>_param`` field (``InnerProduct`` ->
    ``inner_product``), from the ``*_param`` fields of LayerParameter and their message names."""
    names: Dict[str, str] = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    for type_name, prefix in _SHARED_PARAM.items():
        names.setdefault(type_name, prefix)
    return names


def _is_repeated(proto, name: str) -> bool:
    # Repeated containers have extend(); FieldDescriptor.label is gone from newer protobufs.
    return hasattr(getattr(proto, name), "extend")


def _is_message(proto, name: str) -> bool:
    return proto.DESCRIPTOR.fields_by_name[name].message_type is not None


def assign_proto(proto, name: str, value: Any) -> None:
    """Set field ``name`` of ``proto`` from Python values, recursively: dicts fill messages,
    lists (or tuples) fill repeated fields, a single value given to a repeated field becomes a
    one-element list (``kernel_size=3``), a protobuf message is copied."""
    if name not in proto.DESCRIPTOR.fields_by_name:
        raise AttributeError(f'{proto.DESCRIPTOR.name} has no field "{name}"')
    if _is_repeated(proto, name):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        field = getattr(proto, name)
        if _is_message(proto, name):
            for item in values:
                _fill_message(field.add(), item, f"{name}[]")
        else:
            field.extend(values)
    elif _is_message(proto, name):
        _fill_message(getattr(proto, name), value, name)
    else:
        setattr(proto, name, value)


def _fill_message(message, value: Any, name: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assign_proto(message, key, item)
    elif hasattr(value, "DESCRIPTOR") and hasattr(value, "SerializeToString"):
        message.CopyFrom(value)
    else:
        raise TypeError(f"'{name}' is a {message.DESCRIPTOR.name} message: give a dict "
                        f"(got {type(value).__name__})")


class Top:
    """One output blob of a layer (output ``n`` of :class:`Function` ``fn``)."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> "caffe_pb2.NetParameter":
        """A NetParameter with every layer needed to compute this blob."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """One layer: its type, its input :class:`Top` s, its keyword parameters and its tops."""

    def __init__(self, type_name: str, inputs: Tuple[Top, ...], params: Dict[str, Any]):
        self.type_name = type_name
        for index, top in enumerate(inputs):
            if not isinstance(top, Top):
                # pycaffe's TypeError and message (net_spec.py Function.__init__), word for word:
                # programs match it; a tuple here usually means a multi-top layer's result was
                # passed whole instead of unpacked (L.Silence(*tops)).
                raise ArgumentTypeError(f"{type_name} input {index} is not a Top "
                                        f"(type is {type(top)})")
        self.inputs = tuple(inputs)
        params = dict(params)
        ntop = params.pop("ntop", 1)
        if isinstance(ntop, bool) or not isinstance(ntop, numbers.Integral) or ntop < 0:
            raise NetError(f"ntop={ntop!r}: the number of tops must be a whole number >= 0",
                           f"NetSpec layer of type {type_name}",
                           "ntop=0 for a layer without tops, 2 or more for a tuple of tops")
        self.ntop = int(ntop)
        self.in_place = bool(params.pop("in_place", False))
        if self.in_place and self.ntop != len(self.inputs):
            # pycaffe writes the bottoms as the tops, so any other count names tops that
            # do not exist in the prototxt (an IndexError later, or a silently missing blob).
            raise NetError(f"in_place=True writes the tops over the bottoms, so ntop ({self.ntop}) "
                           f"must equal the number of bottoms ({len(self.inputs)})",
                           f"NetSpec layer of type {type_name}",
                           "drop in_place=True, or give as many bottoms as tops")
        self.params = params
        self.tops = tuple(Top(self, i) for i in range(self.ntop))

    def _top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[self.type_name] += 1
            names[top] = f"{self.type_name}{autonames[self.type_name]}"
        return names[top]

    def _layer_name(self, names, autonames) -> str:
        if self not in names:
            if self.tops:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers: "OrderedDict[Function, Any]", names, autonames) -> None:
        """Add this layer and every layer it depends on to ``layers``, inputs first.

        pycaffe recurses here; a depth-first walk with an explicit stack gives the same order
        and the same automatic names without Python's recursion limit (a chain of a few
        thousand unnamed layers raised RecursionError).
        """
        stack: List[Tuple[Function, int]] = [(self, 0)]
        while stack:
            fn, i = stack.pop()
            if fn in layers:
                continue
            if i < len(fn.inputs):
                stack.append((fn, i + 1))
                stack.append((fn.inputs[i].fn, 0))
            else:
                layers[fn] = fn._layer_proto(layers, names, autonames)

    def _layer_proto(self, layers, names, autonames):
        """This layer's LayerParameter; the layers of its inputs are already in ``layers``."""
        bottoms = [layers[top.fn].top[top.n] for top in self.inputs]
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(t, names, autonames) for t in self.tops)
        layer.name = self._layer_name(names, autonames)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        return layer

    def _assign(self, layer, key: str, value: Any) -> None:
        target = layer
        if not key.endswith("param"):
            prefix = param_name_dict().get(self.type_name)
            if prefix is not None:
                own = getattr(layer, prefix + "_param")
                if key in own.DESCRIPTOR.fields_by_name:
                    target = own
        where = f"NetSpec layer '{layer.name}' (type {self.type_name})"
        if key not in target.DESCRIPTOR.fields_by_name:
            own_field = param_name_dict().get(self.type_name)
            # pycaffe's assign_proto reads the field with getattr: an AttributeError there.
            raise NetAttributeError(f"unknown parameter '{key}'", where,
                           f"it is neither a field of {own_field}_param nor of LayerParameter"
                           if own_field else
                           "it is not a LayerParameter field; pass type-specific values inside "
                           "the right *_param dict, e.g. convolution_param=dict(...)")
        try:
            assign_proto(target, key, value)
        except (TypeError, ValueError, AttributeError) as e:
            # Raised as the type protobuf (or assign_proto, in pycaffe) raised, still naming
            # the layer: a program's except TypeError / ValueError holds as with pycaffe.
            kind = (NetTypeError if isinstance(e, TypeError) else
                    NetValueError if isinstance(e, ValueError) else NetAttributeError)
            raise kind(f"bad value for '{key}': {e}", where) from None


def to_proto(*tops: Union[Top, Function]) -> "caffe_pb2.NetParameter":
    """A NetParameter with every layer needed to compute ``tops`` (pycaffe ``caffe.to_proto``);
    blobs and layers get automatic names."""
    return _net_param(tops, {})


def _net_param(tops, names) -> "caffe_pb2.NetParameter":
    layers: "OrderedDict[Function, Any]" = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        if not isinstance(top, (Top, Function)):
            raise ArgumentTypeError(f"to_proto() takes the tops of caffe.layers calls (or "
                                    f"NetSpec attributes), got {type(top).__name__}")
        top._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """A net written in Python: assign layer outputs to attributes (or items) to name them, then
    ``to_proto()`` (pycaffe ``caffe.NetSpec``)."""

    def __init__(self) -> None:
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name: str, value: Union[Top, Function]) -> None:
        if not isinstance(value, (Top, Function)):
            raise NetError(f"cannot assign a {type(value).__name__} to '{name}'", "NetSpec",
                           "assign layer outputs, e.g. n.conv1 = L.Convolution(n.data, ...)")
        self.tops[name] = value

    def __getattr__(self, name: str) -> Union[Top, Function]:
        try:
            return self.__dict__["tops"][name]
        except KeyError:
            raise AttributeError(f"NetSpec has no blob '{name}'") from None

    def __setitem__(self, key: str, value: Union[Top, Function]) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, key: str) -> Union[Top, Function]:
        try:
            return self.tops[key]
        except KeyError:
            raise KeyError(f"NetSpec has no blob '{key}'") from None

    def __contains__(self, key: str) -> bool:
        return key in self.tops

    # The SSD fork's NetSpec additions, which its model_libs.py (VGGNetBody, CreateMultiBoxHead)
    # and ssd_*.py scripts use: names and values in order, a layer's parameters changed after
    # the fact, a blob forgotten.
    def __delitem__(self, key: str) -> None:
        try:
            del self.tops[key]
        except KeyError:
            raise KeyError(f"NetSpec has no blob '{key}'") from None

    def keys(self) -> List[str]:
        """The assigned blob names, in assignment order (the SSD fork's ``net.keys()``)."""
        return list(self.tops)

    def vals(self) -> List[Union[Top, Function]]:
        """The assigned tops (or top-less layers), in assignment order."""
        return list(self.tops.values())

    def update(self, name: str, params: Dict[str, Any]) -> None:
        """Merge ``params`` into the keyword parameters of the layer that made blob ``name``
        (``net.update('conv5_1', {'dilation': 2})``)."""
        value = self[name]
        fn = value.fn if isinstance(value, Top) else value
        fn.params.update(params)

    def __dir__(self):
        return list(self.tops) + ["to_proto", "tops", "keys", "vals", "update"]

    def to_proto(self) -> "caffe_pb2.NetParameter":
        """Every layer needed for the assigned blobs, named after the attributes."""
        for key in self.tops:
            if not isinstance(key, str):
                raise NetError(f"the blob name {key!r} is not a string", "NetSpec",
                               "name blobs with strings: n.conv1 = ... or n['conv1'] = ...")
        names = {value: key for key, value in self.tops.items()}
        return _net_param(list(self.tops.values()), names)


class Layers:
    """``caffe.layers``: ``L.<Type>(*bottoms, **params)`` records a layer of that type and returns
    its Top (``ntop=1``), a tuple of Tops, or the layer itself (``ntop=0``)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("_"):
            raise AttributeError(type_name)

        def layer(*bottoms: Top, **params: Any) -> Union[Top, Tuple[Top, ...], Function]:
            fn = Function(type_name, bottoms, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        layer.__name__ = type_name
        return layer


class _ParamConstants:
    """Constants of ``caffe_pb2.<Name>Parameter`` (``P.Pooling.MAX``)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, constant: str):
        if constant.startswith("_"):
            raise AttributeError(constant)
        message = getattr(caffe_pb2, self._name + "Parameter", None)
        if message is None:
            raise AttributeError(f"caffe.params.{self._name}: caffe.proto has no message "
                                 f"{self._name}Parameter")
        try:
            return getattr(message, constant)
        except AttributeError:
            raise AttributeError(f"caffe.params.{self._name} has no constant "
                                 f"'{constant}'") from None


class Parameters:
    """``caffe.params``: ``P.Pooling.MAX``, ``P.Data.LMDB``, ``P.Eltwise.SUM``..."""

    def __getattr__(self, name: str) -> _ParamConstants:
        if name.startswith("_"):
            raise AttributeError(name)
        return _ParamConstants(name)


layers = Layers()
params = Parameters()

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "assign_proto",
           "param_name_dict"]
