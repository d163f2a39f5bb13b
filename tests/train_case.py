"""Shared by the CLI tests: a small training folder made from the golden sgd_fixed case."""
import os
import shutil

from pycaffe_alt.prototxt import read_solver, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "fixtures", "golden")
CASE = os.path.join(GOLDEN, "solvers", "sgd_fixed")
TOOLS = os.path.join(os.path.dirname(HERE), "tools")


def make_case(tmp_path, **solver_fields) -> str:
    """``tmp_path/solvers/case`` with net, init weights and a solver file with the given fields
    changed; the net's ``../../data`` LMDBs resolve to the fixtures (a symlink). Returns the folder."""
    data = tmp_path / "data"
    if not data.exists():
        data.symlink_to(os.path.join(GOLDEN, "data"), target_is_directory=True)
    folder = tmp_path / "solvers" / "case"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("net.prototxt", "init.caffemodel"):
        shutil.copy(os.path.join(CASE, name), folder / name)
    param = read_solver(os.path.join(CASE, "solver.prototxt"))
    for key, value in solver_fields.items():
        setattr(param, key, value)
    write_text(param, str(folder / "solver.prototxt"))
    return str(folder)
