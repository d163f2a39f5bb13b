"""The training tools' malloc policy (pycaffe_alt/host_memory.py)."""
import platform
import sys

import pytest

from pycaffe_alt import host_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def clean_env(monkeypatch):
    for name in host_memory._USER_SETTINGS + ("LD_PRELOAD",):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_applied_on_glibc(clean_env):
    assert host_memory.keep_freed_memory() is True


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "131072"),
                                         ("MALLOC_TRIM_THRESHOLD_", "0"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                         ("LD_PRELOAD", "libjemalloc.so.2")])
def test_the_users_own_allocator_settings_win(clean_env, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert host_memory.keep_freed_memory() is False


def test_the_training_tools_apply_it(monkeypatch, tmp_path):
    """tools/train, tools/test and tools/time set the policy before building nets."""
    from pycaffe_alt.tools import test as test_tool
    from pycaffe_alt.tools import time_net, train

    calls = []
    for module in (train, test_tool, time_net):
        monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(1) or True)
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
                   'inner_product_param { num_output: 2 } }\n'
                   'layer { name: "loss" type: "Reduction" bottom: "ip" top: "loss" loss_weight: 1 }\n')
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 display: 0 '
                      f'snapshot_after_train: false')
    assert train.main(["--solver", str(solver)]) == 0
    assert time_net.main(["--model", str(net), "--iterations", "1"]) == 0
    assert test_tool.main(["--model", str(net), "--iterations", "1", "--allow_unmatched_weights"]) == 0
    assert len(calls) == 3
