"""``import caffe`` for programs that cannot be edited: ``caffe`` and every ``caffe.X`` are
pycaffe_alt's own module objects.

Three ways to get there, one mechanism (a finder on ``sys.meta_path``, the import system's
documented hook, PEP 451):

* ``pycaffe_alt.install_as_caffe()`` (the convention of ``pymysql.install_as_MySQLdb()``) makes
  ``sys.modules['caffe']`` the pycaffe_alt package; ``pycaffe-alt run script.py`` calls it before
  running the script.
* The one-line alias users write, a ``caffe/__init__.py`` holding ``import sys, pycaffe_alt;
  sys.modules[__name__] = pycaffe_alt``, ends in the same state.
* ``pycaffe-alt install-caffe-alias`` writes a ``.pth`` file that installs a finder answering a
  bare ``import caffe`` (see :mod:`pycaffe_alt.tools.caffe_alias`).

Only aliasing the top-level name is not enough: ``import caffe.io`` would then find ``io.py``
through the package's ``__path__`` and execute it a second time as a new module ``caffe.io``,
whose relative imports load ``caffe.proto.caffe_pb2`` a second time (protobuf's process-wide
descriptor pool refuses that) and whose error classes are copies that ``except
pycaffe_alt.CaffeError`` does not catch. The :class:`CaffeAliasFinder` therefore answers every
``caffe.X`` while ``sys.modules['caffe']`` is the pycaffe_alt package, by handing back the module
``pycaffe_alt.X`` itself: nothing is loaded twice and ``caffe.io is pycaffe_alt.io``. A ``caffe.X``
with no ``pycaffe_alt.X`` is loaded from a Caffe fork's ``python/caffe`` folder on ``sys.path``
when one has it (SSD's ``caffe.model_libs``: pure Python over pycaffe's NetSpec, whose ``import
caffe`` then gets ours), else fails with the usual ``ModuleNotFoundError``. The finder is installed
when pycaffe_alt is imported and does nothing while ``caffe`` is another module (a real Caffe).

A real Caffe is never shadowed silently: :func:`install_as_caffe` refuses when another ``caffe``
module is already imported and warns (:class:`CaffeShadowWarning`) when one is importable from
``sys.path``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import contextlib
import importlib.util
import os
import sys
import types
import warnings
from typing import Iterator, Optional, Sequence

from .errors import CaffeError

ALIAS = "caffe"
PACKAGE = __name__.rpartition(".")[0]  # "pycaffe_alt"


class CaffeShadowWarning(UserWarning):
    """``caffe`` now means pycaffe_alt although a real Caffe's pycaffe is importable too."""


def _package() -> types.ModuleType:
    return sys.modules[PACKAGE]


def aliased() -> bool:
    """Whether ``sys.modules['caffe']`` is the pycaffe_alt package."""
    return sys.modules.get(ALIAS) is sys.modules.get(PACKAGE)


def real_caffe_location(path: Optional[Sequence[str]] = None) -> Optional[str]:
    """Where a ``caffe`` package that is not an alias of ours would be imported from (searching
    ``path``, default ``sys.path``), or None.

    Counted: a ``caffe`` package whose folder holds the compiled ``_caffe`` extension (BVLC's
    built ``python/caffe``, a Caffe distribution's package) and a ``caffe`` module file. Not
    counted: one of the one-line aliases (a ``caffe/__init__.py`` that mentions pycaffe_alt), a
    folder named ``caffe`` without ``__init__.py`` (a source checkout), and a package without the
    extension (a fork's unbuilt ``python/caffe``, whose helpers the alias loads).
    """
    spec = importlib.machinery.PathFinder.find_spec(ALIAS, None if path is None else list(path))
    if spec is None or spec.origin in (None, "namespace"):
        return None
    origin = spec.origin
    if origin.endswith(".py"):
        try:
            with open(origin, encoding="utf-8", errors="replace") as f:
                if PACKAGE in f.read():
                    return None
        except OSError:
            pass
    if spec.submodule_search_locations:
        folder = os.path.dirname(origin)
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        if not any(n.startswith("_caffe") and n.endswith(suffixes) for n in names):
            return None
    return origin


def fork_module_spec(fullname: str) -> Optional[importlib.machinery.ModuleSpec]:
    """The spec of ``caffe.X`` (``caffe.X.Y`` ...) from a ``caffe`` package folder on
    ``sys.path`` that is not pycaffe_alt's: a Caffe fork's ``python/caffe`` holding pure-Python
    helpers next to its pycaffe (SSD's ``model_libs.py``, used as ``from caffe.model_libs
    import *``). None when no such file exists (the usual ModuleNotFoundError follows)."""
    parts = fullname.split(".")[1:]
    ours = {os.path.realpath(os.path.dirname(os.path.abspath(__file__))),
            os.path.realpath(os.path.join(ALIAS_PATH, ALIAS))}
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), ALIAS)
        if not os.path.isdir(folder) or os.path.realpath(folder) in ours:
            continue
        base = os.path.join(folder, *parts)
        if os.path.isfile(os.path.join(base, "__init__.py")):
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(fullname, base + ".py")
    return None


class CaffeAliasFinder:
    """Resolves ``caffe.X`` to the already-importable ``pycaffe_alt.X`` while ``caffe`` is the
    pycaffe_alt package; with ``top_level=True`` (the ``.pth`` alias) also a bare ``import caffe``.

    A meta-path finder and its own loader (the protocol of ``importlib.abc.MetaPathFinder`` and
    ``Loader``, without importing that module: ``import pycaffe_alt`` stays cheap). The loader
    hands back the existing module object (``create_module``) and leaves its own ``__spec__``
    and ``__name__`` in place, so the module stays what it is, only reachable by a second name.
    """

    def __init__(self, top_level: bool = False):
        self.top_level = top_level

    def __repr__(self) -> str:
        return f"<{type(self).__name__} caffe -> {PACKAGE} top_level={self.top_level}>"

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname == ALIAS:
            if not self.top_level:
                return None
            real = real_caffe_location()
            if real is not None:
                warnings.warn(CaffeShadowWarning(
                    f"'import caffe' gives pycaffe_alt (the alias written by 'pycaffe-alt "
                    f"install-caffe-alias'), not the Caffe at {real}; run 'pycaffe-alt "
                    f"uninstall-caffe-alias' to use that one"), stacklevel=2)
            return self._spec(fullname, PACKAGE, is_package=True)
        if not fullname.startswith(ALIAS + ".") or not aliased():
            return None
        target_name = PACKAGE + fullname[len(ALIAS):]
        module = sys.modules.get(target_name)
        if module is not None:
            is_package = hasattr(module, "__path__")
        else:
            try:
                found = importlib.util.find_spec(target_name)
            except ModuleNotFoundError:
                found = None
            if found is None:
                # Not ours: a module a fork ships inside its own python/caffe package (the SSD
                # fork's caffe.model_libs) runs from there, its `import caffe` being ours.
                return fork_module_spec(fullname)
            is_package = found.submodule_search_locations is not None
        return self._spec(fullname, target_name, is_package)

    def _spec(self, fullname: str, target_name: str, is_package: bool):
        spec = importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)
        spec.loader_state = target_name
        return spec

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        # The import system stamps the new spec on whatever create_module returns; keep the
        # module's own (exec_module puts it back) so reload() and pickling see pycaffe_alt.X.
        spec.loader_state = (spec.loader_state, module.__spec__)
        return module

    def exec_module(self, module) -> None:
        # Nothing to execute: the module is pycaffe_alt's, already imported.
        _, own_spec = module.__spec__.loader_state
        module.__spec__ = own_spec


def install_finder(top_level: bool = False) -> CaffeAliasFinder:
    """Put a :class:`CaffeAliasFinder` first on ``sys.meta_path`` (once; a later call with
    ``top_level=True`` upgrades the installed one) and return it."""
    for finder in sys.meta_path:
        if isinstance(finder, CaffeAliasFinder):
            finder.top_level = finder.top_level or top_level
            return finder
    finder = CaffeAliasFinder(top_level)
    # First: the path finder would otherwise find caffe.X through pycaffe_alt's __path__ and
    # load a second copy.
    sys.meta_path.insert(0, finder)
    return finder


# A folder holding a one-line ``caffe`` alias package, for processes started from an aliased one.
ALIAS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alias_path")


def alias_for_child_processes() -> None:
    """Let Python processes this one starts import ``caffe`` as pycaffe_alt too: put
    :data:`ALIAS_PATH` first on ``sys.path`` (what multiprocessing's spawn and forkserver
    children start from) and on ``PYTHONPATH`` (any other Python started from here)."""
    if ALIAS_PATH not in sys.path:
        sys.path.insert(0, ALIAS_PATH)
    # The alias imports pycaffe_alt: the folder this one came from goes along (a source checkout
    # imported through the current directory is not on the child's path otherwise).
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = [ALIAS_PATH, home]
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in ours]
    os.environ["PYTHONPATH"] = os.pathsep.join(ours + parts)


@contextlib.contextmanager
def caffe_importable() -> Iterator[None]:
    """While the block runs, a bare ``import caffe`` gives pycaffe_alt, unless ``caffe`` is
    already imported or a real Caffe is importable; for Python layer modules, which ``import
    caffe`` as inside Caffe's embedded interpreter. Nothing is aliased unless the block imports
    ``caffe`` (then it stays imported, as any import does)."""
    if ALIAS in sys.modules or real_caffe_location() is not None:
        yield
        return
    finder = install_finder()
    before, finder.top_level = finder.top_level, True
    try:
        yield
    finally:
        finder.top_level = before


def install_as_caffe() -> types.ModuleType:
    """Make ``import caffe`` and every ``caffe.X`` give pycaffe_alt's modules in this process.

    Refuses (:class:`~pycaffe_alt.errors.CaffeError`) when another ``caffe`` module is already
    imported; warns (:class:`CaffeShadowWarning`) when a real Caffe is importable from
    ``sys.path``, which ``import caffe`` now no longer reaches. Returns the package.
    """
    package = _package()
    current = sys.modules.get(ALIAS)
    if current is not None and current is not package:
        raise CaffeError(
            f"a different 'caffe' module is already imported ({getattr(current, '__file__', current)})",
            "install_as_caffe",
            "call pycaffe_alt.install_as_caffe() before anything imports caffe, or use that Caffe")
    install_finder()
    if current is None:
        real = real_caffe_location()
        if real is not None:
            warnings.warn(CaffeShadowWarning(
                f"'import caffe' now gives pycaffe_alt, not the Caffe at {real}"), stacklevel=2)
        sys.modules[ALIAS] = package
    return package
