"""``tools/convert_model``: a Caffe net and its weights to ONNX, TorchScript, torch.export,
standalone PyTorch code, or another Caffe weight format (docs/convert.md).

    convert_model --model deploy.prototxt --weights W.caffemodel --to onnx --out net.onnx
                  [--outputs prob,fc8] [--inputs data] [--shape data=1,3,224,224]
                  [--include-loss] [--no-verify]
    convert_model --model deploy.prototxt --state-dict sd.pt --to caffemodel --out W.caffemodel

``--state-dict`` takes a PyTorch state_dict saved with ``torch.save`` in ``net.state_dict()``
naming (``conv1.weight``...): with ``--to caffemodel`` that is the way back from PyTorch.
After writing, the file is loaded through its own runtime and compared with the Net (unless
``--no-verify``); the largest relative difference is printed.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import CaffeError
from ..export import FORMATS, convert
from ..log import get_logger, setup_tool_logging
from .cli import int32, parse_args


def parse_shapes(items: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``["data=1,3,224,224", ...]`` -> ``{"data": (1, 3, 224, 224)}``."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            # Every entry is a size: "1,,28,28" is a typo, not the 3-axis shape (1, 28, 28).
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise CaffeError(f"--shape {item!r}: expected BLOB=D0,D1,... with positive sizes",
                             hint="e.g. --shape data=1,3,224,224")
        if name in shapes:
            # The later flag silently replaced the earlier one.
            raise CaffeError(f"--shape gives blob {name!r} twice ({shapes[name]} and {shape})",
                             hint="give one --shape per input blob")
        shapes[name] = shape
    return shapes


def _names(flag: Optional[str]) -> Optional[List[str]]:
    return [n.strip() for n in flag.split(",") if n.strip()] if flag else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_model",
        description="Convert a Caffe net and its weights to another format.",
        epilog="formats: " + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--model", required=True, help="the net definition (.prototxt)")
    p.add_argument("--weights", default="", help="trained weights (.caffemodel or .h5)")
    p.add_argument("--state-dict", "--state_dict", dest="state_dict", default="",
                   help="weights from a torch.save'd state_dict in net.state_dict() naming")
    p.add_argument("--to", required=True, choices=list(FORMATS), help="the output format")
    p.add_argument("--out", required=True, help="the output file (pytorch: the .py; its weights "
                   "go to the same name with .pt)")
    p.add_argument("--outputs", default="", help="comma-separated output blobs (default: the "
                   "net's outputs without loss layers)")
    p.add_argument("--inputs", default="", help="comma-separated input blobs (default: the tops "
                   "of Input and data layers)")
    p.add_argument("--shape", action="append", default=[], metavar="BLOB=D0,D1,...",
                   help="input shape (repeatable); turns a data layer into an input of that shape")
    p.add_argument("--include-loss", "--include_loss", dest="include_loss", action="store_true",
                   help="keep loss layers (their labels become inputs)")
    p.add_argument("--no-verify", "--no_verify", dest="no_verify", action="store_true",
                   help="do not run the written file against the net")
    p.add_argument("--allow-unmatched-weights", "--allow_unmatched_weights",
                   dest="allow_unmatched_weights", action="store_true",
                   help="convert even when --weights shares no layer name with the net (its "
                   "random initial weights are written)")
    p.add_argument("--allow-python", "--allow_python", dest="allow_python", action="store_true",
                   help="build the net's Python layers (runs their modules' code)")
    p.add_argument("--stage", default="", help="comma-separated NetState stages (as tools/test)")
    p.add_argument("--level", type=int32, default=0, help="NetState level")
    args = parse_args(p, argv)
    setup_tool_logging()
    if not args.weights and not args.state_dict:
        # tools/test refuses to score a net without weights; converting one can be meant (an
        # architecture to train elsewhere), but the random weights must not pass unnoticed.
        get_logger().warning("%s: no --weights or --state-dict given: the converted model holds "
                             "the random initial weights the net's fillers draw", args.model)
    result = convert(args.model, args.weights or None, args.to, args.out,
                     outputs=_names(args.outputs), inputs=_names(args.inputs),
                     shapes=parse_shapes(args.shape) or None, include_loss=args.include_loss,
                     state_dict=args.state_dict or None, verify=not args.no_verify,
                     allow_unmatched_weights=args.allow_unmatched_weights,
                     allow_python=args.allow_python, stages=args.stage, level=args.level)
    print(result.summary())
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)
