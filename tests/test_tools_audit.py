"""Command-line tools as Caffe's own tools print: what goes to stderr in glog's line format, which
lines appear (the ones users' scripts grep), and GLOG_minloglevel. Each test runs the tool as a
user does, through tools/<name>, and compares with the statements of Caffe's tools/*.cpp."""
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DATA = os.path.join(ROOT, "tests", "fixtures", "golden", "data")

# glog's prefix: severity, [year] month-day (glog >= 0.6 writes the year, as in the reference
# logs), time with microseconds, thread id, file:line.
GLOG_PREFIX = r"[IWEF](?:\d{4})?\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ [^ ]+:\d+\] "

# Two examples of three features each, and a net output of 2x3 values (the Softmax "prob").
TINY_NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 }
    data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def run_tool(name, *args, env=None, cwd=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.pop("GLOG_minloglevel", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=full_env, cwd=cwd)


def messages(stderr):
    """The messages of the glog lines of ``stderr`` (prefix removed), in order."""
    return [re.sub("^" + GLOG_PREFIX, "", line) for line in stderr.splitlines()
            if re.match(GLOG_PREFIX, line)]


def tiny_net(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY_NET)
    return path


def test_tools_obey_glog_minloglevel(tmp_path):
    # `GLOG_minloglevel=1 caffe time ...` prints no INFO line: glog reads the variable at start.
    net = tiny_net(tmp_path)
    loud = run_tool("time", "--model", net, "--iterations", "1")
    assert loud.returncode == 0, loud.stderr
    assert "Average Forward pass" in loud.stderr
    quiet = run_tool("time", "--model", net, "--iterations", "1", env={"GLOG_minloglevel": "1"})
    assert quiet.returncode == 0, quiet.stderr
    assert not [m for m in quiet.stderr.splitlines() if m.startswith("I")], quiet.stderr


def test_caffe_test_lines(tmp_path):
    # caffe.cpp test(): "Use CPU.", "Running for N iterations.", one "Batch i, NAME = v" per
    # element of each output (the bare blob name, also for outputs of several values), then
    # "Loss: ", then "NAME = mean" per element with the loss suffix on loss outputs.
    proc = run_tool("test", "--model", tiny_net(tmp_path), "--iterations", "2",
                    "--allow_unmatched_weights")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = messages(proc.stderr)
    loss = "1.09861"  # -log(1/3): the three logits are equal
    per_batch = ["Batch %d, loss = " + loss] + ["Batch %d, prob = 0.333333"] * 6
    expected = (["Use CPU.", "Running for 2 iterations."]
                + [line % 0 for line in per_batch] + [line % 1 for line in per_batch]
                + ["Loss: " + loss, f"loss = {loss} (* 1 = {loss} loss)"]
                + ["prob = 0.333333"] * 6)
    assert lines == expected, proc.stderr


def test_convert_imageset_lines(tmp_path):
    # convert_imageset.cpp: "Shuffling data", "A total of N images.", the encode_type note, and
    # "Processed N files." after every 1000 records and after the last (scripts grep it).
    import cv2

    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(3)]
    for name in names:
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    proc = run_tool("convert_imageset", "--shuffle", "--encode_type", "png", f"{tmp_path}/",
                    tmp_path / "list.txt", tmp_path / "db")
    assert proc.returncode == 0, proc.stderr
    assert messages(proc.stderr) == ["Shuffling data", "A total of 3 images.",
                                     "encode_type specified, assuming encoded=true.",
                                     "Processed 3 files."], proc.stderr


def test_compute_image_mean_lines(tmp_path):
    # compute_image_mean.cpp logs (on stderr, in glog's format) the count, the output file, the
    # channels and each channel's mean, summed in a float as Caffe does (a double gives 136.535
    # for channel 0 of this database).
    out = tmp_path / "mean.binaryproto"
    proc = run_tool("compute_image_mean", os.path.join(GOLDEN_DATA, "photos_resized_lmdb"), out)
    assert proc.returncode == 0, proc.stderr
    assert "mean_value" not in proc.stdout
    assert messages(proc.stderr) == ["Starting iteration", "Processed 12 files.", f"Write to {out}",
                                     "Number of channels: 3", "mean_value channel [0]: 136.536",
                                     "mean_value channel [1]: 146.059",
                                     "mean_value channel [2]: 147.826"], proc.stderr


def test_upgrade_tools_log_in_glog_format(tmp_path):
    # upgrade_net_proto_text.cpp logs through glog: "E<date> <time> <tid> file:line] File already
    # in latest proto format: IN", then the INFO line naming the output.
    net = tiny_net(tmp_path)
    out = tmp_path / "out.prototxt"
    proc = run_tool("upgrade_net_proto_text", net, out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert re.fullmatch("E" + GLOG_PREFIX[len("[IWEF]"):] + re.escape(f"File already in latest proto format: {net}"),
                        lines[0]), proc.stderr
    assert messages(proc.stderr)[1:] == [f"Wrote upgraded NetParameter text proto to {out}"]


def glog_block(text, first, last):
    """The messages from the line starting ``first`` to the one before ``last``, the lines
    without a glog prefix (a multi-line message) kept as they are."""
    lines = [re.sub("^" + GLOG_PREFIX, "", line) for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
    return lines[start:end]


def test_train_logs_the_solver_parameters_as_caffe(tmp_path):
    # Solver::Init logs param.DebugString() after caffe.cpp set train_state from --level (0)
    # and --stage (boost::split of "" gives one empty stage): the reference log's block.
    case = os.path.join(ROOT, "tests", "fixtures", "golden", "solvers", "sgd_step")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    for name in ("solver.prototxt", "net.prototxt"):
        (work / name).write_text(open(os.path.join(case, name)).read())
    os.symlink(GOLDEN_DATA, tmp_path / "data")  # the net reads ../../data/mnist_*_lmdb
    proc = run_tool("train", "--solver", "solver.prototxt", cwd=work)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(case, "train.log")) as f:
        reference = glog_block(f.read(), "Initializing solver", "Creating training net")
    assert glog_block(proc.stderr, "Initializing solver", "Creating training net") == reference


def test_test_and_time_pass_the_empty_stage_as_caffe(tmp_path):
    # caffe.cpp's test() and time() give the net every name of boost::split(--stage, ","): with
    # no --stage that is the one stage "", so a rule naming "" applies (as in tools/train).
    net = tmp_path / "staged.prototxt"
    net.write_text(TINY_NET + 'layer { name: "extra" type: "Softmax" bottom: "ip" top: "extra"\n'
                              '  exclude { stage: "" } }\n')
    for tool, extra in (("test", ("--iterations", "1", "--allow_unmatched_weights")),
                        ("time", ("--iterations", "1"))):
        plain = run_tool(tool, "--model", net, *extra)
        assert plain.returncode == 0, plain.stderr
        assert not [m for m in messages(plain.stderr) if "extra" in m], plain.stderr
        staged = run_tool(tool, "--model", net, "--stage", "deploy", *extra)
        assert staged.returncode == 0, staged.stderr
        assert [m for m in messages(staged.stderr) if "extra" in m], staged.stderr


def test_glog_minloglevel_is_read_as_strtol_reads_it(monkeypatch):
    # glog's EnvToInt is strtol(value, NULL, 10): leading blanks and a sign, then the leading
    # digits; a value with no leading digits is 0.
    import logging

    from pycaffe_alt.log import glog_env_level

    for value, level in (("1abc", logging.WARNING), (" 2", logging.ERROR), ("+1", logging.WARNING),
                         ("abc", logging.INFO), ("", logging.INFO), ("-1", logging.INFO)):
        monkeypatch.setenv("GLOG_minloglevel", value)
        assert glog_env_level() == level, value


def test_convert_model_without_weights_warns(tmp_path):
    # The converted model would hold the fillers' random weights: said, not silent.
    net = tmp_path / "deploy.prototxt"
    net.write_text('name: "tiny"\nlayer { name: "data" type: "Input" top: "data"\n'
                   '  input_param { shape { dim: 1 dim: 3 } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                   '  inner_product_param { num_output: 2 } }\n')
    proc = run_tool("convert_model", "--model", net, "--to", "torchscript",
                    "--out", tmp_path / "net.pt")
    assert proc.returncode == 0, proc.stderr
    assert [m for m in messages(proc.stderr) if "no --weights or --state-dict" in m], proc.stderr
