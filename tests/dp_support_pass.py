"""Helper of tests/test_distributed.py (not a test): I-alternation support steps on the ranks of
a torch.distributed job (or on one process without a launcher), each rank's mask store and pass
statistics written to OUT.

usage: [torchrun --nproc_per_node 2] python3 tests/dp_support_pass.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pycaffe_alt as caffe  # noqa: E402
from pycaffe_alt.distributed import DataParallel, join, launch_env, leave  # noqa: E402

from alternation_case import solver_param  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    job = launch_env()
    device = torch.device("cpu")
    rank = 0 if job is None else job.rank
    name = "single" if job is None else f"rank{rank}"
    if job is not None:
        join(job, device, start_timeout=60)
    # The same pass batch (8) on one process and on the ranks: the stores must match bytewise.
    param = solver_param(out, "mode: INSTANCE gap_iter: 8", batch=8)
    solver = caffe.get_solver(param, device="cpu")
    dp = DataParallel(solver, watchdog=False) if job is not None else None
    stats = []
    for step in (1, 2):
        if step == 2:  # other thresholds, the same on every rank: some supports change
            with torch.no_grad():
                for layer in solver.net.layer_modules.values():
                    if type(layer).__name__ == "HardThreshold":
                        layer.beta.add_(0.02)
        s = solver.support_step()
        stats.append({k: s[k] for k in ("records", "batches", "records_computed", "first",
                                        "changed_overall", "on_overall", "gather_seconds")})
        solver.store.save(str(out / f"{name}_{step}.masks"))
    (out / f"{name}.json").write_text(json.dumps(stats))
    if dp is not None:
        dp.close()
        torch.distributed.barrier()  # rank 0 hosts the job's store: leave together
        leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
