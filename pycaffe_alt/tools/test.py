"""``tools/test``: score a model like ``caffe test``.

Runs the net in TEST phase (or ``--phase TRAIN``) for ``--iterations`` forward passes and logs
each output per batch, then the mean of each output over the batches, with the loss weight
applied to loss outputs as Caffe prints them (``loss = 0.3 (* 1 = 0.3 loss)``).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..errors import CaffeError, WeightsError
from ..weights import warn_uncovered
from ..host_memory import keep_freed_memory
from ..log import format_value, get_logger, loss_suffix, setup_tool_logging
from ..mode import resolve_device
from ..output_counts import count_change
from .cli import add_bool_flag, int32, parse_args, run_main


def add_net_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the tools that build a net from a prototxt (Caffe's names)."""
    parser.add_argument("--model", required=True, help="the net definition (.prototxt)")
    parser.add_argument("--weights", default="", help="trained weights (.caffemodel), comma-separated")
    parser.add_argument("--gpu", default=None,
                        help="GPU id to run on (default: CPU); N,M or 'all' are accepted but only "
                             "the first device is used")
    parser.add_argument("--stage", default="", help="comma-separated NetState stages")
    parser.add_argument("--level", type=int32, default=0, help="NetState level")
    parser.add_argument("--allow-python", "--allow_python", action="store_true",
                        help="allow Python layers (they run code named in the prototxt)")
    parser.add_argument("--compile", action="store_true",
                        help="run the net through torch.compile (see docs/performance.md)")


def gpu_ids(flag: Optional[str]) -> List[int]:
    """Device ids of Caffe's ``--gpu`` flag: ``N``, ``N,M,...`` or ``all``; empty means the CPU."""
    if flag is None or str(flag).strip() in ("", "cpu", "-1"):
        return []
    flag = str(flag).strip()
    if flag == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise CaffeError("--gpu all: no CUDA device is available to PyTorch",
                             hint="run without --gpu to use the CPU")
        return list(range(count))
    try:
        # Every comma-separated entry is a device id, as caffe.cpp's get_gpus casts each one
        # (boost::lexical_cast fails on an empty entry): "0,,1" is a typo, not the list 0,1.
        return [int(s) for s in flag.split(",")]
    except ValueError:
        raise CaffeError(f"--gpu {flag!r}: expected a device id (0), a list (0,1) or 'all'",
                         hint="run tools/device_query to list the devices") from None


def select_device(flag: Optional[str]) -> torch.device:
    """The one device a tool runs on for ``--gpu``.

    Caffe trains data-parallel on several GPUs (NCCL); pycaffe_alt does not implement that, so a
    list runs on its first device, with a warning rather than silently pretending.
    """
    ids = gpu_ids(flag)
    if not ids:
        return resolve_device(None)
    if len(ids) > 1:
        get_logger().warning("--gpu %s: multi-GPU data-parallel execution is not implemented; "
                             "running on GPU %d only (the effective batch size is NOT multiplied "
                             "by %d as in Caffe)", flag, ids[0], len(ids))
    return resolve_device(ids[0])


def build_net(args, phase: int, require_weights_match: bool = False):
    """The Net described by the shared flags.

    With ``require_weights_match``, a ``--weights`` file that copies into no layer of the net
    (no layer name in common) is an error instead of a warning: scoring the random net would
    look like a result.
    """
    from ..net import Net

    # Every name of boost::split(--stage, ","), as caffe.cpp's test() and time() pass them (and
    # tools/train): without --stage the net's state has the stage "".
    stages = args.stage.split(",")
    device = select_device(args.gpu)
    # caffe.cpp's test() and time() name the device before building the net: its lines (the
    # weights' "Ignoring source layer", the uncovered-layers warning) come after.
    log_device(device)
    net = Net(args.model, phase, stages=stages, level=args.level,
              allow_python=args.allow_python, device=device, compile=args.compile)
    names = args.weights.split(",") if args.weights else []
    if not all(names):  # Caffe would try to open the empty name
        raise WeightsError(f"--weights {args.weights!r} has an empty entry",
                           hint="give .caffemodel paths separated by single commas")
    # Caffe loads each file in turn and skips the layers a file lacks; only when no file
    # matched any layer would the score be the random initial weights'.
    copied = {w: net.copy_from(w) for w in names}
    matched = [w for w in names if copied[w]]
    if matched:
        warn_uncovered(matched, [n for w in matched for n in copied[w]], net.params)
    if names and not matched and require_weights_match and len(net.params):
        raise WeightsError(f"no layer of {'this weights file' if len(names) == 1 else 'these weights files'} "
                           "has the name of a layer of the net, so nothing would be tested but "
                           "the net's random initial weights", where=args.weights,
                           hint=f"check that --weights belongs to --model ({args.model}); to "
                                "score the unmatched net anyway, add --allow_unmatched_weights")
    return net


def log_device(device: torch.device) -> None:
    """Caffe's line naming the device (caffe.cpp test() and time(): "Use CPU." or "Use GPU with
    device ID N", which has no full stop)."""
    if device.type == "cpu":
        get_logger().info("Use CPU.")
    else:
        get_logger().info("Use GPU with device ID %d", device.index)


def score(net, iterations: int) -> "OrderedDict[str, float]":
    """Mean of every element of every net output over ``iterations`` forward passes.

    Logged as caffe.cpp's test() logs it: the bare blob name on every line, also for each value
    of an output of several values, and float sums and means (Caffe keeps them in floats). The
    returned keys tell those values apart: ``name[j]`` for an output of several values.
    """
    log = get_logger()
    sums: "OrderedDict[str, np.ndarray]" = OrderedDict()
    loss = np.float32(0)
    first_counts: Optional[List[int]] = None
    with torch.no_grad():
        for i in range(iterations):
            values = net.run()  # the whole pass (one graph with --compile)
            loss += np.float32(net.loss(values).item()) if net.loss_tops else np.float32(0)
            counts = [values[name].numel() for name in net.outputs]
            first_counts = first_counts or counts
            change = count_change(net.outputs, first_counts, counts, i)
            if change is not None:  # caffe.cpp's test() sums by position, as Solver::Test
                raise CaffeError(change, where=net.source,
                                 hint="score one batch at a time (--iterations 1), or end the "
                                      "net in outputs of a fixed size")
            for name in net.outputs:
                flat = values[name].detach().cpu().float().numpy().ravel()
                for v in flat:
                    log.info("Batch %d, %s = %s", i, name, format_value(v))
                sums[name] = sums[name] + flat if name in sums else flat.copy()
    log.info("Loss: %s", format_value(loss / np.float32(max(iterations, 1))))
    means: "OrderedDict[str, float]" = OrderedDict()
    for name, total in sums.items():
        mean = total / np.float32(max(iterations, 1))
        weight = net.blob_loss_weights.get(name, 0.0)
        for j, v in enumerate(mean):
            log.info("%s = %s%s", name, format_value(v), loss_suffix(weight, v))
            means[name if mean.size == 1 else f"{name}[{j}]"] = float(v)
    return means


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="test", description=__doc__.splitlines()[0])
    add_net_flags(parser)
    parser.add_argument("--iterations", type=int32, default=50, help="number of batches to score")
    parser.add_argument("--phase", choices=["TEST", "TRAIN"], default="TEST")
    add_bool_flag(parser, "allow_unmatched_weights",
                  "score the net even when --weights shares no layer name with it, or is not "
                  "given (ours)")
    args = parse_args(parser, argv, ["allow_unmatched_weights"])
    if args.iterations < 1:  # Caffe would print "Loss: -nan" (0/0) for nothing scored
        raise CaffeError(f"--iterations {args.iterations}: must be at least 1",
                         hint="the number of batches to score")
    setup_tool_logging()
    keep_freed_memory()  # reuse activation memory across iterations, as Caffe does
    from ..layers import TEST, TRAIN

    net = build_net(args, TRAIN if args.phase == "TRAIN" else TEST,
                    require_weights_match=not args.allow_unmatched_weights)
    if not args.weights and len(net.params) and not args.allow_unmatched_weights:
        # Caffe's test(): CHECK_GT(FLAGS_weights.size(), 0) "Need model weights to score."
        raise WeightsError("no --weights given: there are no model weights to score, only the "
                           "net's random initial ones", where=args.model,
                           hint="add --weights model.caffemodel; to score the initial weights "
                                "anyway, add --allow_unmatched_weights")
    get_logger().info("Running for %d iterations.", args.iterations)
    score(net, args.iterations)
    return 0


if __name__ == "__main__":
    run_main(main)
