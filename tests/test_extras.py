"""The library works without its optional extras: Hydra (extra 'hydra') and jsonargparse (extra 'cli')."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A meta-path hook makes the blocked packages unimportable, as if they were not installed.
SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {"hydra", "omegaconf", "jsonargparse"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_peft import PEFT, LoRAConfig, list_adapters

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.body(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    model = Module()
    peft = PEFT(LoRAConfig(r=2, target_modules=["body.0", "body.2"]), verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[peft])
    trainer.fit(model, data)
    assert list_adapters(model) == ["default"], list_adapters(model)
    assert trainer.global_step == 2
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("loaded:", loaded)
    """
)


def test_library_and_callbacks_work_without_hydra_and_jsonargparse(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_hydra_is_an_extra_and_the_dev_extra_holds_both_clis():
    project = _pyproject()
    required = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not required & {"hydra-core", "omegaconf", "jsonargparse"}
    assert {_name(r) for r in extras["hydra"]} == {"hydra-core", "omegaconf"}
    assert extras["cli"] == ["jsonargparse[signatures]>=4.39,<5"]
    (own,) = [r for r in extras["dev"] if r.startswith("lightning_peft[")]
    assert {"hydra", "cli", "llm", "qlora", "probe", "results"} <= set(own[len("lightning_peft[") : -1].split(","))
    assert "ruff>=0.6" in extras["dev"]


def test_constraints_pin_every_requirement():
    project = _pyproject()
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[_name(name)] = version
    named = {_name(r) for r in project["dependencies"]}
    named |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    named |= {"docstring-parser", "typeshed-client"}  # jsonargparse[signatures]
    assert sorted(named - {"lightning-peft"} - set(pinned)) == []
    assert all(re.fullmatch(r"[0-9][0-9a-z.]*", v) for v in pinned.values()), pinned
