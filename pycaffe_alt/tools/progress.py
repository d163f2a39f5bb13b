"""A training progress bar (iterations/s, ETA) for terminals; nothing at all for log files.

``training_progress(solver)`` is a context manager: when the stream (stderr by default) is a
terminal it attaches a solver hook that advances a tqdm bar kept at the bottom of the screen,
and routes the package's log lines through tqdm so that they scroll above the bar; when the
stream is a file or a pipe it does nothing, and the log holds only Caffe's plain lines.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional, TextIO

from ..log import get_logger


class ProgressHook:
    """Solver hook advancing a tqdm bar by one per iteration, showing the latest loss.

    The bar counts iterations up to the solver's ``max_iter``, starting at the iteration training
    starts from (a resumed run starts part-way), so tqdm's rate and ETA are about this run.
    """

    def __init__(self, bar) -> None:
        self.bar = bar

    def after_step(self, solver, loss: float) -> None:
        # Catch up to the solver's iteration (one step() call may run several iterations).
        done = min(int(solver.iter), int(self.bar.total)) - int(self.bar.n)
        if done > 0:
            self.bar.update(done)
        self.bar.set_postfix_str(f"loss={float(loss):.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def is_terminal(stream: Optional[TextIO]) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def training_progress(solver, stream: Optional[TextIO] = None) -> Iterator[Optional[ProgressHook]]:
    """Show a progress bar for ``solver`` while the block runs, if ``stream`` is a terminal.

    Yields the hook (or None when no bar is shown, e.g. stderr redirected to a file, or tqdm not
    installed).
    """
    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        yield None
        return
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # tqdm is optional: plain lines only
        yield None
        return
    total = int(solver.param.max_iter)
    bar = tqdm(total=total, initial=min(int(solver.iter), total), file=stream, unit="it",
               dynamic_ncols=True, leave=True, desc="train")
    hook = ProgressHook(bar)
    solver.add_hook(hook)
    try:
        # Log lines go through tqdm.write, so they print above the bar instead of through it.
        with logging_redirect_tqdm(loggers=[get_logger()], tqdm_class=tqdm):
            yield hook
    finally:
        hook.close()
