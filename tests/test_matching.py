import pytest
from torch import nn

from lightning_peft.groups.matching import match_module_names, name_matches

CASES = [
    # (pattern, module name, expected)
    ("encoder", "model.bert.encoder", True),
    ("bert.encoder", "model.bert.encoder", True),
    ("model.bert.encoder", "model.bert.encoder", True),
    ("coder", "model.bert.encoder", False),  # suffixes only at dot boundaries
    ("encoder", "model.bert.encoder.layer.0", False),
    ("re:.*layer\\.[01]", "model.bert.encoder.layer.1", True),
    ("re:layer\\.[01]", "model.bert.encoder.layer.1", False),  # regexes match the whole name
    ("re:.*layer\\.[01]", "model.bert.encoder.layer.10", False),
    ("fc", "fc", True),
]


@pytest.mark.parametrize("pattern,name,expected", CASES)
def test_name_matches(pattern, name, expected):
    assert name_matches(pattern, name) is expected


def _net():
    return nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))


def test_match_module_names_in_model_order_without_duplicates():
    net = _net()
    assert match_module_names(net, ["1", "0", "re:0\\..*", "0.0"]) == ["0", "0.0", "0.1", "1"]


def test_pattern_that_matches_nothing_lists_existing_names():
    with pytest.raises(ValueError, match=r"'nope' matched no module.*'0', '0.0', '0.1', '1'"):
        match_module_names(_net(), ["0", "nope"])
