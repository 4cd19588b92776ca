import json
from collections import Counter

import pytest

from lightning_peft import TextClassificationDataModule, load_text_dataset
from lightning_peft.data import stratified_split


def test_bbc_news_is_the_real_packaged_corpus():
    data = load_text_dataset("bbc_news")
    assert len(data.texts) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(data.labels)[data.label_names.index("sports")] == 511


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
    with pytest.raises(ValueError, match=r"Unknown data set 'imdb'; choose one of \['bbc_news', 'table'\]"):
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
