"""all_reduce_grads_mean_ on a real 2-process gloo group: parameters unused on one rank still end up identical."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from lightning_peft.distributed.gradients import all_reduce_grads_mean_

    def work(rank, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        used_by_both = torch.nn.Parameter(torch.zeros(3))
        used_by_rank0 = torch.nn.Parameter(torch.zeros(2, 2))
        unused = torch.nn.Parameter(torch.zeros(4))
        used_by_both.grad = torch.full((3,), float(rank + 1))
        if rank == 0:
            used_by_rank0.grad = torch.full((2, 2), 4.0)
        all_reduce_grads_mean_([used_by_both, used_by_rank0, unused])
        torch.save({"both": used_by_both.grad, "rank0": used_by_rank0.grad, "unused": unused.grad}, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.spawn(work, args=(f"file://{out}/store", out), nprocs=2)
    """
)


def test_gradients_missing_on_one_rank_count_as_zero_and_ranks_agree(tmp_path: Path) -> None:
    script = tmp_path / "reduce.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("both", "rank0"):
        assert torch.equal(r0[key], r1[key])
    assert torch.equal(r0["both"], torch.full((3,), 1.5))
    assert torch.equal(r0["rank0"], torch.full((2, 2), 2.0))  # (4 + 0) / 2: DDP's convention for an unused parameter
    assert r0["unused"] is None and r1["unused"] is None  # no rank had a gradient: the optimizer must skip it
