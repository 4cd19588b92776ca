"""Reward functions for GRPO: the built-in verifiable topic reward, and resolving and checking a user's reward.

A reward function is any callable ``(prompts, completions, references) -> list[float]`` taking three
lists of strings of one length (a prompt repeated for each of its completions) and returning one finite
score per completion.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

__all__ = ["BBC_TOPICS", "RewardFunction", "resolve_reward", "reward_name", "score_completions", "topic_reward"]

RewardFunction = Callable[[list[str], list[str], list[str]], Sequence[float]]
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")


def _words(text: str) -> list[str]:
    """Lower-cased words of ``text`` with punctuation removed: ``"Sport."`` -> ``["sport"]``."""
    return re.sub(r"[^\w\s]", " ", text).casefold().split()


def topic_reward(
    prompts: list[str], completions: list[str], references: list[str], choices: Sequence[str] = BBC_TOPICS, format_bonus: float = 0.1
) -> list[float]:
    """Verifiable reward for topic-as-generation: ``1`` when the answer is the reference topic, plus a format term.

    The answer and the reference are compared as words, case-insensitive and without punctuation
    (``"Sport."`` is ``sport``); an answer that says more than the one word (``"sport news"``) is wrong. The
    format term ``format_bonus`` is added when the answer is exactly one word out of ``choices`` (the five BBC
    topics by default), right or wrong: a wrong topic word scores 0.1, free text 0, the right word 1.1.
    ``prompts`` are not read. In Hydra: ``{_target_: lightning_peft.topic_reward, _partial_: true}``.

    >>> topic_reward(["p", "p", "p"], ["Sport.", "business", "It is sport"], ["sport", "sport", "sport"])
    [1.1, 0.1, 0.0]
    """
    if isinstance(choices, str) or not choices:
        raise ValueError(f"choices must be a non-empty list of topic words, got {choices!r}")
    allowed = {w.casefold() for w in choices}
    scores = []
    for completion, reference in zip(completions, references):
        words = _words(completion)
        right = float(words == _words(reference))
        scores.append(right + (float(format_bonus) if len(words) == 1 and words[0] in allowed else 0.0))
    return scores


def _import(path: str) -> Any:
    module, _, attr = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"reward {path!r} is not a dotted path 'package.module.function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"cannot import the reward function {path!r} ({type(e).__name__}: {e}); the built-in one is 'lightning_peft.topic_reward'"
        ) from None


def resolve_reward(spec: RewardFunction | str | Mapping[str, Any]) -> RewardFunction:
    """A reward callable from a callable, a dotted path (``"lightning_peft.topic_reward"``) or a Hydra-style
    mapping ``{"_target_": path, **kwargs}`` (classes and ``_partial_: true`` are called with the kwargs).

    >>> resolve_reward({"_target_": "lightning_peft.topic_reward", "_partial_": True, "format_bonus": 0.5})(["p"], ["Tech"], ["tech"])
    [1.5]
    """
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(f"a reward mapping needs a _target_ (a dotted path), got keys {sorted(spec)}")
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
        target = _import(str(spec["_target_"]))
        if spec.get("_partial_"):
            return partial(target, **kwargs)
        return target(**kwargs) if kwargs or isinstance(target, type) else target
    if isinstance(spec, str):
        spec = _import(spec)
        if isinstance(spec, type):
            spec = spec()
    if not callable(spec):
        raise TypeError(
            f"reward must be a callable (prompts, completions, references) -> list[float], a dotted path or a "
            f"{{_target_: ...}} mapping; got {type(spec).__name__}"
        )
    return spec


def reward_name(fn: Any) -> str:
    """A readable name of a reward callable, for messages and hyperparameters."""
    if isinstance(fn, partial):
        return reward_name(fn.func)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else "…" + text[-n + 1 :])


def score_completions(fn: RewardFunction, prompts: list[str], completions: list[str], references: list[str]) -> torch.Tensor:
    """``fn``'s rewards as a float32 tensor ``(N,)``, refusing anything that would train on garbage.

    An exception inside ``fn`` is re-raised naming the function and the first prompt it fails on; a result
    of the wrong length, a non-number, NaN or infinity is an error naming the function (and the completion).
    """
    name = reward_name(fn)
    try:
        result = fn(prompts, completions, references)
    except Exception as error:
        culprit = 0
        for i in range(len(prompts)):  # find the first example it fails on alone, to name it
            try:
                fn(prompts[i : i + 1], completions[i : i + 1], references[i : i + 1])
            except Exception:
                culprit = i
                break
        raise RuntimeError(
            f"reward function {name} raised {type(error).__name__}: {error} — on prompt {culprit} "
            f"{_short(prompts[culprit])} with completion {_short(completions[culprit])}"
        ) from error
    if isinstance(result, torch.Tensor):
        result = result.detach().flatten().tolist()
    try:
        values = [float(v) for v in result]
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward function {name} must return a list of numbers, got {type(result).__name__} ({e})") from None
    if len(values) != len(completions):
        raise ValueError(
            f"reward function {name} returned {len(values)} rewards for {len(completions)} completions; it must return one per completion"
        )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(
                f"reward function {name} returned {v} for completion {i} {_short(completions[i])} of prompt "
                f"{_short(prompts[i])}: rewards must be finite numbers"
            )
    return torch.tensor(values, dtype=torch.float32)
