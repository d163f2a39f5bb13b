"""upgrade_solver_proto_text IN OUT — rewrite an old solver prototxt (``solver_type: SGD``
enum) with the ``type`` string. Command line and exit codes as Caffe's tool (see
upgrade_net_proto_text). Like Caffe's tool it does not touch snapshot_prefix."""
from __future__ import annotations

import sys
from typing import List, Optional

from .. import prototxt, upgrade
from ..proto import caffe_pb2
from .upgrade_net_proto_text import run_upgrade_tool


def _read_solver_text(path: str) -> caffe_pb2.SolverParameter:
    return prototxt.parse_text(prototxt.read_text_file(path), caffe_pb2.SolverParameter(), path)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``upgrade_solver_proto_text old_solver_proto_file_in solver_proto_file_out``."""
    return run_upgrade_tool(argv, "upgrade_solver_proto_text", "SOLVER_PROTO_TEXT_IN",
                            "Rewrite an old solver prototxt (solver_type enum) with the type "
                            "string.",
                            read=_read_solver_text, needs_upgrade=upgrade.solver_needs_type_upgrade,
                            apply_upgrade=upgrade.upgrade_solver_as_needed,
                            write=prototxt.write_text, written_what="SolverParameter text proto")


if __name__ == "__main__":
    sys.exit(main())
