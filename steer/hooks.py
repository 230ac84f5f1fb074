"""Hook lifetimes, call tracking and position-aware reads: the engine under every steer feature.

``attach`` puts hook functions on TransformerLens hook points for the length of a ``with`` block and
always takes them off again, also when an exception escapes. Each function is called as
``fn(activation, state)`` where ``state`` is the ``CallState`` of the forward call being run, so a
hook can pick its token positions with ``steer.positions.select``. A tracker on the underlying Hugging
Face model records that state once per forward call (not once per hook): the attention mask over the
cached prefix and the new tokens, the cache length, and, while ``model.generate`` runs, where the
prompt ends. After every completed forward call it checks that each attached hook fired; a hook point
that exists but never fires (a gated attention hook, say) is an error, not a silent no-op.

``read`` runs batched forward passes that stop after the deepest layer needed and keep, per row, only
the mean activation over the selected positions, so memory is ``O(rows x hooks x d_model)``.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steer.errors import SteerError, SteerValueError
from steer.positions import CallState, Selector, is_per_row, select, validate
from steer.prompts import Tokens

HookFn = Callable[[torch.Tensor, CallState], "torch.Tensor | None"]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class _Watch:
    name: str
    what: str
    fired: bool = False


class _Tracker:
    """Follows one model's forward calls; shared by every ``attach`` on that model."""

    def __init__(self, model) -> None:
        self.model = model
        self.state: CallState | None = None
        self.watches: list[_Watch] = []
        self.users = 0
        self.paused = False
        self._prompt_width: int | None = None
        self._generating = False
        hf = model.original_model
        self._handles = [
            hf.register_forward_pre_hook(self._before, with_kwargs=True),
            hf.register_forward_hook(self._after),
        ]
        generate = model.generate

        def tracked_generate(*args, **kwargs):
            self._generating, self._prompt_width = True, None
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating, self._prompt_width = False, None

        tracked_generate.__doc__ = generate.__doc__
        model.generate = tracked_generate

    def _before(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("input_ids")
        if x is None:
            x = kwargs["inputs_embeds"]
        batch, new = x.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2:
            mask = torch.ones(batch, past + new, dtype=torch.long, device=x.device)
        width = past + new
        if self._generating:
            # The first call of a generation sees exactly the prompt, with or without a KV cache.
            if self._prompt_width is None:
                self._prompt_width = width
            width = self._prompt_width
        self.state = CallState(mask, past, width)
        for watch in self.watches:
            watch.fired = False

    def _after(self, module, args, output) -> None:
        silent = [w for w in self.watches if not w.fired]
        if silent:
            names = ", ".join(sorted({w.name for w in silent}))
            raise SteerError(
                f"Hook point(s) {names} never fired during this forward pass, so the "
                f"{silent[0].what} did nothing. TransformerBridge accepts some hook names it only "
                "fires when a flag is on (for example model.set_use_attn_result(True) for hook_result); "
                "turn that flag on or pick another hook point."
            )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.__dict__.pop("generate", None)


_trackers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _tracking(model) -> Iterator[_Tracker]:
    tracker = _trackers.get(model)
    if tracker is None:
        tracker = _trackers[model] = _Tracker(model)
    tracker.users += 1
    try:
        yield tracker
    finally:
        tracker.users -= 1
        if tracker.users == 0:
            tracker.close()
            del _trackers[model]


def active(model) -> list[str]:
    """What steer has attached to ``model`` right now (the features' names), empty when nothing."""
    tracker = _trackers.get(model)
    return sorted({watch.what for watch in tracker.watches}) if tracker else []


@contextlib.contextmanager
def paused(model) -> Iterator[None]:
    """Inside the block, every hook steer attached to ``model`` passes its activation through unchanged,
    so steer can run a probe of its own inside a user's ``with`` blocks."""
    tracker = _trackers.get(model)
    if tracker is None:
        yield
        return
    before, tracker.paused = tracker.paused, True
    try:
        yield
    finally:
        tracker.paused = before


def check_hook_name(model, name: str) -> None:
    """Refuse a hook point the model does not have, naming the valid range."""
    if name in model.hook_dict:
        return
    match = _BLOCK.match(name)
    if match and int(match.group(1)) >= model.cfg.n_layers:
        raise SteerValueError(
            f"Layer {match.group(1)} in {name!r} is outside 0..{model.cfg.n_layers - 1}; "
            f"this model has {model.cfg.n_layers} layers."
        )
    suffix = name.split(".")[-1]
    similar = sorted(n for n in model.hook_dict if n.endswith(suffix))[:3]
    hint = f" Similar names: {', '.join(similar)}." if similar else ""
    raise SteerValueError(f"The model has no hook point {name!r}.{hint}")


def layer_of(name: str) -> int | None:
    """The block index of a hook name like ``blocks.12.hook_resid_post``, else ``None``."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def attach(model, hooks: Sequence[tuple[str, HookFn]], what: str = "intervention") -> Iterator[None]:
    """Attach ``fn(activation, state)`` at each named hook point for the ``with`` block.

    ``what`` names the feature in the error raised when a hook never fires. ``blocks.L.hook_resid_mid``
    means the residual stream between attention and MLP, read and written as such (see ``_resid_mid``).
    """
    for name, _ in hooks:
        check_hook_name(model, name)
    with _tracking(model) as tracker:
        watches = [_Watch(name, what) for name, _ in hooks]

        def wrap(fn: HookFn, watch: _Watch):
            def hook_fn(activation: torch.Tensor, hook) -> torch.Tensor | None:
                watch.fired = True
                return None if tracker.paused else fn(activation, tracker.state)

            return hook_fn

        fwd_hooks = []
        for (name, fn), watch in zip(hooks, watches):
            fwd_hooks += _resid_mid(name, wrap(fn, watch)) if _MID.match(name) else [(name, wrap(fn, watch))]
        tracker.watches.extend(watches)
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
                except ValueError as err:  # TransformerBridge refuses hooks gated behind a flag
                    raise SteerValueError(str(err)) from err
                yield
        finally:
            for watch in watches:
                tracker.watches.remove(watch)


def _resid_mid(name: str, hook_fn) -> list[tuple[str, Callable]]:
    """TransformerLens hooks that give ``hook_fn`` the residual stream between attention and MLP and
    make its edits reach the residual stream.

    TransformerBridge's ``hook_resid_mid`` is the second norm's input hook: an edit there reaches the
    MLP, but the block adds the MLP's output to the unedited tensor, and a gradient taken there misses
    the residual path. So ``resid_mid = resid_pre + attn_out`` is formed at the attention output and
    the attention output becomes ``edited - resid_pre``, after which the residual stream is ``edited``
    and gradients flow through the residual path too.
    """
    layer = layer_of(name)
    pre: dict[str, torch.Tensor] = {}

    def keep_pre(activation: torch.Tensor, hook) -> None:
        pre["x"] = activation

    def at_attn_out(activation: torch.Tensor, hook) -> torch.Tensor | None:
        edited = hook_fn(pre["x"] + activation, hook)
        return None if edited is None else edited - pre["x"]

    return [(f"blocks.{layer}.hook_resid_pre", keep_pre), (f"blocks.{layer}.hook_attn_out", at_attn_out)]


_MID = re.compile(r"^blocks\.\d+\.hook_resid_mid$")


def read(
    model,
    batch: Tokens,
    hooks: Sequence[str],
    positions: Selector = "last",
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Mean activation over the selected positions of each row, at each hook point.

    Args:
        batch: the rows to run, e.g. from ``steer.tokenize``; either padding side.
        hooks: hook point names, e.g. ``["blocks.12.hook_resid_post"]``.
        positions: a selector (see ``steer.positions``) or one per row. ``"last"`` is each row's
            last token, ``"mean"`` the mean over all its tokens.
        batch_size: rows per forward pass.
        progress: show a progress bar; default when there is more than one forward pass.

    Returns:
        ``{hook: [rows, d]}`` float32 on the model's device.
    """
    if not hooks:
        raise SteerValueError("No hook points to read; name at least one, e.g. 'blocks.0.hook_resid_post'.")
    if batch_size < 1:
        raise SteerValueError(f"batch_size must be at least 1, got {batch_size}.")
    validate(positions)
    per_row = is_per_row(positions)
    if per_row and len(positions) != batch.tokens.shape[0]:
        raise SteerValueError(f"{len(positions)} per-row positions for {batch.tokens.shape[0]} rows.")
    layers = [layer_of(name) for name in hooks]
    stop = None if None in layers or _after_blocks(hooks) else max(layers) + 1
    device = model.cfg.device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in hooks}
    starts = range(0, batch.tokens.shape[0], batch_size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc="reading activations", disable=not show, leave=False):
        rows = slice(start, start + batch_size)
        tokens, mask = _trim(batch.tokens[rows], batch.attention_mask[rows])
        selector = positions[rows] if per_row else positions
        found: dict[str, torch.Tensor] = {}
        keepers = [(name, _keeper(name, selector, start, found)) for name in hooks]
        with torch.no_grad(), attach(model, keepers, what="read"):
            model(tokens.to(device), attention_mask=mask.to(device), stop_at_layer=stop)
        silent = [name for name in hooks if name not in found]
        if silent:
            raise SteerError(f"Hook point(s) {', '.join(silent)} never fired, so there is nothing to read.")
        for name in hooks:
            out[name].append(found[name])
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def _keeper(name: str, selector: Selector, first_row: int, found: dict[str, torch.Tensor]) -> HookFn:
    """A hook storing ``[batch, d]``: each row's mean activation over its selected positions."""

    def fn(activation: torch.Tensor, state: CallState) -> None:
        picked = select(selector, state)
        empty = (~picked.any(dim=1)).nonzero().flatten()
        if len(empty):
            raise SteerValueError(
                f"Position selector {selector!r} picks no token in row(s) {(empty + first_row).tolist()}; "
                "check it against those rows' lengths."
            )
        weights = picked.float() / picked.sum(dim=1, keepdim=True)
        found[name] = torch.einsum("bp,bpd->bd", weights, activation.float())

    return fn


def forward_last(model, tokens: torch.Tensor, attention_mask: torch.Tensor, keep: int | None) -> torch.Tensor:
    """``model(tokens)`` with logits only at the last ``keep`` positions (all when ``None``).

    Hugging Face's ``logits_to_keep`` slices the final hidden states; the bridge's unembedding then
    multiplies that non-contiguous ``[batch, keep, d_model]`` slice through a per-row copy of the whole
    unembedding matrix (a batched matmul), slower than unembedding every position. A contiguous copy
    of the slice turns it back into one small matrix product.
    """
    if keep is None:
        return model(tokens, attention_mask=attention_mask)

    def compact(x: torch.Tensor, state: CallState) -> torch.Tensor:
        return x.contiguous()

    with attach(model, [("unembed.hook_in", compact)], what="unembedding"):
        return model(tokens, attention_mask=attention_mask, logits_to_keep=keep)


def _after_blocks(hooks: Sequence[str]) -> bool:
    return any(name.startswith(("ln_final", "unembed")) for name in hooks)


def _trim(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a chunk."""
    used = mask.any(dim=0).nonzero().flatten()
    return tokens[:, used[0] : used[-1] + 1], mask[:, used[0] : used[-1] + 1]


@dataclass
class Trunk:
    """One unsteered forward pass, kept so that the rest of the model can be re-run from any layer.

    A steering edit at ``blocks.L.hook_resid_post`` leaves blocks ``0..L`` untouched, so a sweep over
    coefficients need only re-run blocks ``L+1..`` from the kept residual stream: ``resume``.

    logits: ``[batch, pos, d_vocab]`` of the unsteered pass. resid: ``{layer: [batch, pos, d_model]}``.
    state: the pass's ``CallState``. block_kwargs: what the model handed its decoder blocks (causal mask,
    rotary embeddings, positions) for this batch.
    """

    logits: torch.Tensor
    resid: dict[int, torch.Tensor]
    state: CallState
    block_kwargs: dict
    cache: object | None = None


def trunk(model, batch: Tokens, layers: Sequence[int], *, past=None, keep_cache: bool = False) -> Trunk:
    """Run ``batch`` once, unsteered, keeping ``blocks.{L}.hook_resid_post`` for each of ``layers``;
    layer ``-1`` keeps the input of block 0 (the embeddings).

    ``past``: a Hugging Face KV cache of a prefix shared by every row; ``batch`` then holds only the
    tokens after it, and its attention mask covers the prefix too. ``keep_cache`` keeps this pass's cache.
    """
    resid: dict[int, torch.Tensor] = {}
    captured: dict = {}

    def keep(layer: int) -> HookFn:
        def fn(h: torch.Tensor, state: CallState) -> None:
            resid[layer] = h
            captured["state"] = state

        return fn

    def block_inputs(module, args, kwargs) -> None:
        # The cache object is mutated as blocks run; a replay brings its own.
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        if -1 in layers:
            resid[-1] = args[0] if args else kwargs["hidden_states"]

    device = next(model.parameters()).device
    extra: dict = {} if past is None else {"past_key_values": past}
    if keep_cache:
        extra.update(return_type="logits_and_cache", use_cache=True)
    names = [(f"blocks.{layer}.hook_resid_post", keep(layer)) for layer in layers if layer >= 0]
    handle = model.blocks[0].register_forward_pre_hook(block_inputs, with_kwargs=True)
    try:
        with torch.inference_mode(), attach(model, names, "read"):
            out = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device), **extra)
    finally:
        handle.remove()
    logits, cache = out if keep_cache else (out, None)
    return Trunk(logits, resid, captured["state"], captured["kwargs"], cache)


def resume(
    model, kept: Trunk, layer: int, resid: torch.Tensor, cache=None, *, start: int = 0
) -> tuple[torch.Tensor, object]:
    """Run blocks ``layer+1..`` from ``resid`` (``[k * batch, pos, d_model]``: the trunk's rows, repeated
    ``k`` times); return the final residual stream, before the final norm, and the KV cache.

    ``cache``: keys and values of the prefix the trunk ran after, for blocks ``layer+1..`` and all
    ``k * batch`` rows; it is extended in place. Without one, a fresh cache collects this run's keys and
    values, so a later run can continue after these tokens. ``start``: ``resid`` holds only the trunk's
    positions ``start..``, and ``cache`` the keys and values before them (see ``cache_prefix``).
    """
    from transformers import DynamicCache

    repeat = resid.shape[0] // kept.state.batch
    kwargs = dict(_repeat_rows(suffix_kwargs(kept.block_kwargs, start), kept.state.batch, repeat))
    kwargs.update(past_key_values=DynamicCache() if cache is None else cache, use_cache=True)
    x = resid
    with torch.inference_mode():  # measurably faster than no_grad here, and nothing is trained on the result
        for block in model.blocks[layer + 1 :]:
            out = block(x, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
    return x, kwargs["past_key_values"]


def suffix_kwargs(kwargs: dict, start: int) -> dict:
    """The blocks' keyword arguments for positions ``start..`` of the run they were captured from."""
    if not start:
        return kwargs
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = mask[:, :, start:]
    if "position_embeddings" in kwargs:
        out["position_embeddings"] = tuple(t[:, start:] for t in kwargs["position_embeddings"])
    for key in ("position_ids", "cache_position"):
        if kwargs.get(key) is not None:
            out[key] = kwargs[key][..., start:]
    return out


def cache_prefix(cache, start: int, repeat: int, first_layer: int = 0):
    """A new KV cache with ``cache``'s positions ``..start-1`` from ``first_layer`` on, its rows repeated
    ``repeat`` times, for runs that recompute positions ``start..`` only."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if index >= first_layer and keys is not None and keys.numel():
            out.update(
                keys[:, :, :start].repeat(repeat, 1, 1, 1),
                layer.values[:, :, :start].repeat(repeat, 1, 1, 1),
                index,
            )
    return out


def cache_rows(cache, rows: torch.Tensor, first_layer: int = 0):
    """A new KV cache with ``cache``'s layers from ``first_layer`` on, holding batch rows ``rows`` of each."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if index >= first_layer and keys is not None and keys.numel():
            picked = rows.to(keys.device)
            out.update(keys[picked], layer.values[picked], index)
    return out


def _repeat_rows(value, batch: int, repeat: int):
    """Tile every tensor whose first dimension is the batch ``repeat`` times along it (others unchanged)."""
    if repeat == 1:
        return value
    if isinstance(value, torch.Tensor):
        return (
            value.repeat(repeat, *([1] * (value.ndim - 1)))
            if value.ndim and value.shape[0] == batch
            else value
        )
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, batch, repeat) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_rows(v, batch, repeat) for k, v in value.items()}
    return value
