"""Distillation: the loss is the formula (checked by hand), the teacher stays frozen, in eval mode and out
of the student's checkpoint, hidden-state projections train and resume, PEFT-style students work."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from helpers import VisionClassifier, fit, image_loader
from torch import nn

from lightning_peft import (
    Distillation,
    TextClassificationDataModule,
    TextClassifier,
    distillation_loss,
    hidden_state_loss,
    load_teacher,
    soft_target_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")


# --- the pure loss -----------------------------------------------------------------------------------

def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_distillation_loss_matches_the_formula_on_hand_made_logits():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    labels = [1, 2]
    alpha, t = 0.3, 2.0
    ce = -sum(math.log(_softmax(s, 1.0)[y]) for s, y in zip(student, labels)) / 2
    kl = sum(
        sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(_softmax(tr, t), _softmax(sr, t)))
        for sr, tr in zip(student, teacher)
    ) / 2
    expected = alpha * ce + (1 - alpha) * t * t * kl

    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha=alpha, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), 1.0, t).item() == pytest.approx(ce, rel=1e-6)
    same = torch.tensor(student)
    assert soft_target_loss(same, same.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_term_gradient_is_t_times_the_softened_probability_gap():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    t = 4.0
    soft_target_loss(student, teacher, t).backward()
    expected = t * (torch.softmax(student.detach() / t, -1) - torch.softmax(teacher.detach() / t, -1)) / 2
    torch.testing.assert_close(student.grad, expected)
    assert teacher.grad is None  # the teacher's logits are constants


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"teacher_logits": torch.zeros(2, 4)}, "differ in shape.*num_labels"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    args = {"student_logits": torch.zeros(2, 3), "teacher_logits": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        distillation_loss(**args)


# --- the callback on an unchanged TextClassifier --------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A complete (if untrained) 2-class BERT classifier of another width (48) than the student (32)."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(7)
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def data(tmp_path, tiny_bert_dir) -> TextClassificationDataModule:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"review {i} was {'good' if i % 2 else 'bad'}{' very' * (i % 5)},{i % 2}\n" for i in range(24)))
    return TextClassificationDataModule("table", tokenizer=tiny_bert_dir, max_length=16, batch_size=4, dataset_kwargs={"path": str(path)})


class Spy(pl.Callback):
    """Records, per training step: the loss, the student's and teacher's logits, the labels, the teacher's mode."""

    def __init__(self, teacher_of) -> None:
        self.teacher_of = teacher_of
        self.steps: list[dict] = []
        self.current: dict = {}

    def on_fit_start(self, trainer, pl_module):
        pl_module.register_forward_hook(lambda m, a, o: self.current.__setitem__("student", o.detach()))
        teacher = self.teacher_of()
        teacher.register_forward_hook(lambda m, a, o: self.current.update(teacher=o.logits.detach(), teacher_training=m.training))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({**self.current, "loss": outputs["loss"].detach(), "labels": batch["labels"]})
        self.current = {}


def _trainer(callbacks, steps=2, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )


def test_callback_loss_is_the_formula_and_the_teacher_stays_frozen_and_out_of_the_checkpoint(tiny_bert_dir, teacher_dir, data, tmp_path):
    torch.manual_seed(0)
    student = TextClassifier(tiny_bert_dir, num_classes=2)
    distill = Distillation(teacher_dir, alpha=0.3, temperature=2.5)  # loaded by path; num_labels from the student
    spy = Spy(lambda: distill.teacher)
    trainer = _trainer([distill, spy], steps=3)
    trainer.fit(student, datamodule=data)
    teacher = distill.teacher
    before = {k: v.clone() for k, v in type(teacher).from_pretrained(teacher_dir).state_dict().items()}

    assert len(spy.steps) == 3
    for step in spy.steps:
        expected = distillation_loss(step["student"], step["teacher"], step["labels"], alpha=0.3, temperature=2.5)
        torch.testing.assert_close(step["loss"], expected)
        assert step["teacher_training"] is False
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device == student.device and next(teacher.parameters()).dtype == torch.float32
    assert "training_step" not in student.__dict__  # the module's own step is back after fit

    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(student.state_dict())
    saved = [t for t in _tensors(checkpoint)]
    teacher_only = teacher.classifier.weight.detach()  # no student tensor has these values
    assert not any(t.shape == teacher_only.shape and torch.equal(t, teacher_only) for t in saved)
    assert not any(t.shape == teacher.bert.embeddings.word_embeddings.weight.shape for t in saved)  # width 48: teacher-only

    reloaded = load_teacher(path)  # a TextClassifier checkpoint can teach the next student
    assert isinstance(reloaded, TextClassifier)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in reloaded.state_dict().items())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_teacher_inside_the_student_is_refused_and_leaked_tensors_are_dropped_on_save(tiny_bert_dir, data):
    student = TextClassifier(tiny_bert_dir, num_classes=2)
    with pytest.raises(ValueError, match="teacher is a submodule of the student"):
        _trainer([Distillation(student.backbone)]).fit(student, datamodule=data)

    teacher = nn.Linear(3, 2)
    distill = Distillation(teacher)
    checkpoint = {"state_dict": {"head.weight": torch.zeros(2, 3), "aux.weight": teacher.weight.detach()}}
    with pytest.warns(UserWarning, match="dropped 1 teacher tensors"):
        distill.on_save_checkpoint(None, None, checkpoint)
    assert list(checkpoint["state_dict"]) == ["head.weight"]


class LoRALinear(nn.Module):
    """A minimal PEFT-style wrapper: frozen base layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


class GradProbe(pl.Callback):
    def __init__(self, teacher_of) -> None:
        self.teacher_of = teacher_of
        self.with_grad: set[str] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.with_grad = {n for n, p in pl_module.named_parameters() if p.grad is not None}
        assert all(p.grad is None for p in self.teacher_of().parameters())


def test_peft_student_only_its_trainable_parameters_get_gradients(tiny_bert_dir, teacher_dir, data):
    torch.manual_seed(0)
    student = TextClassifier(tiny_bert_dir, num_classes=2)
    attention = student.backbone.encoder.layer[0].attention.self
    attention.query = LoRALinear(attention.query)
    student.backbone.requires_grad_(False)
    attention.query.a.requires_grad_(True)
    attention.query.b.requires_grad_(True)
    distill = Distillation(teacher_dir, alpha=0.5)
    probe = GradProbe(lambda: distill.teacher)
    _trainer([distill, probe], steps=1).fit(student, datamodule=data)
    lora = {"backbone.encoder.layer.0.attention.self.query.a", "backbone.encoder.layer.0.attention.self.query.b"}
    assert probe.with_grad == lora | {"head.1.weight", "head.1.bias"}


class Record(pl.Callback):
    def __init__(self, distill: Distillation) -> None:
        self.distill = distill
        self.at_fit_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):  # after the checkpoint's callback states are restored
        self.at_fit_start = {k: v.clone() for k, v in self.distill.projections.state_dict().items()}


class HiddenSpy(pl.Callback):
    """Per step, before backward: the hidden term recomputed from the layers' outputs and the step's projection, and
    whether the gradient the loss sends into the student's layer output is the formula's (task + soft + weighted hidden)."""

    def __init__(self, distill: Distillation, student_layer: str, teacher_layer: str) -> None:
        self.distill, self.layers = distill, (student_layer, teacher_layer)
        self.current: dict = {}
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        def keep(key, value):
            self.current[key] = value

        pl_module.register_forward_hook(lambda m, a, k, o: self.current.update(logits=o, mask=k.get("attention_mask")), with_kwargs=True)
        pl_module.get_submodule(self.layers[0]).register_forward_hook(lambda m, a, o: keep("student", o[0] if isinstance(o, tuple) else o))
        self.distill.teacher.register_forward_hook(lambda m, a, o: keep("teacher_logits", o.logits))
        teacher_layer = self.distill.teacher.get_submodule(self.layers[1])
        teacher_layer.register_forward_hook(lambda m, a, o: keep("teacher", o[0] if isinstance(o, tuple) else o))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current.clear()
        self.current["labels"] = batch["labels"]

    def on_before_backward(self, trainer, pl_module, loss):
        c, d = self.current, self.distill
        hidden = hidden_state_loss(d.projections["p0"](c["student"]), c["teacher"], c["mask"])
        formula = distillation_loss(c["logits"], c["teacher_logits"], c["labels"], d.alpha, d.temperature) + d.hidden_weight * hidden
        (got,) = torch.autograd.grad(loss, c["student"], retain_graph=True)
        (expected,) = torch.autograd.grad(formula, c["student"], retain_graph=True)
        self.steps.append({"hidden": hidden.detach(), "loss": loss.detach(), "formula": formula.detach(), "grad": got, "expected_grad": expected})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["logged"] = trainer.callback_metrics["distill/hidden"].clone()


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_hidden_state_matching_learns_a_projection_that_is_saved_and_restored(tiny_bert_dir, teacher_dir, data, tmp_path):
    pairs = [("backbone.encoder.layer.1", "bert.encoder.layer.1")]  # widths 32 -> 48
    torch.manual_seed(0)
    student = TextClassifier(tiny_bert_dir, num_classes=2)
    distill = Distillation(teacher_dir, hidden=pairs, hidden_weight=10.0)
    record = Record(distill)
    spy = HiddenSpy(distill, "backbone.encoder.layer.1", "bert.encoder.layer.1")
    trainer = _trainer([distill, record, spy], steps=3)
    trainer.fit(student, datamodule=data)
    projection = distill.projections["p0"]
    assert len(spy.steps) == 3
    for step in spy.steps:  # the logged term is the MSE of the projected student layer, and it trains the student
        torch.testing.assert_close(step["logged"], step["hidden"])
        torch.testing.assert_close(step["loss"], step["formula"])
        torch.testing.assert_close(step["grad"], step["expected_grad"])
        assert step["hidden"] > 0 and step["grad"].abs().sum() > 0
    assert (projection.in_features, projection.out_features) == (32, 48)
    assert not torch.equal(projection.weight, record.at_fit_start["p0.weight"])  # it trained
    assert "distill/hidden" in trainer.callback_metrics
    (group,) = [g for g in trainer.optimizers[0].param_groups if g.get("name") == "distillation_projection"]
    assert {id(p) for p in group["params"]} == {id(p) for p in projection.parameters()}
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    torch.manual_seed(123)  # a fresh projection would start elsewhere
    resumed = Distillation(teacher_dir, hidden=pairs, hidden_weight=10.0)
    record = Record(resumed)
    _trainer([resumed, record], steps=4).fit(TextClassifier(tiny_bert_dir, num_classes=2), datamodule=data, ckpt_path=path)
    torch.testing.assert_close(record.at_fit_start["p0.weight"], projection.weight.detach())
    assert not any(k.startswith("bert.") or "projection" in k for k in torch.load(path, weights_only=False)["state_dict"])

    with pytest.raises(ValueError, match="set projection=True"):
        _trainer([Distillation(teacher_dir, hidden=pairs, projection=False)]).fit(TextClassifier(tiny_bert_dir, num_classes=2), datamodule=data)


def test_module_calling_a_submodule_needs_student_name():
    def modules():
        torch.manual_seed(0)
        return VisionClassifier(torchvision.models.resnet18(num_classes=3)), torchvision.models.resnet18(num_classes=3)

    student, teacher = modules()
    with pytest.raises(RuntimeError, match="ran 0 times in training_step.*student='net'"):
        fit(student, image_loader(), [Distillation(teacher)], steps=1)
    student, teacher = modules()
    fit(student, image_loader(), [Distillation(teacher, student="net", alpha=0.5)], steps=2)
    assert len(student.losses) == 2  # the module's own losses; the callback returned the distillation loss


def test_hydra_distill_choice_trains(compose, tiny_bert_dir):
    from conftest import tiny_overrides
    from lightning_peft.cli.train import train

    hidden = "finetune.hidden=[[backbone.encoder.layer.1,bert.encoder.layer.1]]"
    cfg = compose("finetune=distill", *tiny_overrides(tiny_bert_dir), hidden, "finetune.temperature=3")
    with pytest.warns(UserWarning, match="randomly initialised.*HINT"):  # the default teacher has an untrained head
        metrics = train(cfg)
    assert metrics["distill/soft"] >= 0.0 and "distill/hidden" in metrics
