"""Built-in instruction tasks made from data shipped offline: BBC News headlines and topics.

Each task returns ``(train, val)`` lists of ``{"prompt", "completion"}`` records, split by topic with
the same stratified split the classifiers use, so a topic-as-generation score is comparable with the
classification table.
"""

from __future__ import annotations

from collections.abc import Callable

from .datasets import load_bbc_news, stratified_split

__all__ = ["INSTRUCTION_TASKS", "bbc_headlines", "bbc_topics", "load_instruction_task"]

Records = list[dict[str, str]]


def _article(text: str, max_chars: int) -> tuple[str, str]:
    """(headline, body) of a BBC file: the first line is the headline."""
    headline, _, body = text.partition("\n")
    body = " ".join(body.split())
    return headline.strip(), body[:max_chars]


def _split(val_fraction: float, seed: int):
    data = load_bbc_news()
    train, val = stratified_split(data.labels, val_fraction, seed)
    return data, train, val


def bbc_headlines(val_fraction: float = 0.2, seed: int = 0, max_chars: int = 1000) -> tuple[Records, Records]:
    """Article body -> its headline (scored by ROUGE-L)."""
    data, train, val = _split(val_fraction, seed)

    def record(i: int) -> dict[str, str]:
        headline, body = _article(data.texts[i], max_chars)
        return {"prompt": f"Write a short headline for this news article.\n\n{body}", "completion": headline}

    return [record(i) for i in train], [record(i) for i in val]


def bbc_topics(val_fraction: float = 0.2, seed: int = 0, max_chars: int = 400) -> tuple[Records, Records]:
    """Article -> one topic word out of the five (scored by exact match)."""
    data, train, val = _split(val_fraction, seed)
    choices = ", ".join(data.label_names)

    def record(i: int) -> dict[str, str]:
        headline, body = _article(data.texts[i], max_chars)
        return {"prompt": f"Which topic is this news article about? Answer with one word: {choices}.\n\n{headline}. {body}",
                "completion": data.label_names[data.labels[i]]}

    return [record(i) for i in train], [record(i) for i in val]


INSTRUCTION_TASKS: dict[str, Callable[..., tuple[Records, Records]]] = {"bbc_headlines": bbc_headlines, "bbc_topics": bbc_topics}


def load_instruction_task(name: str, **kwargs) -> tuple[Records, Records]:
    """``(train, val)`` records of a built-in task; unknown names list the valid ones."""
    if name not in INSTRUCTION_TASKS:
        raise ValueError(f"Unknown instruction task {name!r}; choose one of {sorted(INSTRUCTION_TASKS)}")
    return INSTRUCTION_TASKS[name](**kwargs)
