"""tools/plot_training_log: figures with one line per log, PNG output, Caffe's legacy chart types."""
import os

import numpy as np
import pytest

from pycaffe_alt.errors import CaffeError
from pycaffe_alt.tools import plot_training_log as ptl

HERE = os.path.dirname(os.path.abspath(__file__))
SOLVERS = os.path.join(HERE, "fixtures", "golden", "solvers")
LOGS = [os.path.join(SOLVERS, c, "train.log") for c in ("sgd_step", "adam_fixed")]


def test_one_line_per_log_per_panel_with_legend():
    fig = ptl.plot_logs(LOGS, x="iters", ys=["loss", "accuracy", "lr"], labels=["sgd", "adam"])
    axes = fig.get_axes()
    assert len(axes) == 3
    for ax in axes:
        assert len(ax.get_lines()) == 2
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sgd", "adam"]
    loss_sgd = axes[0].get_lines()[0]
    ref = np.load(os.path.join(SOLVERS, "sgd_step", "ref.npz"))
    np.testing.assert_allclose(loss_sgd.get_xdata(), ref["loss_iter"])
    np.testing.assert_allclose(loss_sgd.get_ydata(), ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(axes[1].get_lines()[0].get_xdata(), [0, 10, 20, 30])
    # one colour per log
    assert axes[0].get_lines()[0].get_color() != axes[0].get_lines()[1].get_color()


def test_default_labels_stay_distinct_for_same_named_logs():
    fig = ptl.plot_logs(LOGS, ys=["loss"])
    texts = [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]
    assert texts == ["sgd_step/train", "adam_fixed/train"]


def test_cli_writes_png(tmp_path):
    out = tmp_path / "fig.png"
    assert ptl.main(["--x", "seconds", "--y", "test_loss", "--out", str(out)] + LOGS) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("chart", range(8))
def test_legacy_chart_types(chart, tmp_path):
    fig = ptl.plot_legacy(chart, LOGS)
    (ax,) = fig.get_axes()
    assert len(ax.get_lines()) == 2
    table, col, x, title = ptl.LEGACY_CHARTS[chart]
    assert ax.get_title() == "" and fig._suptitle.get_text() == title
    n = len(ax.get_lines()[0].get_xdata())
    # test passes at 0/10/20/30; train rows 0..29 plus the final display line at 30 (no rate)
    assert n == (4 if table == "test" else 31)
    if col == "loss" and table == "train" and x == "iters":
        assert ax.get_lines()[0].get_xdata()[-1] == 30


def test_legacy_cli_form(tmp_path):
    out = tmp_path / "legacy.png"
    assert ptl.main(["6", str(out)] + LOGS) == 0
    assert out.stat().st_size > 5000
    with pytest.raises(CaffeError, match="not a valid chart type"):
        ptl.main(["9", str(out)] + LOGS)


def test_unknown_quantity_and_missing_log():
    with pytest.raises(CaffeError, match="none of the logs"):
        ptl.plot_logs(LOGS, ys=["nonexistent"])
    with pytest.raises(CaffeError, match="does not exist"):
        ptl.main(["--out", "x.png", "missing.log"])
