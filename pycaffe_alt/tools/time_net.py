"""``tools/time``: per-layer forward and backward times of a net, like ``caffe time``.

(The module is ``time_net`` so that it does not shadow the standard library's ``time``.)

How it is measured — the same method as Caffe's ``time`` command, which times each layer's
``Forward`` and ``Backward`` call on its own:

- forward: the layers run one at a time (``Net.run(start=i, end=i)``); each layer reads its
  bottoms as fresh autograd leaves (detached copies that require a gradient exactly where
  Caffe's need-backward analysis says the layer propagates one), so every layer's graph is
  its own;
- backward: the layers are visited in reverse and each one's gradient is computed alone with
  ``torch.autograd.grad(its tops, its bottom leaves + parameters, top diffs)``; the bottom diffs
  it returns are summed into the diffs of the blobs below (fan-out) and become the top diffs of
  the producing layer, and loss tops start with their loss weight as diff, as in Caffe;
- on a GPU every timed region ends with ``torch.cuda.synchronize`` (kernels are asynchronous).

One clean, untimed forward/backward pass comes first (Caffe does the same). Because every layer
is a separate autograd graph, the per-layer backward times include one autograd-engine call each
(tens of microseconds); "Average Forward-Backward" is measured around the whole iteration.
Nets with Input layers are fed uniform random numbers in [0, 1) (integral labels then read as
class 0, valid for every loss); nets with Data layers read their data as in training.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CaffeError, NetError
from ..host_memory import keep_freed_memory
from ..log import get_logger, setup_tool_logging
from .cli import int32, parse_args, run_main
from .test import add_net_flags, build_net


@dataclass
class LayerTime:
    """Mean milliseconds of one layer's forward and backward."""

    name: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0


@dataclass
class Timings:
    """What ``caffe time`` reports: per layer, per pass, per iteration, in milliseconds."""

    iterations: int
    layers: List[LayerTime] = field(default_factory=list)
    forward_ms: float = 0.0  # mean forward pass
    backward_ms: float = 0.0  # mean backward pass
    iteration_ms: List[float] = field(default_factory=list)  # each forward-backward
    total_ms: float = 0.0  # the whole benchmark


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class _Record:
    """One layer's forward in the current iteration: its bottom leaves and its top tensors."""

    leaves: List[Tuple[str, torch.Tensor]]
    tops: List[Tuple[str, torch.Tensor]]
    params: List[torch.nn.Parameter]


class LayerTimer:
    """Runs a Net layer by layer, timing each layer's forward and backward (see module docstring)."""

    def __init__(self, net) -> None:
        self.net = net
        # The net's execution plan: layer order, blob names, and which bottoms get gradients.
        self.steps = net._steps
        self.sync = _synchronizer(net.device)
        self.loss_weights = {n: w for n, w in net.blob_loss_weights.items() if w}

    def feed_inputs(self, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Random values in [0, 1) for the net's Input blobs."""
        return {name: torch.rand(self.net.blobs[name].shape, generator=generator).to(self.net.device)
                for name in self.net.inputs}

    def forward(self, inputs: Dict[str, torch.Tensor], times: Optional[List[float]] = None
                ) -> List[_Record]:
        """One forward pass, layer by layer; adds each layer's seconds to ``times``."""
        values = dict(inputs)
        records: List[_Record] = []
        for i, step in enumerate(self.steps):
            leaves = []
            for b, detach in zip(step.bottoms, step.detach):
                v = values[b]
                leaf = v.detach()
                if not detach and leaf.is_floating_point():
                    leaf.requires_grad_(True)
                leaves.append((b, leaf))
            start = time.perf_counter()
            with torch.enable_grad():
                out = self.net.run(dict(leaves), start=i, end=i) if step.runs else values
            self.sync()
            if times is not None:
                times[i] += time.perf_counter() - start
            tops = [(t, out[t]) for t in step.tops]
            values.update(tops)
            records.append(_Record(leaves, tops, [p for p in step.layer.blobs if p.requires_grad]))
        return records

    def backward(self, records: List[_Record], times: Optional[List[float]] = None,
                 param_grads: Optional[Dict[torch.nn.Parameter, torch.Tensor]] = None) -> None:
        """One backward pass over ``records`` in reverse; adds each layer's seconds to ``times``.

        ``param_grads``, when given, receives every parameter's gradient (summed over the layers
        sharing it), so that the layer-by-layer backward can be checked against the net's own.
        """
        pending: Dict[str, torch.Tensor] = {}
        # Loss tops start with their loss weight as diff (Caffe's Layer::SetLossWeights).
        for rec in records:
            for name, t in rec.tops:
                if name in self.loss_weights:
                    pending[name] = torch.full_like(t, self.loss_weights[name])
        for i in range(len(records) - 1, -1, -1):
            rec = records[i]
            outs, diffs = [], []
            for name, t in rec.tops:
                diff = pending.pop(name, None)
                if t.requires_grad:
                    outs.append(t)
                    diffs.append(diff if diff is not None else torch.zeros_like(t))
            wanted = [leaf for _, leaf in rec.leaves if leaf.requires_grad] + rec.params
            grads: Sequence[Optional[torch.Tensor]] = [None] * len(wanted)
            if outs and wanted:  # a layer with nothing to differentiate takes no time (Input, Data)
                start = time.perf_counter()
                grads = torch.autograd.grad(outs, wanted, diffs, allow_unused=True)
                self.sync()
                if times is not None:
                    times[i] += time.perf_counter() - start
            got = iter(grads)
            for name, leaf in rec.leaves:
                if not leaf.requires_grad:
                    continue
                g = next(got)
                if g is not None:  # fan-out: diffs of a blob read by several layers add up
                    pending[name] = g if name not in pending else pending[name] + g
            if param_grads is not None:
                for p in rec.params:
                    g = next(got)
                    if g is not None:
                        param_grads[p] = g if p not in param_grads else param_grads[p] + g

    def run(self, iterations: int, on_iteration: Optional[Callable[[int, float], None]] = None
            ) -> Timings:
        """``iterations`` timed forward-backward passes."""
        n = len(self.steps)
        fwd, bwd = [0.0] * n, [0.0] * n
        result = Timings(iterations)
        forward_total = backward_total = 0.0
        bench_start = time.perf_counter()
        for j in range(iterations):
            inputs = self.feed_inputs()
            it_start = time.perf_counter()
            records = self.forward(inputs, fwd)
            fwd_end = time.perf_counter()
            self.backward(records, bwd)
            it_end = time.perf_counter()
            forward_total += fwd_end - it_start
            backward_total += it_end - fwd_end
            result.iteration_ms.append((it_end - it_start) * 1e3)
            if on_iteration:
                on_iteration(j + 1, result.iteration_ms[-1])
        result.total_ms = (time.perf_counter() - bench_start) * 1e3
        result.layers = [LayerTime(s.name, f * 1e3 / iterations, b * 1e3 / iterations)
                         for s, f, b in zip(self.steps, fwd, bwd)]
        result.forward_ms = forward_total * 1e3 / iterations
        result.backward_ms = backward_total * 1e3 / iterations
        return result


def time_net(net, iterations: int) -> Timings:
    """Caffe's ``time`` benchmark of ``net``: a clean pass, then ``iterations`` timed passes."""
    if iterations < 1:
        raise CaffeError(f"--iterations {iterations}: must be at least 1")
    log = get_logger()
    timer = LayerTimer(net)
    log.info("Performing Forward")
    records = timer.forward(timer.feed_inputs())
    log.info("Initial loss: %g", float(net.loss().detach()))
    log.info("Performing Backward")
    net.check_backward()  # Caffe's untimed Net::Backward
    timer.backward(records)
    del records
    for step in net.steps:
        if not step.layer.has_backward:
            # caffe.cpp's time() calls every layer's Backward in its benchmark loop, needed or
            # not: ThresholdLayer's NOT_IMPLEMENTED stops it there.
            raise NetError("has no backward (Caffe's Backward_cpu is NOT_IMPLEMENTED), and caffe "
                           "time runs every layer's backward", step.layer.where,
                           "time a net without this layer (its forward is one comparison)")
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    result = timer.run(iterations, lambda j, ms: log.info(
        "Iteration: %d forward-backward time: %g ms.", j, ms))
    log.info("Average time per layer: ")
    for lt in result.layers:
        log.info("%10s\tforward: %g ms.", lt.name, lt.forward_ms)
        log.info("%10s\tbackward: %g ms.", lt.name, lt.backward_ms)
    log.info("Average Forward pass: %g ms.", result.forward_ms)
    log.info("Average Backward pass: %g ms.", result.backward_ms)
    log.info("Average Forward-Backward: %g ms.", result.total_ms / iterations)
    log.info("Total Time: %g ms.", result.total_ms)
    log.info("*** Benchmark ends ***")
    return result


def time_passes(net, iterations: int) -> Timings:
    """Whole forward-backward passes (``--compile``: the net is one compiled graph, so there
    are no per-layer times); the first pass, which compiles, is timed and reported apart."""
    if iterations < 1:
        raise CaffeError(f"--iterations {iterations}: must be at least 1")
    log = get_logger()
    sync = _synchronizer(net.device)

    def one_pass() -> float:
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        loss = net.loss(net.run())
        if loss.requires_grad:
            loss.backward()
        sync()
        return (time.perf_counter() - start) * 1e3

    log.info("First pass (compiles the net): %g ms.", one_pass())
    result = Timings(iterations)
    bench_start = time.perf_counter()
    for j in range(iterations):
        result.iteration_ms.append(one_pass())
        log.info("Iteration: %d forward-backward time: %g ms.", j + 1, result.iteration_ms[-1])
    result.total_ms = (time.perf_counter() - bench_start) * 1e3
    log.info("Average Forward-Backward: %g ms.", result.total_ms / iterations)
    log.info("Total Time: %g ms.", result.total_ms)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="time", description=__doc__.splitlines()[0])
    add_net_flags(parser)
    parser.add_argument("--iterations", type=int32, default=50, help="number of timed passes")
    parser.add_argument("--phase", choices=["TRAIN", "TEST"], default="TRAIN",
                        help="net phase (caffe time's default: TRAIN)")
    args = parse_args(parser, argv)
    setup_tool_logging()
    keep_freed_memory()  # reuse activation memory across iterations, as Caffe does
    from ..layers import TEST, TRAIN

    log = get_logger()
    net = build_net(args, TRAIN if args.phase == "TRAIN" else TEST)  # logs the device first
    if args.compile:
        log.info("--compile: timing whole passes of the compiled net (no per-layer times)")
        time_passes(net, args.iterations)
    else:
        time_net(net, args.iterations)
    return 0


if __name__ == "__main__":
    run_main(main)
