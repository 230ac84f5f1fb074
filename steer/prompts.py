"""Text in, token batches out: chat formatting and padding-aware tokenization.

BOS policy (one rule, applied everywhere in steer): text is tokenized exactly as the model's own
Hugging Face tokenizer tokenizes it with ``add_special_tokens=True``; steer never adds a BOS of its
own. For SmolLM2 that means plain text starts with its first word, and chat prompts start with
``<|im_start|>``, which is that model's BOS token, because the chat template writes it. Models whose
tokenizer adds a BOS (Llama 2/3, Gemma) get it as their tokenizer gives it. ``load_model`` sets the
bridge's ``default_prepend_bos`` to match, so ``model.to_tokens(text)`` agrees with ``tokenize``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from steer.errors import SteerTypeError, SteerValueError


@dataclass(frozen=True)
class Tokens:
    """A padded batch of token ids.

    tokens: ``[batch, pos]`` int64 ids; pads sit on ``padding_side``.
    attention_mask: ``[batch, pos]`` int64, 1 on real tokens, 0 on pads.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    padding_side: str

    @property
    def lengths(self) -> torch.Tensor:
        """``[batch]`` number of real tokens per row."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> Tokens:
        return Tokens(self.tokens.to(device), self.attention_mask.to(device), self.padding_side)


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise SteerTypeError(
            f"Expected a model from steer.load_model or a Hugging Face tokenizer, got "
            f"{type(model_or_tokenizer).__name__}."
        )
    return tokenizer


def tokenize(model_or_tokenizer: Any, texts: str | Sequence[str], *, padding_side: str = "left") -> Tokens:
    """Tokenize one text or a batch, padded on ``padding_side``, following the BOS policy above.

    Left padding (the default) keeps every row's last real token in the last column, which is what
    generation needs; right padding keeps every row's first token in column 0.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if padding_side not in ("left", "right"):
        raise SteerValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not batch:
        raise SteerValueError("No texts to tokenize: pass at least one string.")
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise SteerTypeError(f"Text {i} is a {type(text).__name__}, not a str.")
    ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in batch]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise SteerValueError(f"Texts {empty} tokenize to nothing; give each text at least one character.")
    if tokenizer.pad_token_id is None:
        raise SteerValueError(
            "The tokenizer has no pad token; load the model with steer.load_model, which sets one."
        )
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Tokens(tokens, mask, padding_side)


def chat_prompt(
    model_or_tokenizer: Any,
    user: str,
    *,
    system: str | None = None,
    assistant: str | None = None,
) -> str:
    """Format one user turn with the model's chat template, ready for the assistant to answer.

    ``system`` adds a system message (otherwise the template's default, if any, applies).
    ``assistant`` starts the assistant's answer, so generation continues from it, e.g. ``"(A"``
    or ``"Sure, "``.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise SteerValueError("This tokenizer has no chat template; format the prompt as plain text instead.")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + (assistant or "")


@dataclass(frozen=True)
class ContrastivePair:
    """Two texts that differ in the concept to extract: ``positive`` has it, ``negative`` has its opposite.

    read: where to read each text. ``None`` uses the extractor's ``positions``; an int is a token index
        (negative counts from the end, ``-1`` the last token); a str is a substring of both texts whose
        tokens are averaged (its last occurrence).
    """

    positive: str
    negative: str
    read: int | str | None = None


def pairs_from(data: Iterable[Any]) -> list[ContrastivePair]:
    """Pairs from ``ContrastivePair`` objects, ``(positive, negative)`` tuples or dicts with those keys."""
    pairs = []
    for i, item in enumerate(data):
        if isinstance(item, ContrastivePair):
            pair = item
        elif isinstance(item, dict):
            missing = {"positive", "negative"} - item.keys()
            if missing:
                raise SteerValueError(
                    f"Pair {i} lacks {sorted(missing)}; each pair needs 'positive' and 'negative'."
                )
            pair = ContrastivePair(item["positive"], item["negative"], _read_value(item.get("read")))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            pair = ContrastivePair(*item)
        else:
            raise SteerTypeError(f"Pair {i} is a {type(item).__name__}; use (positive, negative) or a dict.")
        if not isinstance(pair.positive, str) or not isinstance(pair.negative, str):
            raise SteerTypeError(f"Pair {i}'s texts must be strings.")
        if pair.positive == pair.negative:
            raise SteerValueError(
                f"Pair {i} has the same text on both sides ({pair.positive[:60]!r}), so it carries no contrast; "
                "fix or drop it."
            )
        pairs.append(pair)
    if not pairs:
        raise SteerValueError("The pair list is empty; give at least one (positive, negative) pair.")
    return pairs


def load_pairs(path: str | os.PathLike) -> list[ContrastivePair]:
    """Pairs from a ``.jsonl`` file (one object per line) or a ``.csv`` file with a header row.

    Both use the fields ``positive``, ``negative`` and optionally ``read``.
    """
    path = Path(path)
    if not path.is_file():
        raise SteerValueError(f"No such pair file: {path}.")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SteerValueError(f"{path}:{n} is not valid JSON: {err.msg}.") from None
        return pairs_from(rows)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return pairs_from(csv.DictReader(f))
    raise SteerValueError(f"{path} is neither .jsonl nor .csv; pair files use one of those.")


def example_pairs(name: str) -> list[ContrastivePair]:
    """A small pair set shipped with steer: ``"sentiment"`` or ``"formality"``."""
    path = resources.files("steer") / "data" / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".jsonl") for p in (resources.files("steer") / "data").iterdir())
        raise SteerValueError(f"No example pair set {name!r}; there are {', '.join(known)}.")
    with resources.as_file(path) as real:
        return load_pairs(real)


def ab_pairs(
    model_or_tokenizer: Any, items: Iterable[dict[str, str]], *, system: str | None = None
) -> list[ContrastivePair]:
    """CAA-style A/B items as chat-formatted pairs read at the answer letter.

    Each item is ``{"question": ..., "answer_matching_behavior": "(A)", "answer_not_matching_behavior":
    "(B)"}``, the question listing the choices. The positive text is the question followed by the start
    of the matching answer, ``"(A"``; the negative ends in the other letter. Both are read at their last
    token, the letter.
    """
    pairs = []
    for i, item in enumerate(items):
        try:
            question = item["question"]
            yes, no = item["answer_matching_behavior"], item["answer_not_matching_behavior"]
        except (KeyError, TypeError):
            raise SteerValueError(
                f"A/B item {i} needs 'question', 'answer_matching_behavior' and 'answer_not_matching_behavior'."
            ) from None
        prompt = chat_prompt(model_or_tokenizer, question, system=system)
        pairs.append(ContrastivePair(prompt + _letter(yes), prompt + _letter(no), read=-1))
    return pairs_from(pairs)


def token_span(model_or_tokenizer: Any, text: str, substring: str) -> slice:
    """Token indices covering the last occurrence of ``substring`` in ``text`` (BOS policy as ``tokenize``)."""
    tokenizer = _tokenizer_of(model_or_tokenizer)
    start = text.rfind(substring)
    if start < 0 or not substring:
        raise SteerValueError(f"{substring!r} does not occur in {text[:80]!r}; pick a span of the text.")
    end = start + len(substring)
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return slice(hit[0], hit[-1] + 1)


def _letter(answer: str) -> str:
    """``"(A)"`` -> ``"(A"``: the answer up to and including its letter, so the letter is the last token."""
    answer = answer.strip()
    return answer[:-1] if answer.endswith(")") else answer


def _read_value(value: Any) -> int | str | None:
    """CSV cells are strings: an integer-looking ``read`` is an index."""
    if value in (None, ""):
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value
