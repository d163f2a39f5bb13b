"""The paper's training method: support rules, the bit-packed mask store, and (later) the
alternation trainer and DSD flow. See docs/alternation.md for the choices made and why.

Kept import-light: layers import :mod:`.rules`, so this package must not import the layers.
"""
