"""Attention steering: make chosen heads look at chosen spans of the prompt (as in PASTA).

For each chosen (layer, head), every query's pre-softmax score for a prompt key *outside* the
emphasised spans gets ``log(alpha)`` added, so after the softmax the attention to those keys is scaled
by ``alpha`` (relative to the span) and each row still sums to 1. ``alpha < 1`` emphasises the spans,
``alpha > 1`` de-emphasises them, ``alpha = 1`` changes nothing. Keys of generated tokens are left
alone; generated queries, which read the prompt's keys from the KV cache, see them re-weighted.

The edit is made at ``blocks.{L}.attn.hook_attn_scores`` ``[batch, head, query, key]``. Before first
use on a model steer checks that an edit there reaches the attention output; a model whose attention
only reports the scores is refused.

Spans are substrings of each prompt (every occurrence) or ``(start, end)`` character offsets, counted
in the prompt as it is tokenized (after a chat template, when ``chat=True`` applies one).

``profile_heads`` steers each head (or each layer's heads) alone on a small task and ranks them by
what that does to a metric; its best heads are a head set for ``Emphasis``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import einops
import torch
from tqdm.auto import tqdm

from steer.errors import SteerError, SteerTypeError, SteerValueError
from steer.hooks import attach, cache_prefix, paused, resume, trunk
from steer.metrics import MetricLike, Scorer
from steer.positions import CallState, select
from steer.prompts import Tokens, pad, token_mask

Span = str | tuple[int, int]
SCORES = "blocks.{}.attn.hook_attn_scores"


@dataclass(frozen=True)
class Emphasis:
    """Which spans to emphasise, with which heads, how strongly.

    spans: a substring or ``(start, end)`` character offsets, or a list of them, for every prompt; or a
        list of such lists, one per prompt.
    heads: ``(layer, head)`` pairs; a bare ``layer`` means all of that layer's heads.
    alpha: the factor on attention to the prompt's other tokens, ``> 0`` (PASTA uses 0.01).
    """

    spans: Span | Sequence[Span] | Sequence[Sequence[Span]]
    heads: Sequence[tuple[int, int] | int]
    alpha: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SteerValueError(
                f"alpha must be a finite number > 0, got {self.alpha!r}; 0.01 makes the chosen heads "
                "look almost only at the spans, 1 changes nothing."
            )
        if isinstance(self.heads, (int, str)) or not self.heads:
            raise SteerValueError(
                "heads is a list of (layer, head) pairs or layers, e.g. [(12, 3), 14]; "
                "steer.profile_heads finds good ones."
            )
        for item in self.heads:
            ok = isinstance(item, int) or (
                isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, int) for x in item)
            )
            if not ok or isinstance(item, bool):
                raise SteerTypeError(f"Each head is (layer, head) or a layer number; got {item!r}.")
        if _is_span(self.spans):
            return
        if isinstance(self.spans, str) or not isinstance(self.spans, Sequence) or not self.spans:
            raise SteerValueError("spans is a substring, (start, end), or a non-empty list of them.")
        nested = [isinstance(s, list) for s in self.spans]
        if any(nested) and not all(nested):
            raise SteerTypeError("spans mixes lists and single spans; give one list per prompt, or no lists.")
        for group in self.spans if all(nested) else [self.spans]:
            if not group or not all(_is_span(s) for s in group):
                raise SteerTypeError(
                    f"Each span is a substring or (start, end) character offsets; got {group!r}."
                )

    def head_map(self, model) -> dict[int, list[int]]:
        """``{layer: [head, ...]}`` on ``model``, checked against its shape."""
        layers, heads = model.cfg.n_layers, model.cfg.n_heads
        out: dict[int, set[int]] = {}
        for item in self.heads:
            layer, head = (item, None) if isinstance(item, int) else item
            if not 0 <= layer < layers:
                raise SteerValueError(f"Layer {layer} is outside 0..{layers - 1}; this model has {layers}.")
            if head is not None and not 0 <= head < heads:
                raise SteerValueError(f"Head {head} is outside 0..{heads - 1}; each layer has {heads} heads.")
            out.setdefault(layer, set()).update(range(heads) if head is None else [head])
        return {layer: sorted(h) for layer, h in sorted(out.items())}

    def spans_for(self, prompts: int) -> list[list[Span]]:
        """One list of spans per prompt."""
        if _is_span(self.spans):
            return [[self.spans]] * prompts
        if isinstance(self.spans[0], list):
            if len(self.spans) != prompts:
                raise SteerValueError(
                    f"{len(self.spans)} lists of spans for {prompts} prompts; give one list per prompt, "
                    "or one set of spans for all."
                )
            return [list(group) for group in self.spans]
        return [list(self.spans)] * prompts

    def token_masks(self, model, texts: Sequence[str]) -> list[list[bool]]:
        """Per text, one bool per token: inside an emphasised span."""
        return [token_mask(model, text, spans) for text, spans in zip(texts, self.spans_for(len(texts)))]

    @contextlib.contextmanager
    def hooked(self, model, masks: Sequence[Sequence[bool] | None]) -> Iterator[None]:
        """Re-weight the chosen heads inside the block; ``masks`` (from ``token_masks``) mark each row's
        emphasised tokens, counted among its real tokens; ``None`` leaves a row alone."""
        heads = self.head_map(model)
        check_editable(model, next(iter(heads)))
        emphasised = _row_masks(masks)
        on = torch.tensor([m is not None for m in masks])
        log_alpha = math.log(self.alpha)
        memo: dict = {"state": None}

        def down(state: CallState) -> torch.Tensor:
            """``[batch, key]`` True at prompt keys outside the spans, in emphasised rows."""
            if memo["state"] is not state:  # once per forward call, shared by every layer
                whole = CallState(state.mask, 0, state.prompt_width)  # every key column, cached ones too
                prompt = select("prompt", whole)
                inside = select(emphasised.to(prompt.device), whole)
                memo["state"], memo["down"] = state, prompt & ~inside & on.to(prompt.device)[:, None]
            return memo["down"]

        def edit(layer_heads: list[int]):
            def fn(scores: torch.Tensor, state: CallState) -> torch.Tensor:
                return reweight(scores, down(state), layer_heads, log_alpha)

            return fn

        hooks = [(SCORES.format(layer), edit(h)) for layer, h in heads.items()]
        with attach(model, hooks, what="attention steering"):
            yield

    @contextlib.contextmanager
    def applied(self, model, texts: str | Sequence[str], *, padding_side: str = "left") -> Iterator[Tokens]:
        """Tokenize ``texts`` and emphasise their spans in forward passes and ``model.generate`` inside
        the block, which get the yielded batch::

            with emphasis.applied(model, texts) as batch:
                logits = model(batch.tokens, attention_mask=batch.attention_mask)
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        masks = self.token_masks(model, texts)
        rows = [model.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        with self.hooked(model, masks):
            yield pad(rows, model.tokenizer.pad_token_id, padding_side)


def reweight(scores: torch.Tensor, down: torch.Tensor, heads, log_alpha: float) -> torch.Tensor:
    """``scores`` ``[batch, head, query, key]`` plus ``log_alpha`` where ``down`` ``[batch, key]`` is True,
    for ``heads``: a list of head indices, or ``[batch, head]`` bool, one head set per row."""
    if down.shape[1] != scores.shape[-1]:
        raise SteerError(
            f"The attention scores cover {scores.shape[-1]} keys but the call has {down.shape[1]} columns; "
            "attention steering cannot tell which key is which here."
        )
    if isinstance(heads, torch.Tensor):
        chosen = heads.to(scores.device)
    else:
        chosen = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        chosen[heads] = True
        chosen = chosen.expand(scores.shape[0], -1)
    cells = chosen[:, :, None, None] & down.to(scores.device)[:, None, None, :]
    return scores + cells.to(scores.dtype) * log_alpha


def _row_masks(masks: Sequence[Sequence[bool] | None]) -> torch.Tensor:
    """``[batch, longest]`` bool over each row's real tokens, False beyond a row's mask."""
    width = max((len(m) for m in masks if m is not None), default=1)
    out = torch.zeros(len(masks), width, dtype=torch.bool)
    for i, m in enumerate(masks):
        if m is not None:
            out[i, : len(m)] = torch.tensor(list(m), dtype=torch.bool)
    return out


def _is_span(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) for x in value)
    )


_editable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_editable(model, layer: int = 0) -> None:
    """Refuse a model whose ``hook_attn_scores`` reports the scores without using an edit of them.

    Two three-token runs through ``layer``, one with the first key masked out for every query (any
    hooks steer has attached pass through meanwhile): if the output does not move, the edit did
    nothing. A model that passes is remembered.
    """
    if _editable.get(model):
        return
    tokens = torch.arange(1, 4, device=next(model.parameters()).device)[None]

    def mask_first(scores: torch.Tensor, hook) -> torch.Tensor:
        scores = scores.clone()
        scores[..., 0] = -1e4
        return scores

    with torch.no_grad(), paused(model):
        plain = model(tokens, stop_at_layer=layer + 1)
        with model.hooks(fwd_hooks=[(SCORES.format(layer), mask_first)]):
            edited = model(tokens, stop_at_layer=layer + 1)
    if torch.equal(plain, edited):
        raise SteerError(
            f"This model's attention ({type(model.blocks[layer].attn).__name__}) reports "
            f"{SCORES.format(layer)} but does not use an edit of it, so attention steering would do "
            "nothing; it needs a TransformerBridge attention that computes the softmax itself."
        )
    _editable[model] = True


@dataclass
class AttentionMaps:
    """One head's attention pattern over one prompt, without and with the emphasis.

    before, after: ``[query, key]``. tokens: the prompt's tokens. emphasised: per token, inside a span.
    """

    tokens: list[str]
    before: torch.Tensor
    after: torch.Tensor
    emphasised: list[bool]
    layer: int
    head: int
    alpha: float

    def span_mass(self) -> tuple[float, float]:
        """Attention mass on the spans, before and after, averaged over the queries from the first
        emphasised token on (earlier queries cannot see the spans)."""
        inside = torch.tensor(self.emphasised)
        first = int(inside.nonzero()[0])
        return tuple(float(m[first:, inside].sum(dim=-1).mean()) for m in (self.before, self.after))

    def plot(self):
        from steer.plot import attention_maps as draw

        return draw(self)


def attention_maps(model, text: str, emphasis: Emphasis, layer: int, head: int) -> AttentionMaps:
    """Head ``(layer, head)``'s attention over ``text`` unsteered and with ``emphasis`` applied (whether
    or not the emphasis steers that head itself: heads it steers at earlier layers change it too)."""
    Emphasis(emphasis.spans, [(layer, head)], emphasis.alpha).head_map(model)
    found: list[torch.Tensor] = []

    def keep(pattern: torch.Tensor, state) -> None:
        found.append(pattern[0, head].detach().float().cpu())

    reader = [(f"blocks.{layer}.attn.hook_pattern", keep)]
    ids = torch.tensor([model.tokenizer(text, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        with attach(model, reader, what="attention read"):
            model(ids.to(model.cfg.device), stop_at_layer=layer + 1)
        with emphasis.applied(model, text) as batch, attach(model, reader, what="attention read"):
            model(batch.tokens.to(model.cfg.device), stop_at_layer=layer + 1)
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    mask = emphasis.token_masks(model, [text])[0]
    return AttentionMaps(tokens, found[0], found[1], mask, layer, head, emphasis.alpha)


@dataclass
class HeadProfile:
    """What emphasising the spans with one head (or one layer's heads) at a time does to a metric.

    effects: ``[n_layers, n_heads]`` (``by="head"``) or ``[n_layers, 1]`` (``by="layer"``): metric when
        steered minus ``baseline``; NaN for layers not profiled.
    """

    effects: torch.Tensor
    baseline: float
    metric: str
    by: str
    alpha: float

    def top(self, k: int = 10) -> list[tuple[int, int | None, float]]:
        """The ``k`` units that raise the metric most: ``(layer, head or None, effect)``."""
        flat = self.effects.flatten().nan_to_num(-math.inf)
        order = flat.argsort(descending=True)[: min(k, int(self.effects.isfinite().sum()))]
        width = self.effects.shape[1]
        return [
            (int(i) // width, None if self.by == "layer" else int(i) % width, float(flat[i])) for i in order
        ]

    def heads(self, k: int = 5) -> list[tuple[int, int] | int]:
        """The best ``k`` heads (or layers) with a positive effect, ready for ``Emphasis(heads=...)``."""
        best = [(layer, head) for layer, head, effect in self.top(k) if effect > 0]
        return [layer if head is None else (layer, head) for layer, head in best]

    def records(self) -> list[dict]:
        rows = []
        for layer in range(self.effects.shape[0]):
            for head in range(self.effects.shape[1]):
                value = float(self.effects[layer, head])
                if not math.isnan(value):
                    unit = None if self.by == "layer" else head
                    rows.append({"layer": layer, "head": unit, "effect": value})
        return rows

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records())

    def plot(self, *, k: int = 15):
        from steer.plot import head_profile

        return head_profile(self, k=k)

    def __str__(self) -> str:
        lines = [f"{self.metric}: {self.baseline:.4f} unsteered (alpha {self.alpha:g}); best by effect:"]
        for layer, head, effect in self.top(10):
            unit = f"L{layer}" if head is None else f"L{layer}.H{head}"
            lines.append(f"  {unit:>8}  {effect:+.4f}")
        return "\n".join(lines)


def profile_heads(
    model,
    prompts: str | Sequence[str],
    spans: Span | Sequence[Span] | Sequence[Sequence[Span]],
    metric: MetricLike,
    *,
    alpha: float = 0.01,
    by: str = "head",
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> HeadProfile:
    """Emphasise ``spans`` with each head alone (``by="head"``) or each layer's heads (``by="layer"``)
    and measure ``metric`` (``steer.logit_diff``, ``steer.answer_prob`` or a function of the logits
    ``[prompts, pos, d_vocab]`` of the left-padded batch) against the unsteered run.

    A head at layer ``L`` leaves blocks ``0..L-1`` alone, and every position before the first emphasised
    token as it was, so the prompts run once and every steered run resumes at its layer and that position
    from the kept residual stream and KV cache; ``batch_size`` bounds the rows per resumed run.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise SteerValueError("profile_heads needs at least one prompt, each a non-empty string.")
    if by not in ("head", "layer"):
        raise SteerValueError(f"by must be 'head' or 'layer', got {by!r}.")
    if batch_size < 1:
        raise SteerValueError(f"batch_size must be at least 1, got {batch_size}.")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    chosen = list(range(n_layers)) if layers is None else sorted({int(x) for x in layers})
    emphasis = Emphasis(spans, chosen, alpha)
    emphasis.head_map(model)
    check_editable(model, chosen[0])
    masks = emphasis.token_masks(model, texts)
    rows = [model.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    batch = pad(rows, model.tokenizer.pad_token_id, "left")
    scorer = Scorer.build(model, metric, len(texts), len(texts))
    kept = trunk(model, batch, [layer - 1 for layer in chosen], keep_cache=True)
    baseline = float(scorer(kept.logits)[0])
    inside = select(_row_masks(masks), kept.state)
    down = select("prompt", kept.state) & ~inside
    # A query that sees no emphasised key gets the same log(alpha) on every prompt key it sees, which the
    # softmax cancels: columns before the first emphasised token are as in the unsteered run.
    start = int(inside.any(dim=0).nonzero()[0])

    units = [None] if by == "layer" else list(range(n_heads))
    per_run = max(1, batch_size // len(texts))
    runs = [(layer, units[i : i + per_run]) for layer in chosen for i in range(0, len(units), per_run)]
    effects = torch.full((n_layers, len(units)), math.nan)
    show = progress if progress is not None else len(runs) > 1
    for layer, group in tqdm(runs, desc="profiling heads", disable=not show, leave=False):
        heads = torch.zeros(len(group), n_heads, dtype=torch.bool)
        for i, head in enumerate(group):
            heads[i, slice(None) if head is None else head] = True
        heads = einops.repeat(heads, "unit head -> (unit row) head", row=len(texts))

        fn = _fixed(down.repeat(len(group), 1), heads, math.log(alpha))
        resid = kept.resid[layer - 1][:, start:].repeat(len(group), 1, 1)
        prefix = cache_prefix(kept.cache, start, len(group), first_layer=layer) if start else None
        with attach(model, [(SCORES.format(layer), fn)], what="head profiling"):
            final, _ = resume(model, kept, layer - 1, resid, prefix, start=start)
        with torch.inference_mode():
            if scorer.last_only:
                logits = model.unembed(model.ln_final(final[:, -1:]))
            else:
                before = kept.logits[:, :start].repeat(len(group), 1, 1)
                logits = torch.cat([before, model.unembed(model.ln_final(final)).to(before.dtype)], dim=1)
            values = scorer(logits)
        columns = [0] if by == "layer" else group
        effects[layer, columns] = values.float().cpu() - baseline
    return HeadProfile(effects, baseline, scorer.name, by, alpha)


def _fixed(down: torch.Tensor, heads: torch.Tensor, log_alpha: float):
    """A score edit for runs with no KV cache, whose layout is known in advance: ``down`` ``[rows, key]``,
    ``heads`` ``[rows, head]``."""

    def fn(scores: torch.Tensor, state) -> torch.Tensor:
        return reweight(scores, down, heads, log_alpha)

    return fn
