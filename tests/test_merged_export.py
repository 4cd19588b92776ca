"""save_merged_model and scripts/merge_adapter.py: a plain transformers folder that reproduces base + adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama, minilm_llama, output, randomize, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import (
    AdapterConfig,
    CausalLM,
    IA3Config,
    LoRAConfig,
    PromptTuningConfig,
    inject,
    list_adapters,
    save_adapter,
    save_merged_model,
    set_adapter,
)
from lightning_peft.peft.layer import adapter_layers

PROMPTS = ["Name a fruit.", "Two plus two?"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from lightning_peft import load_tokenizer

    path = tmp_path_factory.mktemp("merge-base")
    minilm_llama(seed=5).save_pretrained(path)
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(path)
    return path


def greedy(model, tokenizer, max_new_tokens: int = 6) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("config", [LoRAConfig(r=4, target_modules="all-linear"), LoRAConfig(r=4, use_dora=True), IA3Config()],
                         ids=["lora", "dora", "ia3"])
def test_merged_folder_reloads_with_transformers_alone_and_reproduces_base_plus_adapter(base_dir, tmp_path, config):
    module = CausalLM(str(base_dir)).eval()
    inject(module, config)
    randomize(module, std=0.3)
    x = token_batch()
    with torch.no_grad():
        expected_logits = module.model(input_ids=x).logits
    expected_tokens = greedy(module.model, module.tokenizer)
    with torch.no_grad():
        plain = CausalLM(str(base_dir)).eval()
        assert not torch.allclose(plain.model(input_ids=x).logits, expected_logits, atol=1e-3)  # the adapter matters

    out = save_merged_model(module, tmp_path / "merged")
    assert not list(adapter_layers(module))  # in place: the module holds the plain merged model now
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert not any("lora" in k or "ia3" in k or "base_layer" in k for k in reloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=x).logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert greedy(reloaded, AutoTokenizer.from_pretrained(out)) == expected_tokens  # the tokenizer came along


def test_only_the_active_adapter_is_merged_and_dtype_casts_the_saved_weights(base_dir, tmp_path):
    module = CausalLM(str(base_dir)).eval()
    inject(module, LoRAConfig(r=4), adapter_name="a")
    randomize(module, std=0.3, seed=1)
    inject(module, LoRAConfig(r=4), adapter_name="b")
    randomize(module, std=0.3, seed=2)
    set_adapter(module, "b")
    x = token_batch()
    with torch.no_grad():
        expected = module.model(input_ids=x).logits
    save_merged_model(module.model, tmp_path / "merged", tokenizer=module.tokenizer, dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = reloaded(input_ids=x).logits.float()
    assert float((got - expected).norm() / expected.norm()) < 2e-2  # bf16 rounding of b merged, not a + b


@pytest.mark.parametrize("config", [AdapterConfig(bottleneck_size=4), PromptTuningConfig(num_virtual_tokens=3)], ids=["bottleneck", "prompt"])
def test_adapters_that_cannot_merge_are_refused_before_anything_changes(base_dir, tmp_path, config):
    module = CausalLM(str(base_dir)).eval()
    inject(module, config)
    randomize(module, std=0.3)
    x = token_batch()
    with torch.no_grad():
        before = module(x)
    with pytest.raises(RuntimeError, match="Cannot merge.*(nonlinear|prompts).*save_adapter"):
        save_merged_model(module, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert list_adapters(module) == ["default"]
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_a_folder_with_files_is_kept_unless_overwrite(base_dir, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    module = CausalLM(str(base_dir)).eval()
    inject(module, LoRAConfig(r=2))
    with pytest.raises(FileExistsError, match="notes.txt.*overwrite=True"):
        save_merged_model(module, target)
    assert list_adapters(module) == ["default"]  # refused before merging
    save_merged_model(module, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").exists()


def test_a_module_without_a_transformers_model_is_refused():
    with pytest.raises(TypeError, match="save_pretrained.*CausalLM"):
        save_merged_model(torch.nn.Linear(2, 2), "unused")


def test_qlora_merges_into_the_dequantized_base_and_a_refusal_leaves_the_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_peft import QLoRAConfig
    from lightning_peft.peft.quantization import is_quantized

    x = token_batch()
    model = llama()
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    blocked = copy.deepcopy(model)
    inject(blocked, AdapterConfig(bottleneck_size=4), adapter_name="bottleneck")  # fp32 adapters on the 4-bit layers
    randomize(blocked, seed=3)
    with torch.no_grad():
        before = output(blocked, x)
    with pytest.raises(RuntimeError, match="nonlinear"):
        save_merged_model(blocked, tmp_path / "blocked")
    assert sum(is_quantized(m) for m in blocked.modules()) == 14  # not dequantized on the way to the refusal
    with torch.no_grad():
        assert torch.equal(output(blocked, x), before)

    default = copy.deepcopy(model)
    save_merged_model(model, tmp_path / "merged", dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(is_quantized(m) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, x), expected, rtol=1e-4, atol=1e-4)
    save_merged_model(default, tmp_path / "merged-bf16")  # default: the dequantized base in bf16, the whole model in it
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-bf16", dtype="auto").eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = output(reloaded.float(), x)
    assert float((got - expected).norm() / expected.norm()) < 2e-2


def test_merge_adapter_script_writes_checks_and_refuses(base_dir, tmp_path, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("merge_adapter", REPO / "scripts" / "merge_adapter.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    module = CausalLM(str(base_dir)).eval()
    inject(module, LoRAConfig(r=4, target_modules="all-linear"))
    randomize(module, std=0.3)
    save_adapter(module, tmp_path / "adapter")
    expected = greedy(module.model, module.tokenizer)
    script.main(["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    printed = capsys.readouterr().out
    assert "merged model written to" in printed and "next-token argmax equal at" in printed
    positions = printed.split("argmax equal at ")[1].split(" positions")[0]
    assert positions.split("/")[0] == positions.split("/")[1]
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), AutoTokenizer.from_pretrained(tmp_path / "merged")) == expected

    with pytest.raises(SystemExit, match="already holds files.*--overwrite"):
        script.main(["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    bottleneck = CausalLM(str(base_dir)).eval()
    inject(bottleneck, AdapterConfig(bottleneck_size=4))
    save_adapter(bottleneck, tmp_path / "bottleneck")
    with pytest.raises(SystemExit, match="error: Cannot merge.*nonlinear"):
        script.main(["--model", str(base_dir), "--adapter", str(tmp_path / "bottleneck"), "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
