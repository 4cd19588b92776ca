import pytest
import tiny_models
from torch import nn

from lightning_peft import LoRAConfig
from lightning_peft.groups.matching import match_module_names, name_matches, select_names
from lightning_peft.peft.targeting import is_linear, resolve_targets

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
    # wrapper-transparent: FSDP / activation checkpointing / torch.compile segments are not part of the name
    ("bert.encoder", "model.bert._fsdp_wrapped_module.encoder", True),
    ("model.bert.encoder", "_orig_mod.model.bert.encoder", True),
    ("re:.*layer\\.1\\.query", "bert.encoder.layer.1._checkpoint_wrapped_module.query", True),
    ("_fsdp_wrapped_module", "bert._fsdp_wrapped_module", False),
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


NAMES = [
    "bert", "bert.embeddings", "bert.encoder", "bert.encoder.layer", "bert.encoder.layer.0", "bert.encoder.layer.0.query",
    "bert.encoder.layer.0.value", "bert.encoder.layer.1", "bert.encoder.layer.1.query", "bert.encoder.layer.1.value",
    "classifier",
]

# PEFT's REGEX_TEST_CASES style: (patterns, expected selection in model order) over NAMES.
SELECT_CASES = [
    (["query"], ["bert.encoder.layer.0.query", "bert.encoder.layer.1.query"]),  # dotted suffix
    (["value", "query"], ["bert.encoder.layer.0.query", "bert.encoder.layer.0.value", "bert.encoder.layer.1.query",
                          "bert.encoder.layer.1.value"]),  # model order, not pattern order
    (["layer.1.query", "1.query"], ["bert.encoder.layer.1.query"]),  # each name once
    (["re:.*layer\\.0\\..*"], ["bert.encoder.layer.0.query", "bert.encoder.layer.0.value"]),
    (["re:.*\\.(query|value)"], [n for n in NAMES if n.endswith(("query", "value"))]),
    (["classifier", "bert.embeddings"], ["bert.embeddings", "classifier"]),
    ("classifier", ["classifier"]),  # one pattern as a string
]


@pytest.mark.parametrize("patterns,expected", SELECT_CASES)
def test_select_names(patterns, expected):
    assert select_names(NAMES, patterns, what="test", owner="Model") == expected


def test_select_names_only_usable_and_says_what_the_rest_are():
    usable = {"bert.encoder.layer.0.query", "bert.encoder.layer.1.query"}
    assert select_names(NAMES, ["re:.*layer\\.0.*"], what="LoRA", owner="M", usable=usable) == ["bert.encoder.layer.0.query"]
    with pytest.raises(ValueError, match=r"matched only modules it cannot wrap \(Box: 'classifier'\)\. Modules it can wrap"):
        select_names(NAMES, ["classifier"], what="LoRA", owner="M", usable=usable, describe=lambda hits: "Box")


# (target_modules, exclude_modules, expected LoRA targets) on a tiny BertForSequenceClassification
LAYER = "bert.encoder.layer.{}.attention.self.{}"
TARGET_CASES = [
    (["query"], None, [LAYER.format(i, "query") for i in (0, 1)]),
    (["query", "value"], ["re:.*layer\\.0\\..*"], [LAYER.format(1, "query"), LAYER.format(1, "value")]),
    ("all-linear", ["re:.*layer\\.1\\..*", "dense"], [LAYER.format(0, k) for k in ("query", "key", "value")]),  # excludes name modules, not subtrees
    ("all-linear", None, None),  # every linear of the backbone (pooler included), never the classifier head
]


@pytest.mark.parametrize("targets,exclude,expected", TARGET_CASES)
def test_target_modules(targets, exclude, expected):
    model = tiny_models.bert()
    names = resolve_targets(model, LoRAConfig(target_modules=targets, exclude_modules=exclude), is_linear, {}, "LoRA")
    if expected is None:  # all-linear: every nn.Linear inside bert, none in the head
        expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.")]
        assert "classifier" not in names
    assert names == expected


def test_exclude_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="exclude_modules pattern 'nothing' matched no module"):
        resolve_targets(tiny_models.bert(), LoRAConfig(target_modules=["query"], exclude_modules=["nothing"]), is_linear, {}, "LoRA")
