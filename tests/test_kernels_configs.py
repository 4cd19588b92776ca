"""Every autotune config of every Triton kernel, launched on its own (``pinned_config``) and judged like the default one.

On a GPU each kernel is autotuned over many configs, so a config that is wrong at a ragged edge would show up only
where the timings chose it. Here each config runs alone through the whole op (forward and backward) on small odd
shapes that leave partial blocks: on CPU every distinct block shape through the interpreter (it ignores warps and
stages) in fp32, on CUDA every config natively in bf16.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import CUDA
from test_kernels_bottleneck import compare as compare_bottleneck
from test_kernels_bottleneck import masters as bottleneck_masters
from test_kernels_lora import compare as compare_lora
from test_kernels_lora import masters as lora_masters

triton = pytest.importorskip("triton")

from lightning_peft.kernels import bottleneck, lora  # noqa: E402  (imports triton)
from lightning_peft.kernels._triton_common import distinct_configs, pinned_config  # noqa: E402

DTYPE = torch.bfloat16 if CUDA else torch.float32


def _cases(module) -> list:
    out = []
    for name, (_, configs) in module.autotuned_kernels().items():
        chosen = configs if CUDA else distinct_configs(configs)
        out += [pytest.param(name, i, id=f"{name}-{i}") for i in range(len(chosen))]
    return out


def _config(module, name: str, index: int):
    kernel, configs = module.autotuned_kernels()[name]
    return kernel, (configs if CUDA else distinct_configs(configs))[index]


@pytest.mark.parametrize(("name", "index"), _cases(lora))
def test_every_lora_kernel_config(monkeypatch, name, index):
    kernel, config = _config(lora, name, index)
    tma = name == "gemm_tma"
    monkeypatch.setenv(lora.TMA_ENV_VAR, "1" if tma else "0")
    # 15 rows, K=24, N=40: ragged in every block size; K, N multiples of 8 so that 16-bit rows suit TMA
    m, dy = lora_masters((3, 5), 24, 40, 5, True, seed=20 + index)
    with pinned_config(kernel, config):
        compare_lora(m, dy, torch.bfloat16 if tma else DTYPE)


@pytest.mark.parametrize(("name", "index"), _cases(bottleneck))
def test_every_bottleneck_kernel_config(name, index):
    kernel, config = _config(bottleneck, name, index)
    t, dy = bottleneck_masters((3, 5), 41, 13, seed=30 + index)
    with pinned_config(kernel, config):
        compare_bottleneck(t, dy, DTYPE)


def test_pinned_config_runs_that_config_and_gives_the_kernels_configs_back():
    kernel, configs = lora.autotuned_kernels()["skinny"]
    own, seen = list(kernel.configs), []
    real_run = kernel.fn.run

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("BLOCK_I", "BLOCK_L")})
        return real_run(*args, **kwargs)

    kernel.fn.run = spy
    try:
        with pinned_config(kernel, configs[-1]):
            lora.lora_skinny(torch.randn(9, 4, device="cuda" if CUDA else "cpu"), torch.randn(9, 6, device="cuda" if CUDA else "cpu"))
    finally:
        del kernel.fn.run
    assert seen and all(s == configs[-1].kwargs for s in seen)
    assert kernel.configs == own
