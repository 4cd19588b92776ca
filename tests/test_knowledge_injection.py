"""Knowledge injection: fused models start equal to the unfused ones, the features reach the model in every
loop, the right weights train under FreezeBackbone and PEFT, FeatureCache keys include the features, and
bad input fails naming the problem."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft import (
    PEFT,
    FeatureCache,
    FreezeBackbone,
    KnowledgeConfig,
    KnowledgeInjection,
    LoRAConfig,
    TextClassificationDataModule,
    TextClassifier,
)
from lightning_peft.features.pooling import pool
from lightning_peft.features.store import sample_keys
from lightning_peft.knowledge import FusedLinear, attach_knowledge

pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode", "ignore:.*does not have many workers")

DIM = 4


class UserClassifier(pl.LightningModule):
    """A user's module: a transformers encoder, mean pooling, a linear head; it knows nothing of external features."""

    def __init__(self, path: str, classes: int = 3) -> None:
        super().__init__()
        from transformers import BertModel

        self.encoder = BertModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(self.encoder.config.hidden_size, classes))
        self.seen: dict[str, list[torch.Tensor]] = {"val": [], "test": []}

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool(hidden, attention_mask, "mean"))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(self(batch["input_ids"], batch["attention_mask"]))

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(self(batch["input_ids"], batch["attention_mask"]))

    def predict_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch["attention_mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)  # all parameters: frozen ones must stay untouched anyway


def _batches(n: int = 3, size: int = 4, dim: int = DIM, key: str = "features") -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 2000, (size, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (size,), generator=g),
                    key: torch.randn(size, dim, generator=g)})
    return out


def _loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: {k: v.clone() for k, v in b.items()})


def _trainer(callbacks, steps: int = 3, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _reference_logits(module: UserClassifier, batch: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Late fusion written out: Linear(H + F) over cat(mean-pooled encoder output, features)."""
    hidden = module.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return F.linear(torch.cat([pool(hidden, batch["attention_mask"], "mean"), batch["features"]], -1), weight, bias)


# --- step 0 equals the unfused model ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["late", "early"])
def test_fusion_starts_equal_to_the_unfused_model(tiny_bert_dir, mode):
    torch.manual_seed(0)
    plain = UserClassifier(tiny_bert_dir).eval()
    fused = UserClassifier(tiny_bert_dir).eval()
    fused.load_state_dict(plain.state_dict())
    slot = attach_knowledge(fused, KnowledgeConfig(mode, DIM))
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = plain(batch["input_ids"], batch["attention_mask"])
        with slot.holding(batch["features"] * 100):
            got = fused(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, expected)


def test_ready_text_classifier_early_fusion_starts_equal_then_trains(tiny_bert_dir):
    torch.manual_seed(0)
    plain = TextClassifier(tiny_bert_dir, 3, dropout=0.0).eval()
    torch.manual_seed(0)
    fused = TextClassifier(tiny_bert_dir, 3, dropout=0.0, knowledge=KnowledgeConfig("early", DIM)).eval()
    assert fused.hparams["knowledge"] == {"mode": "early", "dim": DIM, "key": "features"}
    batch = _batches(1)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(fused(**inputs, features=batch["features"]), plain(**inputs))
    trainer = _trainer([], steps=2)
    trainer.fit(fused.train(), _loader(_batches(2)))
    assert fused.knowledge_projection.proj.weight.abs().sum() > 0  # the projection trains from zero
    with torch.no_grad():
        a = fused.eval()(**inputs, features=batch["features"])
        b = fused(**inputs, features=torch.zeros_like(batch["features"]))
    assert not torch.allclose(a, b)  # and the features now change the output


# --- late fusion: head widened, only it trains under FreezeBackbone -----------------------------------------


def test_late_fusion_under_freeze_backbone_trains_only_the_widened_head(tiny_bert_dir):
    torch.manual_seed(0)
    module = UserClassifier(tiny_bert_dir)
    head_before = module.head[1].weight.detach().clone()
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    injection = KnowledgeInjection("late", dim=DIM)
    trainer = _trainer([FreezeBackbone(verbose=False), injection])  # order does not matter
    trainer.fit(module, _loader(_batches()))
    linear = module.head[1]
    assert isinstance(linear, FusedLinear) and linear.weight.shape == (3, 32 + DIM)
    assert all(torch.equal(v, encoder_before[k]) for k, v in module.encoder.state_dict().items())
    assert not torch.equal(linear.weight[:, :32], head_before)
    assert linear.weight[:, 32:].abs().sum() > 0  # the new columns trained from zero
    # the trained model is exactly Linear(H + F) over cat(pooled, features)
    batch = _batches(1)[0]
    predictions = trainer.predict(module, _loader([batch]))
    with torch.no_grad():
        expected = _reference_logits(module, batch, linear.weight, linear.bias)
    torch.testing.assert_close(predictions[0], expected)


def test_features_reach_the_model_in_validation_and_test(tiny_bert_dir):
    torch.manual_seed(0)
    module = UserClassifier(tiny_bert_dir)
    batches = _batches(2)
    trainer = _trainer([KnowledgeInjection("late", dim=DIM)], steps=1, limit_val_batches=2)
    trainer.fit(module, _loader(batches), _loader(batches))
    with torch.no_grad():
        module.head[1].weight[:, 32:] = 1.0  # make the features matter
    module.seen = {"val": [], "test": []}
    trainer.validate(module, _loader(batches), verbose=False)
    trainer.test(module, _loader(batches), verbose=False)
    with torch.no_grad():
        expected = [_reference_logits(module, b, module.head[1].weight, module.head[1].bias) for b in batches]
    for stage in ("val", "test"):
        for got, want in zip(module.seen[stage], expected, strict=True):
            torch.testing.assert_close(got, want)


def test_late_fusion_composes_with_lora(tiny_bert_dir):
    torch.manual_seed(0)
    module = UserClassifier(tiny_bert_dir)
    base_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    peft = PEFT(LoRAConfig(r=2, target_modules=["query", "value"]), verbose=False)
    trainer = _trainer([peft, KnowledgeInjection("late", dim=DIM)])  # PEFT first: the head is still widened before it is copied
    trainer.fit(module, _loader(_batches()))
    state = module.state_dict()
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n in trained) and any(n.startswith("head") for n in trained)
    assert all(torch.equal(state[f"encoder.{k}"], v) for k, v in base_before.items() if f"encoder.{k}" in state)
    fused = [m for m in module.head.modules() if isinstance(m, FusedLinear) and m.weight.requires_grad]
    assert fused and fused[0].weight.shape == (3, 32 + DIM) and fused[0].weight[:, 32:].abs().sum() > 0


# --- FeatureCache keys include the features ----------------------------------------------------------------


def test_sample_keys_change_with_the_extra_features():
    ids = torch.arange(12).reshape(3, 4)
    features = torch.randn(3, DIM)
    base = sample_keys((ids,), {}, extra={"knowledge": features})
    changed = features.clone()
    changed[1, 0] += 1.0
    keys = sample_keys((ids,), {}, extra={"knowledge": changed})
    assert keys[0] == base[0] and keys[2] == base[2] and keys[1] != base[1]
    assert sample_keys((ids,), {}) != base


def _write_vectors(path, vectors: list[list[float]]) -> str:
    rows = [{"text": f"article {i} about {'sport' if i % 2 else 'money'}", "label": "a" if i % 2 else "b", "vec": v}
            for i, v in enumerate(vectors)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("ready", [False, True], ids=["callback", "text_classifier"])
def test_feature_cache_is_keyed_by_the_external_features(tmp_path, tiny_bert_dir, ready):
    vectors = [[float(i), 1.0, -1.0, 0.5] for i in range(12)]

    def run(vectors) -> FeatureCache:
        data = TextClassificationDataModule("table", tiny_bert_dir, batch_size=4, val_fraction=0.25, features="vec",
                                            dataset_kwargs={"path": _write_vectors(tmp_path / "docs.jsonl", vectors)})
        torch.manual_seed(0)
        if ready:
            model, callbacks = TextClassifier(tiny_bert_dir, 2, knowledge={"mode": "late", "dim": DIM}), []
        else:
            model, callbacks = UserClassifier(tiny_bert_dir, 2), [KnowledgeInjection("late", dim=DIM)]
        cache = FeatureCache(cache_dir=tmp_path / "cache")
        _trainer([*callbacks, cache], steps=-1, max_epochs=2, limit_val_batches=0).fit(model, data)
        return cache

    first = run(vectors)
    assert first.stats.computed_examples == 8 and first.stats.cached_calls == 1  # 8 training examples; epoch 2: verify, then cached
    again = run(vectors)
    assert again.stats.loaded == 8 and again.stats.computed_examples == 0
    edited = [[*v[:3], v[3] + 1.0] if i % 3 == 0 else v for i, v in enumerate(vectors)]
    changed = run(edited)
    assert 0 < changed.stats.computed_examples < 8  # the examples with new vectors were recomputed, the others not


# --- data: a column of vectors, or a callable ---------------------------------------------------------------


def test_table_feature_column_and_callable_become_batched_features(tmp_path, tiny_bert_dir):
    vectors = [[float(i), 0.0, 1.0, 2.0] for i in range(8)]
    path = _write_vectors(tmp_path / "docs.jsonl", vectors)
    data = TextClassificationDataModule("table", tiny_bert_dir, batch_size=8, val_fraction=0.25, features="vec",
                                        features_key="kg", dataset_kwargs={"path": path})
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch["kg"].dtype == torch.float32 and batch["kg"].shape == (2, DIM)
    texts = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    assert [int(row[0]) for row in batch["kg"]] == [int(t.split()[1]) for t in texts]  # each row its own example's vector
    computed = TextClassificationDataModule("table", tiny_bert_dir, batch_size=8, val_fraction=0.25,
                                            features=lambda text: [len(text), 1.0], dataset_kwargs={"path": path})
    computed.setup()
    batch = next(iter(computed.val_dataloader()))
    assert batch["features"].shape == (2, 2) and batch["features"][0, 0] == len(texts[0])


def test_missing_feature_column_names_the_columns(tmp_path, tiny_bert_dir):
    path = _write_vectors(tmp_path / "docs.jsonl", [[1.0]] * 4)
    data = TextClassificationDataModule("table", tiny_bert_dir, features="embedding", dataset_kwargs={"path": path})
    with pytest.raises(KeyError, match=r"'embedding' not in .*columns there: \['label', 'text', 'vec'\]"):
        data.setup()


def test_feature_vectors_of_different_lengths_name_the_row(tmp_path, tiny_bert_dir):
    path = _write_vectors(tmp_path / "docs.jsonl", [[1.0, 2.0], [1.0, 2.0], [3.0], [1.0, 2.0]])
    data = TextClassificationDataModule("table", tiny_bert_dir, features="vec", dataset_kwargs={"path": path})
    with pytest.raises(ValueError, match=r"docs.jsonl line 3: feature vector of length 1, but the first example's has 2"):
        data.setup()


# --- bad input -------------------------------------------------------------------------------------------


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"knowledge mode 'middle' is not one of \('late', 'early'\)"):
        KnowledgeInjection("middle", dim=DIM)
    with pytest.raises(ValueError, match="knowledge dim must be a positive integer"):
        KnowledgeConfig("late", 0)
    with pytest.raises(ValueError, match=r"unknown knowledge options \['size'\]"):
        from lightning_peft.knowledge import as_knowledge_config

        as_knowledge_config({"mode": "late", "size": 3})


def test_feature_dimension_mismatch_is_named(tiny_bert_dir):
    module = UserClassifier(tiny_bert_dir)
    batches = _batches(dim=DIM + 1)
    with pytest.raises(ValueError, match=r"shape \(4, 5\), expected \(B, 4\): feature dimension mismatch"):
        _trainer([KnowledgeInjection("late", dim=DIM)]).fit(module, _loader(batches))


def test_batch_without_the_features_key_names_it(tiny_bert_dir):
    module = UserClassifier(tiny_bert_dir)
    with pytest.raises(KeyError, match=r"the batch has no 'kg' entry \(keys: \['attention_mask', 'features', 'input_ids', 'labels'\]\)"):
        _trainer([KnowledgeInjection("early", dim=DIM, key="kg")]).fit(module, _loader(_batches()))


def test_early_fusion_without_token_embeddings_says_to_use_late():
    module = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="early knowledge fusion adds to the input token embeddings.*Use mode='late'"):
        attach_knowledge(module, KnowledgeConfig("early", DIM))


# --- the ready classifiers, the callback on them, and the Hydra entry point ---------------------------------


def test_early_fusion_callback_on_text_classifier_under_freeze_backbone(tiny_bert_dir):
    """TextClassifier passes every batch key to forward: the callback must have taken the features out."""
    torch.manual_seed(0)
    model = TextClassifier(tiny_bert_dir, 3, dropout=0.0)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _trainer([KnowledgeInjection("early", dim=DIM), FreezeBackbone(verbose=False)]).fit(model, _loader(_batches()))
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())
    assert model.knowledge_projection.proj.weight.abs().sum() > 0 and model.head[1].weight.requires_grad


def test_image_classifier_late_fusion_starts_equal_to_the_unfused_model():
    from lightning_peft import ImageClassifier

    torch.manual_seed(0)
    plain = ImageClassifier("resnet18", 3, pretrained=False, dropout=0.0).eval()
    torch.manual_seed(0)
    fused = ImageClassifier("resnet18", 3, pretrained=False, dropout=0.0, knowledge={"mode": "late", "dim": DIM}).eval()
    assert fused.backbone.fc.weight.shape == (3, 512 + DIM)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x, features=torch.randn(2, DIM)), plain(x))
    with pytest.raises(ValueError, match="early knowledge fusion adds to the input token embeddings"):
        ImageClassifier("resnet18", 3, pretrained=False, knowledge={"mode": "early", "dim": DIM})


def test_hydra_knowledge_group_trains_with_a_table_column(compose, tmp_path, tiny_bert_dir):
    from conftest import tiny_overrides
    from lightning_peft.cli.train import instantiate_callbacks, train

    path = _write_vectors(tmp_path / "docs.jsonl", [[float(i), 1.0, 0.0, -1.0] for i in range(40)])
    cfg = compose(*tiny_overrides(tiny_bert_dir), "data=table", f"data.dataset_kwargs.path={path}", "data.features=vec",
                  "knowledge=late", f"knowledge.dim={DIM}", "knowledge.key=kg", "finetune=linear_probe")
    assert cfg.data.features_key == "kg"  # the data module's key follows the callback's
    [callback] = instantiate_callbacks({"knowledge": cfg.knowledge})
    assert isinstance(callback, KnowledgeInjection) and callback.config == KnowledgeConfig("late", DIM, "kg")
    metrics = train(cfg)
    assert "val/acc" in metrics


@pytest.mark.parametrize("mode,method", [("early", "prompt_tuning"), ("late", "ia3"), ("early", "bitfit")])
def test_fusion_trains_with_other_peft_methods(tiny_bert_dir, mode, method):
    from lightning_peft import BitFitConfig, IA3Config, PromptTuningConfig

    config = {"prompt_tuning": PromptTuningConfig(num_virtual_tokens=2), "ia3": IA3Config(), "bitfit": BitFitConfig()}[method]
    torch.manual_seed(0)
    module = UserClassifier(tiny_bert_dir)
    frozen = {n: p.detach().clone() for n, p in module.encoder.named_parameters() if "bias" not in n}
    _trainer([PEFT(config, verbose=False), KnowledgeInjection(mode, dim=DIM)]).fit(module, _loader(_batches()))
    if mode == "early":  # the trainable copy (PEFT's modules_to_save) is the one that runs, and it trained
        trained = [p for n, p in module.knowledge_projection.named_parameters() if p.requires_grad and n.endswith("weight")]
        assert trained and all(p.abs().sum() > 0 for p in trained)
    else:
        fused = [m for m in module.head.modules() if isinstance(m, FusedLinear) and m.weight.requires_grad]
        assert fused and fused[0].weight[:, 32:].abs().sum() > 0
    state = {n: p for n, p in module.named_parameters()}
    assert all(torch.equal(state[f"encoder.{n}"], v) for n, v in frozen.items() if f"encoder.{n}" in state)
