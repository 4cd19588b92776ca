"""Causal-LM SFT: completion-only labels, packing, the CausalLM module and generation-based validation."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import minilm_llama
from transformers import LlamaForCausalLM

from lightning_peft import PEFT, CausalLM, InstructionDataModule, LoRAConfig
from lightning_peft.data.instruction_datamodule import _Examples as _Items
from lightning_peft.data.instructions import IGNORE_INDEX, encode_example, pack_examples, pad_examples
from lightning_peft.models.causal_lm import completion_loss

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

RECORDS = [
    {"prompt": "What colour is the sky?", "completion": "Blue."},
    {"prompt": "Name a fruit.", "completion": "An apple, a pear or a plum."},
    {"prompt": "Two plus two?", "completion": "Four."},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"prompt": "Opposite of hot?", "completion": "Cold."},
    {"prompt": "A colour of grass?", "completion": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from lightning_peft import load_tokenizer

    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    return tok


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token = "[SEP]"
    tok.chat_template = CHATML
    return tok


def tiny_llama(seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    return minilm_llama(seed, attn_implementation=attn)


def test_plain_template_masks_exactly_the_prompt(tokenizer):
    e = encode_example(tokenizer, RECORDS[1], max_length=64, template="plain")
    prompt = tokenizer("### Instruction:\nName a fruit.\n\n### Response:\n")["input_ids"]
    assert e.input_ids[: len(prompt)] == prompt
    assert e.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = e.labels[len(prompt) :]
    assert IGNORE_INDEX not in answer and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True) == "an apple, a pear or a plum."


def test_chat_template_masks_by_the_generation_prompt(chat_tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
                           {"role": "assistant", "content": "Four."}]}
    e = encode_example(chat_tokenizer, record, max_length=64)
    prompt = chat_tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    assert e.input_ids[: len(prompt)] == prompt and e.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert chat_tokenizer.decode(e.labels[len(prompt) :], skip_special_tokens=True).strip() == "four."
    assert e.labels[-1] == chat_tokenizer.eos_token_id


def test_long_prompts_are_cut_from_the_left_never_the_completion(tokenizer):
    record = {"prompt": "word " * 100, "completion": "The answer."}
    e = encode_example(tokenizer, record, max_length=20, template="plain")
    full = encode_example(tokenizer, record, max_length=1000, template="plain")
    assert len(e.input_ids) == 20 and e.prompt_truncated == len(full.input_ids) - 20
    assert e.input_ids == full.input_ids[-20:] and e.labels == full.labels[-20:]
    with pytest.raises(ValueError, match=r"record 3: the completion alone is 51 tokens.*\(completions are never truncated\)"):
        encode_example(tokenizer, {"prompt": "q", "completion": "long " * 50}, max_length=20, template="plain", index=3)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q"}, r"record 0: missing field\(s\) \['completion'\]"),
        ({"prompt": "q", "completion": "  "}, "record 0: the completion is empty"),
        ({"text": "q"}, "record 0: needs 'prompt' and 'completion', or 'messages'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "record 0: the last message must be the assistant's answer"),
    ],
)
def test_bad_records_are_refused_by_number(tokenizer, record, message):
    with pytest.raises(ValueError, match=message):
        encode_example(tokenizer, record, max_length=64, template="plain")


def test_a_batch_with_every_label_masked_is_refused():
    with pytest.raises(ValueError, match="every label in this batch is masked"):
        completion_loss(torch.randn(2, 5, 11), torch.full((2, 5), IGNORE_INDEX))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_losses_and_gradients_as_unpacked(tokenizer, attn):
    examples = [encode_example(tokenizer, r, 64, template="plain") for r in RECORDS[:4]]
    model = tiny_llama(attn=attn)
    lengths = [len(e.input_ids) for e in examples]
    packed = pack_examples(examples, max_length=sum(lengths[:2]) + 1, pad_id=0)
    assert packed["input_ids"].shape[0] == 2  # two rows of two examples each

    def per_token_sum(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids")).logits
        return completion_loss(logits, batch["labels"], reduction="sum")

    model.zero_grad()
    loss_u, n_u = per_token_sum(pad_examples(examples, pad_id=0))
    loss_u.backward()
    grads_u = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_p, n_p = per_token_sum(packed)
    loss_p.backward()
    assert int(n_u) == int(n_p)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for gp, gu in zip((p.grad for p in model.parameters()), grads_u):
        torch.testing.assert_close(gp, gu, rtol=1e-4, atol=1e-5)


def _datamodule(tokenizer, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(tokenizer, train=RECORDS * 4, val=RECORDS[:3], max_length=48, batch_size=4, template="plain", generate_size=3, **kwargs)
    return dm


def test_lora_sft_lowers_the_loss_changes_only_adapters_and_writes_samples(tokenizer, tmp_path):
    model = CausalLM(tiny_llama(), tokenizer=tokenizer, max_new_tokens=4, optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-2))
    base = {id(p): p.detach().clone() for p in model.parameters()}
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                         callbacks=[PEFT(LoRAConfig(r=8, alpha=16, target_modules="all-linear")), Losses()])
    trainer.fit(model, datamodule=_datamodule(tokenizer))
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    for name, p in model.named_parameters():
        if ".adapters." in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, base[id(p)]), name
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [r["completion"] for r in RECORDS[:3]]
    assert all(0.0 <= s["rougeL"] <= 1.0 and isinstance(s["generated"], str) for s in samples)
    assert {"val/rougeL", "val/exact_match", "val/loss"} <= set(trainer.callback_metrics)
    assert (tmp_path / "samples.md").read_text().startswith("# Validation samples")


def test_validation_generation_is_greedy_decoding_of_the_prompt(tokenizer):
    model = CausalLM(tiny_llama(seed=3), tokenizer=tokenizer, max_new_tokens=5)
    model.eval()
    dm = _datamodule(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    answers = model.generate(batch["prompt_ids"], batch["prompt_mask"])
    # The same answer by a manual greedy loop on the unpadded prompt.
    for row, answer in enumerate(answers):
        ids = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()][None]
        for _ in range(5):
            nxt = model.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
        new = ids[0, batch["prompt_mask"][row].sum() :]
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_script_with_a_saved_adapter_prints_what_the_trained_module_generates(tokenizer, tmp_path):
    import subprocess
    import sys

    from tiny_models import randomize

    from conftest import REPO
    from lightning_peft import inject, save_adapter

    base = tmp_path / "base"
    tiny_llama(seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    module = CausalLM(str(base), max_new_tokens=6)
    inject(module, LoRAConfig(r=4, target_modules="all-linear"))
    randomize(module, std=0.3)
    save_adapter(module, tmp_path / "adapter")
    module.eval()
    prompts = ["Name a fruit.", "Two plus two?"]
    from lightning_peft.data.instructions import EncodedExample, prompt_ids

    ids = [prompt_ids(module.tokenizer, {"prompt": p, "completion": "-"}, "plain") for p in prompts]
    batch = pad_examples([EncodedExample(i, i) for i in ids], module.tokenizer.pad_token_id, side="left")
    expected = module.generate(batch["input_ids"], batch["attention_mask"])
    inject_free = CausalLM(str(base), max_new_tokens=6).eval()
    assert expected != inject_free.generate(batch["input_ids"], batch["attention_mask"])  # the adapter matters

    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(base), "--adapter", str(tmp_path / "adapter"),
         "--template", "plain", "--max-new-tokens", "6", "--json", *[a for p in prompts for a in ("--prompt", p)]],
        capture_output=True, text=True, timeout=300, check=True,
    )
    got = [json.loads(line)["generated"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert got == expected


def test_generate_script_samples_repeatably_with_a_seed_as_the_module_does(tokenizer, tmp_path, capsys):
    import importlib.util

    from conftest import REPO
    from lightning_peft.data.instructions import EncodedExample, prompt_ids

    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = tmp_path / "base"
    tiny_llama(seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    prompts = ["Name a fruit.", "Two plus two?"]
    module = CausalLM(str(base), max_new_tokens=8).eval()
    ids = [prompt_ids(module.tokenizer, {"prompt": p, "completion": "-"}, "plain") for p in prompts]
    batch = pad_examples([EncodedExample(i, i) for i in ids], module.tokenizer.pad_token_id, side="left")

    def sampled(seed: int) -> list[str]:
        script.main(["--model", str(base), "--template", "plain", "--max-new-tokens", "8", "--json", "--temperature", "1.5",
                     "--top-k", "50", "--seed", str(seed), *[a for p in prompts for a in ("--prompt", p)]])
        return [json.loads(line)["generated"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    torch.manual_seed(3)
    expected = module.generate(batch["input_ids"], batch["attention_mask"], do_sample=True, temperature=1.5, top_p=1.0, top_k=50)
    assert sampled(3) == expected == sampled(3)
    assert expected != module.generate(batch["input_ids"], batch["attention_mask"])  # not the greedy answers
    with pytest.raises(SystemExit):
        script.main(["--prompt", "x", "--temperature", "-1"])
    assert "--temperature must be >= 0" in capsys.readouterr().err


def test_hydra_llm_job_trains_lora_and_writes_adapter_samples_and_metrics(compose, tiny_llama_dir, instructions_jsonl):
    from conftest import tiny_llm_overrides
    from lightning_peft.cli.train import train

    cfg = compose(*tiny_llm_overrides(tiny_llama_dir, instructions_jsonl), "experiment=smollm2_headlines", "peft=lora",
                  "peft.target_modules=all-linear", "trainer.max_steps=4", "data.val_size=4")
    metrics = train(cfg)
    out = __import__("pathlib").Path(cfg.paths.output_dir)
    assert {"val/loss", "val/rougeL", "val/exact_match"} <= set(metrics)
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "adapter" / "peft" / "adapter_config.json").exists()
    peft_config = json.loads((out / "adapter" / "peft" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "CAUSAL_LM"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["reference"].startswith("It is ") for s in samples)


METHODS = {
    "lora": lambda: LoRAConfig(r=4, target_modules="all-linear"),
    "ia3": lambda: __import__("lightning_peft").IA3Config(),
    "adapter": lambda: __import__("lightning_peft").AdapterConfig(bottleneck_size=8),
    "prompt_tuning": lambda: __import__("lightning_peft").PromptTuningConfig(num_virtual_tokens=4),
    "prefix_tuning": lambda: __import__("lightning_peft").PrefixTuningConfig(num_virtual_tokens=4),
    "p_tuning_v2": lambda: __import__("lightning_peft").PTuningV2Config(num_virtual_tokens=4),
}


def _fit_two_steps(tokenizer, callbacks, tmp_path) -> tuple[CausalLM, list[float]]:
    model = CausalLM(tiny_llama(), tokenizer=tokenizer, max_new_tokens=3, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=3,
                         callbacks=[*callbacks, Losses()])
    trainer.fit(model, datamodule=_datamodule(tokenizer))
    return model, losses


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_peft_method_trains_a_causal_lm_and_generates(tokenizer, tmp_path, method):
    model, losses = _fit_two_steps(tokenizer, [PEFT(METHODS[method]())], tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n or "prompt" in n or "prefix" in n for n in trainable), trainable[:5]
    assert (tmp_path / "samples.jsonl").exists()  # generation ran with the method active


def test_bitfit_on_a_llama_without_biases_says_so(tokenizer, tmp_path):
    from lightning_peft import BitFitConfig

    with pytest.raises(ValueError, match="BitFit found no bias parameters"):
        _fit_two_steps(tokenizer, [PEFT(BitFitConfig())], tmp_path)


@pytest.mark.parametrize("name", ["freeze_backbone", "gradual_unfreezing", "discriminative_lr", "l2sp"])
def test_layer_group_callbacks_apply_to_a_causal_lm(tokenizer, tmp_path, name):
    from lightning_peft import L2SP, DiscriminativeLR, FreezeBackbone, GradualUnfreezing

    callback = {"freeze_backbone": lambda: FreezeBackbone(train_top=1), "gradual_unfreezing": lambda: GradualUnfreezing(steps=[100]),
                "discriminative_lr": lambda: DiscriminativeLR(decay=0.5), "l2sp": lambda: L2SP(alpha=0.01)}[name]()
    model, losses = _fit_two_steps(tokenizer, [callback], tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if name in ("freeze_backbone", "gradual_unfreezing"):  # no task head: the top layer trains from the start
        assert not model.model.model.layers[0].self_attn.q_proj.weight.requires_grad
        assert model.model.model.layers[-1].self_attn.q_proj.weight.requires_grad


def test_exported_lora_generates_the_same_greedy_tokens_in_hf_peft(tokenizer, tmp_path):
    from peft import PeftModel
    from tiny_models import randomize

    from lightning_peft import export_peft, inject

    base = tmp_path / "base"
    tiny_llama(seed=7).save_pretrained(base)
    module = CausalLM(str(base), tokenizer=tokenizer, max_new_tokens=6)
    inject(module, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(module, std=0.3)
    export_peft(module, tmp_path / "peft")
    module.eval()
    dm = _datamodule(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    ours = module.model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "peft").eval()
    theirs = theirs_model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    base_only = LlamaForCausalLM.from_pretrained(base).eval().generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base_only)  # the adapter changes what is generated


def test_two_ddp_ranks_accumulating_give_the_gradient_of_the_one_large_batch(tmp_path):
    """Per-token mean over all ranks and micro-batches: 2 ranks x 2 accumulated micro-batches of 2 records (Lightning's
    DistributedSampler injected into the window sampler) == 1 process x 8 records, with uneven completions everywhere."""
    import subprocess
    import sys

    from ddp_causal_lm_worker import one_step
    from two_ranks import worker_env

    from conftest import REPO

    env = worker_env()
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_causal_lm_worker.py"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(out, weights_only=True)
    _, single = one_step(devices=1, batch_size=8)
    for name, value in single.named_parameters():
        torch.testing.assert_close(ddp[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)


# Completions of uneven length: 11 records = windows of 2 x 4 records, then a last window of 3 (one short micro-batch).
UNEVEN = [{"prompt": f"Question {i}?", "completion": "yes " * n} for i, n in enumerate([1, 1, 2, 1, 9, 12, 7, 10, 3, 1, 14])]


class _OwnLoader(InstructionDataModule):
    """A user's own training loader: plain batches without ``window_tokens``."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Items([(e, None, None) for e in self._train]), batch_size=self.batch_size, collate_fn=self._collate(self.packing))


def _sgd_epoch(tokenizer, tmp_path, batch_size: int, accumulate: int, packing: bool, datamodule=InstructionDataModule) -> dict[str, torch.Tensor]:
    """The weights after one epoch of SGD on UNEVEN (in order) from the same tiny Llama."""
    model = CausalLM(tiny_llama(seed=1), tokenizer=tokenizer, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    dm = datamodule(tokenizer, train=UNEVEN, val=UNEVEN[:1], max_length=48, batch_size=batch_size, template="plain", generate_size=0,
                    shuffle=False, packing=packing)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [False, True])
def test_accumulated_micro_batches_give_the_gradient_of_the_whole_window(tokenizer, tmp_path, packing):
    """2 x 4 accumulated == 1 x 8 (then a last window of 3 alone): the loss is the mean over every completion token of the window."""
    whole = _sgd_epoch(tokenizer, tmp_path, batch_size=8, accumulate=1, packing=packing)
    accumulated = _sgd_epoch(tokenizer, tmp_path, batch_size=4, accumulate=2, packing=packing)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-5, msg=name)
    if packing:
        return
    # A loader without window_tokens falls back to a per-token mean of each micro-batch, which here differs.
    fallback = _sgd_epoch(tokenizer, tmp_path, batch_size=4, accumulate=2, packing=packing, datamodule=_OwnLoader)
    embed = "model.model.embed_tokens.weight"
    assert not torch.allclose(fallback[embed], whole[embed], rtol=1e-4, atol=1e-5)


def test_window_tokens_count_the_loss_tokens_and_survive_lightnings_distributed_sampler(tokenizer):
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from lightning_peft.data.instruction_datamodule import WindowBatchSampler

    dm = InstructionDataModule(tokenizer, train=UNEVEN, val=UNEVEN[:1], max_length=48, batch_size=2, template="plain", packing=True)
    dm.setup("fit")
    dm.trainer = pl.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):  # as Lightning calls the hook
        loader = dm.train_dataloader()
    assert _is_dataloader_shuffled(loader)
    counts = [e.completion_tokens for e in dm._train]
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        ranked = _update_dataloader(loader, sampler)
        assert isinstance(ranked.batch_sampler, WindowBatchSampler) and ranked.batch_sampler.sampler is sampler
        order = list(sampler)  # 6 indices: 3 batches of 2, windows of 2 batches then 1
        windows = [order[:4], order[4:]]
        batches = list(ranked)
        assert len(batches) == 3
        for batch, window in zip(batches, [windows[0], windows[0], windows[1]]):
            assert int(batch["window_tokens"]) == sum(counts[i] for i in window)
        # ... and the count is what the loss counts: labels after the shift that are not -100.
        assert sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches[:2]) == int(batches[0]["window_tokens"])
    # Shuffling draws from the global generator as DataLoader(shuffle=True)'s own batch sampler does, so RNGState's resume holds.
    torch.manual_seed(5)
    ours = [i for batch in loader.batch_sampler for i, _ in batch]
    state = torch.get_rng_state()
    torch.manual_seed(5)
    plain = [i for batch in DataLoader(range(len(UNEVEN)), batch_size=2, shuffle=True).batch_sampler for i in batch]
    assert ours == plain and torch.equal(torch.get_rng_state(), state)
    # Windows end where Lightning steps: every `accumulate` batches and at a limit_train_batches cut.
    limited = WindowBatchSampler(range(7), 1, False, tokens=[1, 2, 3, 4, 5, 6, 7], accumulate=2, limit_batches=3)
    assert [w for [(_, w)] in limited] == [3, 3, 3, 9, 9, 13, 13]
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        WindowBatchSampler(range(7), 1, False, tokens=[1] * 7, accumulate=0)


def test_token_divisor_uses_the_window_and_refuses_a_count_below_the_batchs_own(tokenizer):
    model = CausalLM(tiny_llama(), tokenizer=tokenizer)
    model.trainer = pl.Trainer(accelerator="cpu", accumulate_grad_batches=4, logger=False)
    # Lightning divides the returned loss by 4: sum / (window / 4) / 4 == sum / window.
    assert float(model.token_divisor({"window_tokens": torch.tensor(10)}, torch.tensor(3))) == 2.5
    assert float(model.token_divisor({}, torch.tensor(3))) == 3.0  # no window: this micro-batch's mean
    with pytest.raises(ValueError, match="window_tokens=2 is less than its own 3 completion tokens"):
        model.token_divisor({"window_tokens": torch.tensor(2)}, torch.tensor(3))
