"""``import caffe`` is pycaffe_alt, one module object per module, in each of the three ways:
install_as_caffe() (and ``pycaffe-alt run``), the one-line ``caffe/__init__.py`` alias, and the
``.pth`` written by ``pycaffe-alt install-caffe-alias``. Programs run in subprocesses so that the
alias does not leak into the other tests."""
import importlib
import os
import subprocess
import sys
import sysconfig
import textwrap
import types
import venv
import warnings
from pathlib import Path

import pytest
import torch

import pycaffe_alt
from pycaffe_alt import caffe_alias
from pycaffe_alt.caffe_alias import CaffeAliasFinder, CaffeShadowWarning, install_as_caffe
from pycaffe_alt.errors import CaffeError
from pycaffe_alt.tools import caffe as caffe_cli
from pycaffe_alt.tools.caffe_alias import PTH_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An unchanged pycaffe program: pycaffe's module layout, FCN net surgery, an error caught by the
# package's base class, and a check that no caffe.X module is a second copy. (Nets built from
# such specs run in test_pycaffe_master.py; here the program stays torch-free and quick.)
PROGRAM = textwrap.dedent('''
    import sys
    import caffe
    import caffe.io
    from caffe.io import load_image
    from caffe.proto import caffe_pb2
    import caffe.draw
    import caffe.net_spec
    import caffe.coord_map
    from caffe import layers as L, params as P
    from caffe.coord_map import crop

    import pycaffe_alt
    assert caffe is pycaffe_alt
    assert caffe.io is pycaffe_alt.io and sys.modules["caffe.io"] is pycaffe_alt.io
    assert caffe_pb2 is pycaffe_alt.proto.caffe_pb2
    assert caffe.draw is pycaffe_alt.draw and caffe.coord_map is pycaffe_alt.coord_map
    assert caffe.net_spec.NetSpec is caffe.NetSpec
    for name, module in list(sys.modules.items()):
        if name.startswith("caffe.") and module is not None:
            assert module.__name__ == "pycaffe_alt" + name[len("caffe"):], (name, module)

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, pad=2,
                           weight_filler=dict(type="xavier"))
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.pool, convolution_param=dict(num_output=4, kernel_size=4, stride=2))
    n.score = crop(n.up, n.data)
    proto = caffe_pb2.NetParameter.FromString(n.to_proto().SerializeToString())
    assert list(proto.layer[-1].crop_param.offset) == [2]  # pad 2 grows 20 -> 24 after up
    assert caffe.draw.to_dot(proto, "LR").startswith("digraph")
    assert "torch" not in sys.modules  # none of this needs torch: the program starts fast

    try:
        load_image("/no/such/image.png")
    except pycaffe_alt.CaffeError as e:   # one error class hierarchy
        import caffe.errors
        assert isinstance(e, caffe.errors.CaffeError)
    else:
        raise AssertionError("no error")
    try:
        import caffe.no_such_module
    except ModuleNotFoundError as e:
        assert e.name == "caffe.no_such_module", e.name
    else:
        raise AssertionError("caffe.no_such_module imported")
    if __name__ == "__main__":
        print("PROGRAM OK", sys.argv[1:])
''')


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(args, env=None, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, env=env or _env(), cwd=cwd,
                          timeout=300)


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "classify_thing.py"
    path.write_text(PROGRAM)
    return path


def _ok(result, args="['a', '--b']"):
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"PROGRAM OK {args}" in result.stdout


def test_install_as_caffe_then_the_program(program, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text("import runpy, sys, pycaffe_alt\npycaffe_alt.install_as_caffe()\n"
                        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    _ok(_run([sys.executable, str(launcher), str(program), "a", "--b"]))


def test_one_line_alias_package(program, tmp_path):
    alias = tmp_path / "alias" / "caffe"
    alias.mkdir(parents=True)
    (alias / "__init__.py").write_text("import sys, pycaffe_alt\nsys.modules[__name__] = pycaffe_alt\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path / "alias"), ROOT]))
    _ok(_run([sys.executable, str(program), "a", "--b"], env=env))


def test_pycaffe_alt_run_and_python_m(program, tmp_path):
    # `pycaffe-alt run` is the console script's `run` subcommand; both set argv and __main__.
    _ok(_run([sys.executable, "-m", "pycaffe_alt.run", str(program), "a", "--b"], cwd=tmp_path))
    _ok(_run([sys.executable, "-m", "pycaffe_alt.tools.caffe", "run", str(program), "a", "--b"],
             cwd=tmp_path))


def test_run_reports_a_missing_script_and_keeps_the_exit_status(tmp_path):
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(tmp_path / "nope.py")])
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    # A folder, or a file that is no Python program: one paragraph, not Python's traceback.
    binary = tmp_path / "w.caffemodel"
    binary.write_bytes(b"\x0a\x00\x01garbage")
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    for target, says in ((tmp_path, "is a directory"), (binary, "is not a Python program"),
                         (broken, "'(' was never closed (line 1)")):
        r = _run([sys.executable, "-m", "pycaffe_alt.run", str(target)])
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    exits = tmp_path / "exits.py"
    exits.write_text("import sys, caffe\nsys.exit(3 if caffe.__name__ == 'pycaffe_alt' else 4)\n")
    assert _run([sys.executable, "-m", "pycaffe_alt.run", str(exits)]).returncode == 3
    # What python3 itself runs still runs: a zipapp and compiled bytecode.
    import py_compile
    import zipapp

    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text("import sys, caffe\nsys.exit(5 if caffe.__name__ == 'pycaffe_alt' else 6)\n")
    zipapp.create_archive(str(app), str(tmp_path / "app.pyz"))
    pyc = py_compile.compile(str(exits), cfile=str(tmp_path / "exits.pyc"))
    assert _run([sys.executable, "-m", "pycaffe_alt.run", str(tmp_path / "app.pyz")]).returncode == 5
    assert _run([sys.executable, "-m", "pycaffe_alt.run", pyc]).returncode == 3
    # ... and what it cannot start is one paragraph: a zip without __main__.py, cut bytecode,
    # a folder whose __main__.py does not compile, a module -m cannot find.
    import zipfile

    with zipfile.ZipFile(tmp_path / "nomain.zip", "w") as z:
        z.writestr("other.py", "x = 1\n")
    (tmp_path / "cut.pyc").write_bytes(open(pyc, "rb").read()[:20])
    (tmp_path / "badapp").mkdir()
    (tmp_path / "badapp" / "__main__.py").write_text("def (\n")
    for args, says in (([str(tmp_path / "nomain.zip")], "without __main__.py"),
                       ([str(tmp_path / "cut.pyc")], "is not a Python program"),
                       ([str(tmp_path / "badapp")], "__main__.py' is not a Python program"),
                       (["-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'")):
        r = _run([sys.executable, "-m", "pycaffe_alt.run", *args], cwd=tmp_path)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A zipapp of bytecode only (__main__.pyc) runs, as with python3.
    with zipfile.ZipFile(tmp_path / "pyc.zip", "w") as z:
        z.write(pyc, "__main__.pyc")
    assert _run([sys.executable, "-m", "pycaffe_alt.run", str(tmp_path / "pyc.zip")]).returncode == 3
    # -m looks in the current folder first, as python3 -m does.
    assert _run([sys.executable, "-m", "pycaffe_alt.run", "-m", "exits"], cwd=tmp_path).returncode == 3


def test_pth_alias_install_and_uninstall(program, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The new environment sees this one's packages (numpy, protobuf) through a path .pth, so the
    # test does not depend on what the base interpreter has installed.
    paths = sysconfig.get_paths()
    (Path(site) / "outer_env.pth").write_text(f"{paths['purelib']}\n{paths['platlib']}\n")
    r = _run([python, "-m", "pycaffe_alt.tools.caffe", "install-caffe-alias"])
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(site, PTH_NAME))
    _ok(_run([python, str(program), "a", "--b"]))
    r = _run([python, "-m", "pycaffe_alt.tools.caffe", "uninstall-caffe-alias"])
    assert r.returncode == 0 and not os.path.exists(os.path.join(site, PTH_NAME))
    r = _run([python, "-c", "import caffe"])
    assert r.returncode != 0 and "No module named 'caffe'" in r.stderr


# ------------------------------------------------------------------ in-process finder behaviour
@pytest.fixture
def clean_caffe():
    """Start without caffe / caffe.X in sys.modules (another test's Python layer may have
    aliased it: a layer module's `import caffe` does) and put back what was there after."""
    before = {k: v for k, v in sys.modules.items() if k == "caffe" or k.startswith("caffe.")}
    for k in before:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "caffe" or k.startswith("caffe.")]:
        if k not in before:
            del sys.modules[k]
    sys.modules.update(before)


def _fake_real_caffe(tmp_path):
    pkg = tmp_path / "realcaffe" / "caffe"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ._caffe import Net\n")
    (pkg / "io.py").write_text("REAL = True\n")
    (pkg / "_caffe.so").write_bytes(b"")  # the compiled pycaffe module that makes it a Caffe
    return pkg


def test_finder_hands_back_the_same_module_objects(clean_caffe):
    assert any(isinstance(f, CaffeAliasFinder) for f in sys.meta_path)
    assert install_as_caffe() is pycaffe_alt
    io = importlib.import_module("caffe.io")
    assert io is pycaffe_alt.io and io.__name__ == "pycaffe_alt.io"
    assert io.__spec__.name == "pycaffe_alt.io"  # its own spec, not a caffe.io copy
    pb2 = importlib.import_module("caffe.proto.caffe_pb2")
    assert pb2 is pycaffe_alt.proto.caffe_pb2
    for name in ("caffe.classifier", "caffe.detector", "caffe.pycaffe", "caffe._caffe",
                 "caffe.draw", "caffe.net_spec", "caffe.coord_map", "caffe.solver.solver"):
        assert importlib.import_module(name) is importlib.import_module("pycaffe_alt" + name[5:])
    with pytest.raises(ModuleNotFoundError, match="caffe.nothing_here"):
        importlib.import_module("caffe.nothing_here")
    # caffe.layers stays NetSpec's layer factory even after `import caffe.layers`.
    importlib.import_module("caffe.layers")
    assert sys.modules["caffe"].layers is pycaffe_alt.net_spec.layers


def test_finder_leaves_another_caffe_alone(clean_caffe, tmp_path):
    pkg = _fake_real_caffe(tmp_path)
    other = types.ModuleType("caffe")
    other.__path__ = [str(pkg)]
    sys.modules["caffe"] = other
    io = importlib.import_module("caffe.io")
    assert io.REAL and io is not pycaffe_alt.io
    with pytest.raises(CaffeError, match="different 'caffe' module is already imported"):
        install_as_caffe()


def test_install_as_caffe_says_when_it_shadows_a_real_caffe(clean_caffe, tmp_path, monkeypatch):
    pkg = _fake_real_caffe(tmp_path)
    monkeypatch.syspath_prepend(str(pkg.parent))
    assert caffe_alias.real_caffe_location() == str(pkg / "__init__.py")
    with pytest.warns(CaffeShadowWarning, match="not the Caffe at .*realcaffe"):
        install_as_caffe()
    assert sys.modules["caffe"] is pycaffe_alt


def test_a_one_line_alias_on_the_path_is_not_a_real_caffe(tmp_path, monkeypatch):
    alias = tmp_path / "caffe"
    alias.mkdir()
    (alias / "__init__.py").write_text("import sys, pycaffe_alt\nsys.modules[__name__] = pycaffe_alt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert caffe_alias.real_caffe_location() is None


def test_install_caffe_alias_refuses_to_shadow_a_real_caffe(tmp_path, monkeypatch):
    pkg = _fake_real_caffe(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(pkg.parent))
    with pytest.raises(CaffeError, match="real Caffe is importable") as info:
        caffe_cli.main(["install-caffe-alias", "--site-dir", str(site)])
    assert "--force" in str(info.value) and not (site / PTH_NAME).exists()
    assert caffe_cli.main(["install-caffe-alias", "--site-dir", str(site), "--force"]) == 0
    assert "install_finder(top_level=True)" in (site / PTH_NAME).read_text()
    assert caffe_cli.main(["uninstall-caffe-alias", "--site-dir", str(site)]) == 0
    assert not (site / PTH_NAME).exists()


def test_bare_alias_warns_when_a_real_caffe_is_importable(clean_caffe, tmp_path, monkeypatch):
    pkg = _fake_real_caffe(tmp_path)
    monkeypatch.syspath_prepend(str(pkg.parent))
    finder = CaffeAliasFinder(top_level=True)
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    with pytest.warns(CaffeShadowWarning, match="uninstall-caffe-alias"):
        caffe = importlib.import_module("caffe")
    assert caffe is pycaffe_alt and pycaffe_alt.__spec__.name == "pycaffe_alt"


# ------------------------------------------------------------------ every tool after pip install
CAFFE_INSTALLED_NAMES = {"caffe", "convert_imageset", "compute_image_mean", "extract_features",
                         "upgrade_net_proto_text", "upgrade_net_proto_binary",
                         "upgrade_solver_proto_text", "train", "test", "time", "device_query"}


def _console_scripts():
    import ast

    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            return dict(s.split("=", 1) for s in ast.literal_eval(node.value)["console_scripts"])
    raise AssertionError("setup.py has no entry_points")


def test_every_tool_is_a_pycaffe_alt_command_and_console_scripts_resolve():
    tools = {name for name in os.listdir(os.path.join(ROOT, "tools"))
             if os.access(os.path.join(ROOT, "tools", name), os.X_OK)}
    assert tools <= set(caffe_cli.COMMANDS), tools - set(caffe_cli.COMMANDS)
    assert {"draw_net", "run", "install-caffe-alias", "uninstall-caffe-alias"} <= set(caffe_cli.COMMANDS)
    for name in caffe_cli.COMMANDS:
        assert callable(caffe_cli.command_main(name)), name
    scripts = _console_scripts()
    assert scripts["pycaffe-alt"] == "pycaffe_alt.tools.caffe:run"
    assert not set(scripts) & CAFFE_INSTALLED_NAMES  # never a name a Caffe install puts on PATH
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
        if name != "pycaffe-alt":
            assert name in caffe_cli.COMMANDS


def test_draw_net_tool_writes_dot(tmp_path, capsys):
    out = tmp_path / "lenet.dot"
    assert caffe_cli.main(["draw_net", "--rankdir", "TB", "--phase", "TEST",
                           os.path.join(ROOT, "models", "lenet", "train_val.prototxt"), str(out)]) == 0
    text = out.read_text()
    assert text.startswith('digraph "LeNet"') and "rankdir=TB" in text and "conv1" in text
    assert "Drawing net to" in capsys.readouterr().out


def test_run_next_to_a_real_caffe_says_so(tmp_path):
    # BVLC's python/classify.py run from a Caffe checkout: python/caffe is a real Caffe.
    pkg = _fake_real_caffe(tmp_path)
    script = pkg.parent / "prog.py"
    script.write_text("import caffe\nprint('GOT', caffe.__name__)\n")
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(script)])
    assert r.returncode == 0, r.stderr
    assert "GOT pycaffe_alt" in r.stdout
    assert "CaffeShadowWarning" in r.stderr and str(pkg) in r.stderr


LOGGING_PROGRAM = """
import caffe
caffe.log("a line from the program")
"""


def test_run_shows_glog_lines_like_pycaffe_and_honours_glog_minloglevel(tmp_path):
    # pycaffe never initializes glog, which then writes every line to stderr: log parsers read
    # the solver's lines from there. GLOG_minloglevel=1 keeps only warnings and errors.
    path = tmp_path / "logs.py"
    path.write_text(LOGGING_PROGRAM)
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(path)])
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stderr.splitlines() if "a line from the program" in l)
    assert line.startswith("I") and "] a line from the program" in line
    quiet = _run([sys.executable, "-m", "pycaffe_alt.run", str(path)],
                 env=_env(GLOG_minloglevel="1"))
    assert quiet.returncode == 0 and "a line from the program" not in quiet.stderr
    # Set by the program before `import caffe`, as BVLC's notebooks do.
    inside = tmp_path / "quiet_inside.py"
    inside.write_text("import os\nos.environ['GLOG_minloglevel'] = '2'\n" + LOGGING_PROGRAM)
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(inside)])
    assert r.returncode == 0 and "a line from the program" not in r.stderr


def test_children_of_a_run_program_import_caffe_too(tmp_path):
    """multiprocessing's spawn and forkserver children (and any Python the program starts)
    re-import the main script in a fresh interpreter: `import caffe` failed there."""
    script = tmp_path / "mp_prog.py"
    script.write_text(textwrap.dedent('''
        import multiprocessing as mp
        import subprocess
        import sys
        import caffe

        def child(q):
            import caffe
            q.put(caffe.__name__)

        if __name__ == "__main__":
            for method in ("spawn", "forkserver"):
                ctx = mp.get_context(method)
                q = ctx.Queue()
                p = ctx.Process(target=child, args=(q,))
                p.start()
                p.join(120)
                print(method, p.exitcode, q.get(timeout=5))
            out = subprocess.run([sys.executable, "-c", "import caffe; print(caffe.__name__)"],
                                 capture_output=True, text=True).stdout.strip()
            print("subprocess", out)
    '''))
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(script)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "spawn 0 pycaffe_alt" in r.stdout and "forkserver 0 pycaffe_alt" in r.stdout
    assert "subprocess pycaffe_alt" in r.stdout


def test_python_layer_modules_import_caffe_under_the_tools(tmp_path):
    """A layer module's `import caffe` finds pycaffe inside Caffe; under tools/train and from
    `import pycaffe_alt as caffe` it found nothing ('No module named caffe')."""
    (tmp_path / "mylayer.py").write_text(textwrap.dedent('''
        import caffe
        import numpy as np

        class Source(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(2, 3)
            def forward(self, bottom, top):
                top[0].data[...] = 1.0
            def backward(self, top, propagate_down, bottom):
                pass
    '''))
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Python" top: "data" python_param { module: "mylayer" '
        'layer: "Source" } }\nlayer { name: "sq" type: "Power" bottom: "data" top: "sq" }\n')
    prog = tmp_path / "prog.py"
    prog.write_text("import pycaffe_alt as caffe\n"
                    "net = caffe.Net('net.prototxt', caffe.TEST, allow_python=True)\n"
                    "print('sum', float(net.forward()['sq'].sum()))\n")
    r = _run([sys.executable, str(prog)], cwd=tmp_path)
    assert r.returncode == 0 and "sum 6.0" in r.stdout, r.stderr[-3000:]
    r = _run([sys.executable, os.path.join(ROOT, "tools", "time"), "--model", "net.prototxt",
              "--iterations", "1", "--allow-python"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_forks_own_python_helpers_load_through_the_alias(tmp_path):
    """SSD's scripts do `from caffe.model_libs import *`, a pure-Python file inside the fork's
    python/caffe next to its pycaffe; with that folder on the path it now loads from there, and
    its own `import caffe` is pycaffe_alt. Modules pycaffe_alt has (caffe.io) stay ours."""
    fork = tmp_path / "fork" / "python" / "caffe"
    (fork / "tools").mkdir(parents=True)
    (fork / "__init__.py").write_text("from ._caffe import Net\n")
    (fork / "io.py").write_text("FORK = True\n")
    (fork / "model_libs.py").write_text(
        "import caffe\nfrom caffe import layers as L, params as P\n"
        "def DataLayer():\n    return L.Input(shape=dict(dim=[1, 3, 4, 4]))\n")
    (fork / "tools" / "__init__.py").write_text("")
    (fork / "tools" / "helper.py").write_text("from caffe.proto import caffe_pb2\nVALUE = 7\n")
    prog = tmp_path / "gen.py"
    prog.write_text(textwrap.dedent('''
        import warnings
        warnings.simplefilter("ignore")
        import caffe
        import caffe.io
        from caffe.model_libs import *
        from caffe.tools.helper import VALUE, caffe_pb2
        import pycaffe_alt
        assert caffe is pycaffe_alt and caffe.io is pycaffe_alt.io and L is pycaffe_alt.layers
        assert caffe_pb2 is pycaffe_alt.proto.caffe_pb2 and VALUE == 7
        n = caffe.NetSpec()
        n.data = DataLayer()
        print("FORK OK", len(n.to_proto().layer))
    '''))
    env = _env(PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path / "fork" / "python")]))
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(prog)], env=env, cwd=tmp_path)
    assert r.returncode == 0 and "FORK OK 1" in r.stdout, r.stderr[-3000:]
    missing = tmp_path / "missing.py"
    missing.write_text("import caffe.no_such_helper\n")
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(missing)], env=env, cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'caffe.no_such_helper'" in r.stderr


def test_a_caffe_folder_is_a_real_caffe_only_with_its_extension(tmp_path, monkeypatch):
    # A source checkout cloned as ./caffe (no __init__.py) or a fork's unbuilt python/caffe
    # blocked the alias for Python layer modules, whose `import caffe` then found nothing usable.
    (tmp_path / "checkout" / "caffe").mkdir(parents=True)
    unbuilt = tmp_path / "unbuilt" / "caffe"
    unbuilt.mkdir(parents=True)
    (unbuilt / "__init__.py").write_text("from ._caffe import Net\n")
    for root in ("checkout", "unbuilt"):
        assert caffe_alias.real_caffe_location([str(tmp_path / root)]) is None
    (unbuilt / "_caffe.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert caffe_alias.real_caffe_location([str(tmp_path / "unbuilt")]) == str(unbuilt / "__init__.py")


def test_a_python_layer_aliases_caffe_only_when_its_module_imports_it(tmp_path):
    (tmp_path / "plain_layer.py").write_text(textwrap.dedent('''
        class Source:
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(1, 2)
            def forward(self, bottom, top):
                top[0].data[...] = 1.0
    '''))
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "Python" top: "d" python_param { module: "plain_layer" '
        'layer: "Source" } }\n')
    prog = tmp_path / "prog.py"
    prog.write_text("import sys, pycaffe_alt as caffe\n"
                    "caffe.Net('net.prototxt', caffe.TEST, allow_python=True)\n"
                    "print('caffe imported', 'caffe' in sys.modules)\n")
    r = _run([sys.executable, str(prog)], cwd=tmp_path)
    assert r.returncode == 0 and "caffe imported False" in r.stdout, r.stderr[-3000:]


def test_a_child_python_without_pycaffe_alt_gets_its_own_caffe(tmp_path):
    """The alias folder on PYTHONPATH steps aside in a Python that cannot import pycaffe_alt
    (another environment), which then imports its own caffe."""
    own = tmp_path / "own" / "caffe"
    own.mkdir(parents=True)
    (own / "__init__.py").write_text("WHO = 'own'\n")
    alias = os.path.join(ROOT, "pycaffe_alt", "alias_path")
    code = "import caffe; print('got', caffe.WHO)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([alias, str(tmp_path / "own")]))
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=env, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0 and "got own" in r.stdout, r.stderr[-2000:]


GPU_PROGRAM = textwrap.dedent('''
    import caffe
    from caffe import layers as L
    caffe.set_mode_gpu()
    caffe.set_device(0)
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.out = L.Power(n.data, power=2)
    caffe.set_mode_gpu()
    with open("net.prototxt", "w") as f:
        f.write(str(n.to_proto()))
    net = caffe.Net("net.prototxt", caffe.TEST)
    print("DEVICE", net.device.type, net.forward(data=[[1.0, 3.0]])["out"].tolist())
''')


def test_run_cpu_keeps_gpu_programs_on_the_cpu(tmp_path):
    # Programs that ask for the GPU unconditionally: `--cpu` runs them on the CPU, with one
    # warning for the two set_mode_gpu() calls; options come in any order before the program.
    prog = tmp_path / "gpu_prog.py"
    prog.write_text(GPU_PROGRAM)
    for opts in (["--cpu"], ["--allow-python", "--cpu"], ["--cpu", "--allow_python"]):
        r = _run([sys.executable, "-m", "pycaffe_alt.run", *opts, str(prog)], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "DEVICE cpu [[1.0, 9.0]]" in r.stdout
        assert r.stderr.count("running on the CPU instead") == 1, r.stderr
    r = _run([sys.executable, "-m", "pycaffe_alt.run", "--cpu"], cwd=tmp_path)
    assert r.returncode != 0 and "--cpu needs a program to run" in r.stderr
    assert "Traceback" not in r.stderr
    if not torch.cuda.is_available():  # without the option the program stops at its GPU call
        r = _run([sys.executable, "-m", "pycaffe_alt.run", str(prog)], cwd=tmp_path)
        assert r.returncode != 0 and "no CUDA device" in r.stderr and "run --cpu" in r.stderr


RESHAPE_WRITE_PROGRAM = textwrap.dedent('''
    import caffe
    from caffe import layers as L
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 6, 6]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=3)
    with open("net.prototxt", "w") as f:
        f.write(str(n.to_proto()))
    net = caffe.Net("net.prototxt", caffe.TEST)
    net.forward()
    a = net.blobs["conv"].data
    a.reshape(a.shape[0], -1)[:] = 7  # merges the batch and channel axes
    print("C_ORDER", a.flags["C_CONTIGUOUS"], "WRITTEN", float(net.blobs["conv"].data.min()))
''')


def test_run_nchw_keeps_activation_arrays_c_order(tmp_path):
    # Default: channels-last activations, whose arrays are strided views (a batch-merging
    # reshape is a copy). `--nchw` (PYCAFFE_ALT_NCHW=1) keeps "auto" nets in C-order memory,
    # where the write goes through as in Caffe.
    prog = tmp_path / "reshape_prog.py"
    prog.write_text(RESHAPE_WRITE_PROGRAM)
    r = _run([sys.executable, "-m", "pycaffe_alt.run", "--nchw", str(prog)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "C_ORDER True WRITTEN 7.0" in r.stdout
    r = _run([sys.executable, "-m", "pycaffe_alt.run", str(prog)], cwd=tmp_path)
    assert r.returncode == 0 and "C_ORDER False" in r.stdout, r.stderr[-3000:]


def test_launcher_switches_warn_once_about_values_that_are_neither_on_nor_off(monkeypatch, caplog):
    # PYCAFFE_ALT_NCHW=2 or =enable meant off without a word; now off with one warning.
    from pycaffe_alt.cpu_fallback import GPU_AS_CPU_ENV, gpu_requests_run_on_cpu
    from pycaffe_alt.env_switch import switch_is_on
    from pycaffe_alt.nchw_request import NCHW_ENV, nchw_requested

    for value, on in ((" Yes ", True), ("on", True), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv(NCHW_ENV, value)
        monkeypatch.setenv(GPU_AS_CPU_ENV, value)
        assert nchw_requested() is on and gpu_requests_run_on_cpu() is on
    assert not caplog.records
    monkeypatch.setenv("PYCAFFE_ALT_TEST_SWITCH", "enable")  # a name no other test reads
    with caplog.at_level("WARNING", logger="pycaffe_alt"):
        assert not switch_is_on("PYCAFFE_ALT_TEST_SWITCH")
        assert not switch_is_on("PYCAFFE_ALT_TEST_SWITCH")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "PYCAFFE_ALT_TEST_SWITCH='enable'" in warnings[0]
