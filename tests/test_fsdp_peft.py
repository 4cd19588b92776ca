"""Real 2-process FSDP fits on CPU (gloo) through Lightning's FSDPStrategy and the PEFT callback (tests/fsdp_peft_worker.py).

Only the frozen base is sharded; the adapters are replicated and their gradients averaged, so the FSDP run
trains exactly as the DDP run does, every rank ends with the same adapters, and the adapter saved at fit
end holds full weights (peft #453, #1366) that load into a fresh model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import worker_env

from lightning_peft import list_adapters, load_adapter

WORKER = Path(__file__).with_name("fsdp_peft_worker.py")
PHASES = ("fsdp", "fsdp-adapter", "ddp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("fsdp-peft")
    env = worker_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, cwd=WORKER.parents[1], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"FSDP worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, {phase: [torch.load(out / f"{phase}-rank{r}.pt") for r in range(2)] for phase in PHASES}


@pytest.mark.parametrize("phase", ["fsdp", "fsdp-adapter"])
def test_fsdp_shards_only_frozen_weights_and_leaves_the_base_bit_identical(runs, phase):
    _, result = runs
    for rank in result[phase]:
        assert rank["world_size"] == 2 and "FSDP" in rank["wrapped"]
        assert rank["base_compared"] == rank["base_count"] == 37 and rank["base_numel"] > 0  # wrapped layers' weights included
        assert rank["base_changed"] == []
        assert len(rank["flat_requires_grad"]) >= 3 and not any(rank["flat_requires_grad"])  # root + 2 blocks, all frozen


@pytest.mark.parametrize("phase", PHASES)
def test_ranks_end_with_identical_adapters_that_trained(runs, phase):
    _, result = runs
    rank0, rank1 = result[phase]
    assert rank0["trainable"] and rank0["trainable"].keys() == rank1["trainable"].keys()
    assert all(".adapters." in name for name in rank0["trainable"])
    for name, value in rank0["trainable"].items():
        assert torch.equal(value, rank1["trainable"][name]), name
    assert any(name.endswith("lora_B") or "up" in name for name in rank0["trainable"])
    assert any(value.abs().sum() > 0 for name, value in rank0["trainable"].items() if name.endswith(("lora_B", "up.weight")))


def test_fsdp_averages_the_replicated_adapters_gradients_as_ddp(runs):
    """The optimizer gets the mean over ranks of each adapter gradient under FSDP too (not their sum, not the local one):
    the first step's gradients, before any update, equal DDP's, whatever the optimizer would make of their scale."""
    _, result = runs
    for rank in range(2):
        fsdp, ddp = result["fsdp"][rank]["first_grads"], result["ddp"][rank]["first_grads"]
        assert fsdp.keys() == ddp.keys() and len(ddp) == len(result["ddp"][rank]["trainable"])
        for name, value in ddp.items():
            assert value.abs().sum() > 0 or name.endswith("lora_A"), name  # B starts at zero: A's first gradient is zero
            torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-8, msg=name)


def test_fsdp_trains_exactly_as_ddp(runs):
    _, result = runs
    for rank in range(2):
        fsdp, ddp = result["fsdp"][rank], result["ddp"][rank]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5, abs=1e-6)
        assert fsdp["trainable"].keys() == ddp["trainable"].keys()
        for name, value in ddp["trainable"].items():
            torch.testing.assert_close(fsdp["trainable"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("phase", ["fsdp", "fsdp-adapter"])
def test_the_adapter_saved_from_the_sharded_run_is_whole_and_loads(runs, phase):
    out, result = runs
    sys.path.insert(0, str(WORKER.parent))
    from fsdp_peft_worker import UserModule

    module = UserModule()
    load_adapter(module, out / f"{phase}-adapter")
    assert list_adapters(module) == ["default"]
    loaded = {n: p for n, p in module.named_parameters() if ".adapters." in n}
    trained = result[phase][0]["trainable"]
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert loaded[name].shape == value.shape and torch.equal(loaded[name].detach(), value), name
