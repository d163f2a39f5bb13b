"""Run an unchanged pycaffe program on pycaffe_alt: ``import caffe`` in it (and every
``caffe.X``) gives pycaffe_alt's modules.

    pycaffe-alt run script.py [args...]
    python3 -m pycaffe_alt.run script.py [args...]
    pycaffe-alt run -m package.module [args...]

The script runs as ``python3 script.py args...`` would run it: as ``__main__`` (its ``if __name__
== "__main__"`` block runs), with ``sys.argv`` = ``[script.py, args...]`` and the script's folder
first on ``sys.path``. Its exceptions and exit status are its own. See
:func:`pycaffe_alt.install_as_caffe` for what aliasing does and when it refuses.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from typing import List, Optional, Sequence

from .caffe_alias import alias_for_child_processes, install_as_caffe
from .cpu_fallback import GPU_AS_CPU_ENV
from .errors import CaffeError
from .fileio import check_input_path
from .host_memory import keep_freed_memory
from .log import setup_logging
from .nchw_request import NCHW_ENV
from .python_opt_in import ALLOW_PYTHON_ENV

USAGE = ("usage: pycaffe-alt run [--allow-python] [--cpu] [--nchw] SCRIPT.py [ARGS...]\n"
         "       pycaffe-alt run [--allow-python] [--cpu] [--nchw] -m MODULE [ARGS...]\n"
         "Runs an unchanged pycaffe program with 'import caffe' meaning pycaffe_alt.\n"
         "--allow-python: its nets may import the Python layer modules they name (as Caffe "
         "does; off by default, since a prototxt then runs code).\n"
         "--cpu: its caffe.set_mode_gpu() keeps the CPU (one warning), for programs that ask "
         "for a GPU unconditionally.\n"
         "--nchw: its nets keep every blob in C-order NCHW memory, as Caffe's (for programs "
         "that write through reshaped views of activation arrays; slower convolutions).")

# The launcher's own options, before the program; through the environment, since the
# program's own calls cannot take them (and its child processes inherit them).
OPTIONS = {"--allow-python": ALLOW_PYTHON_ENV, "--allow_python": ALLOW_PYTHON_ENV,
           "--cpu": GPU_AS_CPU_ENV, "--nchw": NCHW_ENV}


def _not_a_program(script: str, why: str) -> CaffeError:
    return CaffeError(f"'{script}' is not a Python program Python can run: {why}",
                      "pycaffe-alt run", "give the path of the Python program to run")


def _check_runnable(script: str) -> None:
    """One paragraph instead of Python's traceback when ``script`` is no program Python can
    start (a .caffemodel or .prototxt given by mistake, a syntax error, a zip without
    ``__main__.py``, truncated bytecode); errors the program raises while running stay its own."""
    import marshal
    import zipfile

    if os.path.isdir(script):  # a folder runs its __main__.py
        script = os.path.join(script, "__main__.py")
    if zipfile.is_zipfile(script):  # a zipapp (.pyz): Python runs its __main__.py
        with zipfile.ZipFile(script) as z:
            if not {"__main__.py", "__main__.pyc"} & set(z.namelist()):
                raise _not_a_program(script, "a zip file without __main__.py")
        return
    try:
        with open(script, "rb") as f:
            source = f.read()
        if source.startswith(importlib.util.MAGIC_NUMBER):  # compiled bytecode (.pyc)
            marshal.loads(source[16:])  # the header is 16 bytes (PEP 552)
            return
        compile(source, script, "exec")
    except SyntaxError as e:
        line = f" (line {e.lineno})" if e.lineno else ""
        raise _not_a_program(script, f"{e.msg}{line}") from None
    except (ValueError, EOFError, TypeError) as e:  # null bytes; truncated or bad bytecode
        raise _not_a_program(script, str(e) or type(e).__name__) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the program named in ``argv`` (default ``sys.argv[1:]``) with the caffe alias on."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    # pycaffe never calls InitGoogleLogging, and glog then writes every line to stderr ("Logging
    # before InitGoogleLogging() is written to STDERR"): the solver's "Iteration N, loss = ..."
    # lines that log parsers read. GLOG_minloglevel quiets it, as it quiets pycaffe, also when
    # the program sets it itself before `import caffe` (BVLC's notebooks do). The lines stay
    # out of the program's own Python logging: a program that calls logging.basicConfig (many
    # training scripts log their own test accuracy) got each solver line a second time, in its
    # own format, where pycaffe's glog lines never reach it.
    setup_logging(follow_glog_env=True, propagate=False)
    # The program's nets reuse freed activation memory as the training tools' do (and Caffe's
    # blobs keep theirs): see pycaffe_alt/host_memory.py.
    keep_freed_memory()
    while args and args[0] in OPTIONS:
        os.environ[OPTIONS[args[0]]] = "1"
        if len(args) == 1:
            raise CaffeError(f"{args[0]} needs a program to run", "pycaffe-alt run", USAGE)
        args = args[1:]
    if args[0] == "-m":
        if len(args) < 2:
            raise CaffeError("-m needs a module name", "pycaffe-alt run", USAGE)
        # As `python3 -m`: the current folder comes first on the path.
        if os.getcwd() not in sys.path[:1]:
            sys.path.insert(0, os.getcwd())
        if args[1].startswith("."):
            # importlib would raise its own ImportError ("no package specified") with a
            # traceback; python3 -m refuses such names in one line.
            raise CaffeError(f"'{args[1]}' is a relative module name, which -m cannot run",
                             "pycaffe-alt run -m", "give the module's full dotted name")
        install_as_caffe()
        alias_for_child_processes()
        try:
            spec = importlib.util.find_spec(args[1])
        except ValueError:  # an empty name
            spec = None
        except ImportError as e:
            parts = args[1].split(".")
            if getattr(e, "name", None) not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
                raise  # the package was found; its own import failed, as python3 -m reports
            spec = None  # a missing parent package
        if spec is None:
            raise CaffeError(f"no module named '{args[1]}'", "pycaffe-alt run -m",
                             f"run it from the folder that holds it ({os.getcwd()} is searched "
                             "first), or add that folder to PYTHONPATH")
        # Set before the package check: finding its __main__ imports the package, whose
        # __init__ then sees the program's arguments, as under python3 -m (not this tool's).
        argv_before, sys.argv = sys.argv, [args[1]] + args[2:]
        if spec.submodule_search_locations is not None and \
                importlib.util.find_spec(args[1] + ".__main__") is None:
            sys.argv = argv_before
            # A package runs its __main__ submodule; runpy's ImportError for one without it
            # came with a traceback, where python3 -m says it in one line.
            raise CaffeError(f"'{args[1]}' is a package without a __main__ module, so it "
                             "cannot be run", "pycaffe-alt run -m",
                             "give the module inside the package to run (package.module)")
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return 0
    script = args[0]
    if not (os.path.isdir(script) and os.path.isfile(os.path.join(script, "__main__.py"))):
        # As python3 runs a folder with a __main__.py; a FIFO, device or other folder is
        # refused before it is read (reading a FIFO would wait for a writer).
        check_input_path(script, CaffeError, "Python program")
    _check_runnable(script)
    sys.argv = [script] + args[1:]
    # As `python3 script.py`: the script's folder comes first on the path (its sibling modules,
    # Python layers included, are importable), instead of this launcher's. Before aliasing, so
    # that a real Caffe next to the script is noticed (and named in the warning).
    script_dir = os.path.dirname(os.path.abspath(script))
    if sys.path:
        sys.path[0] = script_dir
    else:
        sys.path.append(script_dir)
    install_as_caffe()
    alias_for_child_processes()
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    from .tools.cli import run_main

    run_main(main)
