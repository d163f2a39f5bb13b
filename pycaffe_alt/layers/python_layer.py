"""The ``Python`` layer: a user's pycaffe-style layer class, run inside the torch graph.

A prototxt naming ``python_param { module: "m" layer: "C" }`` names code to run. The rule:

* **No flag needed** when no new code is imported: module ``m`` is already imported in this
  process (in ``sys.modules``, or it is the running script ``__main__`` whose file is ``m.py``)
  and ``m.C`` is a class that subclasses ``caffe.Layer``. The program that defines the layer is
  already running, so the net runs nothing the program did not already load; this is what
  pycaffe scripts and BVLC's own tests do (define the layer, then build the net).
* **Opt-in otherwise**: importing ``m`` would execute a file a prototxt points at, and a prototxt
  (downloaded with a model) is data, not code; so the net must be built with
  ``allow_python=True`` (CLI ``--allow-python``). The subclass requirement matters as well:
  without it a prototxt could name any callable of any loaded module (``os.system``).

The user class follows pycaffe's protocol (``setup``, ``reshape``, ``forward``, ``backward`` over
lists of blobs with numpy ``.data``/``.diff``; ``self.param_str``, ``self.phase``; optional
``self.blobs``). As in Caffe, ``reshape`` runs before every ``forward``; the backward is a custom
``torch.autograd.Function`` that hands the top diffs to the user's ``backward`` and returns the
bottom (and parameter blob) diffs it wrote.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..blob import Blob, BlobVec, legacy_shape, shape_args
from ..blob_memory import check_blob_fits
from ..caffe_alias import caffe_importable
from ..errors import CaffeError, LayerMethodError
from ..phase import Phase
from ..python_opt_in import ALLOW_PYTHON_ENV, python_layers_allowed
from ..registry import LAYERS
from .base import Layer, Shape


def _checked_shape(shape, what: str) -> Tuple[int, ...]:
    """Integer dimensions that fit in memory, or a NetError naming ``what`` (numpy's own errors
    for a negative or huge shape, or a silent cut of 2.5 to 2, were the alternative)."""
    dims = shape_args(shape, what)
    check_blob_fits(dims, None, "reshaped", what)
    return dims


class PyBlob:
    """What a Python layer sees of a blob (pycaffe's ``Blob``): numpy ``data`` and ``diff``,
    ``reshape(*shape)``, ``shape``, ``count`` and the legacy ``num/channels/height/width``."""

    def __init__(self, data: np.ndarray, diff: Optional[np.ndarray] = None):
        self._data = data
        self._diff = np.zeros_like(data) if diff is None else diff

    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.size)

    num = property(lambda self: legacy_shape(self.shape, 0, repr(self)))
    channels = property(lambda self: legacy_shape(self.shape, 1, repr(self)))
    height = property(lambda self: legacy_shape(self.shape, 2, repr(self)))
    width = property(lambda self: legacy_shape(self.shape, 3, repr(self)))

    def reshape(self, *shape: int) -> None:
        """Caffe's Blob::Reshape: new (zeroed) storage only when the shape changes."""
        shape = _checked_shape(shape, "reshape() of a top or blob")
        if shape != self.shape:
            self._data = np.zeros(shape, dtype=self._data.dtype)
            self._diff = np.zeros(shape, dtype=self._data.dtype)

    def _bind(self, data: np.ndarray, diff: Optional[np.ndarray] = None) -> None:
        self._data = data
        self._diff = np.zeros_like(data) if diff is None else diff

    def __repr__(self) -> str:
        return f"PyBlob(shape={self.shape})"


Blob.register(PyBlob)  # a Python layer's bottoms and tops are caffe.Blob too


class PyBlobVec(BlobVec):
    """A Python layer's ``self.blobs``: a growable list of PyBlobs with pycaffe's
    ``add_blob(*shape)`` (a :class:`~pycaffe_alt.blob.BlobVec`, as in pycaffe)."""

    fixed = False  # the user's layer fills its own list

    def add_blob(self, *shape: int) -> None:
        self.append(PyBlob(np.zeros(_checked_shape(shape, "self.blobs.add_blob()"), dtype=np.float32)))


LAYER_METHODS_HINT = "a caffe.Layer subclass defines setup, reshape, forward and backward"


def undefined_method(cls: type, method: str) -> LayerMethodError:
    """The error for a Python layer class ``cls`` that lacks ``method``, a method Caffe calls.
    A NetError too: the class (not the code it runs) is what is wrong, so the tools print one
    paragraph instead of a traceback through this module."""
    return LayerMethodError(f"Python layer class '{cls.__module__}.{cls.__qualname__}' "
                            f"does not define {method}", hint=LAYER_METHODS_HINT)


class PythonLayerBase:
    """Base class for user Python layers, in the role of pycaffe's ``caffe.Layer``.

    Subclass it and define ``setup``, ``reshape``, ``forward`` and ``backward``; ``param_str``,
    ``phase`` and ``blobs`` are set before ``setup`` is called.
    """

    def __init__(self, param: Any = None):
        self.param = param
        self.param_str = ""
        self.phase = 0
        self.blobs = PyBlobVec()

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        raise undefined_method(type(self), "reshape(bottom, top)")

    def forward(self, bottom, top) -> None:
        raise undefined_method(type(self), "forward(bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        pass


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy from other devices)."""
    return t.detach().cpu().numpy()


def _new_tops(n: int, dtype: np.dtype) -> List[PyBlob]:
    return [PyBlob(np.zeros((0,), dtype=dtype)) for _ in range(n)]


def loaded_layer_class(module_name: str, class_name: str) -> Optional[type]:
    """The class ``module_name.class_name`` when running it imports nothing new: the module is in
    ``sys.modules`` (or is the running script, ``__main__``, loaded from ``module_name.py``) and
    the class subclasses ``caffe.Layer``; else None."""
    module = sys.modules.get(module_name)
    if module is None:
        main = sys.modules.get("__main__")
        main_file = getattr(main, "__file__", None)
        if main_file and os.path.splitext(os.path.basename(main_file))[0] == module_name:
            module = main
    cls = getattr(module, class_name, None) if module is not None else None
    if isinstance(cls, type) and issubclass(cls, PythonLayerBase):
        return cls
    return None


def _instantiate(cls: type, param) -> Any:
    """pycaffe constructs the user class with the LayerParameter; a plain class with no
    constructor argument is accepted too."""
    try:
        takes_param = len(inspect.signature(cls).parameters) >= 1
    except (TypeError, ValueError):  # no introspectable signature: construct without arguments
        takes_param = False
    return cls(param) if takes_param else cls()


class _PythonFunction(torch.autograd.Function):
    """Forward and backward through the user's numpy code (Caffe's Forward_cpu/Backward_cpu)."""

    @staticmethod
    def forward(ctx, layer: "Python", n_bottoms: int, *tensors: torch.Tensor):  # type: ignore[override]
        bottoms, params = tensors[:n_bottoms], tensors[n_bottoms:]
        layer._bind_params(params)
        bottom_blobs = [PyBlob(_to_numpy(b)) for b in bottoms]
        top_blobs = layer._tops
        layer.user.reshape(bottom_blobs, top_blobs)
        layer.user.forward(bottom_blobs, top_blobs)
        ctx.layer, ctx.n_bottoms = layer, n_bottoms
        ctx.save_for_backward(*tensors)
        ref = bottoms[0] if bottoms else (params[0] if params else None)
        device = ref.device if ref is not None else torch.device("cpu")
        # Copies: the top arrays are reused by the next forward, as Caffe reuses its top blobs.
        outs = tuple(torch.from_numpy(np.array(t.data, copy=True)).to(device) for t in top_blobs)
        ctx.top_data = [np.array(t.data, copy=True) for t in top_blobs]
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *top_grads: Optional[torch.Tensor]):
        layer, n_bottoms = ctx.layer, ctx.n_bottoms
        tensors = ctx.saved_tensors
        bottoms, params = tensors[:n_bottoms], tensors[n_bottoms:]
        layer._bind_params(params)
        top_blobs = [PyBlob(data, np.zeros_like(data) if g is None else
                            np.ascontiguousarray(_to_numpy(g), dtype=data.dtype).reshape(data.shape))
                     for data, g in zip(ctx.top_data, top_grads)]
        bottom_blobs = [PyBlob(np.array(_to_numpy(b), copy=True)) for b in bottoms]
        propagate_down = [bool(ctx.needs_input_grad[2 + i]) for i in range(n_bottoms)]
        layer.user.backward(top_blobs, propagate_down, bottom_blobs)
        grads: List[Optional[torch.Tensor]] = [None, None]
        for i, (b, blob) in enumerate(zip(bottoms, bottom_blobs)):
            grads.append(torch.from_numpy(np.array(blob.diff, copy=True)).to(b) if propagate_down[i] else None)
        for p, blob in zip(params, layer.user.blobs):
            grads.append(torch.from_numpy(np.array(blob.diff, copy=True)).to(p))
        return tuple(grads)


@LAYERS.register("Python")
class Python(Layer):
    """Runs ``python_param.layer`` from module ``python_param.module`` (pycaffe's protocol); only
    when the net was built with ``allow_python=True``."""

    blob_names = ()
    shape_by_fake_run = False
    runs_user_code = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        pp = param.python_param
        module_name, class_name = pp.module, pp.layer
        if not module_name or not class_name:
            raise self.error("python_param needs both 'module' and 'layer'",
                             "e.g. python_param { module: 'my_layers' layer: 'MyLayer' }")
        if not all(part.isidentifier() for part in module_name.split(".")) or \
                not class_name.isidentifier():
            # importlib's own errors for '.x' (a relative import) or 'a..b' were tracebacks.
            raise self.error(f"python_param names module '{module_name}' and layer '{class_name}'; "
                             "both must be Python names (the module dotted: 'pkg.mod')",
                             "e.g. python_param { module: 'my_layers' layer: 'MyLayer' }")
        cls = loaded_layer_class(module_name, class_name)
        if cls is None:
            if not (ctx.allow_python or python_layers_allowed()):
                state = (f"its '{class_name}' is not a caffe.Layer subclass"
                         if module_name in sys.modules else "it is not imported")
                raise self.error(
                    f"would import and run Python code: class '{class_name}' from module "
                    f"'{module_name}'",
                    f"a Python layer runs without a flag only when its module is already imported "
                    f"in this process and its class subclasses caffe.Layer ({state}). If you trust "
                    "this net, pass allow_python=True to pycaffe_alt.Net(...) or the solver, or "
                    "--allow-python on the command line (an unchanged program: pycaffe-alt run "
                    f"--allow-python SCRIPT.py, or {ALLOW_PYTHON_ENV}=1 in the environment); or "
                    "import the module before building the net")
            cls = self._import(module_name, class_name)
        for method in ("setup", "reshape"):  # both run now; forward is checked when it runs
            # A class that is no caffe.Layer at all failed inside setup with an AttributeError.
            if not callable(getattr(cls, method, None)):
                raise self.error(f"class '{module_name}.{class_name}' has no {method}() method: "
                                 "it is not a Python layer", LAYER_METHODS_HINT)
        self.user = _instantiate(cls, param)
        # pycaffe sets these attributes before setup (PythonLayer::LayerSetUp).
        self.user.param_str = pp.param_str
        self.user.param_str_ = pp.param_str  # the name py-faster-rcnn's Caffe fork gives it
        self.user.phase = Phase(ctx.phase)  # str() is the name, as pycaffe's enum
        if not isinstance(getattr(self.user, "blobs", None), PyBlobVec):
            self.user.blobs = PyBlobVec()
        self.n_tops = len(param.top)
        bottoms = [PyBlob(np.zeros(tuple(s), dtype=np.float32)) for s in bottom_shapes]
        self._tops = _new_tops(self.n_tops, np.float32)
        try:
            with caffe_importable():  # a setup that imports caffe itself
                self.user.setup(bottoms, self._tops)
                self.user.reshape(bottoms, self._tops)
        except Exception as e:
            # The user's own exception goes on unchanged, as pycaffe lets it through
            # (programs catch e.g. RuntimeError from Net()); a note names the layer.
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(f"raised by the setup of Python layer '{param.name}' "
                           f"({module_name}.{class_name})")
            raise
        # Blobs the user added in setup become parameter blobs (learned, saved in the caffemodel).
        self._param_names: List[str] = []
        for i, blob in enumerate(self.user.blobs):
            p = self.add_blob(blob.shape, name=f"blob{i}")
            self._param_names.append(f"blob{i}")
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.asarray(blob.data, dtype=np.float32)))
        self._bind_params(self.blobs)

    def _import(self, module_name: str, class_name: str) -> type:
        # As Caffe's embedded interpreter, the working directory is importable.
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            # Inside Caffe a layer module's `import caffe` finds pycaffe: here ours (never in
            # place of a real Caffe importable from here, the working directory included).
            with caffe_importable():
                module = importlib.import_module(module_name)
        except SyntaxError as e:
            raise self.error(f"module '{module_name}' does not compile: {e.msg} ({e.filename}, "
                             f"line {e.lineno})", "fix the module's Python syntax") from None
        except ImportError as e:
            missing = getattr(e, "name", None)
            path = module_name.replace(".", "/") + ".py"
            if missing and missing != module_name and not module_name.startswith(missing + "."):
                # The layer's module was found; an import inside it failed.
                hint = (f"the module imports '{missing}', which is not installed or not on the "
                        "path: install it or add its folder to PYTHONPATH")
            else:
                hint = f"put {path} in the working directory ({cwd}) or on PYTHONPATH"
            raise self.error(f"cannot import module '{module_name}': {e}", hint) from e
        except Exception as e:
            # The module's own code failed while it ran (a ZeroDivisionError at its top level):
            # its exception goes on unchanged, as from the layer's setup, with a note naming
            # the layer (the traceback alone named only the module's file).
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(f"raised while importing module '{module_name}' of Python layer "
                           f"'{self.name}'")
            raise
        finally:
            if added:
                sys.path.remove(cwd)
        cls = getattr(module, class_name, None)
        if cls is None:
            raise self.error(f"module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                             f"'{class_name}'", "check python_param.layer (the class name)")
        if not isinstance(cls, type):
            # e.g. module: "os" layer: "system" would call os.system(param)
            raise self.error(f"'{module_name}.{class_name}' is a {type(cls).__name__}, not a "
                             "class", "python_param.layer names a class (a caffe.Layer subclass)")
        return cls

    def _bind_params(self, params: Sequence[torch.Tensor]) -> None:
        """Point the user's ``self.blobs[i].data`` at the current parameter values (a view on CPU,
        so in-place updates by the user reach the parameter)."""
        for blob, p in zip(self.user.blobs, params):
            blob._bind(_to_numpy(p))

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> List[Shape]:
        # The user's reshape decides the tops (called with the bottoms' shapes, as Caffe's Reshape).
        bottoms = [PyBlob(np.zeros(tuple(s), dtype=np.float32)) for s in bottom_shapes]
        self.user.reshape(bottoms, self._tops)
        return [t.shape for t in self._tops]

    def forward(self, *bottoms: torch.Tensor):
        dtype = bottoms[0].dtype if bottoms else torch.float32
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        if self._tops and self._tops[0].data.dtype != np_dtype:
            self._tops = _new_tops(self.n_tops, np_dtype)
        # Parameters by attribute name, so functional_call and parameter sharing see replacements.
        params = [getattr(self, n) for n in self._param_names]
        try:
            if not callable(getattr(self.user, "forward", None)):  # a duck-typed class
                raise undefined_method(type(self.user), "forward(bottom, top)")
            outs = _PythonFunction.apply(self, len(bottoms), *bottoms, *params)
        except CaffeError as e:  # ours (a class without forward, a bad top.reshape): name the layer
            raise e.locate(self.where)
        return outs[0] if len(outs) == 1 else outs
