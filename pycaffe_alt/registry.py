"""One small registry: a type name (as written in a prototxt) -> the class that implements it."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, List, Optional, TypeVar

from .errors import UnknownTypeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes; unknown names raise an error listing the known ones."""

    def __init__(self, kind: str, advice: str = ""):
        self.kind = kind
        self.advice = advice  # what to do about an unknown name, said before the known ones
        self._entries: Dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Class decorator: ``@LAYERS.register("ReLU")``."""

        def add(cls: T) -> T:
            for key in (name,) + aliases:
                if key in self._entries and self._entries[key] is not cls:
                    raise ValueError(f"{self.kind} {key!r} registered twice")
                self._entries[key] = cls
            return cls

        return add

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, where: Optional[str] = None) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
            hint += f"{self.advice} " if self.advice else ""
            hint += f"known {self.kind}s: {', '.join(self.names())}"
            raise UnknownTypeError(f"unknown {self.kind} {name!r}", where, hint) from None

    def names(self) -> List[str]:
        return sorted(self._entries)


# A type missing here is usually a fork's own layer whose parameter block caffe.proto does hold
# (SSD's AnnotatedData, MultiBoxLoss, DetectionEvaluate), so the prototxt parses and only the
# build can say what to do instead.
LAYERS: "Registry[type]" = Registry(
    "layer type",
    advice="If it is not a typo, it is a layer of a Caffe fork that pycaffe_alt does not "
           "implement (such as the SSD fork's training layers AnnotatedData, MultiBoxLoss and "
           "DetectionEvaluate): replace a data layer by an Input layer with the same tops and "
           "feed them (net.blobs[name].data, or net(name=tensor)); remove a loss or evaluation "
           "layer to run the net for inference (as its deploy prototxt does); or let a Python "
           "layer (type: \"Python\", docs/pycaffe.md) compute it.")
