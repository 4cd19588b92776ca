"""The PEFT callback and PEFTMixin on unchanged user modules: what trains, adapter-only checkpoints, resume,
the gradient-checkpointing trap, and composition with the layer-group callbacks."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import frozen_base
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import (
    PEFT,
    BitFitConfig,
    DiscriminativeLR,
    GradualUnfreezing,
    IA3Config,
    LoRAConfig,
    PEFTMixin,
    QLoRAConfig,
    inject,
    list_adapters,
    load_adapter,
)
from lightning_peft.peft import AdapterLayer

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class UserModule(pl.LightningModule):
    """A user's classifier (knows nothing of lightning_peft): optimizer over all parameters, a warm-up scheduler."""

    def __init__(self, seed: int = 0, trainable_only: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
        self.head = nn.Linear(16, 2)
        self.trainable_only = trainable_only
        self.losses: list[float] = []

    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.trainable_only else self.parameters()
        opt = torch.optim.AdamW(params, lr=0.02)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=4), "interval": "step"}}


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    """Label 1 when token 7 occurs: learnable by attention adapters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 40, (n, 6), generator=g)
    y = torch.arange(n) % 2
    x[y == 1, 2] = 7
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("trainable_only", [False, True])
def test_only_the_adapter_trains_and_the_loss_falls(trainable_only):
    model = UserModule(trainable_only=trainable_only)
    base = snapshot(model)
    trainer([PEFT(LoRAConfig(r=4, target_modules=["query", "value"]))], max_epochs=8).fit(model, loader())
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    for key, value in base.items():
        if key.startswith("bert."):
            assert torch.equal(after[key], value), f"frozen base weight {key} changed"
    assert not torch.equal(model.head.adapters["default"].weight, base["head.weight"])  # the head copy trained
    lora_b = model.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_B
    assert lora_b.abs().sum() > 0
    assert sum(model.losses[-4:]) < 0.7 * sum(model.losses[:4])


def test_frozen_base_gets_no_optimizer_state():
    model = UserModule(trainable_only=False)
    t = trainer([PEFT(LoRAConfig(r=4))], max_steps=2)
    t.fit(model, loader())
    state = {id(p) for p in t.optimizers[0].state}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert state == trainable


@pytest.mark.parametrize("config", [IA3Config(), BitFitConfig()], ids=["ia3", "bitfit"])
def test_other_methods_train_through_the_callback(config):
    model = UserModule()
    trainer([PEFT(config)], max_epochs=8).fit(model, loader())
    assert list_adapters(model) == ["default"]
    assert sum(model.losses[-4:]) < 0.8 * sum(model.losses[:4])


# --- adapter-only checkpoints ----------------------------------------------------------------------

def test_adapter_only_checkpoint_is_small_and_resume_continues_exactly(tmp_path):
    def run(steps, ckpt_path=None, seed=0):
        model = UserModule(seed=seed)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        t = trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True), ckpt], max_steps=steps, max_epochs=-1)
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model

    full = run(8)
    files = sorted((tmp_path / "ckpt").glob("step=*.ckpt"))
    mid = tmp_path / "ckpt" / "step=4.ckpt"
    state = torch.load(mid, weights_only=False)["state_dict"]
    assert not any(k.startswith("bert.embeddings.") and "adapters" not in k for k in state if k.endswith("weight"))
    frozen_numel = sum(p.numel() for p in full.parameters() if not p.requires_grad)
    saved_numel = sum(v.numel() for v in state.values())
    assert saved_numel < 0.25 * frozen_numel and len(files) == 8
    # resume from step 4 with a model whose base was built the same way: losses 5..8 equal the uninterrupted run's
    resumed = UserModule(seed=0)
    t = trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True)], max_steps=8, max_epochs=-1)
    t.fit(resumed, loader(), ckpt_path=mid)
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_adapter_only_checkpoint_validates_and_refuses_another_base(tmp_path):
    model = UserModule()
    t = trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True)], max_steps=6)
    t.fit(model, loader())
    path = tmp_path / "adapter-only.ckpt"
    t.save_checkpoint(path)
    expected = t.validate(model, loader(), verbose=False)[0]["val_loss"]
    fresh = UserModule(seed=0)  # same pretrained base, no adapter yet: the callback injects, the checkpoint fills it
    got = trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True)]).validate(fresh, loader(), ckpt_path=path, verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6)
    other_base = UserModule(seed=1)
    with pytest.raises(ValueError, match="trained on other base weights"):
        trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True)]).validate(other_base, loader(), ckpt_path=path, verbose=False)


def test_load_adapter_reads_a_lightning_checkpoint_and_save_dir_writes_both_layouts(tmp_path):
    model = UserModule()
    t = trainer([PEFT(LoRAConfig(r=4), adapter_only_checkpoint=True, save_dir=tmp_path / "adapter", export_peft=True)], max_steps=4)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "last.ckpt")
    x = loader().dataset.tensors[0][:5]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for source in (tmp_path / "last.ckpt", tmp_path / "adapter"):
        fresh = UserModule().eval()
        load_adapter(fresh, source)
        with torch.no_grad():
            assert torch.equal(fresh(x), expected), source
    assert (tmp_path / "adapter" / "peft" / "adapter_config.json").exists()


# --- the gradient-checkpointing trap --------------------------------------------------------------

class CheckpointedModule(UserModule):
    """A user module that checkpoints its encoder layers re-entrantly (torch.utils.checkpoint)."""

    def forward(self, x):
        h = self.bert.embeddings(x)
        for layer in self.bert.encoder.layer:
            h = checkpoint(lambda t, layer=layer: layer(t)[0] if isinstance(layer(t), tuple) else layer(t), h, use_reentrant=True)
        return self.head(h.mean(1))


def test_reentrant_checkpointing_without_input_grads_fails_loudly():
    # the head trains, so the loss has a gradient: the checkpointed adapters would stay untrained silently
    with pytest.raises(RuntimeError, match=r"ran in the forward pass only without gradient tracking .*use_reentrant=False"):
        trainer([PEFT(LoRAConfig(r=4))], max_steps=1).fit(CheckpointedModule(), loader())
    # nothing but those adapters trains: the loss itself has no gradient
    with pytest.raises(RuntimeError, match="does not depend on any trainable parameter"):
        trainer([PEFT(LoRAConfig(r=4, modules_to_save=None))], max_steps=1).fit(CheckpointedModule(), loader())


def test_transformers_checkpointing_trains_adapters_thanks_to_the_input_grad_hook():
    model = UserModule()
    model.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.bert.disable_input_require_grads()  # as in older transformers, or after a user turned it off
    t = trainer([PEFT(LoRAConfig(r=4, modules_to_save=None))], max_steps=2)
    t.fit(model, loader())
    lora_b = model.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_B
    assert lora_b.abs().sum() > 0  # trained: gradients reached the checkpointed layers
    # control: without our hook the same setup leaves the adapters without gradients
    control = UserModule()
    control.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    control.bert.disable_input_require_grads()
    inject(control, LoRAConfig(r=4))  # the head copy trains, so the loss has a gradient
    control.bert._lightning_peft_grad_hook.remove()
    x, y = next(iter(loader()))
    control.train()
    F.cross_entropy(control(x), y).backward()
    assert all(p.grad is None for n, p in control.named_parameters() if "lora_" in n)


def test_unused_adapter_parameters_are_reported():
    class UsesLayer0Only(UserModule):
        def forward(self, x):
            h = self.bert.embeddings(x)
            out = self.bert.encoder.layer[0](h)
            return self.head((out[0] if isinstance(out, tuple) else out).mean(1))

    with pytest.warns(UserWarning, match=r"got no gradient .*encoder\.layer\.1\..*HINT"):
        trainer([PEFT(LoRAConfig(r=4))], max_steps=1).fit(UsesLayer0Only(), loader())


# --- mixin, configure_model, composition --------------------------------------------------------

class MixinModule(PEFTMixin, UserModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.peft_config = {"method": "lora", "r": 4, "target_modules": ["query", "value"]}  # e.g. from Hydra
        self.peft_adapter_only_checkpoint = True


def test_mixin_injects_in_configure_model_and_checkpoints_the_adapter_only(tmp_path):
    model = MixinModule()
    t = trainer([], max_epochs=8)
    t.fit(model, loader())
    assert list_adapters(model) == ["default"]
    assert sum(model.losses[-4:]) < 0.7 * sum(model.losses[:4])
    t.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert "bert.embeddings.word_embeddings.weight" not in state
    expected = t.validate(model, loader(), verbose=False)[0]["val_loss"]
    got = trainer([]).validate(MixinModule(), loader(), ckpt_path=tmp_path / "m.ckpt", verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6)


def test_module_that_builds_its_model_in_configure_model():
    class Lazy(UserModule):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.trainable_only, self.losses, self.bert = True, [], None

        def configure_model(self):
            if self.bert is None:
                torch.manual_seed(0)
                self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
                self.head = nn.Linear(16, 2)

    model = Lazy()
    trainer([PEFT(LoRAConfig(r=4))], max_epochs=3).fit(model, loader())
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, AdapterLayer)
    assert model.losses[-1] < model.losses[0]


def test_gradual_unfreezing_of_lora_adapters_and_discriminative_rates():
    model = UserModule(trainable_only=True)
    masks = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            masks.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    # the PEFT callback listed last: the layer-group callbacks still see the adapters
    t = trainer([GradualUnfreezing(every_n_epochs=1), DiscriminativeLR(decay=0.5), Probe(), PEFT(LoRAConfig(r=4))], max_epochs=3)
    t.fit(model, loader())
    assert all(".adapters." in n for mask in masks for n in mask)  # the base never trains
    assert masks[0] == {n for n in masks[0] if n.startswith("head.")}
    assert any("layer.1." in n for n in masks[1]) and not any("layer.0." in n for n in masks[1])
    assert any("layer.0." in n for n in masks[2])
    rates = {g["layer_group"]: g["lr"] for g in t.optimizers[0].param_groups}
    assert rates["bert.encoder.layer.0"] == pytest.approx(rates["head"] * 0.25)
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if ".adapters." in n}  # no frozen base weight adopted


NO_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")


@pytest.mark.parametrize("config", [LoRAConfig(r=4), pytest.param(QLoRAConfig(r=4), marks=NO_BNB), IA3Config(), BitFitConfig()],
                         ids=["lora", "qlora", "ia3", "bitfit"])
def test_bf16_mixed_precision_trains_fp32_adapters_on_a_frozen_base(config):
    model = UserModule()
    base = {}

    class Snapshot(pl.Callback):  # after injection: a QLoRA base exists only once quantized
        def on_train_start(self, trainer, pl_module):
            base.update({k: v for k, v in frozen_base(pl_module).items() if k.startswith("bert.")})

    trainer([PEFT(config), Snapshot()], max_steps=4, precision="bf16-mixed").fit(model, loader())
    assert all(torch.isfinite(torch.tensor(model.losses)))
    after = frozen_base(model)
    if isinstance(config, QLoRAConfig):  # every quantized layer's packed storage and double-quantisation state compared
        assert sum(k.endswith(":state2.absmax") for k in base) == 12
    changed = [k for k, v in base.items() if not torch.equal(after[k], v)]
    assert base and not changed, f"frozen base tensors changed: {changed}"
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    moved = [n for n, p in model.named_parameters()
             if n.startswith("bert.") and ".adapters." in n and "lora_A" not in n and not torch.equal(p, torch.zeros_like(p)) and not torch.equal(p, torch.ones_like(p))]
    assert moved, "no adapter tensor of the encoder moved from its initial value"
