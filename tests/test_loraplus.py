"""LoRA+ (``loraplus_lr_ratio``): PEFT's create_loraplus_optimizer groups, and the ratio kept by the one param-group
mechanism through a warmup scheduler, with DiscriminativeLR in either order, and through PEFTMixin."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tiny_models import llama
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import PEFT, DiscriminativeLR, LoRAConfig, PEFTMixin, create_loraplus_optimizer, inject
from lightning_peft.peft.layer import adapter_layers


def _lrs(model: nn.Module, optimizer: torch.optim.Optimizer, strip: str = "") -> dict[str, float]:
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n.replace(strip, "").replace(".adapters.default", "").replace(".default", "").replace(".weight", ""): lr[id(p)]
            for n, p in model.named_parameters() if p.requires_grad}


def test_create_loraplus_optimizer_gives_peft_groups_learning_rates():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_create

    config = dict(target_modules=["q_proj", "v_proj", "embed_tokens"])
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, **config))
    ours = inject(llama(), LoRAConfig(r=4, alpha=8, modules_to_save=None, **config))
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5)
    expected = _lrs(theirs, peft_create(theirs, torch.optim.AdamW, **kwargs), strip="base_model.model.")
    got = _lrs(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs))
    expected = {k.replace("lora_embedding_", "lora_"): v for k, v in expected.items()}
    assert got == pytest.approx(expected) and sorted(set(got.values())) == pytest.approx([1e-5, 1e-3, 1.6e-2])


BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class WarmupModule(pl.LightningModule):
    """A user's module: AdamW over trainable parameters with a linear warmup stepped every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.bert(x).last_hidden_state.mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.02)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class MixinModule(PEFTMixin, WarmupModule):
    peft_config = LoRAConfig(r=2, loraplus_lr_ratio=4.0)


def _fit(module: pl.LightningModule, callbacks: list) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(8, 40, (12, 6), generator=g), torch.arange(12) % 2), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


def _ab_rates(module: nn.Module, trainer: pl.Trainer) -> dict[str, tuple[float, float]]:
    lr = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    return {name: (lr[id(layer.adapters["default"].lora_A)], lr[id(layer.adapters["default"].lora_B)])
            for name, layer in adapter_layers(module) if "default" in layer.adapters and hasattr(layer.adapters["default"], "lora_A")}


@pytest.mark.parametrize("order", ["peft_first", "dlr_first"])
def test_ratio_holds_after_warmup_steps_with_discriminative_lr(order):
    callbacks = [PEFT(LoRAConfig(r=2, loraplus_lr_ratio=8.0), verbose=False), DiscriminativeLR(decay=0.5, verbose=False)]
    module = WarmupModule()
    trainer = _fit(module, callbacks if order == "peft_first" else callbacks[::-1])
    rates = _ab_rates(module, trainer)
    warm = 0.02 * 4 / 10  # after 3 scheduler steps of the warmup
    assert len(rates) == 4
    for name, (a, b) in rates.items():
        assert b == pytest.approx(8.0 * a)
        depth = 1 if ".layer.1." in name else 2  # DiscriminativeLR: 0.5 per group below the head
        assert a == pytest.approx(warm * 0.5**depth)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([g["initial_lr"] for g in trainer.optimizers[0].param_groups])


def test_mixin_applies_loraplus():
    module = MixinModule()
    trainer = _fit(module, [])
    rates = _ab_rates(module, trainer)
    assert rates and all(b == pytest.approx(4.0 * a) and a == pytest.approx(0.02 * 0.4) for a, b in rates.values())


def test_bad_ratio_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=0.0 is invalid: it must be a number > 0"):
        LoRAConfig(loraplus_lr_ratio=0.0)


def test_dora_pissa_and_loraplus_train_together_through_the_callback_and_only_adapters_change():
    callback = PEFT(LoRAConfig(r=2, use_dora=True, init="pissa", loraplus_lr_ratio=4.0, modules_to_save=None), verbose=False)
    module = WarmupModule()

    class Snapshot(pl.Callback):  # after injection (PiSSA changed the base), before any step
        def on_fit_start(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    snap = Snapshot()
    trainer = _fit(module, [callback, snap])
    after = module.state_dict()
    changed = {k for k, v in snap.state.items() if not torch.equal(v, after[k])}
    assert changed and all(".adapters.default." in k and not k.endswith(("_init",)) for k in changed)
    assert any(k.endswith("lora_magnitude_vector") for k in changed)
    assert all(b == pytest.approx(4.0 * a) for a, b in _ab_rates(module, trainer).values())


def test_hydra_configs_reach_the_lora_options(compose):
    from hydra.utils import instantiate

    dora, plus, pissa = (instantiate(compose(f"peft={name}").peft).config for name in ("dora", "lora_plus", "pissa"))
    assert dora.use_dora and plus.loraplus_lr_ratio == 16 and pissa.init == "pissa"
    assert instantiate(compose("peft=pissa", "peft.init=olora").peft).config.init == "olora"


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resumed_loraplus_dora_run_ends_like_the_uninterrupted_one(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = WarmupModule()
        callbacks = [PEFT(LoRAConfig(r=2, use_dora=True, loraplus_lr_ratio=4.0), verbose=False), DiscriminativeLR(decay=0.5, verbose=False)]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1))
        g = torch.Generator().manual_seed(0)
        data = DataLoader(TensorDataset(torch.randint(8, 40, (8, 6), generator=g), torch.arange(8) % 2), batch_size=4)
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, callbacks=callbacks, logger=False, enable_checkpointing=ckpt_path is None,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        names = {id(p): n for n, p in module.named_parameters()}
        groups = [{k: (tuple(names[id(p)] for p in v) if k == "params" else v) for k, v in g.items()} for g in trainer.optimizers[0].param_groups]
        return groups, {k: v.clone() for k, v in module.state_dict().items()}

    groups_a, state_a = run()
    groups_b, state_b = run(tmp_path / "step=2.ckpt")
    assert groups_a == groups_b and any("loraplus_B" in g["name"] for g in groups_a)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)
