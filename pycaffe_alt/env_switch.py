"""On/off switches read from the environment: the launcher's options (``pycaffe-alt run --cpu``,
``--nchw``) travel this way to the program and its child processes.

A value that is neither on (1, true, yes, on) nor off (empty, 0, false, no, off) is taken as off
with one warning naming the variable, instead of meaning off without a word (``=2``, ``=enable``).
Imports no torch, so the launcher can read and set switches before the program starts.
"""
import logging
import os
from typing import Set

ON = ("1", "true", "yes", "on")
OFF = ("", "0", "false", "no", "off")

_warned: Set[str] = set()  # variables already warned about (once per process, not per read)


def switch_is_on(name: str) -> bool:
    """Whether environment variable ``name`` says on (case and surrounding spaces ignored)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ON:
        return True
    if value not in OFF and name not in _warned:
        _warned.add(name)
        logging.getLogger("pycaffe_alt").warning(
            "%s=%r is not an on/off value (on: %s; off: %s): taken as off", name,
            os.environ.get(name, ""), ", ".join(ON), ", ".join(v for v in OFF if v))
    return False
