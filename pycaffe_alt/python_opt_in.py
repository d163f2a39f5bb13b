"""The environment's opt-in for Python layers, for programs whose ``Net(...)`` calls cannot be
given ``allow_python=True`` (an unchanged pycaffe program run by ``pycaffe-alt run``).

Kept apart from :mod:`pycaffe_alt.layers.python_layer` so that the launcher can set it without
importing torch (an unchanged program that never builds a net starts fast).
"""
import os

# Set to "1" for every net of a process and its child processes to import the python_param
# modules their prototxts name, as Caffe does; ``pycaffe-alt run --allow-python`` sets it.
ALLOW_PYTHON_ENV = "PYCAFFE_ALT_ALLOW_PYTHON"


def python_layers_allowed() -> bool:
    """Whether the environment opts in to importing Python layer modules."""
    return os.environ.get(ALLOW_PYTHON_ENV) == "1"
