"""GradualUnfreezing + DiscriminativeLR under a real 2-process CPU DDP fit (gloo): ranks stay bit-identical (lightning #20340).

DDP only averages the gradients of parameters that required grad when it wrapped the model; groups
that GradualUnfreezing unfreezes later would train on each rank's own data and drift apart. The
fit runs in a subprocess (tests/ddp_worker.py, run again as rank 1), never inside
pytest (see ENVIRONMENT.md). The same fit with the callback's gradient averaging switched off is
the control: it must diverge, which shows the main assertions can fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import worker_env

WORKER = Path(__file__).with_name("ddp_worker.py")
LATE_GROUPS = ("bert.encoder.layer.1.", "bert.encoder.layer.0.")  # unfrozen at epochs 1 and 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """{"sync": [rank 0, rank 1], "nosync": [...]}: what each rank saved after its fit."""
    out = tmp_path_factory.mktemp("ddp")
    env = worker_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), "sync", "nosync"],
        env=env, cwd=WORKER.parents[1], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"DDP worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {mode: [torch.load(out / f"{mode}-rank{r}.pt") for r in range(2)] for mode in ("sync", "nosync")}


def _late(rank: dict) -> set[str]:
    """Parameters that trained in the last epoch but not when DDP wrapped the model."""
    return set(rank["per_epoch"][-1]) - set(rank["at_wrap"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("mode", ["sync", "nosync"])
def test_ranks_start_identical_and_see_different_data(runs, mode):
    rank0, rank1 = runs[mode]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])  # without averaging, they would diverge
    for name, value in rank0["initial"].items():
        assert torch.equal(value, rank1["initial"][name]), name


@pytest.mark.parametrize("mode", ["sync", "nosync"])
def test_groups_unfreeze_after_ddp_wrapped_the_model(runs, mode):
    for rank in runs[mode]:
        assert rank["at_wrap"] == ["head.weight", "head.bias"]  # only the head trains when DDP wraps
        trainable = [set(names) for names in rank["per_epoch"]]
        assert trainable[0] == set(rank["at_wrap"])
        assert trainable[0] < trainable[1] < trainable[2]  # one more group at each epoch
        late = _late(rank)
        for prefix in LATE_GROUPS:
            assert any(n.startswith(prefix) for n in late), prefix
        assert not any(n.startswith("bert.embeddings.") for n in late)  # its turn would be epoch 3


def test_gradual_unfreezing_keeps_ranks_bit_identical_under_ddp(runs):
    rank0, rank1 = runs["sync"]
    diverged = {n: _max_diff(v, rank1["final"][n]) for n, v in rank0["final"].items() if not torch.equal(v, rank1["final"][n])}
    worst = sorted(diverged.items(), key=lambda item: -item[1])[:5]
    assert not diverged, f"{len(diverged)} tensors differ between the ranks after the fit, e.g. {worst}"

    initial, final, late = rank0["initial"], rank0["final"], _late(rank0)
    unchanged_late = sorted(n for n in late if torch.equal(initial[n], final[n]))
    assert not unchanged_late, f"unfrozen late but never trained: {unchanged_late}"
    assert not torch.equal(initial["head.weight"], final["head.weight"])
    frozen_throughout = [n for n in final if n.startswith("bert.embeddings.")]
    assert frozen_throughout and all(torch.equal(initial[n], final[n]) for n in frozen_throughout)


def test_control_without_the_callbacks_gradient_averaging_ranks_diverge(runs):
    """lightning #20340 as is: late-unfrozen parameters drift apart, those DDP reduces stay equal."""
    rank0, rank1 = runs["nosync"]
    late = _late(rank0)
    diverged = {n for n, v in rank0["final"].items() if _max_diff(v, rank1["final"][n]) > 1e-4}
    assert diverged <= late, f"diverged beyond the late-unfrozen parameters: {sorted(diverged - late)}"
    for prefix in LATE_GROUPS:
        assert any(n.startswith(prefix) for n in diverged), f"{prefix} did not diverge without the callback's averaging"
    assert torch.equal(rank0["final"]["head.weight"], rank1["final"]["head.weight"])  # DDP reduced the head


def test_discriminative_rates_are_the_same_on_every_rank_and_decay_by_depth(runs):
    rank0, rank1 = runs["sync"]
    assert rank0["lrs"] == rank1["lrs"] and len(rank0["lrs"]) >= 4
    by_group = {}
    for name, lr in rank0["lrs"].items():
        by_group.setdefault(name.split("/")[0], set()).add(lr)
    head, = by_group["head"]
    top, = by_group["bert.encoder.layer.1"]
    below, = by_group["bert.encoder.layer.0"]
    assert top == pytest.approx(head * 0.5) and below == pytest.approx(head * 0.25)
