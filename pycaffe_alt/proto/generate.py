"""Regenerate ``caffe_pb2.py`` from ``caffe.proto`` with grpc_tools.protoc.

Usage::

    python3 -m pycaffe_alt.proto.generate            # writes next to caffe.proto
    python3 -m pycaffe_alt.proto.generate OUT_DIR    # writes into OUT_DIR

Requires the ``grpcio-tools`` package (``pip install grpcio-tools``). The
generated module embeds a protobuf runtime version check; keep the protobuf
pin in setup.py at least that version.
"""

from __future__ import annotations

import os
import sys

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
PROTO_NAME = "caffe.proto"


def generate(out_dir: str | None = None) -> str:
    """Run protoc on caffe.proto; return the path of the written caffe_pb2.py."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise RuntimeError(
            "grpc_tools is not installed; run `pip install grpcio-tools`"
        ) from exc

    out_dir = os.path.abspath(out_dir or PROTO_DIR)
    os.makedirs(out_dir, exist_ok=True)
    # The include dir for google/protobuf well-known types ships with grpc_tools;
    # caffe.proto imports none, but passing it keeps protoc happy either way.
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        "-I" + PROTO_DIR,
        "-I" + well_known,
        "--python_out=" + out_dir,
        PROTO_NAME,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError("protoc failed with exit code %d" % rc)
    return os.path.join(out_dir, "caffe_pb2.py")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = generate(argv[0] if argv else None)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
