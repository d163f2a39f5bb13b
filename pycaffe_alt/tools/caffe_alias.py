"""``pycaffe-alt install-caffe-alias`` / ``uninstall-caffe-alias``: an opt-in, removable bare
``import caffe`` for a whole Python environment.

Install writes ``pycaffe_alt_caffe_alias.pth`` into the environment's site-packages. Python runs
the ``import`` line of a ``.pth`` file at start-up (the ``site`` module's documented hook); ours
only puts a :class:`~pycaffe_alt.caffe_alias.CaffeAliasFinder` on ``sys.meta_path``, which answers
``import caffe`` with pycaffe_alt when a program asks (nothing is imported before that, and the
line does nothing once pycaffe_alt is uninstalled). Install refuses while a real Caffe is
importable, unless ``--force``; with the alias in place, ``import caffe`` warns whenever a real
Caffe is importable too. Uninstall deletes the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from typing import Optional, Sequence

from ..caffe_alias import real_caffe_location
from ..errors import CaffeError
from .cli import parse_args

PTH_NAME = "pycaffe_alt_caffe_alias.pth"
# A .pth line is executed when it starts with "import"; find_spec keeps it silent once
# pycaffe_alt is gone.
PTH_LINE = ('import importlib.util as _u; _u.find_spec("pycaffe_alt") and '
            '__import__("pycaffe_alt.caffe_alias").caffe_alias.install_finder(top_level=True)\n')


def default_site_dir() -> str:
    """This environment's site-packages (where pip puts pure-Python packages)."""
    return sysconfig.get_paths()["purelib"]


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=what)
    parser.add_argument("--site-dir", default=None,
                        help="the site-packages folder to use (default: this Python's, "
                             f"{default_site_dir()})")
    return parser


def _site_dir(given: Optional[str], prog: str) -> str:
    """The --site-dir to use: this Python's when the flag is absent. An empty value (an unset
    shell variable in ``--site-dir "$SITE"``) is refused: it meant this whole environment."""
    if given is None:
        return default_site_dir()
    if not given:
        raise CaffeError("--site-dir is empty", prog,
                         f"give a site-packages folder, or leave the flag out for this Python's "
                         f"({default_site_dir()})")
    return given


def install_main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the .pth file (refusing to shadow a real Caffe unless ``--force``)."""
    parser = _parser("pycaffe-alt install-caffe-alias",
                     "Make a bare 'import caffe' give pycaffe_alt in this Python environment.")
    parser.add_argument("--force", action="store_true",
                        help="install even though a real Caffe is importable (it is then shadowed; "
                             "'import caffe' warns about it)")
    args = parse_args(parser, argv)
    site_dir = _site_dir(args.site_dir, "pycaffe-alt install-caffe-alias")
    real = real_caffe_location(list(sys.path) + [site_dir])
    if real is not None and not args.force:
        raise CaffeError(f"a real Caffe is importable as 'caffe' ({real}); the alias would hide it",
                         "pycaffe-alt install-caffe-alias",
                         "use 'pycaffe-alt run script.py' for single programs, or pass --force to "
                         "shadow it in this environment")
    if not os.path.isdir(site_dir):
        what = f"'{site_dir}' is not a folder" if os.path.exists(site_dir) else \
            f"no such folder: {site_dir}"
        raise CaffeError(what, "pycaffe-alt install-caffe-alias",
                         "give an existing site-packages folder with --site-dir")
    path = os.path.join(site_dir, PTH_NAME)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
    except OSError as e:
        raise CaffeError(f"cannot write {path}: {e.strerror}", "pycaffe-alt install-caffe-alias",
                         "run it with the permissions pip needs for this environment, or use a "
                         "virtual environment") from None
    print(f"wrote {path}: 'import caffe' now gives pycaffe_alt in {sys.prefix}"
          + (f" (shadowing the Caffe at {real})" if real else "")
          + "\nundo with: pycaffe-alt uninstall-caffe-alias")
    return 0


def uninstall_main(argv: Optional[Sequence[str]] = None) -> int:
    """Remove the .pth file written by :func:`install_main`."""
    parser = _parser("pycaffe-alt uninstall-caffe-alias",
                     "Remove the bare 'import caffe' alias from this Python environment.")
    args = parse_args(parser, argv)
    path = os.path.join(_site_dir(args.site_dir, "pycaffe-alt uninstall-caffe-alias"), PTH_NAME)
    if not os.path.exists(path):
        print(f"no caffe alias installed ({path} does not exist)")
        return 0
    try:
        os.remove(path)
    except OSError as e:
        raise CaffeError(f"cannot remove {path}: {e.strerror}",
                         "pycaffe-alt uninstall-caffe-alias") from None
    print(f"removed {path}: 'import caffe' no longer gives pycaffe_alt")
    return 0
