"""Which layers a net keeps for a given NetState (Caffe's FilterNet / StateMeetsRule), and which
blobs, bottoms and parameters take part in backward (the need-backward analysis of Net::Init).
Pure functions over protobuf messages and plain lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .errors import NetError


def state_meets_rule(state, rule) -> bool:
    """Caffe's StateMeetsRule: phase equal, level within [min, max], every rule stage present."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(layer, state, where: str = "<net>") -> bool:
    """Caffe's FilterNet rule for one layer: include rules OR-ed, exclude rules veto."""
    if len(layer.include) and len(layer.exclude):
        raise NetError("specify either include or exclude rules, not both",
                       f"{where}: layer '{layer.name}'")
    if len(layer.include):
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


@dataclass
class LayerLinks:
    """What the backward analysis needs to know of one layer."""

    bottoms: Sequence[str]
    tops: Sequence[str]
    loss_weights: Sequence[float]
    lr_mults: Sequence[float]  # one per parameter blob
    propagate_down: Sequence[bool]  # empty = not given
    allow_force_backward: Sequence[bool]  # one per bottom
    # Tops with a non-zero loss_weight written in the prototxt: Caffe's InsertSplits counts
    # such a use as a reader (a default weight of a loss layer is not counted).
    explicit_loss: Sequence[bool] = ()


@dataclass
class BackwardPlan:
    """Result of Caffe's need-backward analysis."""

    layer_needs: List[bool] = field(default_factory=list)
    bottom_needs: List[List[bool]] = field(default_factory=list)
    param_needs: List[List[bool]] = field(default_factory=list)
    blob_needs: Dict[str, bool] = field(default_factory=dict)


def plan_backward(layers: Sequence[LayerLinks], force_backward: bool) -> BackwardPlan:
    """Which layers run backward and into which bottoms and parameters, exactly as Net::Init.

    A layer needs backward when a bottom blob needs it or a parameter has lr_mult != 0; it is
    then dropped again unless it contributes to a loss (a top with loss weight, or a top read by
    a layer under a loss). ``propagate_down`` overrides a bottom's flag; ``force_backward`` turns
    on every layer, every parameter and every bottom the layer allows.
    """
    plan = BackwardPlan()
    blob_needs: Dict[str, bool] = {}
    for links in layers:
        need = False
        bottom_needs = []
        for i, b in enumerate(links.bottoms):
            flag = blob_needs.get(b, False)
            need |= flag
            if len(links.propagate_down):
                flag = bool(links.propagate_down[i])
            bottom_needs.append(flag)
        for t in links.tops:
            blob_needs.setdefault(t, False)
        params = [m != 0 for m in links.lr_mults]
        need |= any(params)
        if need:
            for t in links.tops:
                blob_needs[t] = True
        plan.layer_needs.append(need)
        plan.bottom_needs.append(bottom_needs)
        plan.param_needs.append(params)

    # Caffe runs this after inserting Split layers, so there every blob has one reader and a
    # top "skips backprop" when that reader takes no diff. Without splits, a blob skips backprop
    # only when it is read and *no* reader of it takes a diff (an Accuracy or Softmax output
    # reading the loss's bottom must not cut the layers below off). Readers are collected per
    # version of a blob: walking backward, a layer's tops are judged on the readers seen so far
    # and then forgotten, and an in-place layer's bottom is a reader of the previous version.
    under_loss: set = set()
    read: set = set()
    read_with_diff: set = set()
    for li in range(len(layers) - 1, -1, -1):
        links = layers[li]
        contributes = False
        skip = True
        explicit = list(links.explicit_loss) + [False] * (len(links.tops) - len(links.explicit_loss))
        for t, w, as_loss in zip(links.tops, links.loss_weights, explicit):
            if w or t in under_loss:
                contributes = True
            # A top an explicit loss weight uses is, after Caffe's splits, read by the split
            # whose first top carries the weight: that reader takes the diff.
            if t not in read or t in read_with_diff or as_loss:
                skip = False
        read.difference_update(links.tops)
        read_with_diff.difference_update(links.tops)
        if plan.layer_needs[li] and skip:
            plan.layer_needs[li] = False
            plan.bottom_needs[li] = [False] * len(links.bottoms)
        if not contributes:
            plan.layer_needs[li] = False
        for bi, b in enumerate(links.bottoms):
            if contributes:
                under_loss.add(b)
            else:
                plan.bottom_needs[li][bi] = False
            read.add(b)
            if plan.bottom_needs[li][bi]:
                read_with_diff.add(b)

    if force_backward:
        for li, links in enumerate(layers):
            plan.layer_needs[li] = True
            for bi, b in enumerate(links.bottoms):
                flag = plan.bottom_needs[li][bi] or bool(links.allow_force_backward[bi])
                plan.bottom_needs[li][bi] = flag
                blob_needs[b] = blob_needs.get(b, False) or flag
            plan.param_needs[li] = [True] * len(links.lr_mults)
    plan.blob_needs = blob_needs
    return plan
