"""Process-wide test settings, also for the doctests of the library (``pytest`` collects ``lightning_peft/``).

The Triton kernels run on CPU through Triton's interpreter: triton reads TRITON_INTERPRET when a kernel is
decorated, so it is set before any kernel module is imported. Everything stays offline.
"""

import os

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU, launch each kernel with its first autotune config instead of timing every config for every test
# shape (the benchmark script autotunes).
os.environ.setdefault("LIGHTNING_PEFT_AUTOTUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items) -> None:
    """Keep ``@pytest.mark.slow`` tests out of a run that selects no markers (``pytest``): they are skipped, saying how
    to run them. Any ``-m`` expression is pytest's own marker selection: ``-m slow`` runs them, ``-m "not slow"`` not."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
