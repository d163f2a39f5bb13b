"""draw_net: draw a net prototxt as an image, as BVLC's ``python/draw_net.py``.

    draw_net [--rankdir LR] [--phase TRAIN|TEST|ALL] [--display_lrm] NET.prototxt OUT.png

The format follows OUT's extension (png, svg, pdf... through Graphviz; ``.dot``/``.gv``/``.raw``
give the DOT text and need nothing else). Legacy (V0/V1) prototxts are upgraded on reading.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .. import draw, prototxt
from ..phase import TEST, TRAIN
from .cli import parse_args

PHASES = {"TRAIN": TRAIN, "TEST": TEST, "ALL": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draw_net", description="Draw a network graph.")
    parser.add_argument("input_net_proto_file", help="input network prototxt file")
    parser.add_argument("output_image_file", help="output image file (its extension is the format)")
    parser.add_argument("--rankdir", default="LR",
                        help="graph direction: TB (top-bottom), LR (left-right), BT, RL")
    parser.add_argument("--phase", default="ALL", type=str.upper, choices=sorted(PHASES),
                        help="the phase whose layers to draw (ALL: every layer)")
    parser.add_argument("--display_lrm", action="store_true",
                        help="show the learning-rate multipliers of learning layers")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(build_parser(), argv)
    net = prototxt.read_net(args.input_net_proto_file)
    print(f"Drawing net to {args.output_image_file}")
    draw.draw_net_to_file(net, args.output_image_file, args.rankdir, PHASES[args.phase],
                          args.display_lrm)
    return 0
