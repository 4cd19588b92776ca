"""FeatureCache on unchanged modules: the cached probe trains exactly like the uncached one, skips the
backbone once features are cached, and its disk cache is reused, invalidated and rebuilt as it should."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import VisionClassifier, fit, image_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import (
    FeatureCache,
    FeatureSet,
    FeatureStore,
    FreezeBackbone,
    TextClassificationDataModule,
    TextClassifier,
    extract_features,
    find_feature_point,
    fit_classifier,
)

pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # frozen parts in eval, on purpose


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory, tiny_bert_dir) -> str:
    """A tiny BERT without dropout inside (the uncached reference then runs it deterministically too)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("probe-bert")
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return str(path)


def _write_reviews(path: Path, changed: int = 0) -> str:
    rows = ["text,label"]
    for i in range(40):
        word = "edited" if i < changed else "review"
        rows.append(f"{word} {i} was {'good' if i % 2 else 'bad'}{' really' * (i % 7)},{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def reviews(tmp_path) -> str:
    return _write_reviews(tmp_path / "reviews.csv")


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def _probe(model_dir: str, csv: str, callbacks: list, epochs: int = 3, pooling: str = "mean", perturb: bool = False):
    """Fit a TextClassifier probe (40 examples: 32 train in 4 batches, 8 val in 1); return (recorder, backbone calls, model)."""
    pl.seed_everything(0)
    data = TextClassificationDataModule("table", tokenizer=model_dir, max_length=24, batch_size=8, dataset_kwargs={"path": csv})
    model = TextClassifier(model_dir, num_classes=2, pooling=pooling, dropout=0.1, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    if perturb:
        with torch.no_grad():
            model.backbone.encoder.layer[-1].output.LayerNorm.bias.add_(0.5)
    calls = [0]
    model.backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[*callbacks, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return recorder, calls[0], model


def _assert_same_training(a: Recorder, b: Recorder) -> None:
    assert len(a.losses) == len(b.losses) and len(a.val) == len(b.val)
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    for x, y in zip(a.val, b.val):
        assert x.keys() == y.keys()
        torch.testing.assert_close(torch.tensor(list(x.values())), torch.tensor(list(y.values())), rtol=1e-5, atol=1e-6)


def test_cached_probe_matches_the_uncached_probe_and_skips_the_backbone(probe_dir, reviews):
    reference, reference_calls, reference_model = _probe(probe_dir, reviews, [FreezeBackbone(verbose=False)])
    cache = FeatureCache()
    cached, cached_calls, cached_model = _probe(probe_dir, reviews, [cache])

    _assert_same_training(reference, cached)  # same seed: same losses, in the same (shuffled) order, and metrics
    torch.testing.assert_close(cached_model.head[1].weight, reference_model.head[1].weight, rtol=1e-5, atol=1e-6)
    assert reference.losses[0] != reference.losses[-1]  # it did train
    # 3 epochs of 4 train + 1 val batches: the uncached probe runs the backbone 15 times; the cached one
    # in epoch 0 only (5) plus once to check the first fully cached batch against a fresh pass.
    assert reference_calls == 15
    assert cached_calls == 6 and cache.stats.cached_calls == 9 and cache.stats.verified
    assert cache.stats.computed_examples == 40 and len(cache.store) == 40
    assert "forward" not in cached_model.__dict__  # the module's own forward is back after fit
    assert all(not p.requires_grad for p in cached_model.backbone.parameters())


def test_disk_cache_is_reused_and_invalidated_by_model_pooling_and_data(probe_dir, reviews, tmp_path):
    cache_dir = tmp_path / "cache"
    first = FeatureCache(cache_dir=cache_dir)
    _probe(probe_dir, reviews, [first], epochs=1)
    assert first.stats.computed_examples == 40 and len(list(cache_dir.glob("*.pt"))) == 1

    again = FeatureCache(cache_dir=cache_dir)
    _, calls, _ = _probe(probe_dir, reviews, [again], epochs=2)
    assert again.stats.loaded == 40 and again.stats.computed_examples == 0 and again.stats.rebuilt is None
    assert calls == 1  # the check of the first batch; everything else came from disk

    other_pooling = FeatureCache(cache_dir=cache_dir)
    _probe(probe_dir, reviews, [other_pooling], epochs=1, pooling="cls")
    assert other_pooling.stats.loaded == 0 and other_pooling.stats.computed_examples == 40

    other_weights = FeatureCache(cache_dir=cache_dir)
    _probe(probe_dir, reviews, [other_weights], epochs=1, perturb=True)
    assert other_weights.stats.loaded == 0 and other_weights.stats.computed_examples == 40
    assert len(list(cache_dir.glob("*.pt"))) == 3

    edited = _write_reviews(tmp_path / "edited.csv", changed=3)  # 3 texts differ, the other 37 do not
    other_data = FeatureCache(cache_dir=cache_dir)
    _probe(probe_dir, edited, [other_data], epochs=1)
    assert other_data.stats.loaded == 40 and other_data.stats.computed_examples == 3


def test_truncated_cache_file_is_rebuilt_and_training_is_unchanged(probe_dir, reviews, tmp_path):
    cache_dir = tmp_path / "cache"
    reference, _, _ = _probe(probe_dir, reviews, [FeatureCache(cache_dir=cache_dir)], epochs=2)
    (path,) = cache_dir.glob("*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    rebuilt = FeatureCache(cache_dir=cache_dir)
    with pytest.warns(UserWarning, match="corrupt.*rebuilding"):
        again, _, _ = _probe(probe_dir, reviews, [rebuilt], epochs=2)
    assert rebuilt.stats.rebuilt.startswith("corrupt") and rebuilt.stats.computed_examples == 40
    _assert_same_training(reference, again)
    assert FeatureStore.load(path, rebuilt._meta)[1] is None  # rewritten intact


def test_stale_cache_under_a_fixed_model_id_is_caught_by_the_fresh_pass_check(probe_dir, reviews, tmp_path):
    cache_dir = tmp_path / "cache"
    _probe(probe_dir, reviews, [FeatureCache(cache_dir=cache_dir, model_id="my-model")], epochs=1)
    reference, _, _ = _probe(probe_dir, reviews, [FreezeBackbone(verbose=False)], epochs=2, perturb=True)

    stale = FeatureCache(cache_dir=cache_dir, model_id="my-model")  # same id, other weights: the file looks valid
    with pytest.warns(UserWarning, match="differ from a fresh pass"):
        cached, _, _ = _probe(probe_dir, reviews, [stale], epochs=2, perturb=True)
    assert stale.stats.loaded == 40 and stale.stats.rebuilt.startswith("stale")
    _assert_same_training(reference, cached)  # the stale rows were never used


def _store(n: int = 6, dim: int = 4) -> tuple[FeatureStore, list[bytes], torch.Tensor]:
    keys = [bytes([i]) * 16 for i in range(n)]
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    store = FeatureStore()
    store.add(keys, features)
    return store, keys, features


def test_store_round_trip_and_every_kind_of_damage_is_reported(tmp_path):
    store, keys, features = _store()
    path = tmp_path / "f.pt"
    meta = {"model": "abc", "head": "head"}
    store.save(path, meta)
    loaded, problem = FeatureStore.load(path, meta)
    assert problem is None and torch.equal(loaded.lookup(keys[::-1]), features.flip(0))

    assert FeatureStore.load(tmp_path / "nope.pt", meta) == (None, "missing")
    assert FeatureStore.load(path, {**meta, "model": "other"})[1] == "stale (written for another model)"

    raw = path.read_bytes()
    payload = features.numpy().tobytes()
    at = raw.index(payload) + len(payload) // 2
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :])  # one garbled byte inside the features
    assert FeatureStore.load(path, meta)[1] == "corrupt (checksum mismatch)"
    path.write_bytes(raw[:-200])
    assert FeatureStore.load(path, meta)[1].startswith("corrupt (unreadable")
    path.write_bytes(b"not a cache at all")
    assert FeatureStore.load(path, meta)[1].startswith("corrupt")


def test_sample_keys_ignore_padding_and_batch_composition():
    from lightning_peft.features.store import sample_keys

    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    short = sample_keys((), {"input_ids": ids[1:, :2], "attention_mask": mask[1:, :2]})
    padded = sample_keys((), {"input_ids": ids, "attention_mask": mask})
    assert padded[1] == short[0] and padded[0] != padded[1]
    images = torch.randn(3, 3, 4, 4)
    assert sample_keys((images,), {})[2] == sample_keys((images[2:],), {})[0]
    assert sample_keys((images,), {})[0] != sample_keys((images.double(),), {})[0]


def test_vision_classifier_calling_its_network_directly_is_cached_too():
    def run(callbacks):
        torch.manual_seed(0)
        module = VisionClassifier(torchvision.models.resnet18(num_classes=3))
        fit(module, image_loader(), callbacks, steps=6)  # 3 epochs of 2 batches
        return module

    cache = FeatureCache()
    cached, reference = run([cache]), run([FreezeBackbone(verbose=False)])
    assert cache.point.owner == "net" and cache.point.head == "net.fc"
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.net.fc.weight, reference.net.fc.weight, rtol=1e-5, atol=1e-6)
    assert cache.stats.cached_calls == 3  # epochs 1-2, after one checked batch


def test_disk_cache_of_a_vision_backbone_is_invalidated_by_a_batchnorm_running_mean(tmp_path):
    """A near miss: the same weights but one BatchNorm statistic off by 1e-3 compute other features."""
    def run(nudge: float = 0.0) -> FeatureCache:
        torch.manual_seed(0)
        module = VisionClassifier(torchvision.models.resnet18(num_classes=3))
        module.net.layer1[0].bn1.running_mean[0] += nudge
        cache = FeatureCache(cache_dir=tmp_path)
        fit(module, image_loader(), [cache], steps=2)  # one epoch of 2 batches
        return cache

    first, same, nudged = run(), run(), run(1e-3)
    assert first.stats.computed_examples == 16 and same.stats.loaded == 16 and same.stats.computed_examples == 0
    assert nudged.stats.loaded == 0 and nudged.stats.computed_examples == 16
    assert len(list(tmp_path.glob("*.pt"))) == 2


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)

    def forward(self, x):
        return torch.tanh(self.encoder(x))


class TupleOutput(pl.LightningModule):
    """Returns (logits, features): not the head's output alone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = _Backbone(), nn.Linear(8, 2)

    def forward(self, x):
        features = self.backbone(x)
        return self.head(features), features

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[0], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BypassesForward(TupleOutput):
    """Calls backbone and head itself in training_step: nothing to intercept."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)


def _vectors() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)), batch_size=4)


@pytest.mark.parametrize(
    "module,error,match",
    [
        (TupleOutput, RuntimeError, "must return exactly what the head 'head' returns"),
        (BypassesForward, RuntimeError, "was not called during training_step"),
    ],
)
def test_unsupported_module_shapes_fail_clearly(module, error, match):
    with pytest.raises(error, match=match):
        fit(module(), _vectors(), [FeatureCache(backbone="backbone")], steps=2)


def test_partial_fine_tuning_is_refused_and_heads_are_found():
    from lightning_peft import GradualUnfreezing

    with pytest.raises(ValueError, match="FeatureCache caches the output of a frozen backbone, but FreezeBackbone"):
        fit(TupleOutput(), _vectors(), [FreezeBackbone(train_top=1, backbone="backbone", verbose=False), FeatureCache(backbone="backbone")])
    with pytest.raises(ValueError, match="but GradualUnfreezing"):
        fit(TupleOutput(), _vectors(), [GradualUnfreezing(backbone="backbone", verbose=False), FeatureCache(backbone="backbone")])

    two_heads = nn.ModuleDict({"backbone": _Backbone(), "a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})
    with pytest.raises(ValueError, match=r"several modules \('a', 'b'\).*head="):
        find_feature_point(two_heads, backbone="backbone")
    assert find_feature_point(two_heads, head="b", backbone="backbone").head == "b"


def test_extract_features_of_an_intermediate_layer_with_cache_and_classifier(probe_dir, reviews, tmp_path, monkeypatch):
    data = TextClassificationDataModule("table", tokenizer=probe_dir, max_length=24, batch_size=8, dataset_kwargs={"path": reviews})
    data.setup("fit")
    model = TextClassifier(probe_dir, num_classes=2)
    loader = data.train_dataloader()
    calls = [0]
    model.backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    layer0 = extract_features(model, data.val_dataloader(), layer="backbone.encoder.layer.0", pooling="mean", cache_dir=tmp_path)
    batch = next(iter(data.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hidden = model.eval().backbone(**inputs, output_hidden_states=True).hidden_states[1]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(layer0.features, (hidden * mask).sum(1) / mask.sum(1))
    assert torch.equal(layer0.labels, batch["labels"])

    calls[0] = 0
    again = extract_features(model, data.val_dataloader(), layer="backbone.encoder.layer.0", pooling="mean", cache_dir=tmp_path)
    assert calls[0] == 1 and torch.allclose(again.features, layer0.features)  # one checked batch, the rest from disk
    cls = extract_features(model, data.val_dataloader(), pooling="cls")
    assert not torch.allclose(cls.features, extract_features(model, data.val_dataloader(), pooling="mean").features)
    head_input = extract_features(model, data.val_dataloader())  # what TextClassifier(pooling="mean") feeds its head
    torch.testing.assert_close(head_input.features, extract_features(model, data.val_dataloader(), pooling="mean").features)

    class Centroids:  # any estimator with fit/score works
        def fit(self, x, y):
            self.means = {c: x[y == c].mean(0) for c in set(y.tolist())}

        def score(self, x, y):
            classes = sorted(self.means)
            distances = torch.stack([torch.as_tensor(((x - self.means[c]) ** 2).sum(1)) for c in classes])
            return float((torch.tensor(classes)[distances.argmin(0)] == torch.as_tensor(y)).float().mean())

    train = extract_features(model, loader, cache_dir=tmp_path)
    _, metrics = fit_classifier(train, head_input, estimator=Centroids())
    assert set(metrics) == {"train/acc", "val/acc"}
    assert metrics["val/acc"] >= 0.9 and metrics["train/acc"] >= 0.9, metrics  # good/bad reviews apart: chance is 0.5

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match="needs scikit-learn.*pip install scikit-learn"):
        fit_classifier(train)
    with pytest.raises(ValueError, match="have no labels"):
        fit_classifier(FeatureSet(train.features, None), estimator=Centroids())
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        extract_features(model, loader, pooling="max")


def test_logistic_regression_on_cached_features_when_sklearn_is_installed():
    pytest.importorskip("sklearn", reason="scikit-learn is optional (pip install scikit-learn)")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    x = torch.randn(64, 5, generator=g) + 3.0 * y[:, None]
    _, metrics = fit_classifier(FeatureSet(x, y), FeatureSet(x, y))
    assert metrics["val/acc"] > 0.95


def test_hydra_linear_probe_cached_trains_and_writes_the_cache(compose, tiny_bert_dir, tmp_path):
    from conftest import assert_learned, reviews_overrides, tiny_overrides
    from lightning_peft.cli.train import train

    cache_dir = tmp_path / "cache"
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("trainer.max_steps")]
    cfg = compose("finetune=linear_probe_cached", *overrides, *reviews_overrides(tmp_path), "trainer.max_epochs=6", "finetune.lr=3e-2",
                  f"finetune.cache_dir={cache_dir}")
    train(cfg)
    assert_learned(tmp_path)
    (path,) = cache_dir.glob("*.pt")
    assert FeatureStore.load(path, {})[1].startswith("stale")  # a real cache file, refusing a foreign key
