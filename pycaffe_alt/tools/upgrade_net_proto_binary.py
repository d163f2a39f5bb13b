"""upgrade_net_proto_binary IN OUT — rewrite a legacy binary net (.caffemodel) in the current
format, keeping its weights. Command line and exit codes as Caffe's tool (see
upgrade_net_proto_text)."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .. import prototxt, upgrade
from ..errors import PrototxtError
from ..proto import caffe_pb2
from .upgrade_net_proto_text import run_upgrade_tool


def _read_net_binary(path: str) -> caffe_pb2.NetParameter:
    # Caffe's tool reads binary only (ReadProtoFromBinaryFile), without upgrading on read.
    net = prototxt.read_binary(path, caffe_pb2.NetParameter())
    # An empty file parses as an empty NetParameter, which Caffe would "upgrade" into another
    # empty file; a net without layer (or legacy layers) entries is a truncated download or not
    # a net at all.
    if not net.layer and not net.layers:
        what = "the file is empty" if os.path.getsize(path) == 0 else "it holds no layers"
        raise PrototxtError(f"not a binary net: {what} (no 'layer' or legacy 'layers' field)",
                            where=path, hint="give a .caffemodel or other binary NetParameter")
    return net


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``upgrade_net_proto_binary v0_net_proto_file_in net_proto_file_out``."""
    return run_upgrade_tool(argv, "upgrade_net_proto_binary", "NET_PROTO_BINARY_IN",
                            "Rewrite a legacy binary net (.caffemodel) in the current format, "
                            "keeping its weights.",
                            read=_read_net_binary, needs_upgrade=upgrade.net_needs_upgrade,
                            apply_upgrade=upgrade.upgrade_net_as_needed,
                            write=prototxt.write_binary, written_what="NetParameter binary proto")


if __name__ == "__main__":
    sys.exit(main())
