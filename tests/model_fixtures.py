"""Real models' prototxts kept under tests/fixtures/<folder>/, plain or gzipped (the large ones)."""
import gzip
import os

FIXTURE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture_text(folder: str, name: str) -> str:
    """The text of ``fixtures/<folder>/<name>.prototxt`` (or of its ``.gz``)."""
    plain = os.path.join(FIXTURE_ROOT, folder, name + ".prototxt")
    if os.path.exists(plain):
        with open(plain) as f:
            return f.read()
    with gzip.open(plain + ".gz", "rt") as f:
        return f.read()
