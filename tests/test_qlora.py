"""QLoRA: quantization error within the NF4 / int8 bounds, memory, training on a quantized base, adapters on a
freshly quantized base, transformers' BitsAndBytesConfig models, and merging only through dequantization."""

from __future__ import annotations

import copy
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import frozen_base
from tiny_models import llama, output, randomize, token_batch
from torch import nn

from lightning_peft import (
    PEFT,
    LoRAConfig,
    QLoRAConfig,
    QuantSpec,
    base_weight_memory,
    count_parameters,
    disable_adapters,
    export_peft,
    inject,
    load_adapter,
    merge,
    merge_and_dequantize,
    save_adapter,
)
from lightning_peft.peft.quantization import (
    dequantized_weight,
    is_quantized,
    keep_layout,
    quantize_linear,
)

bnb = pytest.importorskip("bitsandbytes")


def _weight(out_features: int = 37, in_features: int = 150, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight[3, 7] = 0.9  # an outlier: its block's scale grows, the others' do not
    return layer


def _code_half_gap(quant_type: str) -> float:
    values = bnb.functional.get_4bit_type(quant_type, device="cpu").sort().values
    return float(((values[1:] - values[:-1]) / 2).max())


def _blocks(t: torch.Tensor, size: int = 64) -> torch.Tensor:
    flat = t.detach().float().flatten()
    return F.pad(flat, (0, (-flat.numel()) % size)).view(-1, size)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_error_is_within_half_a_code_step_of_each_block_scale(quant_type, double_quant):
    linear = _weight()
    q = quantize_linear(linear, QuantSpec(bits=4, quant_type=quant_type, double_quant=double_quant, block_size=64))
    state = q.weight.quant_state
    true_absmax = _blocks(linear.weight).abs().amax(1)
    if double_quant:  # the fp32 scales are themselves stored in 8 bits (blocks of 256, after subtracting their mean)
        scale = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        dynamic = bnb.functional.create_dynamic_map().sort().values
        scale_step = float(((dynamic[1:] - dynamic[:-1]) / 2).max()) * float((true_absmax - state.offset).abs().max())
        assert float((scale - true_absmax).abs().max()) <= scale_step + 1e-7
    else:
        scale = state.absmax
        torch.testing.assert_close(scale, true_absmax)
    w = _blocks(linear.weight)
    error = (_blocks(dequantized_weight(q)) - w).abs()
    # codes are chosen with the true block absmax a and read back with the stored a':
    # |w - code*a'| <= |w - code*a| + |code|*|a - a'| <= half a code step * a + |a - a'|
    bound = _code_half_gap(quant_type) * true_absmax.view(-1, 1) + (scale - true_absmax).abs().view(-1, 1) + 1e-6
    assert bool((error <= bound).all())
    assert error.mean() > 0 and error.max() < 0.2 * float(w.abs().max())


def test_int8_error_is_within_half_a_step_of_each_row_absmax():
    linear = _weight()
    q = quantize_linear(linear, QuantSpec(bits=8))
    w = linear.weight.detach().float()
    error = (dequantized_weight(q) - w).abs()
    absmax = w.abs().amax(1, keepdim=True)
    # half a step of the row's absmax/127 grid; bitsandbytes rounds through float16 first (unit roundoff 2**-11)
    bound = absmax / 127 / 2 + (w.abs() + absmax / 127) * 2**-10
    assert bool((error <= bound).all()) and error.max() > 0


def test_quantized_base_takes_a_quarter_or_half_of_bf16():
    ratios = {}
    for name, spec in {"4-bit": QuantSpec(bits=4, double_quant=False), "4-bit+dq": QuantSpec(bits=4), "8-bit": QuantSpec(bits=8)}.items():
        model = nn.Sequential(OrderedDict(a=nn.Linear(512, 512), b=nn.Linear(512, 1024)))
        for child in ("a", "b"):
            setattr(model, child, quantize_linear(getattr(model, child), spec))
        memory = base_weight_memory(model)
        assert memory.layers == 2 and memory.parameters == 512 * 512 + 512 * 1024
        ratios[name] = memory.ratio
    assert ratios["4-bit+dq"] < ratios["4-bit"] <= 0.29 and ratios["4-bit+dq"] <= 0.27
    assert 0.49 < ratios["8-bit"] <= 0.51


# --- QLoRA on a model ------------------------------------------------------------------------------

def test_qlora_quantizes_the_backbone_and_starts_as_the_quantized_base():
    model = llama()
    x = token_batch()
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    linear = [n for n, m in model.named_modules() if is_quantized(m)]
    assert len(linear) == 2 * 7 and not is_quantized(model.lm_head)  # every block linear; the LM head stays
    with torch.no_grad():
        with_adapters = output(model, x)
        with disable_adapters(model):
            base = output(model, x)
    assert torch.equal(with_adapters, base)
    assert base_weight_memory(model).bits == (4,)
    assert count_parameters(model).total == count_parameters(llama()).total + count_parameters(model).trainable  # logical sizes


class Classifier(pl.LightningModule):
    """A user's module: a tiny Llama body and a head (knows nothing of lightning_peft)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.body = llama(seed).model
        self.head = nn.Linear(32, 2)
        self.losses: list[float] = []

    def forward(self, x):
        return self.head(self.body(x).last_hidden_state.mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 61, (32, 6), generator=g)
    y = torch.arange(32) % 2
    x[y == 1, 2] = 7
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_qlora_trains_through_the_callback_and_only_adapters_change():
    model = Classifier()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[PEFT(QLoRAConfig(r=4, target_modules="all-linear"))])
    storage = None

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal storage
            storage = frozen_base(pl_module)

    trainer.callbacks.append(Snapshot())
    trainer.fit(model, _loader())
    after = frozen_base(model)
    assert sum(k.endswith(":state2.absmax") for k in storage) == sum(map(is_quantized, model.modules())) > 0
    assert storage and all(torch.equal(v, after[k]) for k, v in storage.items())
    assert sum(model.losses[-4:]) < 0.7 * sum(model.losses[:4])
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)


def test_bottleneck_adapters_sit_on_4bit_layers_with_their_real_widths_and_only_they_get_gradients():
    """A 4-bit layer stores its weight packed ((in*out/2, 1) uint8): widths come from in/out_features, masters are fp32."""
    from lightning_peft import AdapterConfig

    model = llama()
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    x = token_batch()
    with torch.no_grad():
        before = output(model, x)
    inject(model, AdapterConfig(bottleneck_size=4), adapter_name="bottleneck")
    adapter = model.model.layers[0].mlp.down_proj.adapters["bottleneck"]
    assert adapter.down.weight.shape == (4, 32) and adapter.down.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(output(model, x), before)  # up starts at zero
    randomize(model)
    loss = output(model, x).square().mean()
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all(".adapters.bottleneck." in n for n in trained)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None and ".up." in n)


def test_adapter_saved_from_qlora_loads_onto_a_freshly_quantized_base(tmp_path):
    x = token_batch()
    model = llama()
    inject(model, QLoRAConfig(r=4, bits=4, modules_to_save=None))
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    save_adapter(model, tmp_path)
    fresh = llama()  # full precision: loading quantizes it the same way first
    load_adapter(fresh, tmp_path)
    assert sum(is_quantized(m) for m in fresh.modules()) == 14
    with torch.no_grad():
        assert torch.equal(output(fresh, x), expected)


def test_merging_into_quantized_weights_is_refused_and_dequantized_merge_keeps_outputs():
    x = token_batch()
    model = llama()
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    with pytest.raises(RuntimeError, match="quantized Linear4bit.*merge_and_dequantize"):
        merge(model)
    report = merge_and_dequantize(copy.deepcopy(model), dtype=torch.float32)
    assert len(report.dequantized) == 14 and not report.requantized
    assert not any(is_quantized(m) for m in report.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(output(report.model, x), expected, rtol=1e-4, atol=1e-4)
    requantized = merge_and_dequantize(copy.deepcopy(model), dtype=torch.float32, requantize=QuantSpec(), example_inputs=x)
    assert requantized.requantized and 0 < requantized.weight_error < 0.5 and requantized.output_difference > 1e-3
    assert sum(is_quantized(m) for m in requantized.model.modules()) == 14


# --- models quantized by transformers' BitsAndBytesConfig ------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    llama().save_pretrained(path)
    return path


def _bnb_llama(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


def test_transformers_bnb_model_accepts_our_lora_and_hf_peft_reads_the_export(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    x = token_batch()
    model = _bnb_llama(llama_dir)
    inject(model, LoRAConfig(r=4, target_modules="all-linear", modules_to_save=None))
    assert is_quantized(model.model.layers[0].self_attn.q_proj.base_layer)
    model.train()
    output(model, x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    save_adapter(model, tmp_path / "ours")
    fresh = _bnb_llama(llama_dir)
    load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(output(fresh, x), expected)
    export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(_bnb_llama(llama_dir), tmp_path / "peft").eval()
    for m in theirs.modules():  # bitsandbytes' CPU inference repacking fails on layers narrower than a block (ours pin it)
        keep_layout(m)
    with torch.no_grad():
        torch.testing.assert_close(output(theirs, x), expected, rtol=1e-4, atol=1e-4)


def test_qlora_on_a_model_transformers_already_quantized_keeps_its_layers(llama_dir):
    model = _bnb_llama(llama_dir)
    before = {n: id(m.weight) for n, m in model.named_modules() if is_quantized(m)}
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    after = {n.removesuffix(".base_layer"): id(m.weight) for n, m in model.named_modules() if is_quantized(m)}
    assert after == before  # no second quantization


def test_bad_quantization_options_are_errors():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QLoRAConfig(bits=3)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        QLoRAConfig(quant_type="int4")
    with pytest.raises(ValueError, match="QLoRA quantize_modules pattern 'nothing' matched no module"):
        inject(llama(), QLoRAConfig(quantize_modules=["nothing"]))


def test_adapter_only_checkpoint_of_a_qlora_run_validates_on_a_fresh_model(tmp_path):
    def trainer():
        return pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[PEFT(QLoRAConfig(r=4), adapter_only_checkpoint=True, verbose=False)])

    model = Classifier()
    t = trainer()
    t.fit(model, _loader())
    t.save_checkpoint(tmp_path / "q.ckpt")
    expected = t.validate(model, _loader(), verbose=False)[0]["val_loss"]
    state = torch.load(tmp_path / "q.ckpt", weights_only=False)["state_dict"]
    frozen = sum(v.numel() for k, v in state.items() if k.endswith(".base_layer.weight") or k.endswith("embed_tokens.weight"))
    assert frozen == 0  # neither the quantized weights nor the embeddings are in it
    got = trainer().validate(Classifier(), _loader(), ckpt_path=tmp_path / "q.ckpt", verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6)


def test_quantized_model_reloads_its_own_state_strictly_and_refuses_another_quantization():
    model = llama()
    inject(model, QLoRAConfig(r=4, modules_to_save=None))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("weight.absmax") for k in state)
    model.load_state_dict(state)  # strict: the quantization state is taken, not left over as unexpected keys
    other = llama(seed=1)
    inject(other, QLoRAConfig(r=4, modules_to_save=None))
    with pytest.raises(RuntimeError, match="quantized differently"):
        model.load_state_dict(other.state_dict())
