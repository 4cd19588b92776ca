"""A word-level tiny Llama for GRPO tests: 24 words, so a chosen word is sampled often enough to learn from."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "yes",
    "no",
    "red",
    "blue",
    "cat",
    "dog",
    "one",
    "two",
    "sun",
    "sky",
    "tree",
    "sea",
    "big",
    "small",
    "up",
    "down",
    "left",
    "right",
    "hot",
    "cold",
]
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
CHAT = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
RECORDS = [{"prompt": f"{a} {b}", "completion": "yes yes"} for a, b in zip(WORDS[2:18], WORDS[4:20])]


def word_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` (plus the roles of the chat template), split on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS, "user", "assistant", "system"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    tok.chat_template = CHAT
    return tok


def word_llama(seed: int = 0):
    """A 2-layer, hidden-32 Llama over the word tokenizer's vocabulary (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(word_tokenizer()),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def save_word_llama(path: Path) -> str:
    word_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def yes_reward(prompts: list[str], completions: list[str], references: list[str], max_words: int = 4) -> list[float]:
    """Share of the ``max_words`` completion slots holding the word ``yes``: learnable from a random start."""
    return [c.split().count("yes") / max_words for c in completions]
