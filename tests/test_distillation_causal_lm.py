"""Token-level distillation of a CausalLM: the masked loss is the formula (by hand), prompt positions never count,
the callback's loss is α · CE + (1 − α) · KD per completion token (also across accumulated micro-batches), a
tiny teacher's distributions are learnt, a different vocabulary is refused, and the Hydra job composes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import minilm_llama
from transformers import LlamaForCausalLM

from lightning_peft import CausalLM, Distillation, InstructionDataModule, token_distillation_loss
from lightning_peft.data.instructions import IGNORE_INDEX
from lightning_peft.models.causal_lm import completion_loss

pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")

RECORDS = [{"prompt": f"Question {i}?", "completion": "yes no " * n} for i, n in enumerate([1, 6, 2, 8, 1, 5, 3, 7])]


def tiny_llama(seed: int, vocab_size: int = 30522) -> LlamaForCausalLM:
    return minilm_llama(seed, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tokenizer():
    from lightning_peft import load_tokenizer

    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    return tok


# --- the pure loss ---------------------------------------------------------------------------------------

def _log_softmax(row: list[float], t: float) -> list[float]:
    z = math.log(sum(math.exp(v / t) for v in row))
    return [v / t - z for v in row]


def _hand_divergence(s: list[float], t: list[float], temperature: float, beta: float) -> float:
    ls, lt = _log_softmax(s, temperature), _log_softmax(t, temperature)
    ps, pt = [math.exp(v) for v in ls], [math.exp(v) for v in lt]
    if beta == 0.0:
        d = sum(p * (a - b) for p, a, b in zip(pt, lt, ls))
    elif beta == 1.0:
        d = sum(p * (a - b) for p, a, b in zip(ps, ls, lt))
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        d = beta * sum(p * math.log(p / q) for p, q in zip(pt, m)) + (1 - beta) * sum(p * math.log(p / q) for p, q in zip(ps, m))
    return d * temperature**2


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_token_loss_is_the_masked_next_token_mean_by_hand(beta):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7) * 2
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])  # row 1: answer then padding
    loss, tokens = token_distillation_loss(student, teacher, labels, temperature=2.0, beta=beta)
    # Position t predicts token t + 1: the counted positions are those whose next label is not -100.
    counted = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE_INDEX]
    assert counted == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)] and int(tokens) == 5
    expected = sum(_hand_divergence(student[b, t].tolist(), teacher[b, t].tolist(), 2.0, beta) for b, t in counted) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    total, _ = token_distillation_loss(student, teacher, labels, temperature=2.0, beta=beta, reduction="sum")
    assert total.item() == pytest.approx(expected * 5, rel=1e-5)


def test_prompt_and_padding_positions_never_count():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 6, 9, requires_grad=True), torch.randn(2, 6, 9)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6], [-100, -100, 1, 2, -100, -100]])
    loss, _ = token_distillation_loss(student, teacher, labels)
    changed = teacher.clone()
    changed[0, :2] = torch.randn(2, 9) * 5  # prompt positions (their next label is -100)
    changed[:, -1] = torch.randn(2, 9) * 5  # the last position predicts nothing
    changed[1, 2:] = torch.randn(4, 9) * 5  # row 1: the position predicting the answer's last token stays, the rest is padding
    changed[1, 2] = teacher[1, 2]
    assert torch.equal(token_distillation_loss(student, changed, labels)[0], loss)
    changed[0, 3] += 1.0  # an answer position does count
    assert not torch.equal(token_distillation_loss(student, changed, labels)[0], loss)
    loss.backward()
    counted = torch.zeros(2, 6, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert student.grad[~counted].abs().max() == 0 and student.grad[counted].abs().amin(-1).gt(0).all()


def test_bad_token_inputs_name_the_problem():
    labels = torch.tensor([[-100, 1, 2]])
    with pytest.raises(ValueError, match="same vocabulary size"):
        token_distillation_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), labels)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        token_distillation_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5), labels, beta=2.0)
    with pytest.raises(ValueError, match="no completion token"):
        token_distillation_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))


# --- the callback on a CausalLM --------------------------------------------------------------------------

def _fit(tokenizer, tmp_path, callbacks, batch_size=4, accumulate=1, max_epochs=1, lr=0.5, optimizer=torch.optim.SGD) -> tuple[pl.Trainer, CausalLM]:
    model = CausalLM(tiny_llama(seed=0), tokenizer=tokenizer, optimizer=lambda ps: optimizer(ps, lr=lr))
    dm = InstructionDataModule(tokenizer, train=RECORDS, val=RECORDS[:1], max_length=48, batch_size=batch_size, template="plain",
                               generate_size=0, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_callback_loss_is_the_per_token_formula_and_the_kd_term_falls(tokenizer, tmp_path):
    teacher = tiny_llama(seed=1)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    seen: list[tuple[float, float]] = []  # (returned loss, α · CE + (1 − α) · KD computed here), per step
    soft: list[float] = []

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                args = (batch["input_ids"], batch["attention_mask"])
                logits = pl_module(*args)
                ce, _ = completion_loss(logits, batch["labels"])
                kd, _ = token_distillation_loss(logits, teacher(*args).logits, batch["labels"], temperature=2.0)
            self.expected = 0.25 * ce + 0.75 * kd

        def on_before_backward(self, trainer, pl_module, loss):
            seen.append((loss.item(), self.expected.item()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            soft.append(float(trainer.callback_metrics["distill/soft"]))

    _fit(tokenizer, tmp_path, [Distillation(teacher, alpha=0.25, temperature=2.0), Check()], max_epochs=2, lr=5e-2, optimizer=torch.optim.AdamW)
    for got, expected in seen:
        assert got == pytest.approx(expected, rel=1e-4)
    assert len(soft) == 4 and soft[2] < 0.7 * soft[0] and soft[3] < 0.7 * soft[1], soft  # same batches, second epoch: learnt
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_accumulated_distillation_gives_the_gradient_of_the_whole_window(tokenizer, tmp_path):
    """The KD term is normalised like the task loss: 2 x 4 accumulated == 1 x 8, completions of uneven length."""
    weights = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        _, model = _fit(tokenizer, tmp_path, [Distillation(tiny_llama(seed=1), alpha=0.3, temperature=1.5)], batch_size, accumulate)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_teacher_with_another_vocabulary_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="teacher's vocabulary has 30000 tokens and the student's 30522.*same tokenizer"):
        _fit(tokenizer, tmp_path, [Distillation(tiny_llama(seed=1, vocab_size=30000))])


def test_hydra_distill_composes_with_the_llm_experiment(compose, tiny_llama_dir, instructions_jsonl):
    from conftest import tiny_llm_overrides
    from lightning_peft.cli.train import train

    cfg = compose(*tiny_llm_overrides(tiny_llama_dir, instructions_jsonl), "experiment=smollm2_headlines", "finetune=distill",
                  "finetune.beta=0.5", "trainer.max_steps=2", "data.val_size=4")
    assert cfg.finetune.callbacks.distillation.teacher == tiny_llama_dir  # the default teacher: the model itself (a wiring check)
    metrics = train(cfg)
    # Teacher == initial student: the KD term starts at 0 and grows as the student moves; the logged total is the mix.
    assert 0.0 < metrics["distill/soft"] < 1e-3
    assert metrics["distill/loss"] == pytest.approx(0.5 * metrics["train/loss"] + 0.5 * metrics["distill/soft"], rel=1e-5)
