"""GRPO: group advantages and the loss against hand-written formulas, sampling log-probs equal to the training
forward's, learning a trivially learnable reward, rewards and bad input refused, resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from grpo_helpers import RECORDS, word_llama, word_tokenizer, yes_reward

from lightning_peft import GRPO, PEFT, InstructionDataModule, LoRAConfig, disable_adapters, group_advantages, grpo_loss, topic_reward
from lightning_peft.alignment.grpo import Rollout
from lightning_peft.alignment.rewards import resolve_reward, score_completions


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- advantages and loss on fixed numbers ------------------------------------------------------------


def test_advantages_are_zero_in_a_group_of_equal_rewards_and_match_a_hand_computation():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, num_generations=4)
    assert torch.equal(adv[:4], torch.zeros(4))
    # group 2: mean 0.25, unbiased std sqrt((0.75² + 3 · 0.25²) / 3) = 0.5
    expected = torch.tensor([-0.25, 0.75, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(adv[4:], expected)
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="none")[4:], torch.tensor([-0.25, 0.75, -0.25, -0.25]))
    batch_std = float(torch.tensor(rewards.tolist()).std())
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale_rewards="batch")[4:], torch.tensor([-0.25, 0.75, -0.25, -0.25]) / (batch_std + 1e-4)
    )


def _reference_loss(logps, old, ref, adv, mask, beta, eps):
    """The GRPO objective written out element by element (DAPO aggregation: sum over tokens / number of tokens)."""
    total, tokens, clipped = 0.0, 0, 0
    for i in range(len(logps)):
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1
            total += -surrogate + beta * kl
            tokens += 1
            clipped += (ratio < 1 - eps and adv[i] < 0) or (ratio > 1 + eps and adv[i] > 0)
    return total / tokens, clipped / tokens


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("old_shift", [0.0, 0.5])  # 0.5: ratios up to e^0.5 leave [0.8, 1.2] and clipping binds
def test_loss_equals_the_formula(beta, old_shift):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 5, generator=g) * 3
    old = logps + old_shift * (torch.rand(4, 5, generator=g) * 2 - 1)
    ref = logps + torch.rand(4, 5, generator=g) - 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, -0.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, beta=beta, epsilon=0.2)
    expected, clip = _reference_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, 0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(stats.clip_fraction) == pytest.approx(clip)
    assert (clip > 0) == (old_shift > 0)
    kl = [
        math.exp(r - lp) - (r - lp) - 1
        for lr, rr, mr in zip(logps.tolist(), ref.tolist(), mask.tolist())
        for lp, r, m in zip(lr, rr, mr)
        if m
    ]
    assert float(stats.kl) == pytest.approx(sum(kl) / len(kl) if beta else 0.0, rel=1e-5)


def test_on_policy_gradient_is_minus_the_advantage_per_token_plus_the_kl_gradient():
    logps = (-torch.rand(3, 4)).requires_grad_()
    ref = logps.detach() - 0.3
    adv = torch.tensor([2.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(logps, adv, mask, ref_logps=ref, beta=0.5)  # old_logps=None: ratio 1, nothing clipped
    loss.backward()
    # d/dlogp [-A + beta (e^(ref - logp) - (ref - logp) - 1)] = -A + beta (1 - e^(ref - logp)), over 9 tokens
    expected = (-adv[:, None] + 0.5 * (1 - torch.exp(ref - logps.detach()))) * mask / 9
    torch.testing.assert_close(logps.grad, expected)
    assert float(stats.clip_fraction) == 0.0


# --- the module on a tiny word-level Llama ------------------------------------------------------------


def _module(model=None, reward=yes_reward, **kwargs) -> GRPO:
    settings = {"num_generations": 8, "max_new_tokens": 4, "optimizer": lambda ps: torch.optim.AdamW(ps, lr=2e-2), **kwargs}
    return GRPO(model if model is not None else word_llama(), reward=reward, tokenizer=word_tokenizer(), **settings)


def _datamodule(**kwargs) -> InstructionDataModule:
    settings = {
        "train": RECORDS,
        "val": RECORDS[:4],
        "max_length": 32,
        "batch_size": 4,
        "generate_size": 4,
        "train_prompts": True,
        **kwargs,
    }
    return InstructionDataModule(word_tokenizer(), **settings)


def _trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return pl.Trainer(callbacks=list(callbacks), **settings)


class StepMetrics(pl.Callback):
    """``values[key]``: the logged ``key`` after every training step."""

    def __init__(self, *keys: str) -> None:
        self.values: dict[str, list[float]] = {k: [] for k in keys}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, values in self.values.items():
            values.append(float(trainer.callback_metrics[key]))


def test_sampling_log_probs_equal_the_training_forward_under_left_padding():
    """The distribution sampled from (generate's logits / temperature, KV cache) is the one the loss differentiates."""
    module = _module(temperature=0.7)
    module.model.eval()
    dm = _datamodule()
    dm.setup("fit")
    prompts = [RECORDS[0], {"prompt": "red blue cat dog sun sky", "completion": "yes"}]  # lengths differ: left padding
    from lightning_peft.data.instructions import EncodedExample, pad_examples, prompt_ids

    ids = [prompt_ids(dm.tokenizer, r) for r in prompts]
    batch = pad_examples([EncodedExample(p, p) for p in ids], 0, side="left")
    torch.manual_seed(3)
    out = module.model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        do_sample=True,
        temperature=0.7,
        top_k=0,
        max_new_tokens=5,
        pad_token_id=0,
        eos_token_id=2,
        return_dict_in_generate=True,
        output_logits=True,
    )
    completion = out.sequences[:, batch["input_ids"].shape[1] :]
    sampled = torch.stack(out.logits, dim=1).div(0.7).log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    keep = torch.ones_like(completion, dtype=torch.bool)
    for row in range(2):  # through the first EOS
        eos = (completion[row] == 2).nonzero()
        if len(eos):
            keep[row, int(eos[0]) + 1 :] = False
    rollout = Rollout(
        out.sequences,
        torch.cat([batch["attention_mask"], keep.long()], 1),
        keep,
        batch["input_ids"].shape[1],
        torch.zeros(2),
        torch.zeros(2),
    )
    with torch.no_grad():
        logps = module.completion_logps(rollout)
    torch.testing.assert_close(logps[keep], sampled[keep], rtol=1e-4, atol=1e-4)


def test_lora_grpo_raises_a_learnable_reward_and_trains_only_the_adapter(tmp_path):
    torch.manual_seed(0)
    module = _module()
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    record = StepMetrics("train/reward", "train/completion_length")

    trainer = _trainer(
        tmp_path, [PEFT(LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")), record], max_steps=16, limit_val_batches=1
    )
    trainer.fit(module, datamodule=_datamodule())
    rewards, lengths = record.values["train/reward"], record.values["train/completion_length"]
    assert len(rewards) == 16 and all(1 <= n <= 4 for n in lengths)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.2 and last > 0.6, (first, last)  # seed 0: about 0.04 -> 0.85
    metrics = trainer.callback_metrics
    for key in ("train/reward_std", "train/zero_std_fraction", "train/kl", "train/clip_fraction", "val/reward", "val/exact_match"):
        assert key in metrics, key
    assert float(metrics["train/clip_fraction"]) == 0.0 and float(metrics["train/kl"]) == 0.0  # one pass per sample, beta 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4  # val/reward is the reward of the greedy answers written there
    answers = [s["generated"] for s in samples]
    assert float(metrics["val/reward"]) == pytest.approx(sum(yes_reward([], answers, [])) / 4)
    for name, p in module.named_parameters():
        if name in base:  # every pretrained weight is untouched
            assert torch.equal(p.detach(), base[name]), name


def test_beta_adds_a_kl_to_the_base_model_that_starts_at_zero(tmp_path):
    kls = {}
    for beta in (0.0, 1.0):
        torch.manual_seed(0)
        module = _module(beta=beta)
        record = StepMetrics("train/kl")

        trainer = _trainer(
            tmp_path, [PEFT(LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")), record], max_steps=8, limit_val_batches=0
        )
        trainer.fit(module, datamodule=_datamodule())
        kls[beta] = record.values["train/kl"]
    assert kls[0.0] == [0.0] * 8  # beta 0: no reference pass, nothing logged but 0
    assert kls[1.0][0] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy == reference
    assert all(k >= 0 for k in kls[1.0]) and max(kls[1.0]) > 0


# --- rewards and bad input --------------------------------------------------------------------------


def test_topic_reward_scores_words_not_strings():
    completions = ["Sport.", " SPORT ", "sport!", "business", "sport news", "", "Tech"]
    assert topic_reward(["p"] * 7, completions, ["sport"] * 7) == [1.1, 1.1, 1.1, 0.1, 0.0, 0.0, 0.1]
    assert topic_reward(["p"], ["cat"], ["cat"], choices=["cat", "dog"], format_bonus=0.0) == [1.0]


def test_one_generation_per_prompt_is_refused():
    with pytest.raises(ValueError, match=r"num_generations must be an integer >= 2, got 1: GRPO's baseline is the mean reward"):
        _module(num_generations=1)
    with pytest.raises(ValueError, match=r"num_generations must be >= 2"):
        group_advantages(torch.ones(4), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale_rewards": "std"}, r"scale_rewards must be one of \('group', 'batch', 'none'\), got 'std'"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"epsilon": 1.5}, r"epsilon must be in \(0, 1\), got 1.5"),
        ({"reward": "nowhere.reward_fn"}, r"cannot import the reward function 'nowhere.reward_fn'.*lightning_peft.topic_reward"),
        ({"reward": 3}, r"reward must be a callable \(prompts, completions, references\) -> list\[float\]"),
    ],
)
def test_bad_settings_name_the_problem_and_the_choices(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _module(**kwargs)


def _failing_reward(prompts, completions, references):
    if any("cat" in p for p in prompts):
        raise KeyError("no score for cats")
    return [0.0] * len(prompts)


def test_reward_errors_name_the_function_and_the_prompt():
    prompts, completions = ["red dog", "blue cat", "sun"], ["a", "b", "c"]
    with pytest.raises(
        RuntimeError, match=r"reward function test_grpo._failing_reward raised KeyError: 'no score for cats' — on prompt 1 'blue cat'"
    ):
        score_completions(_failing_reward, prompts, completions, completions)
    with pytest.raises(ValueError, match=r"returned 2 rewards for 3 completions"):
        score_completions(lambda p, c, r: [0.0, 1.0], prompts, completions, completions)
    with pytest.raises(ValueError, match=r"returned nan for completion 2 'c' of prompt 'sun': rewards must be finite"):
        score_completions(lambda p, c, r: [0.0, 1.0, float("nan")], prompts, completions, completions)
    with pytest.raises(ValueError, match=r"returned inf for completion 0"):
        score_completions(lambda p, c, r: torch.tensor([math.inf, 0.0, 0.0]), prompts, completions, completions)
    with pytest.raises(TypeError, match=r"must return a list of numbers"):
        score_completions(lambda p, c, r: ["good", "bad", "ugly"], prompts, completions, completions)
    assert resolve_reward("grpo_helpers.yes_reward") is yes_reward


def test_a_failing_reward_stops_training_naming_it(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(RuntimeError, match=r"reward function test_grpo._failing_reward raised KeyError.*on prompt \d+ '.*cat"):
        trainer.fit(_module(reward=_failing_reward), datamodule=_datamodule(train=[{"prompt": "cat dog", "completion": "yes"}] * 4))


def test_training_batches_without_prompts_and_kl_without_adapter_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"GRPO's training batches need \['prompt_ids', 'prompt_mask', 'references'\].*train_prompts=True"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(_module(), datamodule=_datamodule(train_prompts=False))
    with pytest.raises(ValueError, match=r"beta > 0 needs an adapter"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(_module(beta=0.1), datamodule=_datamodule())


# --- Hydra: the experiment config, adapter-only checkpoints and resume -----------------------------------


@pytest.fixture(scope="module")
def word_llama_dir(tmp_path_factory) -> tuple[str, str]:
    """(model folder, records .jsonl) of the word-level tiny Llama, for ``train(cfg)``."""
    import json

    from grpo_helpers import save_word_llama

    root = tmp_path_factory.mktemp("word-llama")
    records = root / "records.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return save_word_llama(root / "model"), str(records)


def _grpo_run(compose, out, model_dir: str, records: str, *extra: str) -> dict:
    import csv

    from omegaconf import open_dict

    from conftest import tiny_llm_overrides
    from lightning_peft.cli.train import train

    keep = ("data.train_size", "data.batch_size", "trainer.max_steps", "callbacks.", "model.max_new_tokens")
    overrides = [o for o in tiny_llm_overrides(model_dir, records) if not o.startswith(keep)] + [
        "experiment=smollm2_grpo", "peft=lora", "peft.lr=2e-2", "model.num_generations=4", "model.max_new_tokens=3",
        "model.reward._target_=grpo_helpers.yes_reward", "data.max_length=32", "data.train_size=8", "data.batch_size=4",
        "data.val_size=4", "trainer.max_epochs=2", "trainer.max_steps=-1", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null", "callbacks.parameter_summary=null", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1", "~logger.tensorboard", *extra,
    ]  # fmt: skip
    cfg = compose(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    metrics = train(cfg)
    with open(out / "csv" / "metrics.csv") as f:
        steps = {int(r["step"]): (float(r["train/loss"]), float(r["train/reward"])) for r in csv.DictReader(f) if r.get("train/loss")}
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"metrics": metrics, "steps": steps, "state": state["state_dict"], "step": state["global_step"]}


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_adapter_only_checkpoint_and_resume_equal_the_uninterrupted_run(compose, tmp_path, word_llama_dir):
    a = _grpo_run(compose, tmp_path / "a", *word_llama_dir)
    mid = tmp_path / "a" / "checkpoints" / "epoch00-step000002.ckpt"
    saved = torch.load(mid, map_location="cpu", weights_only=True)  # plain containers: the reward is kept by name
    assert saved["hyper_parameters"]["reward"] == "grpo_helpers.yes_reward"
    assert not any(k.startswith("model.model.embed_tokens") for k in saved["state_dict"])  # adapter-only
    assert any("lora" in k or "adapters" in k for k in saved["state_dict"])

    b = _grpo_run(compose, tmp_path / "b", *word_llama_dir, f"ckpt_path={mid}")

    assert a["step"] == b["step"] == 4
    assert sorted(b["steps"]) == [2, 3] and {s: a["steps"][s] for s in (2, 3)} == b["steps"]  # same samples, rewards, losses
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert any(not torch.equal(saved["state_dict"][k], b["state"][k]) for k in saved["state_dict"])  # epoch 1 trained
    assert b["metrics"]["val/reward"] == a["metrics"]["val/reward"]


# --- DDP ----------------------------------------------------------------------------------------------


def test_ddp_ranks_agree_and_equal_one_process_replaying_both_ranks_rollouts(tmp_path):
    """2 ranks, 2 steps: identical adapters on both ranks, equal to SGD on Σ_ranks Σ_tokens loss / all ranks' tokens."""
    import subprocess
    import sys

    from ddp_grpo_worker import LORA, LR, SETTINGS
    from two_ranks import worker_env

    from conftest import REPO
    from lightning_peft import inject
    from lightning_peft.alignment.grpo import Rollout

    env = worker_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_grpo_worker.py"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key in ("start", "end"):
        assert ranks[0][key].keys() == ranks[1][key].keys()
        for name in ranks[0][key]:
            assert torch.equal(ranks[0][key][name], ranks[1][key][name]), (key, name)
    assert not torch.equal(ranks[0]["rollouts"][0]["input_ids"], ranks[1]["rollouts"][0]["input_ids"])  # own prompts

    module = _module(word_llama(), **SETTINGS)
    inject(module, LORA)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in ranks[0]["start"].items():
            params[name].copy_(value)
    for step in range(2):
        rollouts = [Rollout(**rank["rollouts"][step]) for rank in ranks]
        tokens = sum(r.completion_mask.sum() for r in rollouts)
        module.zero_grad()
        for rollout in rollouts:
            with torch.no_grad(), disable_adapters(module.model):
                ref = module.completion_logps(rollout)
            loss, _ = grpo_loss(module.completion_logps(rollout), rollout.advantages, rollout.completion_mask, ref_logps=ref,
                                beta=SETTINGS["beta"], normalizer=tokens)  # fmt: skip
            loss.backward()
        with torch.no_grad():
            for name in ranks[0]["end"]:
                params[name] -= LR * params[name].grad
    moved = 0
    for name, value in ranks[0]["end"].items():
        torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(value, ranks[0]["start"][name])
    assert moved > 0


def test_sft_adapter_is_merged_so_grpo_starts_from_the_sft_model(tmp_path):
    from lightning_peft import inject, list_adapters, save_adapter

    sft = word_llama()
    inject(sft, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for p in sft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # an adapter that changes the outputs
    save_adapter(sft, tmp_path / "sft")
    ids = torch.tensor([[1, 6, 8, 2, 25]])
    module = _module(word_llama(), sft_adapter=tmp_path / "sft")
    assert module.hparams["sft_adapter"] == str(tmp_path / "sft")  # a plain string in checkpoints
    assert list_adapters(module.model) == []  # merged: disabling GRPO's adapter later gives the SFT model back
    assert all(p.requires_grad for p in module.model.parameters())  # as before loading (full fine-tuning possible)
    with torch.no_grad():
        torch.testing.assert_close(module(ids), sft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(module(ids), word_llama()(input_ids=ids).logits, atol=1e-3)
    # an SFT run's adapter names its modules from the LightningModule ("model.model.layers..."): merged alike
    run = _module(word_llama())
    inject(run, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for p, q in zip(run.parameters(), sft.parameters(), strict=True):
            p.copy_(q)
    save_adapter(run, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "adapter.json").read_text())["sites"][0]["module"].startswith("model.model.")
    from_run = _module(word_llama(), sft_adapter=tmp_path / "run")
    assert list_adapters(from_run.model) == []
    with torch.no_grad():
        torch.testing.assert_close(from_run(ids), sft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
