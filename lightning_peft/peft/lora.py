"""LoRA (Hu et al. 2021): y = base(x) + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r), rsLoRA).

Works on ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv2d`` (A is a conv with the base kernel, B a 1x1
conv) and ``nn.Embedding``. A starts random and B at zero, so the wrapped model starts unchanged
(for embeddings A is zero and B Gaussian, as in PEFT, so gradients reach A through B). The
rank-r term is computed low-rank first -- W + B·A is only formed when merging.

Options of the same layer (PEFT's names): ``use_dora`` (weight-decomposed LoRA, :mod:`.dora`),
``init="pissa" | "pissa_niter_<n>" | "olora"`` (start from the base weight's principal part and
leave the residual in the base, :mod:`.lora_init`), ``loraplus_lr_ratio`` (LoRA+ learning rates,
:mod:`lightning_peft.optim.loraplus`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import MethodConfig, check_choice, check_field, check_probability, check_scalar
from .dora import dora_delta, dora_factor_shape, dora_weight_norm, low_rank_weight, oriented_weight
from .layer import AdapterLayer
from .lora_init import base_changing, decompose, loftq, parse_init
from .lora_params import plan_lora_parameters
from .quantization import QuantSpec, is_quantized, keep_layout, quantized_merge_blocker
from .registry import Site, register_layer, register_method, register_peft_exporter
from .targeting import is_conv1d, iter_bias_modules, pattern_value, resolve_targets
from .trainable_tokens import check_token_indices, plan_trainable_tokens

__all__ = ["LORA_DEFAULT_TARGETS", "LoRA", "LoRAConfig", "LoRALayer", "lora_kind"]

# Defaults per transformers model type (as in PEFT), timm class otherwise.
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    **{key: ["query", "value"] for key in ["bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "vit", "deit", "layoutlm"]},
    **{key: ["q_proj", "v_proj"] for key in ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gptj", "bart", "mbart"]},
    **{key: ["query_key_value"] for key in ["gpt_neox", "bloom", "falcon"]},
    "gpt2": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "mpnet": ["q", "v"],
    "t5": ["q", "v"],
    "phi3": ["qkv_proj"],
    "timm:VisionTransformer": ["qkv"],
}

Kind = Literal["linear", "conv1d", "conv2d", "embedding"]


def lora_kind(module: nn.Module) -> Kind | None:
    """Which LoRA form fits ``module``, or ``None`` when LoRA cannot wrap it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA options.

    Args:
        r: rank of the update.
        alpha: scale numerator: the update is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) times B·A.
        dropout: dropout on the LoRA branch's input (not on embeddings).
        use_rslora: rank-stabilised scaling alpha/sqrt(r) (Kalajievski 2023), better for large r.
        rank_pattern / alpha_pattern: per-module overrides, ``{module pattern: value}`` (first match wins).
        bias: ``"none"``; ``"lora_only"`` trains the biases of the wrapped layers; ``"all"`` every bias
            of the model. Trained as a zero-initialised delta per adapter, so adapters stay switchable.
        init: ``"kaiming"`` (uniform, as nn.Linear) or ``"gaussian"`` (std 1/r) for A, B zero; or from the
            base weight, which then holds the residual (Linear / Conv1D only): ``"pissa"`` (top-r SVD),
            ``"pissa_niter_<n>"`` (randomized SVD, n iterations), ``"olora"`` (QR). Saved adapters of these
            are converted to a plain rank-2r LoRA on the *original* base (see :mod:`.lora_init`).
        init_lora_weights: PEFT's spelling of ``init`` (``True`` = ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ...).
        use_dora: DoRA (Liu et al. 2024): a trained magnitude per output unit times the normalised direction
            of W + s·B·A (PEFT's ``lora_magnitude_vector``); Linear, Conv1D and Conv2d layers. See :mod:`.dora`.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): B (and 1-D adapter parameters) train at this multiple of the
            learning rate of A. Applied to the optimizer's param groups by the ``PEFT`` callback / ``PEFTMixin``
            (or :func:`~lightning_peft.apply_loraplus`). ``None``: off.
        loraplus_lr_embedding: with ``loraplus_lr_ratio``, the learning rate of LoRA weights on embeddings (PEFT's default 1e-6).
        adapter_dtype: ``"float32"`` keeps adapter weights in fp32 on fp16/bf16 bases; ``"base"`` uses the base dtype.
        use_kernels: use the fused Triton kernel on CUDA for linear layers when it applies.
        trainable_token_indices: also train these rows of the input embeddings (token ids, e.g. new special
            tokens) and nothing else of them, or ``{module pattern: [ids]}``; a tied LM head follows (PEFT's option).
        target_parameters: LoRA on parameters, e.g. MoE expert stacks ``["experts.gate_up_proj", "experts.down_proj"]``
            (``<module>.<param>`` names or their dotted ends, PEFT's option); with ``target_modules=None`` no module is wrapped.
        target_modules, exclude_modules, modules_to_save: see :class:`~lightning_peft.peft.config.MethodConfig`.
    """

    method = "lora"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = field(default_factory=dict)  # None: {} (Hydra configs use null)
    alpha_pattern: dict[str, float] | None = field(default_factory=dict)
    bias: str = "none"
    init: str = "kaiming"
    adapter_dtype: str = "float32"
    use_kernels: bool = True
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    use_dora: bool = False
    init_lora_weights: bool | str | None = None  # PEFT's name for `init`; folded into `init`
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self.trainable_token_indices = check_token_indices(owner, self.trainable_token_indices)
        if self.target_parameters is not None:
            self.target_parameters = [self.target_parameters] if isinstance(self.target_parameters, str) else list(self.target_parameters)
            if not self.target_parameters or not all(isinstance(t, str) and t for t in self.target_parameters):
                raise ValueError(f"{owner}: target_parameters={self.target_parameters!r} is invalid: give parameter names such as ['experts.gate_up_proj']")
        self._fold_init_alias(owner)
        self.rank_pattern = {k: check_scalar(owner, f"rank_pattern[{k!r}]", v, "int") for k, v in dict(self.rank_pattern or {}).items()}
        self.alpha_pattern = {k: check_scalar(owner, f"alpha_pattern[{k!r}]", v, "float") for k, v in dict(self.alpha_pattern or {}).items()}
        for name, value in (("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())):
            if value < 1:
                raise ValueError(f"{owner}: {name}={value!r} is invalid: the rank must be an integer >= 1")
        for name, value in (("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())):
            if value <= 0:
                raise ValueError(
                    f"{owner}: {name}={value!r} is invalid: it must be a finite number > 0 "
                    "(alpha=0 scales the update and its gradients to zero, so the adapter never trains)"
                )
        check_probability(self, "dropout")
        for key, valid in (("bias", ("none", "lora_only", "all")), ("adapter_dtype", ("float32", "base"))):
            check_choice(self, key, valid)
        check_field(self, "init", self._valid_init, f"choose one of {self.init_choices()} (n >= 1)")
        if self.loraplus_lr_ratio is not None:
            check_scalar(owner, "loraplus_lr_ratio", self.loraplus_lr_ratio, "float")
            check_field(self, "loraplus_lr_ratio", lambda v: v > 0, "it must be a number > 0 (LoRA+ papers use 2-32; None turns LoRA+ off)")
        check_field(self, "loraplus_lr_embedding", lambda v: v >= 0, "it must be a learning rate >= 0")

    def init_choices(self) -> list[str]:
        """The valid values of ``init``."""
        return ["kaiming", "gaussian", "pissa", "pissa_niter_<n>", "olora"]

    def _valid_init(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        kind, niter = parse_init(value)
        return kind in [c for c in self.init_choices() if "<" not in c] and (niter is None or niter >= 1)

    def _fold_init_alias(self, owner: str) -> None:
        """PEFT's ``init_lora_weights`` sets ``init`` (``True``: the default); a conflicting pair is an error."""
        alias = self.init_lora_weights
        if alias is None:
            return
        if alias is False:
            raise ValueError(f"{owner}: init_lora_weights=False (random B, the model changes at init) is not supported; "
                             f"choose one of {self.init_choices()} or True")
        value = "kaiming" if alias is True else alias
        if self.init not in ("kaiming", value):
            raise ValueError(f"{owner}: init={self.init!r} and init_lora_weights={alias!r} disagree; give one of them")
        self.init, self.init_lora_weights = value, None


def _adapter_dtype(base: nn.Module, choice: str) -> torch.dtype:
    dtype = base.weight.dtype
    if choice == "float32" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float32


class LoRA(nn.Module):
    """One LoRA adapter on one layer: ``lora_A``, ``lora_B`` (and ``bias_delta`` when biases train).

    Shapes: linear / Conv1D A (r, in), B (out, r); Conv2d A (r, in, kh, kw), B (out, r, 1, 1);
    embedding A (r, num_embeddings), B (embedding_dim, r). With DoRA also ``lora_magnitude_vector``
    (out,) (Conv2d: (1, out, 1, 1)); with a base-changing init (PiSSA, OLoRA) also the buffers
    ``lora_A_init``/``lora_B_init``: A₀, B₀, which turn the adapter into a plain LoRA of the original
    base when it is saved (:meth:`inference_form`).
    """

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.kind: Kind = spec["kind"]
        r = int(spec["r"])
        self.scale = spec["alpha"] / (math.sqrt(r) if spec.get("rslora") else r)
        factory = {"device": base.weight.device, "dtype": _adapter_dtype(base, spec.get("adapter_dtype", "float32"))}
        weight = base.weight
        if self.kind == "linear":
            a_shape, b_shape, out = (r, base.in_features), (base.out_features, r), base.out_features
        elif self.kind == "conv1d":
            a_shape, b_shape, out = (r, weight.shape[0]), (weight.shape[1], r), weight.shape[1]
        elif self.kind == "conv2d":
            a_shape, b_shape, out = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1), base.out_channels
        else:
            a_shape, b_shape, out = (r, base.num_embeddings), (base.embedding_dim, r), None
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        self.bias_delta = nn.Parameter(torch.zeros(out, **factory)) if spec.get("bias") and out is not None else None
        self.dropout = nn.Dropout(spec.get("dropout", 0.0)) if spec.get("dropout", 0.0) > 0 and self.kind != "embedding" else nn.Identity()
        self.dora = bool(spec.get("dora"))
        self.lora_magnitude_vector: nn.Parameter | None = None
        if self.dora:
            shape = (1, out, 1, 1) if self.kind == "conv2d" else (out,)
            self.lora_magnitude_vector = nn.Parameter(torch.empty(shape, **factory))
        self._merged_norm: torch.Tensor | None = None  # DoRA: ||W + ΔW|| of the unmerged base, kept for unmerge
        self.reset_parameters(spec.get("init", "kaiming"), base)

    def reset_parameters(self, init: str = "kaiming", base: nn.Module | None = None) -> None:
        """Random A and zero B (embeddings: zero A, Gaussian B); with DoRA the magnitude ||W|| per output unit (needs ``base``).

        Base-changing inits (PiSSA, OLoRA) start the same way here; :meth:`init_from_base` then takes their part of W.
        """
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.lora_A.shape[0])
                nn.init.zeros_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
        if self.dora and base is not None:
            self.reset_magnitude(base)

    @torch.no_grad()
    def reset_magnitude(self, base: nn.Module) -> None:
        """DoRA: m = ||W + s·B·A|| per output unit (PEFT's init, computed in fp32)."""
        weight = oriented_weight(base, self.kind, torch.float32)
        delta = self.scale * low_rank_weight(self.lora_A.float(), self.lora_B.float(), weight.shape)
        self.lora_magnitude_vector.copy_(dora_weight_norm(weight, delta).reshape(self.lora_magnitude_vector.shape))

    @torch.no_grad()
    def init_from_base(self, base: nn.Module) -> None:
        """PiSSA / OLoRA: A₀, B₀ from the base weight, which keeps the residual W - s·B₀·A₀ (Linear and Conv1D, float bases)."""
        weight = oriented_weight(base, self.kind, torch.float32)
        a0, b0 = decompose(weight, self.lora_A.shape[0], self.scale, self.spec["init"])
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)
        self.register_buffer("lora_A_init", self.lora_A.detach().clone())
        self.register_buffer("lora_B_init", self.lora_B.detach().clone())
        residual = weight - self.scale * b0 @ a0  # PEFT's order of operations
        base.weight.copy_((residual.t() if self.kind == "conv1d" else residual).to(base.weight.dtype))
        if self.dora:
            self.reset_magnitude(base)

    @torch.no_grad()
    def restore_base(self, base: nn.Module) -> None:
        """Undo :meth:`init_from_base` on ``base``: add s·B₀·A₀ back (when the adapter is deleted)."""
        if getattr(self, "lora_A_init", None) is None:
            return
        delta = self.scale * (self.lora_B_init.float() @ self.lora_A_init.float())
        base.weight.add_((delta.t() if self.kind == "conv1d" else delta).to(base.weight.dtype))

    def forward(self, x: torch.Tensor, base: nn.Module, base_result: torch.Tensor | None = None) -> torch.Tensor:
        """The additive term s·B·A·dropout(x) (plus the bias delta), in the adapter's dtype.

        ``base_result`` (the base layer's output for ``x``) lets DoRA reuse the base GEMM; plain LoRA ignores it.
        """
        a, b = self.lora_A, self.lora_B
        if x.is_floating_point() and x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        if self.dora:
            out = dora_delta(self, x, base, base_result)
        elif self.kind == "embedding":
            out = F.linear(F.embedding(x, a.t(), padding_idx=base.padding_idx), b) * self.scale
        elif self.kind == "conv2d":
            out = F.conv2d(base._conv_forward(self.dropout(x), a, None), b) * self.scale
        else:
            out = F.linear(F.linear(self.dropout(x), a), b) * self.scale
        if self.bias_delta is not None:
            out = out + (self.bias_delta.view(-1, 1, 1) if self.kind == "conv2d" else self.bias_delta)
        return out

    def delta_weight(self) -> torch.Tensor:
        """s·B·A laid out like the base weight (fp32): (out, in) / Conv1D (in, out) / conv (out, in, kh, kw) / embedding (num, dim)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        if self.kind == "conv2d":
            return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scale
        delta = (b @ a) * self.scale
        return delta.t() if self.kind in ("conv1d", "embedding") else delta

    @torch.no_grad()
    def dora_merged_weight(self, base: nn.Module) -> torch.Tensor:
        """DoRA's merged base weight m/||W + ΔW|| · (W + ΔW) (fp32, stored layout); the norm is kept for unmerge."""
        weight, delta = base.weight.detach().float(), self.delta_weight()
        oriented = oriented_weight(base, self.kind, torch.float32)
        self._merged_norm = dora_weight_norm(oriented, delta.t() if self.kind == "conv1d" else delta)
        factor = (self.lora_magnitude_vector.float() / self._merged_norm).reshape(dora_factor_shape(self.kind))
        return factor * (weight + delta)

    @torch.no_grad()
    def dora_unmerged_weight(self, base: nn.Module) -> torch.Tensor:
        """Inverse of :meth:`dora_merged_weight` on the merged base weight (fp32, stored layout)."""
        weight, delta = base.weight.detach().float(), self.delta_weight()
        factor = (self.lora_magnitude_vector.float() / self._merged_norm).reshape(dora_factor_shape(self.kind))
        self._merged_norm = None
        return weight / factor - delta

    def inference_form(self) -> LoRA:
        """What adapter files hold: this adapter, or for PiSSA / OLoRA the equivalent plain LoRA on the *original* base.

        W_res + s·B·A = W + s·(B·A - B₀·A₀) = W + s'·[B, -B₀]·[A; A₀] with rank 2r and alpha scaled so that s' = s
        (PEFT's ``path_initial_model_for_weight_conversion``); DoRA's magnitude carries over unchanged, its norm
        being of that same sum.
        """
        if getattr(self, "lora_A_init", None) is None:
            return self
        form = copy.deepcopy(self)
        del form.lora_A_init, form.lora_B_init
        r = self.lora_A.shape[0]
        form.lora_A = nn.Parameter(torch.cat([self.lora_A.detach(), self.lora_A_init.to(self.lora_A.dtype)], dim=0))
        form.lora_B = nn.Parameter(torch.cat([self.lora_B.detach(), -self.lora_B_init.to(self.lora_B.dtype)], dim=1))
        alpha = self.spec["alpha"] * (math.sqrt(2) if self.spec.get("rslora") else 2)
        form.spec = {**self.spec, "r": 2 * r, "alpha": alpha, "init": "kaiming", "converted_from": self.spec["init"]}
        return form


@register_layer
class LoRALayer(AdapterLayer):
    """A layer with LoRA adapters: ``base_layer(x) + Σ_active s·B·A·x`` (or the merged base alone)."""

    method = "lora"

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> LoRA:
        if lora_kind(base) != spec["kind"]:
            raise ValueError(f"a LoRA adapter of kind {spec['kind']!r} does not fit a {type(base).__name__}")
        if is_quantized(base):
            keep_layout(base)  # wrapped: its storage must stay as quantized (saving, merging)
            if base_changing(spec.get("init", "kaiming")) or spec.get("init") == "loftq":
                raise ValueError(f"init={spec['init']!r} derives the base weight from its float values, but this "
                                 f"{type(base).__name__} is quantized already (or carries another adapter); load the float model")
        return LoRA(base, spec)

    def add_adapter(self, name: str, adapter: nn.Module, config: Any) -> None:
        """Add ``adapter``; a PiSSA / OLoRA one then takes its part of the base weight (once every site was built)."""
        super().add_adapter(name, adapter, config)
        if base_changing(adapter.spec.get("init", "kaiming")):
            adapter.init_from_base(self.base_layer)
        elif adapter.spec.get("init") == "loftq":  # QLoRA: the float base becomes the LoftQ-quantized one
            options = adapter.spec["loftq"]
            quantized, a, b = loftq(self.base_layer, adapter.lora_A.shape[0], adapter.scale, QuantSpec(**options["quant"]), options["iter"])
            with torch.no_grad():
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)
            self.base_layer = quantized

    def delete_adapter(self, name: str) -> None:
        """Remove ``name``; a PiSSA / OLoRA adapter gives its part of the base weight back."""
        adapter = self.adapters[name] if name in self.adapters else None
        super().delete_adapter(name)
        if adapter is not None:
            adapter.restore_base(self.base_layer)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routes = self.routes(x.shape[0])
        fast = self._lora_linear(x, routes) if routes and not args and not kwargs else None
        if fast is not None:
            return fast
        y = base_y = self.base_layer(x, *args, **kwargs)
        for names, index in routes:  # Conv2d, embeddings, DoRA, quantized bases: each adapter's own forward
            xs = x if index is None else x.index_select(0, index.to(x.device))
            ys = base_y if index is None else base_y.index_select(0, index.to(base_y.device))
            delta = sum(self.adapters[n](xs, self.base_layer, ys) for n in names).to(y.dtype)
            y = y + delta if index is None else y.index_add(0, index.to(y.device), delta)
        return y

    def _lora_weight(self) -> torch.Tensor | None:
        """The base weight as ``(out, in)`` for ``kernels.lora_linear_multi`` (Conv1D's transposed view), or ``None``."""
        base = self.base_layer
        if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
            return base.weight
        if is_conv1d(base):
            return base.weight.t()
        return None

    def _lora_linear(self, x: torch.Tensor, routes: list) -> torch.Tensor | None:
        """Plain LoRA on an ``nn.Linear`` / Conv1D: every route through :func:`~lightning_peft.kernels.lora_linear_multi`; else ``None``.

        Whole-batch adapters and the rows of a mixed batch (``adapter_batch``) are branches of that one entry:
        the first whole-batch adapter runs with the base GEMM (fused Triton kernel or cuBLAS-backed path on
        CUDA, the same ordering in PyTorch elsewhere), the others accumulate their rank-r terms into its output,
        each saving x and its ``x·Aᵀ`` only. Dropout per adapter (training only), bias deltas as branch biases.
        Adapters in fp32 on a 16-bit base go in as they are (16-bit operands, fp32 sums, fp32 gradients, as
        HF PEFT's fp32 adapters); other adapter dtypes are cast to x's. ``LoRAConfig(use_kernels=False)`` on
        any of them, ``use_kernels(False)`` or ``LIGHTNING_PEFT_KERNELS=0`` keep Triton out. DoRA adapters,
        Conv2d, embeddings and quantized bases take :meth:`LoRA.forward`.
        """
        weight = self._lora_weight()
        if weight is None or x.shape[-1] == 0 or not x.is_floating_point():
            return None
        from ..kernels import dispatch

        cast = not torch.is_autocast_enabled(x.device.type)
        branches, kernels = [], True
        for names, index in routes:
            for name in names:
                adapter = self.adapters[name]
                if adapter.dora:
                    return None
                a, b, bias = adapter.lora_A, adapter.lora_B, adapter.bias_delta
                masters = a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
                if cast and not masters:
                    a, b, bias = a.to(x.dtype), b.to(x.dtype), None if bias is None else bias.to(x.dtype)
                p = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) and self.training else 0.0
                branches.append(dispatch.LoRABranch(a, b, adapter.scale, p, bias, index))
                kernels = kernels and self.configs[name].use_kernels
        return dispatch.lora_linear_multi(x, weight, self.base_layer.bias, branches, kernels)

    def merge_blocker(self) -> str | None:
        return quantized_merge_blocker(self.base_layer)

    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters into the base weight; a DoRA adapter only merges alone (its norm is of the unmerged base)."""
        wanted = [n for n in (names if names is not None else self.active) if n in self.adapters and n not in self.merged]
        together = [*self.merged, *wanted]
        if len(together) > 1 and any(self.adapters[n].dora for n in together):
            raise RuntimeError(f"cannot merge {together} together: DoRA adapters ({[n for n in together if self.adapters[n].dora]}) "
                               "rescale the whole weight, so they merge only alone; merge one adapter, or keep them unmerged")
        super().merge(names)

    def _merge(self, name: str) -> None:
        adapter = self.adapters[name]
        weight = self.base_layer.weight
        if adapter.dora:
            weight.copy_(adapter.dora_merged_weight(self.base_layer).to(weight.dtype))
        else:
            weight.add_(adapter.delta_weight().to(weight.dtype))
        if adapter.bias_delta is not None:
            self.base_layer.bias.add_(adapter.bias_delta.to(self.base_layer.bias.dtype))

    def _unmerge(self, name: str) -> None:
        adapter = self.adapters[name]
        weight = self.base_layer.weight
        if adapter.dora:
            weight.copy_(adapter.dora_unmerged_weight(self.base_layer).to(weight.dtype))
        else:
            weight.sub_(adapter.delta_weight().to(weight.dtype))
        if adapter.bias_delta is not None:
            self.base_layer.bias.sub_(adapter.bias_delta.to(self.base_layer.bias.dtype))


def plan_lora(model: nn.Module, config: LoRAConfig, modules_to_save: list[str]) -> list[Site]:
    """LoRA sites for the targets (rank/alpha overrides applied); with ``bias="all"`` BitFit sites for other biases."""
    targets = [] if config.target_parameters and config.target_modules is None else resolve_targets(  # parameters only
        model, config, lambda m: lora_kind(m) is not None, LORA_DEFAULT_TARGETS, "LoRA target_modules", skip=modules_to_save)
    sites = []
    for name in targets:
        base = model.get_submodule(name)
        base = getattr(base, "base_layer", base)
        spec = {
            "kind": lora_kind(base),
            "r": int(pattern_value(name, config.rank_pattern, config.r)),
            "alpha": float(pattern_value(name, config.alpha_pattern, config.alpha)),
            "dropout": config.dropout,
            "rslora": config.use_rslora,
            "init": config.init,
            "adapter_dtype": config.adapter_dtype,
            "bias": config.bias != "none" and getattr(base, "bias", None) is not None,
        }
        if config.use_dora:
            spec["dora"] = True
        if config.init == "loftq":  # QLoRAConfig: how the base is quantized, replayed when the adapter is loaded
            spec["loftq"] = {"iter": config.loftq_iter, "quant": dataclasses.asdict(config.quant_spec())}
        _check_variant(name, spec, config)
        sites.append(Site(name, "lora", spec))
    _warn_oversized_ranks(model, sites)
    sites.extend(plan_lora_parameters(model, config, modules_to_save, taken=[s.module for s in sites]))
    sites.extend(plan_trainable_tokens(model, config, modules_to_save, taken=[s.module for s in sites]))
    if config.bias == "all":
        wrapped = set(targets)
        sites.extend(Site(n, "bitfit", {}) for n in iter_bias_modules(model, skip=modules_to_save) if n not in wrapped)
    return sites


def _check_variant(name: str, spec: dict[str, Any], config: LoRAConfig) -> None:
    """DoRA and the base-changing inits apply to some layer kinds only: say which, and how to leave the others out."""
    owner = type(config).__name__
    if spec.get("dora") and spec["kind"] == "embedding":
        raise ValueError(f"{owner}(use_dora=True): {name!r} is an embedding; DoRA here wraps Linear, Conv1D and Conv2d layers. "
                         f"Leave it out with exclude_modules=[{name!r}] or use plain LoRA")
    if spec["init"] == "loftq" and spec["kind"] != "linear":
        raise ValueError(f"{owner}(init='loftq'): {name!r} is a {spec['kind']} layer; LoftQ initialises the nn.Linear layers QLoRA "
                         f"quantizes. Leave it out with exclude_modules=[{name!r}]")
    if base_changing(spec["init"]) and spec["kind"] not in ("linear", "conv1d"):
        raise ValueError(f"{owner}(init={spec['init']!r}): {name!r} is a {spec['kind']} layer; PiSSA / OLoRA initialise Linear and "
                         f"Conv1D layers. Leave it out with exclude_modules=[{name!r}] or use init='kaiming'")


def lora_dims(base: nn.Module, kind: Kind) -> tuple[int, int]:
    """(input width, output width) of the map LoRA adapts: a rank above the smaller adds nothing."""
    if kind == "linear":
        return base.in_features, base.out_features
    if kind == "conv1d":
        return base.weight.shape[0], base.weight.shape[1]
    if kind == "conv2d":
        return base.in_channels * math.prod(base.kernel_size), base.out_channels
    return base.num_embeddings, base.embedding_dim


def _warn_oversized_ranks(model: nn.Module, sites: list[Site]) -> None:
    """Warn when a rank exceeds min(in, out) of its layer: more adapter parameters, no more expressiveness."""
    over = []
    for site in sites:
        base = model.get_submodule(site.module)
        base = getattr(base, "base_layer", base)
        d_in, d_out = lora_dims(base, site.spec["kind"])
        if site.spec["r"] > min(d_in, d_out):
            over.append(f"{site.module} (r={site.spec['r']}, {d_in} -> {d_out})")
    if over:
        shown = ", ".join(over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        warnings.warn(
            f"LoRA rank above min(in, out) of {len(over)} layer(s): {shown}. The update B·A cannot have a higher rank "
            "than that, so the extra rank only adds parameters. HINT: lower r, give these layers a smaller rank "
            "with rank_pattern={...}, or exclude them with exclude_modules=[...].",
            stacklevel=3,
        )


register_method("lora", LoRAConfig, plan_lora)


def export_lora_peft(layer: AdapterLayer, adapter: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one LoRA layer: ``lora_A.weight``/``lora_B.weight`` (``lora_embedding_A``/``_B`` for
    embeddings), DoRA's ``lora_magnitude_vector``, and a trained bias as the full ``base_layer.bias``."""
    a, b = ("lora_embedding_A", "lora_embedding_B") if adapter.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    out = {f"{key}.{a}": adapter.lora_A, f"{key}.{b}": adapter.lora_B}
    if adapter.dora:
        out[f"{key}.lora_magnitude_vector"] = adapter.lora_magnitude_vector
    if adapter.bias_delta is not None:
        bias = layer.base_layer.bias
        out[f"{key}.base_layer.bias"] = bias + adapter.bias_delta.to(bias.dtype)
    return out


register_peft_exporter("lora", export_lora_peft)
