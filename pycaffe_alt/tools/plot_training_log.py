"""``tools/plot_training_log``: plot training logs into a PNG, several logs in one figure.

    plot_training_log --x iters|seconds --y loss|accuracy|lr|test_loss|<output> --out fig.png LOG...

One line per log, one colour per log, a legend naming each log (its file name without ``.log``,
or ``--labels``), so that runs can be compared in one picture (e.g. SGD against alternation).
``--y`` takes a comma-separated list for one panel per quantity. What the names mean:

- ``loss``: the training loss Caffe displays (``Iteration N, loss = X``: smoothed over
  ``average_loss`` iterations, and also logged once more after the last step), else the train
  output named ``loss``; ``train_loss`` is always that output; ``lr``: the learning rate;
  ``accuracy``: the test ``accuracy``;
- ``test_<name>`` / ``train_<name>``: that output of the test / train table;
- any other ``<name>``: the train output of that name, else the test output.

Caffe's legacy interface of ``tools/extra/plot_training_log.py.example`` also works::

    plot_training_log CHART_TYPE out.png log1.log [log2.log ...]

with its chart types 0..7: test accuracy, test loss, train learning rate, train loss (in that
order), each against iterations (even numbers) and seconds (odd numbers).

The tables come from :mod:`.parse_log`; figures are drawn without pyplot (Agg, no display needed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence, Tuple

from ..errors import CaffeError
from ..fileio import atomic_write, check_input_path
from .cli import parse_args, run_main
from .parse_log import Row, parse_log

# Caffe's legacy chart types, in its own numbering: (table, column, x axis, title).
LEGACY_CHARTS: Tuple[Tuple[str, str, str, str], ...] = (
    ("test", "accuracy", "iters", "Test accuracy  vs. Iters"),
    ("test", "accuracy", "seconds", "Test accuracy  vs. Seconds"),
    ("test", "loss", "iters", "Test loss  vs. Iters"),
    ("test", "loss", "seconds", "Test loss  vs. Seconds"),
    ("train", "LearningRate", "iters", "Train learning rate  vs. Iters"),
    ("train", "LearningRate", "seconds", "Train learning rate  vs. Seconds"),
    ("train", "loss", "iters", "Train loss  vs. Iters"),
    ("train", "loss", "seconds", "Train loss  vs. Seconds"),
)

_X_COLUMNS = {"iters": "NumIters", "seconds": "Seconds"}


def log_label(path: str) -> str:
    """A log's legend entry: its file name without a ``.log`` suffix (as Caffe's script does)."""
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".log") else name


def log_labels(paths: Sequence[str]) -> List[str]:
    """Legend entries for several logs: file names, prefixed by their folder when names repeat
    (``sgd/train.log`` and ``alt/train.log`` become ``sgd/train`` and ``alt/train``)."""
    labels = [log_label(p) for p in paths]
    if len(set(labels)) == len(labels):
        return labels
    return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), log_label(p))
            for p in paths]


def resolve_series(y: str, train: Sequence[Row], test: Sequence[Row]) -> Tuple[str, str]:
    """``(table, column)`` a ``--y`` name refers to, for one parsed log (see the module docstring)."""
    def has(rows: Sequence[Row], col: str) -> bool:
        return any(col in r for r in rows)

    if y in ("lr", "LearningRate"):
        return "train", "LearningRate"
    if y == "loss":
        return ("train", "SmoothedLoss") if has(train, "SmoothedLoss") else ("train", "loss")
    if y == "accuracy":
        return ("test", "accuracy") if has(test, "accuracy") else ("train", "accuracy")
    for prefix in ("test", "train"):
        if y.startswith(prefix + "_") and len(y) > len(prefix) + 1:
            return prefix, y[len(prefix) + 1:]
    return ("train", y) if has(train, y) else ("test", y)


def series(rows: Sequence[Row], x_col: str, y_col: str) -> Tuple[List[float], List[float]]:
    """The (x, y) points of the rows that have both values (NaN x, e.g. no timestamps, dropped)."""
    xs, ys = [], []
    for r in rows:
        if x_col in r and y_col in r and not math.isnan(float(r[x_col])):
            xs.append(float(r[x_col]))
            ys.append(float(r[y_col]))
    return xs, ys


def plot_logs(logs: Sequence[str], x: str = "iters", ys: Sequence[str] = ("loss",),
              labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
              log_y: bool = False):
    """A matplotlib Figure: one panel per ``ys`` entry, one line (and colour) per log."""
    # A bare Figure renders with Agg on savefig; no pyplot, so no global backend or GUI state.
    import matplotlib
    from matplotlib.figure import Figure

    if x not in _X_COLUMNS:
        raise CaffeError(f"--x {x!r}: expected one of {', '.join(_X_COLUMNS)}")
    if labels is not None and len(labels) != len(logs):
        raise CaffeError(f"{len(labels)} labels for {len(logs)} logs", hint="give one label per log")
    if not ys:  # `--y ""` or `--y ,`: a figure of zero panels is matplotlib's ValueError
        raise CaffeError("--y names no quantity to plot",
                         hint="e.g. --y loss,accuracy (comma-separated; see tools/parse_log for the columns)")
    parsed = [parse_log(p) for p in logs]
    labels = list(labels) if labels is not None else log_labels(logs)
    fig = Figure(figsize=(7.5, 3.6 * len(ys)), layout="constrained")
    axes = fig.subplots(len(ys), 1, squeeze=False)[:, 0]
    colours = matplotlib.colormaps["tab10"].colors
    for ax, y in zip(axes, ys):
        plotted = 0
        for i, (train, test) in enumerate(parsed):
            table, col = resolve_series(y, train, test)
            xs, vs = series(train if table == "train" else test, _X_COLUMNS[x], col)
            if not xs:
                continue
            ax.plot(xs, vs, label=labels[i],
                    color=colours[i % len(colours)], linewidth=1.0,
                    # a rate holds for a whole iteration: draw it as steps
                    drawstyle="steps-post" if col == "LearningRate" else "default",
                    marker="o" if len(xs) <= 30 else None, markersize=3)
            plotted += 1
        if not plotted:
            raise CaffeError(f"--y {y!r}: none of the logs has that quantity",
                             hint="names come from the 'Train/Test net output #k: NAME = ...' lines; "
                                  "run tools/parse_log to see the columns")
        ax.set_xlabel("Iterations" if x == "iters" else "Seconds")
        ax.set_ylabel(y)
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def plot_legacy(chart_type: int, logs: Sequence[str]):
    """The Figure of one of Caffe's legacy chart types (0..7) for the logs."""
    if not 0 <= chart_type < len(LEGACY_CHARTS):
        raise CaffeError(f"{chart_type} is not a valid chart type",
                         hint="chart types: " + "; ".join(f"{i}: {c[3]}" for i, c in
                                                          enumerate(LEGACY_CHARTS)))
    table, col, x, title = LEGACY_CHARTS[chart_type]
    # Caffe's parse_log.sh took the train loss from the "Iteration N, loss = X" lines: "loss" here.
    y = {"LearningRate": "lr"}.get(col, "loss" if table == "train" else f"{table}_{col}")
    return plot_logs(logs, x=x, ys=[y], title=title)


def save_figure(fig, path: str) -> None:
    """Write the figure as a PNG, with a readable error when the folder is not writable."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    # Atomic, after the output-path check: a FIFO, folder or missing folder is one message.
    atomic_write(path, buffer.getvalue(), CaffeError)


def _check_logs(logs: Sequence[str]) -> None:
    for p in logs:
        check_input_path(p, CaffeError, "log file")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].lstrip("-").isdigit():  # Caffe's legacy: CHART_TYPE OUT.png LOG...
        if len(argv) < 3:
            raise CaffeError("legacy usage: plot_training_log CHART_TYPE OUT.png LOG [LOG ...]")
        _check_logs(argv[2:])
        if not argv[1].endswith(".png"):
            raise CaffeError(f"{argv[1]!r}: the output must end in .png")
        save_figure(plot_legacy(int(argv[0]), argv[2:]), argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="plot_training_log", description=__doc__.splitlines()[0],
                                     epilog="Legacy Caffe form: plot_training_log CHART_TYPE(0-7) "
                                            "OUT.png LOG [LOG ...]")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training logs (glog format)")
    parser.add_argument("--x", choices=sorted(_X_COLUMNS), default="iters", help="x axis")
    parser.add_argument("--y", default="loss",
                        help="comma-separated quantities: loss, accuracy, lr, test_loss, or any "
                             "output name (train_<name>/test_<name> to choose the table)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--labels", default=None, help="comma-separated legend entries, one per log")
    parser.add_argument("--title", default=None)
    parser.add_argument("--logy", action="store_true", help="logarithmic y axis")
    args = parse_args(parser, argv)
    _check_logs(args.logs)
    suffix = os.path.splitext(args.out)[1]
    if suffix and suffix.lower() != ".png":
        # The figure is always a PNG: under another extension (out.pdf, out.svg) the file would
        # not be what its name says.
        raise CaffeError(f"--out {args.out!r}: the output is a PNG image, so its name must end "
                         "in .png", hint=f"e.g. --out {os.path.splitext(args.out)[0]}.png")
    ys = [y for y in args.y.split(",") if y]
    labels = args.labels.split(",") if args.labels else None
    save_figure(plot_logs(args.logs, args.x, ys, labels, args.title, args.logy), args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
