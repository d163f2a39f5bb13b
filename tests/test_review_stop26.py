"""Review round 26: defects found in the per-pass performance and tool-log changes (the
MemoryData one is in test_thirdparty_round7.py, with the behaviour it corrects)."""
import pycaffe_alt as caffe


def test_run_m_package_init_sees_the_programs_arguments(tmp_path):
    # python3 -m pkg imports pkg with the program's arguments in sys.argv; the check for a
    # __main__ submodule imported pkg while sys.argv still held pycaffe-alt's own command line.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = tmp_path / "argvpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nprint('init', sys.argv[1:])\n")
    (pkg / "__main__.py").write_text("import sys\nprint('main', sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pycaffe_alt.run", "-m", "argvpkg", "x", "y"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["init ['x', 'y']", "main ['x', 'y']"], r.stdout


def test_tools_test_names_the_device_before_the_weights_lines(tmp_path):
    # caffe.cpp test() logs "Use CPU." before building the net and copying the weights, so
    # CopyTrainedLayersFrom's "Ignoring source layer" lines come after it, not before.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = ('name: "tiny"\nlayer { name: "data" type: "DummyData" top: "data" top: "label"\n'
            '  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
            '  inner_product_param { num_output: 3 } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    (tmp_path / "tiny.prototxt").write_text(tiny)
    (tmp_path / "big.prototxt").write_text(
        tiny + 'layer { name: "extra" type: "InnerProduct" bottom: "ip" top: "ip2"\n'
               '  inner_product_param { num_output: 2 } }\n')
    caffe.Net(str(tmp_path / "big.prototxt"), caffe.TEST).save(str(tmp_path / "w.caffemodel"))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("GLOG_minloglevel", None)
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "test"), "--model",
                        str(tmp_path / "tiny.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
                        "--iterations", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    messages = [line.split("] ", 1)[-1] for line in r.stderr.splitlines()]
    assert messages[:3] == ["Use CPU.", "Ignoring source layer extra",
                            "Running for 1 iterations."], r.stderr
