"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2 on transformers models: generation with the key/value
cache (greedy generate == a manual argmax loop), masks and positions, encoder classification through the PEFT
callback on an unchanged module (bottleneck adapters too), what trains, save/load (inference form),
adapter-only resume, and the limits."""

from __future__ import annotations

import json
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from tiny_models import gpt2, llama, randomize, token_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel, DynamicCache

from lightning_peft import (
    PEFT,
    AdapterConfig,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    adapter_batch,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
)
from lightning_peft.peft import AdapterLayer
from lightning_peft.peft.prompt import PromptLayer

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

K = 4
CONFIGS = {
    "prompt_tuning": lambda **kw: PromptTuningConfig(num_virtual_tokens=K, init="random", **kw),
    "p_tuning_lstm": lambda **kw: PTuningConfig(num_virtual_tokens=K, encoder="lstm", encoder_hidden=8, **kw),
    "p_tuning_mlp": lambda **kw: PTuningConfig(num_virtual_tokens=K, encoder="mlp", encoder_hidden=8, **kw),
    "prefix_tuning": lambda **kw: PrefixTuningConfig(num_virtual_tokens=K, projection_hidden=8, **kw),
    "p_tuning_v2": lambda **kw: PTuningV2Config(num_virtual_tokens=K, **kw),
}
GENERATION = ["prompt_tuning", "p_tuning_lstm", "prefix_tuning", "p_tuning_v2"]


def prompted(factory, method: str, seed: int = 2):
    model = factory()
    inject(model, CONFIGS[method](modules_to_save=None))
    randomize(model, std=0.5, seed=seed)  # visible prompts
    return model


def argmax_loop(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


# --- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", GENERATION)
def test_greedy_generate_equals_a_manual_argmax_loop(factory, method):
    model = prompted(factory, method)
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 11)
    assert torch.equal(generated, argmax_loop(model, ids, mask, 6))  # cached decoding == full recomputation
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (2, 5, 61)  # the caller's length: virtual positions are not in the outputs
        with disable_adapters(model):
            assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, logits)  # the prompt matters


@pytest.mark.parametrize("factory", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("method", GENERATION)
def test_generate_without_the_cache_equals_with_it_and_the_argmax_loop(factory, method):
    # the prefix methods used to hand back the cache they built when the caller asked for none, and generate fed
    # it back: the prefix and the tokens were attended twice
    model = prompted(factory, method)
    ids = token_batch(2, 5)
    mask = torch.ones_like(ids)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(uncached, argmax_loop(model, ids, mask, 5))
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, use_cache=False).past_key_values is None  # as without an adapter
        assert model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values.get_seq_length() == K + 5


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_hand_written_cached_loop_and_left_padding(method):
    model = prompted(llama, method)
    ids = token_batch(1, 5)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    # step by step with the cache returned by each call (what a user's decoding loop does)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        assert isinstance(out.past_key_values, DynamicCache) and out.past_key_values.get_seq_length() == K + 5
        seq, cache = ids, out.past_key_values
        for _ in range(4):
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
            out = model(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq), past_key_values=cache, use_cache=True)
    assert torch.equal(seq, expected)
    # a left-padded row generates what it generates alone: padding stays masked, real tokens keep their positions
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, :3]], 1), token_batch(1, 5, seed=9)])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, do_sample=False)
    assert torch.equal(both[0, 2:], alone[0])


# --- encoders: masks, positions, shapes ------------------------------------------------------------

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Classifier(pl.LightningModule):
    """A user's encoder classifier (knows nothing of lightning_peft): masked mean pooling of last_hidden_state."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bert = BertModel(BertConfig(**BERT), add_pooling_layer=False)
        self.head = nn.Linear(16, 2)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        loss = F.cross_entropy(self(x, mask), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, mask, y = batch
        self.log("val_loss", F.cross_entropy(self(x, mask), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    """Label 1 when token 7 occurs; rows are right-padded (id 0) to different lengths."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 40, (n, 8), generator=g)
    y = torch.arange(n) % 2
    x[y == 1, 1] = 7
    lengths = torch.randint(4, 9, (n,), generator=g)
    mask = (torch.arange(8) < lengths[:, None]).long()
    return DataLoader(TensorDataset(x * mask, mask, y), batch_size=batch_size)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_padding_is_masked_and_outputs_keep_the_callers_shape(method):
    model = Classifier().eval()
    inject(model, CONFIGS[method]())
    randomize(model, std=0.5)
    ids = torch.randint(8, 40, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out = model.bert(input_ids=padded, attention_mask=torch.tensor([[1] * 6 + [0] * 3]), output_hidden_states=True)
        assert out.last_hidden_state.shape == (1, 9, 16) and all(h.shape == (1, 9, 16) for h in out.hidden_states)
        torch.testing.assert_close(out.last_hidden_state[:, :6], alone, rtol=1e-5, atol=1e-5)
        positional = model.bert(ids, torch.ones_like(ids)).last_hidden_state  # positional arguments are bound by name
        assert torch.equal(positional, alone)
        with disable_adapters(model):
            assert not torch.allclose(model.bert(input_ids=ids).last_hidden_state, alone)


ADAPTERS = {f"adapter_{p}": (lambda p=p: AdapterConfig(placement=p, bottleneck_size=4)) for p in ("houlsby", "pfeiffer", "parallel")}


@pytest.mark.parametrize("method", [*CONFIGS, *ADAPTERS])
def test_encoder_classification_through_the_callback_on_an_unchanged_module(method):
    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bert.")}
    t = trainer([PEFT(CONFIGS[method]() if method in CONFIGS else ADAPTERS[method]())], max_epochs=10)
    t.fit(model, loader())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable) and any(n.startswith("bert.") for n in trainable)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the encoder is bit-for-bit frozen
    assert sum(model.losses[-4:]) < 0.7 * sum(model.losses[:4])
    model.eval()
    x, mask, y = loader().dataset.tensors
    with torch.no_grad():
        accuracy = (model(x, mask).argmax(-1) == y).float().mean().item()
    assert accuracy >= 0.75, accuracy  # chance is 0.5


# --- files, checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_writes_the_inference_form_and_loads_with_identical_outputs(method, tmp_path):
    model = prompted(gpt2, method)
    model.eval()
    ids = token_batch(2, 5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert list(saved) == ["transformer.prompt"]  # the final prompts only: no encoder/MLP
    assert [s["spec"]["encoder"] for s in meta["sites"]] == ["none"] and meta["config"]["method"] == CONFIGS[method]().method
    fresh = gpt2()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    assert sum(p.numel() for p in fresh.transformer.adapters["default"].parameters()) == saved["transformer.prompt"].numel()


def test_prefix_checkpoints_keep_the_reparameterisation_and_resume_exactly(tmp_path):
    config = lambda: PrefixTuningConfig(num_virtual_tokens=3, projection_hidden=8)

    def run(steps, ckpt_path=None):
        model = Classifier()
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        t = trainer([PEFT(config(), adapter_only_checkpoint=True), ckpt], max_steps=steps, max_epochs=-1)
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model

    full = run(8)
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)["state_dict"]
    assert "bert.adapters.default.embedding" in state and any(".encoder." in k for k in state)  # what training needs
    assert "bert.base_layer.embeddings.word_embeddings.weight" not in state
    resumed = Classifier()
    t = trainer([PEFT(config(), adapter_only_checkpoint=True)], max_steps=8, max_epochs=-1)
    t.fit(resumed, loader(), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-6, abs=1e-7)
    fresh = Classifier().eval()
    load_adapter(fresh, tmp_path / "ckpt" / "step=8.ckpt")  # the training form, from the checkpoint
    assert fresh.bert.adapters["default"].encoder_kind == "prefix_mlp"
    x, mask, _ = loader().dataset.tensors
    full.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, mask), full(x, mask))


# --- several adapters, initialisation, limits ------------------------------------------------------------


def test_switching_prompt_adapters_and_their_limits():
    model = gpt2()
    ids = token_batch(2, 5)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    inject(model, CONFIGS["prompt_tuning"](modules_to_save=None), "a")
    inject(model, CONFIGS["p_tuning_v2"](modules_to_save=None), "b")
    randomize(model, std=0.5)
    assert list_adapters(model) == ["a", "b"] and isinstance(model.transformer, PromptLayer)
    with torch.no_grad():
        out_b = model(input_ids=ids).logits
        set_adapter(model, "a")
        out_a = model(input_ids=ids).logits
        assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
        set_adapter(model, ["a", "b"])
        with pytest.raises(RuntimeError, match="only one prompt adapter can be active"):
            model(input_ids=ids)
        set_adapter(model, "a")
        with pytest.raises(RuntimeError, match="cannot serve mixed-adapter batches"):
            with adapter_batch(model, ["a", "b"]):
                model(input_ids=ids)
        with pytest.raises(RuntimeError, match="Cannot merge: transformer: prompts and key/value prefixes are extra inputs"):
            merge(model)
        delete_adapter(model, "a")
        delete_adapter(model, "b")
        assert type(model.transformer).__name__ == "GPT2Model"
        assert torch.equal(model(input_ids=ids).logits, base)


def test_prompt_init_from_text_and_vocabulary(tiny_bert_dir):
    from lightning_peft import load_tokenizer

    holder = nn.Sequential(OrderedDict(enc=BertModel.from_pretrained(tiny_bert_dir), head=nn.Linear(32, 2)))
    inject(holder, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="sport politics"))
    words = load_tokenizer(tiny_bert_dir)("sport politics", add_special_tokens=False)["input_ids"]
    table = holder.enc.base_layer.embeddings.word_embeddings.weight
    assert torch.equal(holder.enc.adapters["default"].prompt, table[(words * 5)[:5]])
    vocab = PromptLayer.make_adapter(holder.enc.base_layer, {"kind": "input", "encoder": "none", "tokens": 3, "out_dim": 32, "init": "vocab"})
    assert all(any(torch.equal(row, t) for t in table) for row in vocab.prompt)


def test_lora_inside_a_prompted_model_and_clear_errors():
    model = Classifier()
    inject(model, CONFIGS["prompt_tuning"]())
    inject(model, LoRAConfig(r=2, target_modules=["query"], modules_to_save=None), "lora")  # targets inside the wrapper
    assert isinstance(model.bert.base_layer.encoder.layer[0].attention.self.query, AdapterLayer)
    set_adapter(model, ["default", "lora"])
    x, mask, y = next(iter(loader()))
    F.cross_entropy(model(x, mask), y).backward()
    assert model.bert.adapters["default"].prompt.grad is not None
    assert model.bert.base_layer.encoder.layer[0].attention.self.query.adapters["lora"].lora_B.grad is not None

    with pytest.raises(ValueError, match="is the module you inject into"):
        inject(gpt2().transformer, PromptTuningConfig())
    from transformers import DistilBertConfig, DistilBertModel

    distil = nn.Sequential(OrderedDict(enc=DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=32))))
    with pytest.raises(ValueError, match="DistilBertModel.forward takes no 'past_key_values'"):
        inject(distil, PrefixTuningConfig())
    inject(distil, PromptTuningConfig(num_virtual_tokens=2))  # input prompts work there
    checkpointed = Classifier()
    inject(checkpointed, PTuningV2Config(num_virtual_tokens=2))
    checkpointed.bert.gradient_checkpointing_enable()
    checkpointed.train()
    with pytest.raises(RuntimeError, match="drops inside gradient-checkpointed layers"):
        checkpointed(x, mask)
    with pytest.raises(ValueError, match=r"8 tokens \+ 600 virtual tokens exceed the 512 positions"):
        inject(Classifier(), PromptTuningConfig(num_virtual_tokens=600))(x, mask)
    with pytest.raises(ValueError, match="init='text' needs init_text"):
        PromptTuningConfig(init="text")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "adapter_parallel"])
def test_bf16_mixed_precision_trains_fp32_prompts_and_adapters(method):
    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bert.")}
    trainer([PEFT(CONFIGS[method]() if method in CONFIGS else ADAPTERS[method]())], max_steps=4, precision="bf16-mixed").fit(model, loader())
    assert all(torch.isfinite(torch.tensor(model.losses)))
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("bert.")}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
