"""Data-parallel training (pycaffe_alt.distributed): Caffe's multi-GPU semantics on 2 gloo ranks.

The jobs run tools/train under ``python3 -m torch.distributed.run`` (and the --gpu launcher's
spawn path on the CPU) on the golden sgd_fixed case (SGD with momentum, weight decay, lr_mult),
30 iterations; every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pycaffe_alt.distributed.launch import free_port
from pycaffe_alt.distributed.sharding import Shard
from pycaffe_alt.solver.snapshot import read_any_solverstate
from pycaffe_alt.weights import blob_to_array, read_net_weights

from train_case import TOOLS, make_case

TRAIN = os.path.join(TOOLS, "train")
JOB_TIMEOUT = 180
MNIST_LMDB = os.path.join(os.path.dirname(TOOLS), "tests", "fixtures", "golden", "data",
                          "mnist_train_lmdb")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _case(tmp_path, name, batch, **fields):
    (tmp_path / name).mkdir()
    folder = make_case(tmp_path / name, **fields)
    net = os.path.join(folder, "net.prototxt")
    with open(net) as f:
        text = f.read()
    with open(net, "w") as f:  # the TRAIN layer's batch (the TEST layer reads 32)
        f.write(text.replace("batch_size: 16", f"batch_size: {batch}"))
    return folder


def _log_dir(folder):
    # torchrun's per-run folder goes to $TMPDIR and stays there unless it is given one.
    return ["--log-dir", os.path.join(str(folder), "torchrun_logs")]


def _torchrun(folder, *args, ranks=2, popen=False, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           *_log_dir(folder), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN,
           "--solver", "solver.prototxt", "--dist-timeout", "60", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=folder, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kw)
    return subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)


def _train(folder, *args):
    return subprocess.run([sys.executable, TRAIN, "--solver", "solver.prototxt", *args],
                          cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)


def _weights(path):
    return {(name, i): blob_to_array(b) for name, (_, blobs) in read_net_weights(path).items()
            for i, b in enumerate(blobs)}


def _max_rel(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)) for k in b)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process at batch 16 and two ranks at batch 8, 30 iterations, snapshots at 15 and 30."""
    tmp = tmp_path_factory.mktemp("dp")
    single = _case(tmp, "single", 16)
    _ok(_train(single))
    double = _case(tmp, "double", 8)
    result = _torchrun(double)
    _ok(result)
    return single, double, result


@pytest.mark.slow
def test_two_ranks_at_b_equal_one_process_at_2b(runs):
    single, double, result = runs
    rel = _max_rel(_weights(os.path.join(double, "snap_iter_30.caffemodel")),
                   _weights(os.path.join(single, "snap_iter_30.caffemodel")))
    assert rel <= 1e-4, rel
    # Rank 0 alone logs (one "Solving" line), tests and snapshots (the ordinary file names).
    log = result.stdout + result.stderr
    assert log.count("Solving SmallNet") == 1
    assert log.count("Snapshotting to binary proto file snap_iter_30.caffemodel") == 1
    assert sorted(f for f in os.listdir(double) if f.startswith("snap")) == [
        "snap_iter_15.caffemodel", "snap_iter_15.solverstate",
        "snap_iter_30.caffemodel", "snap_iter_30.solverstate"]
    # The resume state holds the global data cursor: 15 iterations x 2 ranks x 8 records.
    state = read_any_solverstate(os.path.join(double, "snap_iter_15.solverstate")).resume_state
    data = state["data"]["train"]["mnist"]
    assert (data["world_size"], data["global_cursor"]) == (2, 240)


@pytest.mark.slow
def test_resume_on_two_ranks_equals_the_straight_run(runs, tmp_path):
    _, double, _ = runs
    again = _case(tmp_path, "again", 8)
    for name in ("snap_iter_15.caffemodel", "snap_iter_15.solverstate"):
        os.link(os.path.join(double, name), os.path.join(again, name))
    _ok(_torchrun(again, "--snapshot", "snap_iter_15.solverstate"))
    rel = _max_rel(_weights(os.path.join(again, "snap_iter_30.caffemodel")),
                   _weights(os.path.join(double, "snap_iter_30.caffemodel")))
    assert rel <= 1e-6, rel


@pytest.mark.slow
def test_resume_on_one_rank_continues_the_global_record_order(runs, tmp_path, monkeypatch):
    import pycaffe_alt as caffe

    _, double, _ = runs
    monkeypatch.chdir(double)
    solver = caffe.get_solver("solver.prototxt", device="cpu")
    solver.param.snapshot = 0  # the other tests read this folder's snapshots
    solver.restore("snap_iter_15.solverstate")
    assert solver.iter == 15
    solver.step(1)
    # 2 ranks x 8 records x 15 iterations were read: one rank at batch 8 goes on at record 240.
    assert solver.net.layer_modules["mnist"].last_indices.tolist() == list(range(240, 248))
    solver.step(14)
    assert solver.iter == 30 and np.isfinite(solver.smoother.value())


def test_shard_rule_partitions_the_single_process_batches():
    # W ranks at batch B read, batch by batch, what one process reads at batch W*B.
    for world, batch in ((2, 8), (3, 5)):
        ranks = [Shard(r, world) for r in range(world)]
        for b in range(3):
            union = np.sort(np.concatenate([s.positions(b * batch, batch) for s in ranks]))
            assert union.tolist() == list(range(b * world * batch, (b + 1) * world * batch))
    s, served = Shard(1, 2).resumed({"world_size": 2, "shard_start": 0}, 24)
    assert (s, served) == (Shard(1, 2, 0), 24)
    s, served = Shard(0, 3).resumed({"world_size": 2, "shard_start": 0}, 24)
    assert (s, served) == (Shard(0, 3, 48), 0)


def test_data_layers_read_their_shard(tmp_path, monkeypatch):
    import h5py

    import pycaffe_alt as caffe

    rows = np.arange(20, dtype=np.float32).reshape(20, 1)
    for i in range(2):
        with h5py.File(tmp_path / f"p{i}.h5", "w") as h5:
            h5["data"] = rows[10 * i:10 * i + 10]
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'p0.h5'}\n{tmp_path / 'p1.h5'}\n")
    lmdb = MNIST_LMDB

    def net(batch):
        path = tmp_path / f"net{batch}.prototxt"
        path.write_text(
            f'layer {{ name: "h" type: "HDF5Data" top: "data" hdf5_data_param {{ source: '
            f'"{tmp_path / "list.txt"}" batch_size: {batch} shuffle: true }} }}\n'
            f'layer {{ name: "d" type: "Data" top: "x" top: "y" data_param {{ source: "{lmdb}" '
            f'batch_size: {batch} backend: LMDB }} }}\n')
        return caffe.Net(str(path), caffe.TRAIN)

    caffe.set_random_seed(3)
    whole = net(6)
    ranks = []
    for r in range(2):
        caffe.set_random_seed(3)
        n = net(3)
        for name in ("h", "d"):
            n.layer_modules[name].set_shard(r, 2)
        ranks.append(n)
    for _ in range(5):  # crosses both files and a shuffled pass
        whole.forward()
        for n in ranks:
            n.forward()
        for name, blob in (("h", "data"), ("d", "x")):
            joined = np.stack([n.blobs[blob].data for n in ranks], axis=1)
            assert np.array_equal(joined.reshape(whole.blobs[blob].data.shape),
                                  whole.blobs[blob].data)
            idx = np.stack([n.layer_modules[name].last_indices.numpy() for n in ranks], axis=1)
            assert idx.reshape(-1).tolist() == whole.layer_modules[name].last_indices.tolist()


@pytest.mark.slow
def test_a_missing_rank_times_out_with_a_message(tmp_path):
    folder = _case(tmp_path, "alone", 8)
    env = dict(_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, TRAIN, "--solver", "solver.prototxt",
                             "--dist-timeout", "2"], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "did not arrive within 2 s" in result.stderr or "only 1 of 2 ranks" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_bad_command_line_or_solver_file_is_reported_once(tmp_path):
    # Found before the ranks join: local rank 0 reports it, local rank 1 exits quietly (torchrun
    # adds its own summary of the failed ranks).
    folder = _case(tmp_path, "bad", 8)
    (tmp_path / "bad" / "solvers" / "case" / "broken.prototxt").write_text("base_lr: [\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           *_log_dir(folder), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           TRAIN, "--solver", "broken.prototxt"]
    result = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    assert result.returncode != 0
    assert result.stderr.count("train: error:") == 1, result.stderr[-3000:]
    assert "broken.prototxt:1" in result.stderr
    # Which processes stay quiet: local ranks > 0 of a launched job (also for argparse's
    # errors, which the same rule covers in tools/train).
    from pycaffe_alt.tools.train import later_local_rank

    assert later_local_rank({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert not later_local_rank({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert not later_local_rank({}) and not later_local_rank({"WORLD_SIZE": "2",
                                                              "LOCAL_RANK": "x"})


def _rank_pid(parent_pid, rank, deadline):
    """The pid of the process with RANK=rank below parent_pid (Linux /proc)."""
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and ppid == parent_pid:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} did not start")


def _descendants(pid):
    """Every live process below ``pid`` (Linux /proc), children first."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_job(proc):
    """Kill a launched job and its ranks: a failed test must not leave ranks training on (the
    launchers start them in their own sessions, so the launcher's death does not reach them)."""
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def _wait_for_line(proc, text, deadline):
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines[-30:]))


def _signal_rank_at_iteration_5(proc, rank, sig):
    """Send ``sig`` to rank ``rank`` of the job ``proc`` once it logs iteration 5; the job's
    output."""
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        _wait_for_line(proc, "Iteration 5,", deadline)
        os.kill(_rank_pid(proc.pid, rank, deadline), sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        _kill_job(proc)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")
def test_a_killed_rank_ends_the_job_with_one_report(tmp_path):
    folder = _case(tmp_path, "kill", 8, max_iter=100000, snapshot=0, test_interval=100000)
    launcher = ("import sys; from pycaffe_alt.distributed.launch import spawn_ranks; "
                "sys.exit(spawn_ranks(['--solver', 'solver.prototxt', '--dist-timeout', '60'], "
                "[[], []]))")
    env = dict(_env(), PYTHONPATH=os.path.dirname(TOOLS))
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _signal_rank_at_iteration_5(proc, 1, signal.SIGKILL)
    assert proc.returncode not in (0, None)
    reports = [line for line in out.splitlines() if "error:" in line]
    assert len(reports) == 1, out[-3000:]
    assert "rank 1" in reports[0] and ("killed" in reports[0] or "without a report" in reports[0])
    assert "Traceback" not in out
    assert not [f for f in os.listdir(folder) if f.startswith("snap")]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")
def test_sigint_on_rank_0_snapshots_and_stops_every_rank(tmp_path):
    folder = _case(tmp_path, "sigint", 8, max_iter=100000, snapshot=0, test_interval=100000)
    proc = _torchrun(folder, popen=True)
    out = _signal_rank_at_iteration_5(proc, 0, signal.SIGINT)
    assert proc.returncode == 0, out[-3000:]
    assert "Optimization stopped early." in out
    states = [f for f in os.listdir(folder) if f.endswith(".solverstate")]
    assert len(states) == 1
    it = read_any_solverstate(os.path.join(folder, states[0])).iter
    assert 5 <= it < 100000 and states[0] == f"snap_iter_{it}.solverstate"


@pytest.mark.slow
@pytest.mark.parametrize("alternation", [
    "mode: BATCH warmup_iter: 4 support_beta: 0.01",          # B-alternation: eq. 41 all-reduced
    # I-alternation: support steps at 4 and 12, the pass split by record over the ranks; the
    # snapshot at 10 (weights, history, schedule and the whole mask store) resumes exactly.
    "mode: INSTANCE warmup_iter: 4 gap_iter: 8",
    # Epochs are counted in global batches (512 records / (2 x 8) = 32 iterations), so this is
    # the schedule above; counted per rank it would be twice as long.
    "mode: INSTANCE warmup_epochs: 0.125 gap_epochs: 0.25",
    # Patience: window means (display 2) of the global batch's loss, so the ranks call support
    # steps at the same iterations as one process at the double batch.
    "mode: INSTANCE warmup_iter: 2 patience: 1 min_improvement: 0.05",
    # Staleness: the stale bits of both ranks' batches together decide the support step.
    "mode: INSTANCE warmup_iter: 2 gap_iter: 100 staleness_threshold: 0.03"])
def test_alternation_on_two_ranks_equals_one_process_at_double_batch(tmp_path, alternation):
    from pycaffe_alt.prototxt import write_text

    from alternation_case import solver_param

    def run(name, batch, ranks, *args, extra=""):
        folder = tmp_path / name
        folder.mkdir()
        param = solver_param(folder, alternation, "max_iter: 20 snapshot_after_train: true "
                             + extra, batch=batch)
        write_text(param, str(folder / "solver.prototxt"))
        result = _train(str(folder)) if ranks == 1 else _torchrun(str(folder), *args)
        _ok(result)
        return folder, result.stdout + result.stderr

    decided = "patience" in alternation or "staleness" in alternation
    extra = "display: 2" if decided else "snapshot: 10"
    (one, log_one), (two, log_two) = run("one", 16, 1, extra=extra), run("two", 8, 2, extra=extra)
    rel = _max_rel(_weights(str(two / "tiny_iter_20.caffemodel")),
                   _weights(str(one / "tiny_iter_20.caffemodel")))
    assert rel <= 1e-4, rel
    if decided:
        steps = [[line.split(",")[0].split()[-1] for line in log.splitlines()
                  if "support step next" in line] for log in (log_one, log_two)]
        assert len(steps[0]) >= 2 and steps[0] == steps[1], steps
    if alternation.endswith("gap_iter: 8"):
        again = tmp_path / "again"
        again.mkdir()
        for suffix in ("caffemodel", "solverstate", "masks"):
            os.link(two / f"tiny_iter_10.{suffix}", again / f"tiny_iter_10.{suffix}")
        param = solver_param(again, alternation, "max_iter: 20 snapshot_after_train: true",
                             batch=8)
        write_text(param, str(again / "solver.prototxt"))
        _ok(_torchrun(str(again), "--snapshot", "tiny_iter_10.solverstate"))
        rel = _max_rel(_weights(str(again / "tiny_iter_20.caffemodel")),
                       _weights(str(two / "tiny_iter_20.caffemodel")))
        assert rel <= 1e-6, rel
        assert (again / "tiny_iter_20.masks").read_bytes() == \
            (two / "tiny_iter_20.masks").read_bytes()


# No biases before the BatchNorms: their gradient is 0 there (BatchNorm removes the mean), so
# they would hold float noise only.
BN_SOLVER = """
type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed" max_iter: 12
display: 0 random_seed: 3 snapshot_after_train: true snapshot_prefix: "bn"
net_param { name: "TinyBN"
  layer { name: "mnist" type: "Data" top: "data" top: "label"
    transform_param { scale: 0.00390625 }
    data_param { source: "%(lmdb)s" batch_size: %(batch)d backend: LMDB } }
  layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
    convolution_param { num_output: 4 kernel_size: 5 stride: 2 bias_term: false
      weight_filler { type: "xavier" } } }
  layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
  layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
    scale_param { bias_term: true } }
  layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
  layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
    inner_product_param { num_output: 10 bias_term: false weight_filler { type: "xavier" } } }
  layer { name: "bn2" type: "BatchNorm" bottom: "ip1" top: "ip1" }
  layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" } }
"""


@pytest.mark.slow
def test_sync_batchnorm_on_two_ranks_equals_one_process_at_double_batch(tmp_path):
    finals = []
    for name, batch, ranks in (("one", 16, 1), ("two", 8, 2)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "solver.prototxt").write_text(BN_SOLVER % {"lmdb": MNIST_LMDB, "batch": batch})
        _ok(_train(str(folder)) if ranks == 1 else _torchrun(str(folder), "--sync-bn"))
        finals.append(_weights(str(folder / "bn_iter_12.caffemodel")))
    # Every blob, the BatchNorm layers' running mean, variance and scale factor included.
    assert ("bn1", 1) in finals[0] and ("bn2", 2) in finals[0]
    rel = _max_rel(finals[1], finals[0])
    assert rel <= 1e-4, rel


@pytest.mark.slow
def test_support_pass_split_by_record_gives_the_single_process_store(tmp_path):
    # tests/dp_support_pass.py: two support steps (the second with other thresholds) on one
    # process and on 2 ranks, the same weights and pass batch; every rank saves its store.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_support_pass.py")
    _ok(subprocess.run([sys.executable, script, str(tmp_path)], env=_env(), capture_output=True,
                       text=True, timeout=JOB_TIMEOUT))
    _ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        *_log_dir(tmp_path), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script,
                        str(tmp_path)], env=_env(), capture_output=True, text=True,
                       timeout=JOB_TIMEOUT))
    for step in (1, 2):
        single = (tmp_path / f"single_{step}.masks").read_bytes()
        assert (tmp_path / f"rank0_{step}.masks").read_bytes() == single
        assert (tmp_path / f"rank1_{step}.masks").read_bytes() == single
    stats = {name: json.loads((tmp_path / f"{name}.json").read_text())
             for name in ("single", "rank0", "rank1")}
    for one, r0, r1 in zip(stats["single"], stats["rank0"], stats["rank1"]):
        # Each rank computed half of the 512 records (32 batches of 8, one process 64) ...
        assert (one["records_computed"], one["batches"]) == (512, 64)
        assert (r0["records_computed"], r0["batches"]) == (r1["records_computed"], r1["batches"]) \
            == (256, 32)
        # ... and logs the whole pass's statistics.
        for key in ("records", "first", "changed_overall", "on_overall"):
            assert one[key] == r0[key] == r1[key], key
    assert stats["single"][1]["changed_overall"] > 0


@pytest.mark.slow
def test_dsd_support_pruning_on_two_ranks_equals_one_process_at_double_batch(tmp_path):
    """DSD (support pruning, B-alternation): the estimation pass reads the training set once
    between the ranks (global batches), so both the keep masks and the trained weights are one
    process's at the double batch."""
    from pycaffe_alt.prototxt import write_text

    from alternation_case import solver_param

    logs, finals = [], []
    for name, batch, ranks in (("one", 16, 1), ("two", 8, 2)):
        folder = tmp_path / name
        folder.mkdir()
        param = solver_param(folder, "mode: BATCH", "max_iter: 12 display: 1 "
                             "snapshot_after_train: true dsd_param { dense_iter: 4 "
                             "sparse_iter: 4 redense_iter: 4 prune_by: SUPPORT }", batch=batch)
        param.type = "SGD"
        write_text(param, str(folder / "solver.prototxt"))
        result = _train(str(folder)) if ranks == 1 else _torchrun(str(folder))
        _ok(result)
        logs.append([line.split("] ", 1)[-1] for line in (result.stdout + result.stderr)
                     .splitlines() if "DSD: eq. 41 supports of" in line])
        finals.append(_weights(str(folder / "tiny_iter_12.caffemodel")))
    assert logs[0] and logs[0] == logs[1]  # same batch count, channels and pruned layers
    assert _max_rel(finals[1], finals[0]) <= 1e-4


@pytest.mark.slow
def test_gpu_list_flags_and_launcher_environment(tmp_path):
    from pycaffe_alt.distributed.group import LaunchEnv, launch_env
    from pycaffe_alt.distributed.launch import rank_env, without_flag
    from pycaffe_alt.errors import DistributedError
    from pycaffe_alt.tools.train import rank_gpu

    assert without_flag(["--solver", "s", "--gpu", "0,1", "--gpu=all", "-x"], "gpu") == \
        ["--solver", "s", "-x"]
    env = rank_env(1, 2, 1234, base={})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == \
        ("1", "1", "2", "1234")
    assert launch_env(env) == LaunchEnv(1, 2, 1, "127.0.0.1", 1234)
    assert launch_env({}) is None and launch_env(dict(env, WORLD_SIZE="1", RANK="0")) is None
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        launch_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"})
    with pytest.raises(DistributedError, match="RANK 2 is not in"):
        launch_env(dict(env, RANK="2"))
    job = LaunchEnv(1, 2, 1, "h", 1)
    assert rank_gpu(job, [3, 5], "") == "5" and rank_gpu(job, [], "2") == "3"
    assert rank_gpu(job, [], "") == ""
    with pytest.raises(DistributedError, match="LOCAL_RANK 2"):
        rank_gpu(LaunchEnv(2, 3, 2, "h", 1), [0, 1], "")
    # Without CUDA, --gpu 0,1 fails once, before any rank is started.
    import torch

    if not torch.cuda.is_available():
        folder = _case(tmp_path, "gpus", 8)
        result = _train(folder, "--gpu", "0,1")
        assert result.returncode == 1 and result.stderr.count("error:") == 1
        assert "no CUDA device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_adam_iter_size_clipping_and_step_policy_on_two_ranks(tmp_path):
    # iter_size 2: each rank accumulates two batches of 4; the job's 16 records per iteration are
    # one process's two batches of 8. Clipping sees the averaged, accumulated gradient (Caffe).
    fields = dict(type="Adam", base_lr=0.002, momentum=0.9, momentum2=0.999, iter_size=2,
                  clip_gradients=0.5, lr_policy="step", stepsize=8, gamma=0.5, max_iter=20,
                  snapshot=0, test_interval=100)
    single = _case(tmp_path, "single", 8, **fields)
    _ok(_train(single))
    double = _case(tmp_path, "double", 4, **fields)
    _ok(_torchrun(double))
    rel = _max_rel(_weights(os.path.join(double, "snap_iter_20.caffemodel")),
                   _weights(os.path.join(single, "snap_iter_20.caffemodel")))
    assert rel <= 1e-4, rel


@pytest.mark.slow
def test_a_nan_loss_stops_every_rank_with_one_report(tmp_path):
    folder = _case(tmp_path, "nan", 8, base_lr=1e8, max_iter=30, snapshot=0, test_interval=100)
    result = _torchrun(folder)
    assert result.returncode != 0
    reports = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(reports) == 1, result.stderr[-3000:]
    assert "NaN or infinite at iteration" in reports[0] and "rank " in reports[0]
    assert not [f for f in os.listdir(folder) if f.startswith("snap")]


def test_gather_rows_completes_every_rank_store_in_chunks():
    import threading

    import torch

    from pycaffe_alt.alternation.mask_store import MaskStore
    from pycaffe_alt.alternation.support_pass import gather_rows
    from pycaffe_alt.distributed.sharding import RecordSplit

    layout, n, world = [("a", (3, 5)), ("b", (9,))], 11, 3
    gen = torch.Generator().manual_seed(0)
    masks = {name: torch.rand((n,) + shape, generator=gen) > 0.5 for name, shape in layout}
    whole = MaskStore(layout, n)
    whole.put(None, list(range(n)), masks)
    # Three "ranks" in threads: an all-gather is a barrier plus a shared table.
    table, barrier = {}, threading.Barrier(world)

    def gather_for(rank):
        def gather(t):
            table[rank] = t.clone()
            barrier.wait()
            parts = [table[q] for q in range(world)]
            barrier.wait()
            return parts
        return gather

    stores = []
    for r in range(world):
        store = MaskStore(layout, n)
        mine = np.arange(r, n, world)
        store.put(None, mine, {k: v[mine] for k, v in masks.items()})
        stores.append(store)
    splits = [RecordSplit(r, world, gather_for(r), lambda t: t) for r in range(world)]
    threads = [threading.Thread(target=gather_rows, args=(stores[r], splits[r]),
                                kwargs={"chunk_bytes": 2 * whole.row_bytes})
               for r in range(world)]  # 2 rows per chunk: ceil(4 / 2) = 2 gathers
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for store in stores:
        assert store.filled.all()
        assert np.array_equal(store.read_rows(range(n)), whole.read_rows(range(n)))


def test_a_request_made_while_the_ranks_exchange_is_kept(tmp_path, monkeypatch):
    # A signal handler runs right after the blocking all_gather returns, i.e. in the middle of
    # the per-iteration exchange; its stop request must act at the next exchange, not vanish.
    import torch.distributed as dist

    import pycaffe_alt as caffe
    from pycaffe_alt.distributed import DataParallel
    from pycaffe_alt.errors import DistributedError

    folder = _case(tmp_path, "req", 8, max_iter=50, snapshot=0, test_interval=1000)
    monkeypatch.chdir(folder)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        solver = caffe.get_solver("solver.prototxt", device="cpu")
        dp = DataParallel(solver, watchdog=False)
        real, calls = dist.all_gather, []

        def all_gather_then_signal(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 1:
                dp.request_stop()  # what SignalEffects.handle does on SIGINT
            return result

        monkeypatch.setattr(dist, "all_gather", all_gather_then_signal)
        dp.step(5)
        assert solver.stopped_early and solver.iter == 2
        dp.close()
    finally:
        dist.destroy_process_group()


def test_worker_processes_read_the_same_shard(tmp_path):
    import pycaffe_alt as caffe

    lmdb = MNIST_LMDB
    path = tmp_path / "net.prototxt"
    path.write_text(f'layer {{ name: "d" type: "Data" top: "x" top: "y" data_param {{ '
                    f'source: "{lmdb}" batch_size: 5 backend: LMDB }} }}\n')
    seen = []
    for workers in (0, 1):
        caffe.set_random_seed(3)
        net = caffe.Net(str(path), caffe.TRAIN)
        layer = net.layer_modules["d"]
        layer.set_pipeline(workers=workers)
        layer.set_shard(1, 2)
        batches = []
        for _ in range(3):
            net.forward()
            batches.append(layer.last_indices.tolist())
        layer.close()
        seen.append(batches)
    assert seen[0] == seen[1] == [[1, 3, 5, 7, 9], [11, 13, 15, 17, 19], [21, 23, 25, 27, 29]]


def _exact_lmdb_case(folder, batch):
    from pycaffe_alt.prototxt import write_text

    from alternation_case import solver_param

    folder.mkdir()
    # Every iteration an exact step: a support pass and two L-BFGS solves over all 512 records,
    # read in passes of 16 on one process and on each rank.
    param = solver_param(folder, 'weight_step: CONVEX lbfgs_iter: 3 exact_batch_size: 16 '
                         'exact_layer: "conv1" exact_layer: "ip2"',
                         "max_iter: 2 display: 1 snapshot_after_train: true", batch=batch)
    write_text(param, str(folder / "solver.prototxt"))
    return str(folder)


@pytest.mark.slow
def test_exact_steps_on_two_ranks_split_the_records_and_equal_one_process(tmp_path):
    # CONVEX on the LMDB net (Data layer: each rank reads its shard) ...
    one, two = _exact_lmdb_case(tmp_path / "one", 16), _exact_lmdb_case(tmp_path / "two", 8)
    _ok(_train(one))
    result = _torchrun(two)
    _ok(result)
    assert "(256 of 512 records on this rank)" in result.stdout + result.stderr
    rel = _max_rel(_weights(os.path.join(two, "tiny_iter_2.caffemodel")),
                   _weights(os.path.join(one, "tiny_iter_2.caffemodel")))
    assert rel <= 1e-4, rel
    # ... and LEAST_SQUARES on the teacher-student net (HDF5Data: each rank keeps its rows),
    # solved densely and by CG (max_dense_unknowns: 0; each CG product a reduced pass).
    from exact_case import hidden_weights, teacher_files

    cg = ("alternation_param { weight_step: LEAST_SQUARES warmup_iter: 0 gap_iter: 1 "
          "max_dense_unknowns: 0 cg_iter: 4 }")
    finals = []
    for name, ranks, extra in (("ls_one", 1, None), ("ls_two", 2, None), ("cg_one", 1, cg),
                               ("cg_two", 2, cg)):
        case = teacher_files(tmp_path / name, d=10, k=3, n=600, batch=100, max_iter=2,
                             extra=extra)
        cmd = [TRAIN, "--solver", str(case["solver"]), "--weights", str(case["weights"])]
        if ranks == 2:
            cmd = ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                   *_log_dir(tmp_path / name), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), *cmd, "--dist-timeout", "60"]
        result = subprocess.run([sys.executable, *cmd], env=_env(), capture_output=True,
                                text=True, timeout=JOB_TIMEOUT)
        _ok(result)
        log = result.stdout + result.stderr
        if ranks == 2:
            assert "(300 of 600 records on this rank)" in log
        assert ("CG 4 on 30" in log) == (extra is not None), log[-2000:]
        finals.append(hidden_weights(tmp_path / name / "snap_iter_2.caffemodel"))
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(finals[3], finals[2], rtol=1e-6, atol=1e-9)


def test_plateau_is_refused_data_parallel(tmp_path):
    """The SSD fork drops the rate from the root solver's smoothed loss alone; every rank of
    ours applies the update with its own loss, so the ranks would part: refused at the start."""
    import torch.distributed as dist
    from google.protobuf import text_format

    import pycaffe_alt as caffe
    from pycaffe_alt.distributed import DataParallel
    from pycaffe_alt.errors import DistributedError
    from pycaffe_alt.proto import caffe_pb2

    p = caffe_pb2.SolverParameter()
    text_format.Parse('net_param { layer { name: "x" type: "DummyData" top: "x" '
                      'dummy_data_param { shape { dim: 1 } } } } base_lr: 0.1 '
                      'lr_policy: "plateau" gamma: 0.1 plateau_winsize: 5', p)
    solver = caffe.get_solver(p, device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(DistributedError, match='lr_policy "plateau" cannot run '
                                                   "data-parallel") as e:
            DataParallel(solver)
        assert ": lr_policy" in str(e.value) and "multistep" in str(e.value)
    finally:
        dist.destroy_process_group()
