"""LoRA and bottleneck adapters through the PEFT callback under a real 2-process CPU DDP fit (gloo): ranks stay
identical, the adapter-only checkpoint written by rank 0 resumes on both ranks exactly where the uninterrupted run was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import worker_env

WORKER = Path(__file__).with_name("ddp_peft_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("ddp-peft")
    env = worker_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, cwd=WORKER.parents[1], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"DDP worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    phases = ("full", "resumed", "checkpointing-reentrant", "checkpointing-nonreentrant", "adapter")
    return out, {phase: [torch.load(out / f"{phase}-rank{r}.pt") for r in range(2)] for phase in phases}


def test_only_adapters_train_and_ranks_see_different_data(runs):
    _, result = runs
    for rank in result["full"]:
        assert rank["world_size"] == 2
        assert rank["at_wrap"] and all(".adapters.default." in n for n in rank["at_wrap"])
    assert not torch.equal(result["full"][0]["first_batch"], result["full"][1]["first_batch"])


@pytest.mark.parametrize("phase", ["full", "resumed", "checkpointing-reentrant", "checkpointing-nonreentrant", "adapter"])
def test_ranks_end_with_identical_adapters(runs, phase):
    _, result = runs
    rank0, rank1 = result[phase]
    assert rank0["trainable"].keys() == rank1["trainable"].keys()
    for name, value in rank0["trainable"].items():
        assert torch.equal(value, rank1["trainable"][name]), name


def test_adapter_only_checkpoint_is_written_once_and_resumes_exactly(runs):
    out, result = runs
    files = sorted((out / "ckpt").glob("step=*.ckpt"))
    assert [f.name for f in files] == [f"step={i}.ckpt" for i in range(1, 7)]
    state = torch.load(out / "ckpt" / "step=3.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("bert.") and ".adapters." not in k and k.endswith("weight") for k in state)
    for rank in range(2):
        full, resumed = result["full"][rank], result["resumed"][rank]
        assert sorted(resumed["losses"]) == [3, 4, 5]
        assert [resumed["losses"][s] for s in (3, 4, 5)] == pytest.approx([full["losses"][s] for s in (3, 4, 5)], rel=1e-6, abs=1e-7)
        for name, value in full["trainable"].items():
            torch.testing.assert_close(resumed["trainable"][name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["reentrant", "nonreentrant"])
def test_gradient_checkpointing_with_a_saved_head_under_ddp_trains_like_without(runs, mode):
    """peft #899 (modules_to_save + gradient checkpointing + DDP breaks): here it trains, to the same weights."""
    _, result = runs
    plain, checkpointed = result["full"][0], result[f"checkpointing-{mode}"][0]
    assert plain["use_reentrant"] is None and checkpointed["use_reentrant"] is (mode == "reentrant")  # the mode named ran
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-6)
    for name, value in plain["trainable"].items():
        torch.testing.assert_close(checkpointed["trainable"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(".head.adapters.default." in f".{n}" for n in checkpointed["trainable"])


def test_bottleneck_adapters_train_under_ddp(runs):
    _, result = runs
    rank0 = result["adapter"][0]
    assert rank0["at_wrap"] and all(".adapters.default." in n for n in rank0["at_wrap"])
    assert any("attention.output.dense" in n for n in rank0["at_wrap"]) and any(".output.dense" in n and "attention" not in n for n in rank0["at_wrap"])
    ups = [v for n, v in rank0["trainable"].items() if ".adapters.default.up.weight" in n]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # the zero-started up projections trained
