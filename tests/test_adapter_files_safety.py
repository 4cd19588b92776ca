"""Adapter files under failure: killed writers, crafted or damaged files, diverged runs.

Folders are swapped in whole (a SIGKILL at any point leaves the old or the new adapter, never a mix),
checkpoints are unpickled with weights_only=True, non-finite tensors are not written silently, and
every damaged file is named in the error.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time

import pytest
import torch
from tiny_models import MODELS, llama, output, randomize

from lightning_peft import (
    LoRAConfig,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    save_adapter,
)

X = MODELS["llama"][1]()


def lora_llama(seed: int, alpha: float = 8.0):
    model = llama()
    inject(model, LoRAConfig(r=2, alpha=alpha, target_modules=["q_proj", "v_proj"]))
    randomize(model, seed=seed)
    return model


def outputs(model):
    with torch.no_grad():
        return output(model, X)


# --- all-or-nothing folders ----------------------------------------------------------------------

def _keep_writing(models, folder, export):
    torch.set_num_threads(1)
    for i in range(10**6):
        (export_peft if export else save_adapter)(models[i % 2], folder)


@pytest.mark.parametrize("export", [False, True], ids=["save_adapter", "export_peft"])
def test_a_writer_killed_during_an_overwrite_leaves_the_old_or_the_new_adapter(tmp_path, export):
    models = [lora_llama(seed=2, alpha=8.0), lora_llama(seed=3, alpha=16.0)]  # export: other weights and lora_alpha
    expected = [outputs(m) for m in models]
    folder = tmp_path / "adapter"
    (export_peft if export else save_adapter)(models[0], folder)
    rng = random.Random(0)
    context = multiprocessing.get_context("fork")
    for _ in range(4):
        writer = context.Process(target=_keep_writing, args=(models, folder, export))
        writer.start()
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        fresh = llama()
        (import_peft if export else load_adapter)(fresh, folder)
        got = outputs(fresh)
        assert torch.equal(got, expected[0]) or torch.equal(got, expected[1])
    (export_peft if export else save_adapter)(models[1], folder)  # a later save cleans up what killed writers left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path, caplog):
    model = lora_llama(seed=2)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    folder.rename(tmp_path / f"adapter.old-{time.time_ns()}-1")  # the state after "rename old aside", before "rename new in"
    fresh = llama()
    load_adapter(fresh, folder)
    assert torch.equal(outputs(fresh), outputs(model)) and "a save into it was interrupted" in caplog.text
    save_adapter(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_overwrite_keeps_other_files_and_drops_stale_ones(tmp_path):
    folder = tmp_path / "out"
    save_adapter(lora_llama(seed=2), folder)
    export_peft(lora_llama(seed=2), folder / "peft")
    (folder / "notes.txt").write_text("mine")
    (folder / ".adapter.json.abc.tmp").write_text("orphan of an old writer")
    save_adapter(lora_llama(seed=3), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors", "notes.txt", "peft"]
    assert (folder / "notes.txt").read_text() == "mine"
    import_peft(llama(), folder / "peft")


def test_saved_folders_get_the_mode_of_a_mkdir_not_the_private_mode_of_a_temporary_folder(tmp_path):
    mask = os.umask(0o027)
    try:
        save_adapter(lora_llama(seed=2), tmp_path / "out")
        export_peft(lora_llama(seed=2), tmp_path / "out" / "peft")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "peft").stat().st_mode & 0o777 == 0o750


def test_an_export_mixing_files_of_two_exports_is_refused(tmp_path):
    export_peft(lora_llama(seed=2, alpha=8.0), tmp_path / "a")
    export_peft(lora_llama(seed=3, alpha=16.0), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")  # new alpha, old weights
    with pytest.raises(ValueError, match=r"a: adapter_config.json do not match lightning_peft_manifest.json"):
        import_peft(llama(), tmp_path / "a")


# --- untrusted and damaged files ------------------------------------------------------------------

class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_checkpoint_runs_no_code_and_is_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"state_dict": {}, "hyper_parameters": _RunsAShellCommand(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))
    named = "posix.system" if writer == "torch.save" else "Unsupported operand"  # a raw pickle fails earlier, on its framing
    with pytest.raises(ValueError, match=rf"Refused to load .*evil.ckpt: it stores Python objects that could run code .*{named}"):
        load_adapter(llama(), path)
    assert not marker.exists()


def test_a_weights_file_is_accepted_for_its_folder_and_a_lone_one_is_explained(tmp_path):
    model = lora_llama(seed=2)
    save_adapter(model, tmp_path / "a")
    fresh = llama()
    load_adapter(fresh, tmp_path / "a" / "adapter.safetensors")
    assert torch.equal(outputs(fresh), outputs(model))
    shutil.copy(tmp_path / "a" / "adapter.safetensors", tmp_path / "lone.safetensors")
    with pytest.raises(ValueError, match=r"lone.safetensors is a single .safetensors file, not an adapter: pass the folder"):
        load_adapter(llama(), tmp_path / "lone.safetensors")


def test_damaged_files_are_named(tmp_path):
    save_adapter(lora_llama(seed=2), tmp_path / "ours")
    (tmp_path / "ours" / "adapter.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"ours/adapter.json is not valid JSON .*Save or download the adapter again"):
        load_adapter(llama(), tmp_path / "ours")

    export_peft(lora_llama(seed=2), tmp_path / "peft")
    os.remove(tmp_path / "peft" / "lightning_peft_manifest.json")  # as PEFT writes it: no manifest
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"peft/adapter_model.safetensors cannot be read as safetensors .*truncated"):
        import_peft(llama(), tmp_path / "peft")

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"last.ckpt cannot be read as a checkpoint .*truncated"):
        load_adapter(llama(), checkpoint)


# --- diverged runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("write", [save_adapter, export_peft], ids=["save_adapter", "export_peft"])
def test_non_finite_adapters_are_not_written_without_saying_so(tmp_path, write):
    model = lora_llama(seed=2)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* in 1 tensors: .*layers.1.self_attn.v_proj.*nothing was written .*allow_non_finite=True"):
        write(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    write(model, tmp_path / "a", allow_non_finite=True)
    assert (tmp_path / "a").is_dir()


def test_the_working_directory_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"is the working directory or holds it; .*give the adapter a folder of its own"):
        save_adapter(lora_llama(seed=2), ".")
    assert list(tmp_path.iterdir()) == []
