"""A request that a signal handler may make at any moment (SIGINT's stop, SIGHUP's snapshot).

The request is counted, never cleared: the handler only increments a count, and the reader takes
"has the count moved since I last looked". A flag that the reader cleared after reading lost a
request made between the read and the clear; with a data-parallel job's exchange in between
(a blocking all-gather) that happened under load, and the stop never came.
"""
from __future__ import annotations


class CountedRequest:
    """``make()`` from anywhere (a signal handler included); ``take()`` says whether any request
    was made since the last ``take()``."""

    def __init__(self) -> None:
        self._made = 0
        self._taken = 0

    def make(self) -> None:
        self._made += 1

    def take(self) -> bool:
        made = self._made
        new = made != self._taken
        self._taken = made
        return new
