"""Text in, token batches out: chat formatting and padding-aware tokenization.

BOS policy (one rule, applied everywhere in steer): text is tokenized exactly as the model's own
Hugging Face tokenizer tokenizes it with ``add_special_tokens=True``; steer never adds a BOS of its
own. For SmolLM2 that means plain text starts with its first word, and chat prompts start with
``<|im_start|>``, which is that model's BOS token, because the chat template writes it. Models whose
tokenizer adds a BOS (Llama 2/3, Gemma) get it as their tokenizer gives it. ``load_model`` sets the
bridge's ``default_prepend_bos`` to match, so ``model.to_tokens(text)`` agrees with ``tokenize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
