"""The SSD fork's detection test (``eval_type: "detection"``): mean average precision of a test
net whose outputs are DetectionEvaluate rows, as ``Solver::TestDetection`` computes it.

Each output blob holds rows of five numbers (its legacy ``height`` is the row count, its
``width`` must be 5): ``[item_id, label, score, tp, fp]`` for a detection, or ``[-1, label,
num_pos, ...]`` giving the number of ground-truth boxes of a label in a batch. Over the test
batches the fork collects, per output and per label, the (score, tp) and (score, fp) pairs and
sums the positives; then for each output it averages the per-label AP (``ComputeAP`` in the
fork's bbox_util.cpp, in one of three ``ap_version`` styles) over every label that has
positives. Arithmetic is float32 where the fork's is ``float``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import SolverError
from ..log import format_value, get_logger

logger = get_logger()

EVAL_TYPES = ("classification", "detection")
AP_VERSIONS = ("11point", "MaxIntegral", "Integral")
_EPS = np.float32(1e-6)  # ComputeAP's `const float eps`
_f32 = np.float32

Pairs = List[Tuple[float, int]]


def check_eval_param(eval_type: str, ap_version: str, where: str) -> None:
    """The fork aborts on an unknown ``eval_type`` (at the first test) and an unknown
    ``ap_version`` (at the first AP); refused when the solver is built instead."""
    if eval_type not in EVAL_TYPES:
        raise SolverError(f'unknown evaluation type "{eval_type}"', f"{where}: eval_type",
                          "use one of: " + ", ".join(EVAL_TYPES))
    if eval_type == "detection" and ap_version not in AP_VERSIONS:
        raise SolverError(f'unknown ap_version "{ap_version}"', f"{where}: ap_version",
                          "use one of: " + ", ".join(AP_VERSIONS))


def _cumsum(pairs: Pairs) -> List[int]:
    # CumSum: stable sort by score, descending (Python's reverse sort keeps ties in order).
    out, total = [], 0
    for _, flag in sorted(pairs, key=lambda p: p[0], reverse=True):
        total += flag
        out.append(total)
    return out


def compute_ap(tp: Pairs, num_pos: int, fp: Pairs, ap_version: str) -> float:
    """The fork's ComputeAP: the average precision of one label's detections."""
    if len(tp) != len(fp) or any(t[1] != 1 - f[1] for t, f in zip(tp, fp)):
        raise SolverError("detection rows whose tp and fp are not complementary (a detection "
                          "is either a true or a false positive)",
                          hint="the test net's outputs must be DetectionEvaluate rows "
                               "[item_id, label, score, tp, fp]")
    ap = _f32(0)
    if not tp or num_pos == 0:
        return float(ap)
    tp_cum, fp_cum = _cumsum(tp), _cumsum(fp)
    if tp_cum[-1] > num_pos:
        raise SolverError(f"{tp_cum[-1]} true positives for a label with {num_pos} ground-truth "
                          "boxes",
                          hint="the test net's num_pos rows (item_id -1) undercount the boxes")
    prec = [_f32(t) / _f32(t + f) for t, f in zip(tp_cum, fp_cum)]
    rec = [_f32(t) / _f32(num_pos) for t in tp_cum]
    num = len(tp)
    if ap_version == "11point":  # VOC2007
        max_precs = [_f32(0)] * 11
        start = num - 1
        for j in range(10, -1, -1):
            for i in range(start, -1, -1):
                if float(rec[i]) < j / 10.0:
                    start = i
                    if j > 0:
                        max_precs[j - 1] = max_precs[j]
                    break
                if max_precs[j] < prec[i]:
                    max_precs[j] = prec[i]
        for j in range(10, -1, -1):
            ap = _f32(ap + max_precs[j] / _f32(11))
    elif ap_version == "MaxIntegral":  # VOC2012, ILSVRC
        cur_rec, cur_prec = rec[-1], prec[-1]
        for i in range(num - 2, -1, -1):
            cur_prec = max(prec[i], cur_prec)
            gap = abs(_f32(cur_rec - rec[i]))
            if gap > _EPS:
                ap = _f32(ap + cur_prec * gap)
            cur_rec = rec[i]
        ap = _f32(ap + cur_rec * cur_prec)
    else:  # "Integral", the natural integral (check_eval_param refused other names)
        prev_rec = _f32(0)
        for i in range(num):
            gap = abs(_f32(rec[i] - prev_rec))
            if gap > _EPS:
                ap = _f32(ap + prec[i] * gap)
            prev_rec = rec[i]
    return float(ap)


class DetectionTally:
    """The detections and positives of the test batches so far, per output and label."""

    def __init__(self) -> None:
        self.true_pos: Dict[int, Dict[int, Pairs]] = {}
        self.false_pos: Dict[int, Dict[int, Pairs]] = {}
        self.num_pos: Dict[int, Dict[int, int]] = {}

    def add(self, outputs: Sequence[Tuple[str, np.ndarray]]) -> None:
        """One test batch: ``(name, values)`` of every output blob, in output order."""
        for j, (name, values) in enumerate(outputs):
            shape = list(values.shape) + [1] * (4 - values.ndim)
            if values.ndim > 4 or shape[3] != 5:
                raise SolverError(f"test net output {name} has shape {list(values.shape)}; "
                                  "eval_type detection needs rows of 5 values (width 5)",
                                  hint="the outputs must be DetectionEvaluate's, or set "
                                       'eval_type: "classification"')
            rows = values.astype(np.float32).reshape(-1)[:shape[2] * 5].reshape(-1, 5)
            for k, row in enumerate(rows):
                # The fork casts these to int; a NaN or infinity there is no count or label.
                cast = row[[0, 1, 2]] if row[0] == -1 else row[[0, 1, 3, 4]]
                if not np.isfinite(cast).all():
                    raise SolverError(f"test net output {name}, row {k}: {row.tolist()} has a "
                                      "non-finite item_id, label, num_pos, tp or fp",
                                      hint="the rows must be DetectionEvaluate's "
                                           "[item_id, label, score, tp, fp]")
                item, label = int(row[0]), int(row[1])  # static_cast<int>: toward zero
                if item == -1:
                    counts = self.num_pos.setdefault(j, {})
                    counts[label] = counts.get(label, 0) + int(row[2])
                    continue
                score, tp, fp = float(row[2]), int(row[3]), int(row[4])
                if tp == 0 and fp == 0:  # matched to a difficult box: not evaluated
                    continue
                self.true_pos.setdefault(j, {}).setdefault(label, []).append((score, tp))
                self.false_pos.setdefault(j, {}).setdefault(label, []).append((score, fp))

    def mean_aps(self, ap_version: str, per_class: bool) -> List[float]:
        """The mAP of outputs 0, 1, ... (as many as outputs that had a detection); logs
        ``class<label>: <AP>`` lines with ``per_class`` (show_per_class_result)."""
        maps = []
        for i in range(len(self.true_pos)):
            if i not in self.true_pos or i not in self.num_pos:
                raise SolverError(f"test net output #{i} has no "
                                  f"{'detections' if i not in self.true_pos else 'num_pos rows'}"
                                  " while a later output has (Caffe: Missing output_blob)",
                                  hint="every output must be a DetectionEvaluate blob")
            true_pos, false_pos = self.true_pos[i], self.false_pos[i]
            total = _f32(0)
            for label, count in sorted(self.num_pos[i].items()):
                if label not in true_pos:
                    logger.warning("Missing true_pos for label: %d", label)
                    continue
                ap = compute_ap(true_pos[label], count, false_pos[label], ap_version)
                total = _f32(total + _f32(ap))
                if per_class:
                    logger.info("class%d: %s", label, format_value(ap))
            with np.errstate(invalid="ignore", divide="ignore"):
                maps.append(float(total / _f32(len(self.num_pos[i]))))
        return maps
