"""Which token positions of one forward call an edit or a read touches.

Positions are counted among a row's *real* tokens: position 0 is the row's first non-pad token,
whatever the padding side, and a generated token's position is one past the previous one, whether
generation recomputes the whole sequence or feeds one token on top of a KV cache. A selector therefore
means the same tokens for a prompt alone, in a left- or right-padded batch, and with or without the
cache, and it never touches a pad.

Selectors:
    "all"        every real token, prompt and generated
    "prompt"     the prompt's tokens (in a plain forward call, every token is prompt)
    "generated"  tokens produced by ``generate`` (none in a plain forward call)
    "last"       the prompt's last token
    "mean"       for reads: the mean over every token of the prompt (for writes it means "prompt")
    int k        token k; negative k counts back from the prompt's end (-1 is the last prompt token)
    slice(a, b)  tokens a..b-1; ``slice(k, None)`` is "from token k on", generated tokens included;
                 negative bounds count back from the prompt's end
    a bool mask  ``[pos]`` or ``[batch, pos]`` over positions 0..pos-1
    a list       one of the above per batch row; ``None`` in such a list selects nothing in that row
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from steer.errors import SteerTypeError, SteerValueError

# A recursive alias needs the string forward reference, which the | operator cannot take.
Selector = Union[str, int, slice, torch.Tensor, Sequence[bool], Sequence["Selector"]]  # noqa: UP007
NAMED = ("all", "prompt", "generated", "last", "mean")


@dataclass(frozen=True)
class CallState:
    """The token layout of one forward call.

    mask: ``[batch, past + new]`` 1 on real tokens, 0 on pads, over the cached prefix and this call's tokens.
    past: how many columns are already in the KV cache (0 without a cache).
    prompt_width: columns ``< prompt_width`` hold the prompt; later columns were generated.
    """

    mask: torch.Tensor
    past: int
    prompt_width: int

    @classmethod
    def plain(cls, attention_mask: torch.Tensor) -> CallState:
        """A forward call over a whole prompt: no cache, nothing generated."""
        return cls(attention_mask, 0, attention_mask.shape[1])

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def new(self) -> int:
        """Number of columns this call computes."""
        return self.mask.shape[1] - self.past

    def layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(is_real, index, is_prompt, prompt_len)`` for this call's columns.

        is_real, is_prompt: ``[batch, new]`` bool; index: ``[batch, new]`` position among the row's real
        tokens; prompt_len: ``[batch, 1]`` real tokens in each row's prompt.
        """
        mask = self.mask.bool()
        index = (mask.long().cumsum(dim=1) - 1)[:, self.past :]
        is_real = mask[:, self.past :]
        columns = torch.arange(self.past, self.mask.shape[1], device=mask.device)
        is_prompt = (columns < self.prompt_width).expand_as(is_real)
        prompt_len = mask[:, : self.prompt_width].sum(dim=1, keepdim=True)
        return is_real, index, is_prompt, prompt_len


def validate(selector: Selector) -> Selector:
    """Refuse a selector that is malformed or can never select a token; return it unchanged."""
    if isinstance(selector, str):
        if selector not in NAMED:
            raise SteerValueError(f"Unknown position selector {selector!r}; use one of {', '.join(NAMED)}.")
    elif isinstance(selector, bool):
        raise SteerTypeError("A position selector cannot be a bool; use 'all' or a mask.")
    elif isinstance(selector, int):
        pass
    elif isinstance(selector, slice):
        if selector.step not in (None, 1):
            raise SteerValueError(f"Position slices take no step, got {selector}.")
        a, b = selector.start, selector.stop
        if a is not None and b is not None and (a >= 0) == (b >= 0) and b <= a:
            raise SteerValueError(f"The position slice {selector} selects no token; make stop > start.")
    elif isinstance(selector, torch.Tensor) or _is_bool_list(selector):
        mask = torch.as_tensor(selector)
        if mask.dtype != torch.bool or mask.ndim not in (1, 2):
            raise SteerTypeError("A position mask must be a bool tensor of shape [pos] or [batch, pos].")
        if not mask.any():
            raise SteerValueError("The position mask selects no token; set at least one entry True.")
    elif isinstance(selector, Sequence) and selector:
        for s in selector:
            if isinstance(s, (list, tuple)) and not _is_bool_list(s):
                raise SteerTypeError("Per-row selectors cannot nest further.")
            if s is not None:
                validate(s)
        if all(s is None for s in selector):
            raise SteerValueError("Every row's selector is None, so nothing would be selected.")
    else:
        raise SteerTypeError(f"Not a position selector: {selector!r}. See steer.positions for the forms.")
    return selector


def select(selector: Selector, state: CallState) -> torch.Tensor:
    """``[batch, new]`` bool: the positions of this call that ``selector`` picks. Pads are never picked."""
    is_real, index, is_prompt, prompt_len = state.layout()
    if is_per_row(selector):
        if len(selector) != state.batch:
            raise SteerValueError(
                f"{len(selector)} per-row position selectors for a batch of {state.batch} rows; "
                "give one per row."
            )
        # Rows usually share a few selectors (a generate() batch: the same one, or None); select each once.
        masks: dict[int, torch.Tensor] = {}
        rows = []
        for i, s in enumerate(selector):
            if s is None:
                rows.append(torch.zeros_like(is_real[i]))
                continue
            if id(s) not in masks:
                masks[id(s)] = select(s, state)
            rows.append(masks[id(s)][i])
        return torch.stack(rows)
    prompt = is_real & is_prompt
    if isinstance(selector, str):
        if selector == "all":
            return is_real
        if selector in ("prompt", "mean"):
            return prompt
        if selector == "generated":
            return is_real & ~is_prompt
        return prompt & (index == prompt_len - 1)  # "last"
    if isinstance(selector, int):
        k = selector + prompt_len if selector < 0 else torch.full_like(prompt_len, selector)
        # A negative index names a prompt token; a non-negative one may reach into generated tokens.
        return (prompt if selector < 0 else is_real) & (index == k)
    if isinstance(selector, slice):
        lo = _bound(selector.start, prompt_len, default=0)
        hi = _bound(selector.stop, prompt_len, default=None)
        picked = is_real & (index >= lo)
        return picked if hi is None else picked & (index < hi)
    mask = torch.as_tensor(selector, device=index.device)
    if mask.ndim == 1:
        mask = mask.expand(state.batch, -1)
    if mask.shape[0] != state.batch:
        raise SteerValueError(f"The position mask has {mask.shape[0]} rows for a batch of {state.batch}.")
    inside = index < mask.shape[1]
    gathered = mask.gather(1, index.clamp(0, mask.shape[1] - 1))
    return is_real & inside & gathered


def is_per_row(selector: Selector) -> bool:
    """Whether ``selector`` is a list of selectors, one per batch row."""
    return isinstance(selector, (list, tuple)) and bool(selector) and not _is_bool_list(selector)


def _bound(value: int | None, prompt_len: torch.Tensor, default: int | None) -> torch.Tensor | int | None:
    if value is None:
        return default
    return value + prompt_len if value < 0 else value


def _is_bool_list(x: object) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(v, bool) for v in x)
