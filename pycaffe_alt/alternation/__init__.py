"""The paper's training method: support rules, the bit-packed mask store, the alternation solver
(:mod:`.solver`, :mod:`.support_pass`) and DSD (:mod:`.dsd`, :mod:`.pruning`). See docs/alternation.md for the choices made and why.

Kept import-light: layers import :mod:`.rules`, so this package must not import the layers.
"""


def __getattr__(name: str):
    # The solver imports the layers, which import .rules from this package: load it on first use
    # only (``from pycaffe_alt.alternation import AlternationSolver``).
    if name == "AlternationSolver":
        from .solver import AlternationSolver

        return AlternationSolver
    if name in ("DSDSolver", "SupportDSDSolver"):
        from . import dsd

        return getattr(dsd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
