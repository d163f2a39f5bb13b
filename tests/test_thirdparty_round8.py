"""Round 8 of third-party pycaffe programs run unchanged, aimed at training driven from Python:
behaviours those programs rely on, each checked with a small program of our own written after
the real one's pattern."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_NET = """name: 'tiny'
layer { name: 'data' type: 'DummyData' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: 'gaussian' } data_filler { type: 'constant' value: 1 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'xavier' } } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""


def _run_program(tmp_path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        "net: 'net.prototxt' base_lr: 0.1 lr_policy: 'fixed' display: 1 max_iter: 4 "
        "snapshot_prefix: 'snap'")
    (tmp_path / "prog.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pycaffe_alt.run", "prog.py"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_solver_lines_stay_out_of_the_programs_own_logging(tmp_path):
    # ChanganVR/ConstraintAwareCompression's pruning/fine_tune.py calls logging.basicConfig and
    # logs its own test accuracy; glog's lines reach stderr but never the program's Python
    # logging, so its log holds only its own lines.
    r = _run_program(tmp_path, """
        import logging, sys
        import caffe
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='PY %(message)s')
        solver = caffe.get_solver('solver.prototxt')
        solver.step(2)
        logging.info('accuracy %d', 1)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["PY accuracy 1"]
    assert "Iteration 1, loss = " in r.stderr


def test_get_solver_reads_the_solver_file_once(tmp_path, monkeypatch, caplog):
    # ChanganVR/ConstraintAwareCompression writes a solver file without snapshot_prefix and
    # opens it with caffe.get_solver: pycaffe reads the file once (ReadSolverParamsFromText-
    # FileOrDie), so Caffe's upgrade note is logged once and the solver is of the file's type.
    import logging

    import pycaffe_alt as caffe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "ft_solver.prototxt").write_text(
        "net: 'net.prototxt' base_lr: 0.01 lr_policy: 'fixed' type: 'Adam'")
    with caplog.at_level(logging.INFO, logger="pycaffe_alt"):
        solver = caffe.get_solver("ft_solver.prototxt")
    notes = [r for r in caplog.records if "snapshot_prefix was not specified" in r.getMessage()]
    assert len(notes) == 1
    assert isinstance(solver, caffe.AdamSolver)
    assert solver.param.snapshot_prefix == "ft_solver"
    assert solver.source == "ft_solver.prototxt"
