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
