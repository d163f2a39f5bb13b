"""Caffe's (glog's) log line format, so that existing log parsers read our logs.

``I1123 05:42:38.123456  4321 solver.py:240] Iteration 100, loss = 0.3``: severity letter,
month-day, time with microseconds, process id, source file:line, then the message. Everything in
pycaffe_alt logs through the ``pycaffe_alt`` logger; ``setup_logging`` installs the formatter.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Optional, TextIO

import numpy as np

LOGGER_NAME = "pycaffe_alt"


class GlogFormatter(logging.Formatter):
    """Formats records the way glog does (Caffe's log lines)."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        head = "%s%s %s.%06d %5d %s:%d] " % (
            record.levelname[0], time.strftime("%m%d", t), time.strftime("%H:%M:%S", t), micros,
            os.getpid(), os.path.basename(record.pathname), record.lineno)
        return head + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced,
    e.g. by a progress bar or a test harness, after logging was set up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    """The package logger."""
    return logging.getLogger(LOGGER_NAME)


# A library's logger gets a NullHandler (the logging HOWTO's advice): without one, Python's
# last-resort handler printed its warnings (e.g. the legacy-input upgrade note) to stderr in a
# program that never called caffe.init_log(), whatever GLOG_minloglevel said. Handlers the
# program or init_log() configure still receive every record.
get_logger().addHandler(logging.NullHandler())


def format_value(x: float) -> str:
    """A float32 value as Caffe's ``ostream << float`` prints it (6 significant digits)."""
    return "%g" % float(np.float32(x))


def loss_suffix(weight: float, value: float) -> str:
    """Caffe's `` (* w = w*v loss)`` suffix of an output line, empty for a non-loss output."""
    if not weight:
        return ""
    product = np.float32(weight) * np.float32(value)
    return f" (* {format_value(weight)} = {format_value(product)} loss)"


GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def glog_env_level() -> int:
    """The logging level glog's ``GLOG_minloglevel`` asks for (0 INFO, 1 WARNING, 2 ERROR,
    3 FATAL; unset or unreadable: INFO), the knob Caffe users set to quiet pycaffe."""
    # glog reads the variable with strtol: leading blanks and a sign, then the leading digits
    # ("1abc" is 1, "abc" is 0).
    match = _LEADING_INT.match(os.environ.get("GLOG_minloglevel", ""))
    value = int(match.group(0)) if match else 0
    return GLOG_LEVELS.get(min(max(value, 0), 3), logging.INFO)


_LEADING_INT = re.compile(r"\s*[+-]?\d+")


class GlogEnvFilter(logging.Filter):
    """Passes a record when ``GLOG_minloglevel`` allows its level, read at each record: pycaffe
    programs set the variable in ``os.environ`` just before ``import caffe`` (glog reads it when
    it loads), after a launcher has set logging up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= glog_env_level()


def setup_logging(stream: Optional[TextIO] = None, level: int = logging.INFO,
                  follow_glog_env: bool = False, propagate: bool = True) -> logging.Logger:
    """Send the package's log lines to ``stream`` (stderr by default, as glog does); with
    ``follow_glog_env`` each line also passes :class:`GlogEnvFilter`. ``propagate=False`` keeps
    the lines out of the root logger: glog writes them itself and never through the Python
    logging of the program that embeds Caffe."""
    logger = get_logger()
    for h in list(logger.handlers):
        if getattr(h, "_pycaffe_alt", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(GlogFormatter())
    if follow_glog_env:
        handler.addFilter(GlogEnvFilter())
    handler._pycaffe_alt = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    return logger


def setup_tool_logging() -> logging.Logger:
    """Logging of a command-line tool, as Caffe's binaries log: glog's lines on stderr (caffe.cpp
    sets ``FLAGS_alsologtostderr``), without those below ``GLOG_minloglevel``, which glog reads
    from the environment at start-up (``GLOG_minloglevel=1 caffe train ...`` prints warnings and
    errors only; scripts use it to quiet ``caffe test`` and ``caffe time``)."""
    return setup_logging(follow_glog_env=True)
