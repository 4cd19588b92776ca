import pytest
import torch

from lightning_peft.models import pool


def test_mean_ignores_padding_and_last_finds_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, right, "mean")[1], hidden[1].mean(0))
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, right, "cls"), hidden[:, 0])


def test_unknown_pooling_names_choices():
    with pytest.raises(ValueError, match="choose one of .*'cls', 'mean', 'last'"):
        pool(torch.zeros(1, 2, 3), None, "max")


def test_layer_hidden_takes_the_tensor_of_any_layer_output():
    from types import SimpleNamespace

    from lightning_peft.features.pooling import layer_hidden

    x = torch.ones(2, 3, 4)
    assert layer_hidden(x) is x and layer_hidden((x, None)) is x and layer_hidden(SimpleNamespace(last_hidden_state=x)) is x
    with pytest.raises(TypeError, match="Distillation: cannot take hidden states .* dict"):
        layer_hidden({"a": x}, "Distillation: ")


def test_pool_output_poolings():
    from lightning_peft.features.pooling import pool_output

    tokens, image = torch.randn(2, 5, 3), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool_output(tokens, "cls"), tokens[:, 0])
    torch.testing.assert_close(pool_output(image, "avg"), image.mean(dim=(2, 3)))
    assert pool_output(image, "flatten").shape == (2, 48)
    with pytest.raises(ValueError, match="needs \\(batch, tokens, dim\\)"):
        pool_output(image, "mean")


def test_cached_features_agree_with_one_tolerance_rule():
    """FeatureCache and extract_features share it: max abs error within tolerance x max(1, |stored|), looser for bf16/fp16."""
    from lightning_peft.features.verify import features_agree

    stored = torch.full((4, 8), 100.0)
    assert features_agree(stored, stored + 0.09) == (True, pytest.approx(0.09, rel=1e-3))  # 1e-3 x 100
    assert not features_agree(stored, stored + 0.11)[0]
    assert features_agree(torch.zeros(2, 2), torch.full((2, 2), 9e-4))[0]  # scale never below 1
    assert features_agree(stored.bfloat16(), (stored + 4).bfloat16())[0]  # 5e-2 for low precision
    assert not features_agree(stored, stored + 0.11, tolerance=1e-3)[0] and features_agree(stored, stored + 0.11, tolerance=2e-3)[0]
    assert features_agree(stored, stored[:2]) == (False, float("inf"))
