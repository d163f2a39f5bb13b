"""upgrade_net_proto_text IN OUT — rewrite a legacy net prototxt in the current format.

Same command line, messages and exit codes as Caffe's tool: 1 for a usage error or an upgrade
that hit incompatibilities (the output is still written, as in Caffe), 2 when IN cannot be read
as a NetParameter. A file already in the current format is copied through with a note.
The shared driver :func:`run_upgrade_tool` also serves the binary and solver tools.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator, List, Optional

from google.protobuf import message as pb_message

from .. import prototxt, upgrade
from ..errors import CaffeError
from ..log import GlogEnvFilter, GlogFormatter
from ..proto import caffe_pb2

logger = logging.getLogger("pycaffe_alt")

EXIT_USAGE = 1
EXIT_UPGRADE_PROBLEMS = 1
EXIT_UNREADABLE = 2

# glog prints the source file of each LOG call, which is each Caffe tool's own .cpp
# (upgrade_solver_proto_text.cpp:43] File already in latest proto format): the shared driver's
# lines are attributed to the tool's ``main``, which calls run_upgrade_tool, which calls _run.
_TOOL_FRAME = 3


def run_upgrade_tool(argv: Optional[List[str]], prog: str, in_help: str, description: str,
                     read: Callable[[str], pb_message.Message],
                     needs_upgrade: Callable[[pb_message.Message], bool],
                     apply_upgrade: Callable[[pb_message.Message, str], upgrade.UpgradeReport],
                     write: Callable[[pb_message.Message, str], None],
                     written_what: str) -> int:
    """The common flow of the three upgrade tools: read IN, upgrade if needed, write OUT."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) == 1 and args[0] in ("-h", "--help"):
        print(f"Usage: {prog} {in_help} OUT\n{description}")
        return 0
    with _log_to_stderr():
        return _run(args, prog, in_help, read, needs_upgrade, apply_upgrade, write, written_what)


def _run(args: List[str], prog: str, in_help: str,
         read: Callable[[str], pb_message.Message],
         needs_upgrade: Callable[[pb_message.Message], bool],
         apply_upgrade: Callable[[pb_message.Message, str], upgrade.UpgradeReport],
         write: Callable[[pb_message.Message, str], None], written_what: str) -> int:
    if len(args) != 2:
        print(f"Usage: {prog} {in_help} OUT", file=sys.stderr)
        return EXIT_USAGE
    in_path, out_path = args
    try:
        param = read(in_path)
    except CaffeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        success = True
        if needs_upgrade(param):
            report = apply_upgrade(param, in_path)
            success = report.success
            if not success:
                logger.error("Encountered error(s) while upgrading prototxt; see details above.",
                             stacklevel=_TOOL_FRAME)
        else:
            logger.error("File already in latest proto format: %s", in_path,
                         stacklevel=_TOOL_FRAME)
        write(param, out_path)
    except CaffeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_UPGRADE_PROBLEMS
    logger.info("Wrote upgraded %s to %s", written_what, out_path, stacklevel=_TOOL_FRAME)
    return 0 if success else EXIT_UPGRADE_PROBLEMS


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    # Caffe's upgrade tools log through glog: its line format (which log readers match) and its
    # GLOG_minloglevel. Their INFO lines go to glog's log file, which we do not write, so they
    # are shown on stderr with the rest. The handler lives only while the tool runs, so calling
    # main() in-process leaves the logger as it was.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler.addFilter(GlogEnvFilter())
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _read_net_text(path: str) -> caffe_pb2.NetParameter:
    # Caffe's tool reads text only (ReadProtoFromTextFile), without upgrading on read.
    return prototxt.parse_text(prototxt.read_text_file(path), caffe_pb2.NetParameter(), path)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``upgrade_net_proto_text v0_net_proto_file_in net_proto_file_out``."""
    return run_upgrade_tool(argv, "upgrade_net_proto_text", "NET_PROTO_TEXT_IN",
                            "Rewrite a legacy (V0/V1, input fields, old BatchNorm) net prototxt "
                            "in the current format.",
                            read=_read_net_text, needs_upgrade=upgrade.net_needs_upgrade,
                            apply_upgrade=upgrade.upgrade_net_as_needed,
                            write=prototxt.write_text, written_what="NetParameter text proto")


if __name__ == "__main__":
    sys.exit(main())
