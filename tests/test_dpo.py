"""DPO: the losses equal the papers' / TRL's formulas, the adapter-disabled reference equals a frozen copy of the base,
preference pairs share their prompt and keep their completions, LoRA DPO learns prompt-dependent preferences,
adapter-only checkpoints resume exactly, and bad input is refused naming the problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import minilm_llama
from transformers import LlamaForCausalLM

from lightning_peft import DPO, PEFT, LoRAConfig, PreferenceDataModule, dpo_loss, inject, load_tokenizer
from lightning_peft.alignment.preference_data import collate_pairs, encode_pair
from lightning_peft.data.instructions import IGNORE_INDEX
from lightning_peft.losses.logprobs import token_logprobs

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The preferred answer depends on the prompt: no prompt-independent shift beats 50% accuracy.
PAIRS = [
    {"prompt": f"Say {w} to question {i}.", "chosen": w, "rejected": "no" if w == "yes" else "yes"}
    for i in range(16)
    for w in ("yes", "no")
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    return tok


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return minilm_llama(seed)


# --- the losses ---------------------------------------------------------------------------------

POLICY_C, POLICY_R = torch.tensor([-4.0, -7.5, -2.0]), torch.tensor([-6.0, -3.0, -2.5])
REF_C, REF_R = torch.tensor([-5.0, -7.0, -2.2]), torch.tensor([-5.5, -4.0, -2.0])
TOKENS_C, TOKENS_R = torch.tensor([4, 6, 2]), torch.tensor([3, 5, 7])


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)], ids=["dpo", "cdpo", "ipo"])
def test_losses_and_rewards_equal_the_formulas(loss_type, eps, beta):
    out = dpo_loss(
        POLICY_C,
        POLICY_R,
        REF_C,
        REF_R,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_tokens=TOKENS_C,
        rejected_tokens=TOKENS_R,
    )
    for i in range(3):
        rc, rr = float(POLICY_C[i] - REF_C[i]), float(POLICY_R[i] - REF_R[i])
        if loss_type == "sigmoid":  # Rafailov et al. Eq. 7; cDPO (Mitchell 2023): expected loss under flipped labels
            h = beta * (rc - rr)
            expected = -(1 - eps) * _logsigmoid(h) - eps * _logsigmoid(-h)
        else:  # Azar et al. Eq. 17 with TRL's per-token log-ratios
            expected = (rc / int(TOKENS_C[i]) - rr / int(TOKENS_R[i]) - 1 / (2 * beta)) ** 2
        assert float(out.losses[i]) == pytest.approx(expected, rel=1e-6)
        assert float(out.chosen_rewards[i]) == pytest.approx(beta * rc, rel=1e-6)
        assert float(out.rejected_rewards[i]) == pytest.approx(beta * rr, rel=1e-6)
    assert out.accuracies.tolist() == [1.0, 0.0, 1.0]


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    c, r = POLICY_C.clone().requires_grad_(), POLICY_R.clone().requires_grad_()
    dpo_loss(c, r, REF_C, REF_R, beta=0.1).losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"loss_type": "hinge"}, r"loss_type must be one of \('sigmoid', 'ipo'\)"),
        ({"beta": 0.0}, "beta must be a positive number"),
        ({"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing is defined for loss_type='sigmoid'"),
        ({"reference": "model"}, r"reference must be one of \('auto', 'adapters', 'copy', 'precomputed'\)"),
    ],
)
def test_bad_settings_name_the_valid_ones(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPO(tiny_llama(), tokenizer=tokenizer, **kwargs)


def test_ipo_needs_the_completion_lengths():
    with pytest.raises(ValueError, match="pass chosen_tokens and rejected_tokens"):
        dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, loss_type="ipo")


# --- preference data ----------------------------------------------------------------------------


def test_pair_shares_the_left_truncated_prompt_and_keeps_both_completions(tokenizer):
    record = {"prompt": "word " * 60 + "end", "chosen": "The short answer.", "rejected": "A much longer answer with many more words in it."}
    full = encode_pair(tokenizer, record, max_length=1000, template="plain")
    cut = encode_pair(tokenizer, record, max_length=30, template="plain")
    for row in (cut.chosen, cut.rejected):
        assert len(row.input_ids) <= 30
    prompt = cut.chosen.input_ids[: cut.chosen.prompt_length]
    assert prompt == cut.rejected.input_ids[: cut.rejected.prompt_length]  # the same prompt tokens on both rows
    assert prompt == full.chosen.input_ids[full.chosen.prompt_length - len(prompt) : full.chosen.prompt_length]  # its end
    assert cut.prompt_truncated == full.chosen.prompt_length - len(prompt) > 0
    assert len(cut.rejected.input_ids) == 30  # the longer completion decides the cut
    for short, long in ((cut.chosen, full.chosen), (cut.rejected, full.rejected)):
        assert short.labels[short.prompt_length :] == long.labels[long.prompt_length :]  # completions intact
        assert short.labels[-1] == tokenizer.eos_token_id


def test_chat_prompts_and_batches_put_chosen_rows_first(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token, tok.chat_template = "[SEP]", CHATML
    records = [
        {"prompt": [{"role": "user", "content": "Two plus two?"}], "chosen": "Four.", "rejected": "Five, I think."},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.5},
    ]
    with pytest.raises(ValueError, match="1 of 2 records carry"):
        PreferenceDataModule(tok, train=records, val=records, template="chat").setup("fit")
    records[0].update(ref_chosen_logps=-1.0, ref_rejected_logps=-2.0)
    pairs = [encode_pair(tok, r, 64, "chat", None, i) for i, r in enumerate(records)]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 4 and batch["ref_chosen_logps"].tolist() == [-1.0, -3.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -4.5]
    for row, text in enumerate(["four.", "paris.", "five, i think.", "lyon."]):
        answer = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert tok.decode(answer, skip_special_tokens=True).strip() == text
    prompt = tok.apply_chat_template(records[0]["prompt"], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt == batch["input_ids"][2, : len(prompt)].tolist()


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "Q?", "chosen": "A."}, r"record 0: missing field\(s\) \['rejected'\]"),
        ({"prompt": "Q?", "chosen": "  ", "rejected": "B."}, "record 0: 'chosen' is empty"),
        ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same. "}, "record 0: 'chosen' and 'rejected' are identical"),
        ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "ref_chosen_logps": -1.0}, "give both of"),
        (
            {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "ref_chosen_logps": "x", "ref_rejected_logps": -1.0},
            "must be a finite number",
        ),
        ({"prompt": "Q?", "chosen": "A " * 40, "rejected": "B."}, "completions are never truncated"),
    ],
)
def test_bad_records_are_refused_by_number(tokenizer, record, message):
    with pytest.raises(ValueError, match=message):
        encode_pair(tokenizer, record, max_length=24, template="plain")


def test_an_instruction_task_is_not_a_preference_file(tokenizer):
    with pytest.raises(ValueError, match="make pairs from it with scripts/make_dpo_pairs.py"):
        PreferenceDataModule(tokenizer, train="bbc_headlines")


# --- the reference ------------------------------------------------------------------------------


def _batch(tokenizer, records=PAIRS[:6]):
    dm = PreferenceDataModule(
        tokenizer, train=records, val=records[:2], max_length=32, batch_size=len(records), template="plain", shuffle=False
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_reference_with_adapters_disabled_equals_a_frozen_copy_of_the_base(tokenizer):
    from tiny_models import randomize

    module = DPO(tiny_llama(seed=4), tokenizer=tokenizer)
    inject(module, LoRAConfig(r=4, target_modules="all-linear", dropout=0.3))
    randomize(module, std=0.3)
    module.setup("fit")
    assert module.reference_mode == "adapters" and not module._frozen_reference  # no second model
    batch = _batch(tokenizer)
    module.train()
    ref = module.reference_token_logps(batch)
    base = tiny_llama(seed=4).eval()
    with torch.no_grad():
        expected, _ = token_logprobs(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
    assert module.training and module.model.model.layers[0].self_attn.q_proj.training  # modes restored
    policy, _ = token_logprobs(module.eval()(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    assert (policy - ref).abs().max() > 1e-2  # the adapter matters: the reference is not the policy

    # Full fine-tuning: a frozen copy taken at setup, out of the state dict, gives the same reference.
    full = DPO(tiny_llama(seed=4), tokenizer=tokenizer)
    full.setup("fit")
    assert full.reference_mode == "copy" and not any("reference" in k for k in full.state_dict())
    with torch.no_grad():
        next(full.model.parameters()).add_(1.0)  # training moves the policy, not the copy
    torch.testing.assert_close(full.reference_token_logps(batch), expected, rtol=0, atol=1e-6)


def test_sft_adapter_is_merged_so_the_start_and_the_reference_are_the_sft_model(tokenizer, tmp_path):
    from tiny_models import randomize

    from lightning_peft import list_adapters, save_adapter

    sft = tiny_llama(seed=4)
    inject(sft, LoRAConfig(r=4, target_modules="all-linear", dropout=0.0))
    randomize(sft, std=0.3)  # an SFT adapter that changes the outputs
    save_adapter(sft, tmp_path / "sft")
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected, _ = token_logprobs(sft.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        base, _ = token_logprobs(tiny_llama(seed=4).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert (expected - base).abs().max() > 1e-2

    module = DPO(tiny_llama(seed=4), tokenizer=tokenizer, sft_adapter=tmp_path / "sft")
    assert module.hparams["sft_adapter"] == str(tmp_path / "sft") and list_adapters(module.model) == []  # merged; a plain string
    inject(module, LoRAConfig(r=4, target_modules="all-linear", dropout=0.0))  # DPO's new adapter starts at B = 0
    module.setup("fit")
    assert module.reference_mode == "adapters"
    policy, _ = token_logprobs(module.eval()(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    torch.testing.assert_close(policy, expected, rtol=0, atol=1e-5)  # DPO starts from the SFT model
    torch.testing.assert_close(module.reference_token_logps(batch), expected, rtol=0, atol=1e-5)  # and keeps it as the reference


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning"])
def test_adapter_disabled_reference_is_the_base_model_for_other_methods(tokenizer, method):
    from tiny_models import randomize

    from lightning_peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    config = {"ia3": IA3Config, "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=4), "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=4)}[method]()
    module = DPO(tiny_llama(seed=4), tokenizer=tokenizer)
    inject(module, config)
    randomize(module, std=0.3)
    module.setup("fit")
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected, _ = token_logprobs(tiny_llama(seed=4).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(module.reference_token_logps(batch), expected, rtol=0, atol=1e-6)
    _, stats = module.pair_loss(batch)
    assert stats["kl"] > 0  # the method changes the policy


def test_drift_statistics_are_k3_on_chosen_tokens_and_per_token_log_ratios(tokenizer):
    from tiny_models import randomize

    from lightning_peft.alignment.dpo_loss import kl_estimate

    module = DPO(tiny_llama(seed=4), tokenizer=tokenizer)
    inject(module, LoRAConfig(r=4, target_modules="all-linear"))
    randomize(module, std=0.3)
    module.setup("fit")
    module.eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        logps, mask = token_logprobs(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        ref, _ = token_logprobs(tiny_llama(seed=4).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        _, stats = module.pair_loss(batch)
    pairs = len(logps) // 2
    torch.testing.assert_close(stats["kl"], kl_estimate(logps[:pairs], ref[:pairs], mask[:pairs]))
    assert stats["kl"] != kl_estimate(logps, ref, mask)  # the rejected rows are left out
    ratio = ((logps - ref) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(stats["logratio/chosen"], ratio[:pairs].mean())
    torch.testing.assert_close(stats["logratio/rejected"], ratio[pairs:].mean())


def test_precomputed_reference_logps_give_the_loss_of_the_live_reference(tokenizer):
    from tiny_models import randomize

    module = DPO(tiny_llama(seed=4), tokenizer=tokenizer, reference="adapters")
    inject(module, LoRAConfig(r=4, target_modules="all-linear"))
    randomize(module, std=0.3)
    module.setup("fit")
    module.eval()
    batch = _batch(tokenizer)
    live, live_stats = module.pair_loss(batch)
    ref = module.reference_token_logps(batch).sum(-1)
    records = [{**r, "ref_chosen_logps": float(c), "ref_rejected_logps": float(x)} for r, c, x in zip(PAIRS[:6], *ref.chunk(2))]
    dm = PreferenceDataModule(tokenizer, train=records, val=records[:2], max_length=32, batch_size=6, template="plain", shuffle=False)
    dm.setup("fit")
    assert dm.has_reference_logps
    module.reference_mode = "precomputed"
    stored, stored_stats = module.pair_loss(next(iter(dm.train_dataloader())))
    torch.testing.assert_close(stored.losses, live.losses, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/accuracy"):
        torch.testing.assert_close(stored_stats[key], live_stats[key], rtol=1e-5, atol=1e-6)
    logps, mask = token_logprobs(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    chosen, rejected = (logps.sum(-1) / mask.sum(-1)).chunk(2)  # the policy's own per-token preference, no reference
    assert live_stats["logps/accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())


def test_adapters_reference_without_adapters_says_what_to_do(tokenizer):
    with pytest.raises(ValueError, match="reference='adapters' needs adapters on the model"):
        DPO(tiny_llama(), tokenizer=tokenizer, reference="adapters").setup("fit")


# --- training -----------------------------------------------------------------------------------


class Metrics(pl.Callback):
    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def test_lora_dpo_learns_prompt_dependent_preferences_and_logs_its_metrics(tokenizer, tmp_path):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token, tok.chat_template = "[SEP]", CHATML
    module = DPO(tiny_llama(), tokenizer=tok, beta=0.5, max_new_tokens=2, optimizer=lambda ps: torch.optim.AdamW(ps, lr=2e-2))
    base = {id(p): p.detach().clone() for p in module.parameters()}
    dm = PreferenceDataModule(tok, train=PAIRS[:24], val=PAIRS[24:], max_length=32, batch_size=8, generate_size=2)
    metrics = Metrics()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=4,
        callbacks=[PEFT(LoRAConfig(r=8, alpha=16, target_modules="all-linear", dropout=0.0)), metrics],
    )
    trainer.fit(module, datamodule=dm)
    first, last_epoch = metrics.train[0], metrics.train[-3:]
    assert module.reference_mode == "adapters"
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0 (LoRA B = 0)
    assert first["train/rewards/accuracy"] == 0.0 and first["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert sum(m["train/rewards/accuracy"] for m in last_epoch) / 3 > 0.9  # every training pair, last epoch
    assert all(m["train/loss"] < first["train/loss"] and m["train/kl"] > 0 for m in last_epoch)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert val["val/rewards/accuracy"] > 0.9  # held-out prompts
    assert val["val/rewards/margin"] == pytest.approx(val["val/rewards/chosen"] - val["val/rewards/rejected"], abs=1e-5)
    assert {"val/loss", "val/logps/chosen", "val/logps/rejected", "val/kl", "val/rougeL"} <= set(val)
    for name, p in module.named_parameters():
        if ".adapters." not in name:
            assert torch.equal(p, base[id(p)]), name  # only the adapter trained
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [r["chosen"] for r in PAIRS[24:26]]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_hydra_dpo_run_resumes_from_an_adapter_only_checkpoint_to_the_same_weights(compose, tmp_path, tiny_llama_dir, preferences_jsonl):
    from omegaconf import open_dict

    from conftest import tiny_dpo_overrides
    from lightning_peft.cli.train import train

    overrides = [
        o
        for o in tiny_dpo_overrides(tiny_llama_dir, preferences_jsonl)
        if not o.startswith(("callbacks.model_checkpoint", "trainer.max_steps", "data.train_size", "data.val_size"))
    ]
    overrides += [
        "experiment=smollm2_dpo",
        "data.train_size=8",  # 2 steps of 4 pairs per epoch
        "data.val_size=4",
        "peft=lora",
        "peft.target_modules=all-linear",
        "peft.lr=1e-2",
        "model.beta=0.5",
        "data.shuffle=false",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "logger=none",
    ]

    def run(out: Path, *extra: str) -> dict:
        cfg = compose(*overrides, *extra)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        metrics = train(cfg)
        state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return {"metrics": metrics, "state": state["state_dict"], "step": state["global_step"]}

    a = run(tmp_path / "a")
    mid = tmp_path / "a" / "checkpoints" / "epoch00-step000002.ckpt"
    saved = torch.load(mid, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(".adapters." in k or k.startswith("__lightning_peft__") for k in saved), sorted(saved)[:5]  # adapter-only
    b = run(tmp_path / "b", f"ckpt_path={mid}")
    assert a["step"] == b["step"] == 4 and a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert any(not torch.equal(saved[k], b["state"][k]) for k in saved if ".adapters." in k)  # epoch 1 trained
    assert b["metrics"] == a["metrics"] and 0.0 <= a["metrics"]["val/rewards/accuracy"] <= 1.0
    assert (tmp_path / "a" / "adapter" / "adapter.safetensors").exists()


# --- SPIN-style pairs ---------------------------------------------------------------------------


def _script(name: str):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_drop_answers_equal_to_the_truth_or_empty_and_count_them():
    records = [{"prompt": f"Article {i}", "completion": f"Headline {i}"} for i in range(4)]
    pairs, dropped = _script("make_dpo_pairs").make_pairs(records, [" headline 0 ", "Something else", "", "Other"])
    assert dropped == {"equal_to_truth": 1, "empty": 1}
    assert pairs == [
        {"prompt": "Article 1", "chosen": "Headline 1", "rejected": "Something else"},
        {"prompt": "Article 3", "chosen": "Headline 3", "rejected": "Other"},
    ]


def test_make_dpo_pairs_caches_by_the_fingerprint_of_the_model_that_answered(tmp_path, tiny_llama_dir):
    from tiny_models import randomize

    from lightning_peft import CausalLM, save_adapter

    script = _script("make_dpo_pairs")
    out = tmp_path / "pairs.jsonl"
    argv = ["--model", tiny_llama_dir, "--num-articles", "3", "--max-new-tokens", "3", "--max-prompt-tokens", "48", "--out", str(out)]
    first = script.main(argv)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == first["pairs"] == 3 - sum(first["dropped"].values())
    assert all(p["chosen"] != p["rejected"] and p["prompt"].startswith("Write a short headline") for p in pairs)
    stamp = out.stat().st_mtime_ns
    assert script.main(argv) == first and out.stat().st_mtime_ns == stamp  # same model and settings: reused

    adapted = CausalLM(tiny_llama_dir)
    inject(adapted, LoRAConfig(r=4, target_modules="all-linear"))
    randomize(adapted, std=0.5)
    save_adapter(adapted, tmp_path / "adapter")
    other = script.main([*argv, "--adapter", str(tmp_path / "adapter")])
    assert other["fingerprint"] != first["fingerprint"] and other["adapter"] == str(tmp_path / "adapter")
    assert json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())["fingerprint"] == other["fingerprint"]
    dm = PreferenceDataModule(tiny_llama_dir, train=str(out), val=str(out), max_length=64)
    dm.setup("fit")  # the file is valid DPO data
    assert len(dm.train_records) == other["pairs"]


# --- DDP ----------------------------------------------------------------------------------------

def test_two_ddp_ranks_stay_identical_and_give_the_step_of_the_one_large_batch(tmp_path):
    """2 ranks with 1 and 3 pairs == 1 process with 4 pairs: the loss is a mean over all pairs, not a mean of rank means."""
    import subprocess
    import sys

    from ddp_dpo_worker import one_step
    from two_ranks import worker_env

    from conftest import REPO

    env = worker_env()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_dpo_worker.py"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    _, single = one_step(devices=1)
    trained = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert ranks[0].keys() == ranks[1].keys() == trained.keys() and any(n.endswith(".lora_A") for n in trained)
    for name, value in trained.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks never diverge
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)  # lr 1: rounding noise ~1e-6
