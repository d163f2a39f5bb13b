"""What a data-parallel job does when one of its ranks fails.

Every rank writes short records into the job's rendezvous store (:func:`.group.join` returns it):
``failed/<r>`` (rank r's error, one line), ``lost/<r>`` (rank r is alive but lost contact),
``done/<r>`` (rank r finished) and ``beat/<r>`` (a heartbeat counter). With these:

- a rank that raises (a bad record, NaN, a bug) writes ``failed/<r>``, prints its paragraph and
  exits non-zero; the others, whose next collective fails (gloo: the peer's socket closes), find
  the record and stop quietly with a non-zero status: one paragraph for the job;
- a rank that dies without a word (SIGKILL, a lost machine) writes nothing: the surviving ranks
  mark themselves ``lost``, wait a moment, and the lowest of them names the ranks that are neither
  failed, lost nor done;
- a rank blocked in a collective that never completes (NCCL does not notice a dead peer) is freed
  by the :class:`Watchdog` thread: it ends the process once another rank's failure record is
  there, or a rank's heartbeat has stopped for ``dead_after`` seconds.

Snapshots are written atomically (temp file + rename) by rank 0 alone, so whichever way a job
ends, the snapshot files on disk are complete ones.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import List, Optional

import torch.distributed as dist

from ..errors import DistributedError, first_line

GRACE_SECONDS = 3.0


def _cause(error: BaseException) -> str:
    """The first sentence of a communication error, without gloo's source location."""
    text = first_line(error)
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def is_communication_error(e: BaseException) -> bool:
    """Whether ``e`` is a collective or store failure (a peer gone), not a user error."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("Connection closed", "Connection reset", "gloo", "NCCL", "Broken pipe",
                            "Socket", "connect", "Timed out", "timed out"))


class FailureBoard:
    """The failure records of one job in its store (see the module docstring)."""

    def __init__(self, store, rank: int, world: int, endpoint: str = ""):
        self.store = store
        self.rank = rank
        self.world = world
        self.endpoint = endpoint

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _try_set(self, key: str, value: str) -> bool:
        try:
            self.store.set(key, value)
            return True
        except Exception:  # the store's host (rank 0 or the launcher) may be gone
            return False

    def report(self, message: str) -> None:
        """Record this rank's failure (first line of ``message``) for the other ranks."""
        self._try_set(f"failed/{self.rank}", message.strip().splitlines()[0][:500]
                      if message.strip() else "failed")

    def same_failure_on_root(self, message: str, wait: float = GRACE_SECONDS) -> bool:
        """On a rank other than 0: whether rank 0 reports the same failure within ``wait`` s
        (a bad solver or net file fails every rank alike; one report is enough)."""
        if self.rank == 0:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if self._has("failed/0"):
                    return self.store.get("failed/0").decode(errors="replace") == \
                        message.strip().splitlines()[0][:500]
            except Exception:
                return False
            time.sleep(0.05)
        return False

    def finished(self) -> None:
        self._try_set(f"done/{self.rank}", "1")

    def failure_of_others(self) -> Optional[str]:
        """``'rank r: message'`` of the first other rank that recorded a failure, or None."""
        for r in range(self.world):
            if r != self.rank and self._has(f"failed/{r}"):
                return f"rank {r}: {self.store.get(f'failed/{r}').decode(errors='replace')}"
        return None

    def diagnose(self, error: BaseException, iteration: int) -> DistributedError:
        """The error this rank raises after a collective failed (see the module docstring).

        Its ``rank`` is the rank that prints it: the others exit non-zero without repeating it."""
        cause = _cause(error)
        if not self._try_set(f"lost/{self.rank}", "1"):
            return DistributedError(
                f"rank {self.rank} lost contact with the job's store at {self.endpoint} during "
                f"iteration {iteration}: rank 0 (or the launcher hosting it) stopped ({cause})",
                hint="see rank 0's output for its error; resume from the last snapshot with "
                     "--snapshot", rank=self.rank)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                failed = self.failure_of_others()
            except Exception:
                failed = None
            if failed is not None:
                reporter = int(failed.split(":")[0].split()[1])
                return DistributedError(f"the job stopped because {failed}", rank=reporter)
            time.sleep(0.1)
        try:
            state = {r: [k for k in ("failed", "lost", "done") if self._has(f"{k}/{r}")]
                     for r in range(self.world)}
        except Exception:
            state = {}
        silent = [r for r, keys in state.items() if not keys]
        alive = [r for r, keys in state.items() if "lost" in keys] or [self.rank]
        names = ", ".join(map(str, silent)) or "another rank"
        return DistributedError(
            f"rank {names} stopped without a report during iteration {iteration} (killed by a "
            f"signal, out of memory, or its machine failed); the whole job ends ({cause})",
            hint="check that rank's machine and log; resume from the last snapshot with "
                 "--snapshot", rank=min(alive))


class Watchdog(threading.Thread):
    """Beats every ``interval`` s; ends this process (status 1) when another rank recorded a
    failure ``GRACE_SECONDS`` ago and this rank is still running (e.g. stuck in an NCCL
    collective), or when another rank's beat stopped for ``dead_after`` s."""

    def __init__(self, board: FailureBoard, interval: float = 1.0, dead_after: float = 120.0):
        super().__init__(name="pycaffe_alt-watchdog", daemon=True)
        self.board = board
        self.interval = interval
        self.dead_after = dead_after
        self._stop_event = threading.Event()
        self._seen: List[Optional[bytes]] = [None] * board.world
        self._changed: List[float] = [time.monotonic()] * board.world

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        board, beat, failure_since = self.board, 0, None
        while not self._stop_event.wait(self.interval):
            beat += 1
            try:
                board.store.set(f"beat/{board.rank}", str(beat))
                failure = board.failure_of_others()
                stale = self._stale_ranks()
            except Exception:
                continue  # the main thread reports a lost store when it next communicates
            now = time.monotonic()
            if failure is not None:
                failure_since = failure_since or now
                if now - failure_since > GRACE_SECONDS and not self._stop_event.is_set():
                    os._exit(1)  # that rank printed the paragraph
            if stale and not self._stop_event.is_set():
                print(f"rank {board.rank}: rank {', '.join(map(str, stale))} stopped answering "
                      f"for {self.dead_after:g} s (killed, or its machine failed); ending the job",
                      file=sys.stderr, flush=True)
                os._exit(1)

    def _stale_ranks(self) -> List[int]:
        board, now, stale = self.board, time.monotonic(), []
        for r in range(board.world):
            if r == board.rank or board._has(f"done/{r}"):
                continue
            value = board.store.get(f"beat/{r}") if board._has(f"beat/{r}") else None
            if value != self._seen[r]:
                self._seen[r], self._changed[r] = value, now
            elif now - self._changed[r] > self.dead_after:
                stale.append(r)
        return stale
