"""all_reduce_grads_mean_ on a real 2-process gloo group: parameters unused on one rank still end up identical.

FSDP's replicated adapters (sync_replicated_gradients) go through the same algorithm, checked in the same run.
"""

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
    from lightning_peft.distributed.fsdp import sync_replicated_gradients
    from lightning_peft.distributed.gradients import all_reduce_grads_mean_
    from lightning_peft.peft.layer import AdapterDict

    def work(rank, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        used_by_both = torch.nn.Parameter(torch.zeros(3))
        used_by_rank0 = torch.nn.Parameter(torch.zeros(2, 2))
        unused = torch.nn.Parameter(torch.zeros(4))
        used_by_both.grad = torch.full((3,), float(rank + 1))
        if rank == 0:
            used_by_rank0.grad = torch.full((2, 2), 4.0)
        count = all_reduce_grads_mean_([used_by_both, used_by_rank0, unused])
        half = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
        half.grad = torch.full((3,), 0.5 + rank, dtype=torch.bfloat16)
        all_reduce_grads_mean_([half])
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), AdapterDict({"a": torch.nn.Linear(2, 1)}))
        model[0].weight.grad = torch.full((2, 2), float(rank))  # the base: FSDP reduces it, the sync must not touch it
        if rank == 1:
            model[1]["a"].weight.grad = torch.full((1, 2), 6.0)
        synced = sync_replicated_gradients(model)
        torch.save({"both": used_by_both.grad, "rank0": used_by_rank0.grad, "unused": unused.grad, "count": count, "half": half.grad,
                    "synced": synced, "adapter_w": model[1]["a"].weight.grad, "adapter_b": model[1]["a"].bias.grad,
                    "base": model[0].weight.grad}, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.start_processes(work, args=(f"file://{out}/store", out), nprocs=2, start_method="fork")  # the imports are inherited
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
    assert r0["count"] == 3
    assert r0["half"].dtype == torch.bfloat16 and torch.equal(r0["half"], torch.full((3,), 1.0, dtype=torch.bfloat16))
    assert r0["synced"] == r1["synced"] == 2  # the adapter's weight and bias, averaged like any other gradient
    assert torch.equal(r0["adapter_w"], torch.full((1, 2), 3.0)) and torch.equal(r0["adapter_w"], r1["adapter_w"])
    assert r0["adapter_b"] is None and r1["adapter_b"] is None
    assert torch.equal(r0["base"], torch.zeros(2, 2)) and torch.equal(r1["base"], torch.ones(2, 2))
