"""Activation patching: which activations carry a behaviour from one prompt to another.

Run a *clean* prompt ("When Mary and John went to the store, John gave a drink to" -> " Mary") and a
*corrupted* one that differs in the detail that matters (the names swapped). Copy one activation from a
*source* run into a *target* run and measure what the metric does: clean into corrupted (denoising,
"which activations are enough to bring the answer back?") or corrupted into clean (noising, "which
are needed?"). Values are normalised so that 0 is the corrupted run's metric and 1 the clean run's.

Grids (``what``), each over the layers and one or two further axes:
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"   (layer, pos)
    "head"      each attention head's output ``hook_z`` at every position   (layer, head)
    "head_pos"  each head's output at one position                          (layer, head, pos)
    "pattern"   each head's attention pattern                               (layer, head)
Heads are query heads. With grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads)
``hook_z`` still holds one vector per query head, so each query head is patched on its own.

Why exact patching here is fast: a patch at layer ``L`` and position ``p`` leaves blocks ``0..L-1`` and
every position before ``p`` exactly as in the target run. So a patched run starts at block ``L`` from
the target's residual stream, computes only positions ``p..`` (the earlier positions' keys and values
come from the target run's KV cache), and unembeds only what the metric reads. Patched runs that start
at the same position go through the layers together: at block ``L`` the runs patched at layer ``L``
join the batch of runs already under way.

Attribution patching approximates every cell of a grid at once from one gradient: the metric's
gradient at the target run times (source - target activation). Causal tracing (as in ROME) corrupts
chosen token positions' embeddings with Gaussian noise instead of using a second prompt, and restores
clean states one (layer, position) at a time, or a window of layers at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from steer.errors import SteerError, SteerTypeError, SteerValueError
from steer.hooks import _repeat_rows, attach, check_hook_name, forward_last, suffix_kwargs, trunk
from steer.metrics import MetricLike, Scorer
from steer.positions import CallState
from steer.prompts import Tokens, pad, token_span, tokenize

# what -> (hook point template, the axes after "layer")
GRIDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", ("pos",)),
    "resid_mid": ("blocks.{}.hook_resid_mid", ("pos",)),
    "resid_post": ("blocks.{}.hook_resid_post", ("pos",)),
    "attn_out": ("blocks.{}.hook_attn_out", ("pos",)),
    "mlp_out": ("blocks.{}.hook_mlp_out", ("pos",)),
    "head": ("blocks.{}.attn.hook_z", ("head",)),
    "head_pos": ("blocks.{}.attn.hook_z", ("head", "pos")),
    "pattern": ("blocks.{}.attn.hook_pattern", ("head",)),
}


@dataclass
class PatchResult:
    """A patching grid with its axes and the two runs' metric values.

    values: the grid, one axis per name in ``axes`` (e.g. ``[layer, pos]``), normalised (0 = corrupted,
        1 = clean) when ``normalized``, else the raw metric of each patched run.
    labels: for each axis, a label per index: layer and head numbers, token strings for positions.
    clean, corrupted: the metric on the clean and on the corrupted (or noised) run.
    """

    values: torch.Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    what: str
    method: str
    metric: str
    clean: float
    corrupted: float
    normalized: bool
    direction: str = "denoise"
    notes: dict = field(default_factory=dict)

    def raw(self) -> torch.Tensor:
        """The grid in the metric's own units."""
        if not self.normalized:
            return self.values
        return self.corrupted + self.values * (self.clean - self.corrupted)

    def baseline(self) -> float:
        """The value of the unpatched target run: what a cell with no effect shows."""
        at = self.corrupted if self.direction == "denoise" else self.clean
        if not self.normalized:
            return at
        return 0.0 if self.direction == "denoise" else 1.0

    def effect(self) -> torch.Tensor:
        """``values`` minus the unpatched target run's value: how far each patch moved the metric."""
        return self.values - self.baseline()

    def records(self) -> list[dict]:
        """One dict per cell: an entry per axis (its label) and ``value``."""
        rows = []
        for index in torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(
            -1, self.values.ndim
        ):
            cell = {axis: self.labels[axis][i] for axis, i in zip(self.axes, index.tolist())}
            cell["value"] = self.values[tuple(index.tolist())].item()
            rows.append(cell)
        return rows

    def to_frame(self):
        """The records as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.records())

    def top(self, k: int = 5) -> list[dict]:
        """The ``k`` cells that moved the metric most (either way), largest first."""
        base = self.baseline()
        return sorted(self.records(), key=lambda r: -abs(r["value"] - base))[:k]

    def correlation(self, other: PatchResult) -> float:
        """Pearson correlation with another grid of the same shape (e.g. attribution against exact)."""
        if other.values.shape != self.values.shape:
            raise SteerValueError(
                f"Grids of shapes {tuple(self.values.shape)} and {tuple(other.values.shape)} cannot be "
                "compared; compute both for the same `what`, layers and positions."
            )
        pair = torch.stack([self.values.flatten(), other.values.flatten()]).double()
        return float(torch.corrcoef(pair)[0, 1])

    def plot(self, **kwargs):
        """Heat map of the grid with token labels; see ``steer.plot.patch_heatmap``."""
        from steer import plot

        return plot.patch_heatmap(self, **kwargs)

    def __str__(self) -> str:
        scale = "0 = corrupted, 1 = clean" if self.normalized else "raw metric"
        lines = [
            f"{self.method} patching of {self.what} ({self.direction}), {self.metric}: "
            f"clean {self.clean:.4g}, corrupted {self.corrupted:.4g}; values: {scale}",
        ]
        if self.values.ndim == 2 and self.values.shape[1] <= 24:
            rows, cols = self.axes
            labels = [str(c).strip()[:6] or "·" for c in self.labels[cols]]
            lines.append(f"{rows:>5} " + "".join(f"{c:>7}" for c in labels))
            for i, row in enumerate(self.values.tolist()):
                lines.append(f"{self.labels[rows][i]!s:>5} " + "".join(f"{v:>7.2f}" for v in row))
        lines.append("top cells: " + "; ".join(_describe(c) for c in self.top(5)))
        return "\n".join(lines)


def patch(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    metric: MetricLike,
    what: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | str | None = None,
    direction: str = "denoise",
    normalize: bool = True,
    batch_size: int | None = None,
    memory_mb: float = 1024,
    progress: bool | None = None,
) -> PatchResult:
    """Exact activation patching over a grid, many patched runs per forward pass.

    Args:
        clean, corrupted: one prompt each, or equally many; every prompt must have the same number of
            tokens, since positions are patched one for one.
        metric: ``logit_diff(...)``, ``answer_prob(...)``, or any function of the logits
            ``[prompts, pos, d_vocab]`` returning one number.
        what: the grid, one of ``GRIDS`` (see the module docstring), or a hook point template such as
            ``"blocks.{}.ln1.hook_normalized"`` for any activation shaped ``[batch, pos, ...]``.
        layers: the grid's layers (default all).
        positions: for grids with a position axis: token indices to patch one at a time (default all),
            or ``"all"`` to patch every position at once.
        direction: ``"denoise"`` copies clean activations into the corrupted run; ``"noise"`` copies
            corrupted ones into the clean run.
        normalize: report ``(m - corrupted) / (clean - corrupted)`` instead of the raw metric ``m``.
        batch_size: patched runs per forward pass; default as many as fit in ``memory_mb``.
        progress: a progress bar over forward passes; default when there is more than one.

    Returns:
        a ``PatchResult``.
    """
    runs, grid, source, target = _prepare(model, clean, corrupted, metric, what, layers, positions, direction)
    sources, source_logits = _capture(model, source, grid.hooks(), runs.scorer)
    base = _target(model, target)
    values = _patched(model, base, sources, grid, runs.scorer, batch_size, memory_mb, progress)
    ends = runs.scorer(source_logits).item(), runs.scorer(base.logits).item()
    return runs.result(grid, values, "exact", normalize, direction, *ends)


def attribution_patch(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    metric: MetricLike,
    what: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | str | None = None,
    direction: str = "denoise",
    normalize: bool = True,
) -> PatchResult:
    """Attribution patching: every cell of ``patch``'s grid from two forward passes and one backward.

    A cell's value is the first-order estimate of the patched metric: the target run's metric plus
    (gradient of the metric at the target activation) . (source activation - target activation),
    summed over the cell's positions, heads and features. Arguments as for ``patch``; compare with an
    exact grid by ``result.correlation(exact)``.
    """
    runs, grid, source, target = _prepare(model, clean, corrupted, metric, what, layers, positions, direction)
    hooks = grid.hooks()
    acts, grads, ends = _gradients(model, source, target, hooks, runs.scorer)
    rows = source.tokens.shape[0]
    estimate = torch.stack(
        [ends[1] + grid.attribution(grads[name] * (acts[name][:rows] - acts[name][rows:])) for name in hooks]
    )
    return runs.result(grid, grid.arrange(estimate), "attribution", normalize, direction, *ends)


def causal_trace(
    model,
    prompts: str | Sequence[str],
    metric: MetricLike,
    subject: str | Sequence[str] | Sequence[int] | slice,
    what: str = "resid_post",
    *,
    window: int = 1,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    normalize: bool = True,
    batch_size: int | None = None,
    memory_mb: float = 1024,
    progress: bool | None = None,
) -> PatchResult:
    """Causal tracing: noise the subject's embeddings, then restore clean states one cell at a time.

    Args:
        prompts: one prompt or several of the same token length.
        metric: usually ``answer_prob(answer)``.
        subject: the tokens to corrupt: a substring of each prompt (one for all, or one per prompt),
            token indices, or a slice.
        what: ``"resid_post"`` (hidden states), ``"mlp_out"`` or ``"attn_out"``.
        window: restore this many consecutive layers at once, centred on the cell's layer (ROME uses
            10 for MLP and attention outputs).
        noise: the noise's standard deviation, in units of the standard deviation of the token
            embedding matrix's entries.
        samples: noise draws per prompt; the metric is averaged over them. ``seed`` fixes them.
        Others as for ``patch``.

    Returns:
        a ``PatchResult`` over ``(layer, pos)``; position labels of noised tokens end in ``*``.
    """
    if what not in ("resid_post", "mlp_out", "attn_out"):
        raise SteerValueError(f"causal_trace restores 'resid_post', 'mlp_out' or 'attn_out', not {what!r}.")
    if window < 1 or samples < 1 or not noise > 0:
        raise SteerValueError(
            f"window and samples must be at least 1 and noise positive; got window={window}, "
            f"samples={samples}, noise={noise}."
        )
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    runs = _Runs.build(model, texts, texts, metric, repeat=samples)
    noised = _subject_mask(model, texts, subject, runs.clean.tokens.shape[1]).repeat(samples, 1)
    labels = dict(runs.labels)
    labels["pos"] = [t + "*" if noised[0, i] else t for i, t in enumerate(labels["pos"])]
    grid = _Grid.build(model, what, layers, None, labels, window=window)
    scale = noise * model.original_model.get_input_embeddings().weight.float().std().item()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(*noised.shape, model.cfg.d_model, generator=generator) * scale * noised[..., None]

    def add_noise(x: torch.Tensor, state: CallState) -> torch.Tensor:
        return x + draws.to(x.device, x.dtype)

    sources, clean_logits = _capture(model, runs.clean, grid.hooks(), runs.scorer)
    with attach(model, [("hook_embed", add_noise)], what="causal trace noise"):
        base = _target(model, runs.clean)
    values = _patched(model, base, sources, grid, runs.scorer, batch_size, memory_mb, progress)
    ends = runs.scorer(clean_logits).item(), runs.scorer(base.logits).item()
    result = runs.result(grid, values, "causal trace", normalize, "denoise", *ends)
    result.notes.update(noise=noise, samples=samples, seed=seed, window=window)
    return result


def _prepare(model, clean, corrupted, metric, what, layers, positions, direction):
    """The runs, the grid, and which batch is the source and which the target."""
    if direction not in ("denoise", "noise"):
        raise SteerValueError(f"direction is 'denoise' (clean into corrupted) or 'noise'; got {direction!r}.")
    runs = _Runs.build(model, clean, corrupted, metric)
    grid = _Grid.build(model, what, layers, positions, runs.labels)
    source, target = (runs.clean, runs.corrupted) if direction == "denoise" else (runs.corrupted, runs.clean)
    return runs, grid, source, target


# --- prompts, metrics and grids ---------------------------------------------------------------------


@dataclass
class _Runs:
    """The clean and corrupted token batches, the metric bound to them, and the position labels."""

    clean: Tokens
    corrupted: Tokens
    scorer: Scorer
    labels: dict[str, list]

    @classmethod
    def build(cls, model, clean, corrupted, metric: MetricLike, repeat: int = 1) -> _Runs:
        clean_texts, corrupt_texts = _texts(clean, "clean"), _texts(corrupted, "corrupted")
        if len(clean_texts) != len(corrupt_texts):
            raise SteerValueError(
                f"{len(clean_texts)} clean prompts and {len(corrupt_texts)} corrupted ones; give one "
                "corrupted prompt per clean prompt."
            )
        clean_ids = [_ids(model, t) for t in clean_texts]
        corrupt_ids = [_ids(model, t) for t in corrupt_texts]
        _check_lengths(model, clean_ids, corrupt_ids)
        scorer = Scorer.build(model, metric, len(clean_texts) * repeat, len(clean_texts))
        batches = [pad(ids * repeat, model.tokenizer.pad_token_id) for ids in (clean_ids, corrupt_ids)]
        tokens = model.tokenizer.convert_ids_to_tokens(clean_ids[0])
        labels = {"pos": [model.tokenizer.convert_tokens_to_string([t]) for t in tokens]}
        return cls(batches[0], batches[1], scorer, labels)

    def result(self, grid, values, method, normalize, direction, source: float, target: float) -> PatchResult:
        """``source``, ``target``: the metric on the unpatched source and target runs."""
        clean, corrupted = (source, target) if direction == "denoise" else (target, source)
        if normalize:
            if math.isclose(clean, corrupted, rel_tol=1e-6, abs_tol=1e-6):
                raise SteerValueError(
                    f"The {self.scorer.name} is {clean:.6g} on both the clean and the corrupted run, so it "
                    "cannot be normalised: pick prompts or answers the model tells apart, or pass "
                    "normalize=False."
                )
            values = (values - corrupted) / (clean - corrupted)
        return PatchResult(
            values.detach().float().cpu(),
            grid.axes,
            grid.labels,
            grid.what,
            method,
            self.scorer.name,
            clean,
            corrupted,
            normalize,
            direction,
        )


@dataclass(frozen=True)
class _Cell:
    """One patched run: the layers whose activation it replaces, at one position (``None``: all) and
    one head (``None``: all)."""

    layers: tuple[int, ...]
    pos: int | None = None
    head: int | None = None

    @property
    def start(self) -> int:
        """The first position the patch can change."""
        return 0 if self.pos is None else self.pos


@dataclass
class _Grid:
    what: str
    hook: str
    axes: tuple[str, ...]
    labels: dict[str, list]
    cells: list[_Cell]
    shape: tuple[int, ...]
    pattern: bool

    @classmethod
    def build(cls, model, what, layers, positions, labels, window: int = 1) -> _Grid:
        if what in GRIDS:
            hook, rest = GRIDS[what]
        elif isinstance(what, str) and "{}" in what:
            hook, rest = what, ("pos",)
        else:
            raise SteerValueError(
                f"Unknown patching grid {what!r}; use one of {', '.join(GRIDS)}, or a hook point "
                "template with {} for the layer, such as 'blocks.{}.ln1.hook_normalized'."
            )
        n_layers = model.cfg.n_layers
        chosen = list(range(n_layers)) if layers is None else [int(x) for x in _as_list(layers)]
        bad = [x for x in chosen if not 0 <= x < n_layers]
        if bad or not chosen:
            raise SteerValueError(
                f"Layers {bad or '[]'} are not in 0..{n_layers - 1}; pick layers of this model."
            )
        for layer in chosen:
            check_hook_name(model, hook.format(layer))
        width = len(labels["pos"])
        if positions is None:
            spots: list[int | None] = list(range(width))
        elif isinstance(positions, str):
            if positions != "all":
                raise SteerValueError(f"positions is a list of token indices or 'all'; got {positions!r}.")
            spots = [None]
        else:
            spots = [int(p) + width if int(p) < 0 else int(p) for p in _as_list(positions)]
            if not spots or any(not 0 <= p < width for p in spots):
                raise SteerValueError(f"positions {list(positions)} must be token indices in 0..{width - 1}.")
        if "pos" not in rest and positions is not None:
            raise SteerValueError(f"The {what!r} grid has no position axis; leave positions unset.")
        heads = list(range(model.cfg.n_heads))

        def span(layer: int) -> tuple[int, ...]:
            low = max(0, min(layer - window // 2, n_layers - window))
            return tuple(range(low, min(n_layers, low + window)))

        if rest == ("pos",):
            cells = [_Cell(span(x), p) for x in chosen for p in spots]
            shape = (len(chosen), len(spots))
        elif rest == ("head",):
            cells = [_Cell(span(x), None, h) for x in chosen for h in heads]
            shape = (len(chosen), len(heads))
        else:
            cells = [_Cell(span(x), p, h) for x in chosen for h in heads for p in spots]
            shape = (len(chosen), len(heads), len(spots))
        axis_labels = {"layer": chosen, "head": heads}
        axis_labels["pos"] = ["all"] if spots == [None] else [labels["pos"][p] for p in spots]
        axes = ("layer", *rest)
        return cls(what, hook, axes, {a: axis_labels[a] for a in axes}, cells, shape, what == "pattern")

    def hooks(self) -> list[str]:
        """The hook point of every layer any cell patches, in layer order."""
        return [self.hook.format(layer) for layer in sorted({x for c in self.cells for x in c.layers})]

    def arrange(self, values: torch.Tensor) -> torch.Tensor:
        """Per-cell values in cell order (``[cells]``, or ``[layers, cells per layer]``) -> the grid's shape."""
        return values.reshape(self.shape)

    def attribution(self, product: torch.Tensor) -> torch.Tensor:
        """``grad * delta`` at one layer's hook point -> this layer's row of the grid, flattened.

        product: ``[batch, pos, ...]``, or ``[batch, head, query, key]`` for patterns.
        """
        by_layer = self.cells[: len(self.cells) // self.shape[0]]
        if self.pattern:
            return product.sum(dim=(0, 2, 3))  # [head]
        if self.axes[1:] == ("head",):
            return product.sum(dim=(0, 1, 3))  # [head]
        if self.axes[1:] == ("head", "pos"):
            per = product.sum(dim=(0, 3))  # [pos, head]
            return torch.stack([per[c.pos, c.head] for c in by_layer])
        per = product.flatten(2).sum(dim=(0, 2))  # [pos]
        return torch.stack([per.sum() if c.pos is None else per[c.pos] for c in by_layer])


# --- runs ------------------------------------------------------------------------------------------


def _capture(
    model, batch: Tokens, hooks: list[str], scorer: Scorer
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The activations at ``hooks`` in one forward pass over ``batch``, and the logits ``scorer`` reads."""
    found: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(x: torch.Tensor, state: CallState) -> None:
            found[name] = x.detach().clone()

        return fn

    device = model.cfg.device
    with torch.inference_mode(), attach(model, [(name, keep(name)) for name in hooks], what="patching read"):
        logits = forward_last(model, batch.tokens.to(device), batch.attention_mask.to(device), scorer.keep)
    return found, logits


def _target(model, batch: Tokens):
    """The target run: its residual stream into every block, its KV cache and its logits."""
    return trunk(model, batch, range(-1, model.cfg.n_layers), keep_cache=True)


def _patched(
    model, base, sources, grid: _Grid, scorer: Scorer, batch_size, memory_mb, progress
) -> torch.Tensor:
    """The metric of every cell's patched run, ``grid.shape``."""
    rows = base.state.batch
    width = base.state.mask.shape[1]
    if batch_size is None:
        batch_size = max(1, int(memory_mb * 2**20 // (_bytes_per_row(model, width) * rows)))
    if batch_size < 1:
        raise SteerValueError(f"batch_size must be at least 1, got {batch_size}.")
    order = sorted(range(len(grid.cells)), key=lambda i: (grid.cells[i].start, min(grid.cells[i].layers)))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < batch_size and grid.cells[chunks[-1][0]].start == grid.cells[i].start:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    out = torch.empty(len(grid.cells))
    walker = _Walker(model, base, sources, grid)
    show = progress if progress is not None else len(chunks) > 1
    with walker.hooked():
        for chunk in tqdm(chunks, desc=f"patching {grid.what}", disable=not show, leave=False):
            logits = walker.run([grid.cells[i] for i in chunk], full=not scorer.last_only)
            out[chunk] = scorer(logits).float().cpu()
    return grid.arrange(out)


class _Walker:
    """Runs a chunk of patched runs that start at the same position through the blocks, each run
    joining the batch at the first layer it patches."""

    def __init__(self, model, base, sources: dict[str, torch.Tensor], grid: _Grid) -> None:
        self.model, self.base, self.sources, self.grid = model, base, sources, grid
        self.edits: list[tuple[int, _Cell]] = []  # (first row, cell) to patch in the block now running
        self.start = 0
        self.fired = False

    @contextlib.contextmanager
    def hooked(self):
        names = self.grid.hooks()
        with attach(self.model, [(name, self._edit(name)) for name in names], what="patch"):
            yield

    def _edit(self, name: str):
        source = self.sources[name]

        def fn(x: torch.Tensor, state) -> torch.Tensor | None:
            if not self.edits:
                return None
            self.fired = True
            rows = self.base.state.batch
            x = x.clone()
            for first, cell in self.edits:
                _write(x[first : first + rows], source, cell, self.start, self.grid.pattern)
            return x

        return fn

    def run(self, cells: list[_Cell], full: bool) -> torch.Tensor:
        """Logits ``[cells * rows, d_vocab]`` at the last position, or ``[cells * rows, pos, d_vocab]``.

        ``cells``: all with the same ``start``, in order of their first layer.
        """
        from transformers import DynamicCache

        base, model = self.base, self.model
        rows = base.state.batch
        start = cells[0].start
        self.start = start
        joined: list[_Cell] = []
        x = None
        kwargs = suffix_kwargs(base.block_kwargs, start)
        with torch.inference_mode():
            for layer in range(min(cells[0].layers), model.cfg.n_layers):
                joining = [c for c in cells if min(c.layers) == layer]
                if joining:
                    entry = base.resid[layer - 1][:, start:].repeat(len(joining), 1, 1)
                    x = entry if x is None else torch.cat([x, entry])
                    joined += joining
                copies = x.shape[0] // rows
                cache = DynamicCache()
                if start:
                    kept = base.cache.layers[layer]
                    cache.update(
                        kept.keys[:, :, :start].repeat(copies, 1, 1, 1),
                        kept.values[:, :, :start].repeat(copies, 1, 1, 1),
                        layer,
                    )
                self.edits = [(i * rows, c) for i, c in enumerate(joined) if layer in c.layers]
                self.fired = False
                try:
                    out = model.blocks[layer](
                        x, past_key_values=cache, use_cache=True, **_repeat_rows(kwargs, rows, copies)
                    )
                finally:
                    edited, self.edits = bool(self.edits), []
                if edited and not self.fired:
                    raise SteerError(
                        f"Hook point {self.grid.hook.format(layer)} never fired, so nothing was patched; "
                        "pick a hook point this model runs."
                    )
                x = out[0] if isinstance(out, tuple) else out
            if not full:
                return model.unembed(model.ln_final(x[:, -1:]))[:, 0]
            logits = model.unembed(model.ln_final(x))
            before = base.logits[:, :start].repeat(len(joined), 1, 1)
            return torch.cat([before.to(logits.dtype), logits], dim=1)


def _write(x: torch.Tensor, source: torch.Tensor, cell: _Cell, start: int, pattern: bool) -> None:
    """Copy ``cell``'s part of ``source`` (``[rows, pos, ...]`` or a ``[rows, head, pos, pos]`` pattern,
    from a full run) into ``x``, the same activation of a run over positions ``start..`` only."""
    if pattern:
        x[:, cell.head] = source[:, cell.head, start:]
        return
    here = slice(None) if cell.pos is None else cell.pos - start
    there = slice(start, None) if cell.pos is None else cell.pos
    head = () if cell.head is None else (cell.head,)
    x[(slice(None), here, *head)] = source[(slice(None), there, *head)]


def _gradients(model, source: Tokens, target: Tokens, hooks: list[str], scorer: Scorer):
    """One forward pass over the source and target rows together and one backward pass.

    Returns the activations at ``hooks`` (``[source rows; target rows]``), the gradient of the target
    run's metric with respect to the target rows' activations there, and the metric on (source, target).
    Both runs go through one pass because on a CPU a small batch costs about as much as one row: the
    weights are read once.
    """
    acts: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor, state) -> torch.Tensor:
        # Gradients flow from here whether or not the model's weights require them.
        return x.detach().requires_grad_(True)

    def keep(name: str):
        def fn(x: torch.Tensor, state) -> torch.Tensor:
            acts[name] = x
            # Returned, so the model runs on this very tensor: where the bridge shows a hook a reshaped
            # view (hook_z), the view would otherwise stay outside the graph and get no gradient.
            return x

        return fn

    device = model.cfg.device
    rows = source.tokens.shape[0]
    tokens = torch.cat([source.tokens, target.tokens]).to(device)
    mask = torch.cat([source.attention_mask, target.attention_mask]).to(device)
    hooked = [("blocks.0.hook_resid_pre", leaf)] + [(name, keep(name)) for name in hooks]
    with torch.enable_grad(), attach(model, hooked, what="attribution"):
        logits = forward_last(model, tokens, mask, scorer.keep)
        value = scorer(logits[rows:])[0]
        grads = torch.autograd.grad(value, [acts[name] for name in hooks], allow_unused=True)
    grads = {
        name: torch.zeros_like(acts[name][rows:]) if g is None else g[rows:].detach()
        for name, g in zip(hooks, grads)
    }
    ends = scorer(logits[:rows].detach()).item(), value.item()
    return {name: a.detach() for name, a in acts.items()}, grads, ends


# --- checks ----------------------------------------------------------------------------------------


def _texts(prompts, role: str) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise SteerValueError(f"No {role} prompts; give at least one.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise SteerTypeError(f"{role.capitalize()} prompt {i} is {text!r}, not a non-empty string.")
    return texts


def _ids(model, text: str) -> list[int]:
    return tokenize(model, text).tokens[0].tolist()


def _check_lengths(model, clean: list[list[int]], corrupted: list[list[int]]) -> None:
    tok = model.tokenizer
    for i, (a, b) in enumerate(zip(clean, corrupted)):
        if len(a) != len(b):
            differ = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            here, there = ([tok.decode([t]) for t in ids[differ : differ + 3]] for ids in (a, b))
            raise SteerValueError(
                f"Clean prompt {i} has {len(a)} tokens and corrupted prompt {i} has {len(b)}; they first "
                f"differ at position {differ} ({here} vs {there}). Patching copies activations "
                "position by position, so each pair must tokenize to the same length: swap in words "
                "that are the same number of tokens (check with model.to_str_tokens)."
            )
    lengths = sorted({len(a) for a in clean})
    if len(lengths) > 1:
        first = next(i for i, a in enumerate(clean) if len(a) != len(clean[0]))
        raise SteerValueError(
            f"Prompt 0 has {len(clean[0])} tokens but prompt {first} has {len(clean[first])}; all prompts "
            "of one patching run need the same length so that positions line up. Patch each template "
            "separately, or reword the prompts to the same token length."
        )


def _subject_mask(model, texts: list[str], subject, width: int) -> torch.Tensor:
    """``[prompts, pos]`` True at the subject's tokens."""
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    if isinstance(subject, slice):
        mask[:, subject] = True
    elif isinstance(subject, str) or (
        isinstance(subject, Sequence) and subject and all(isinstance(s, str) for s in subject)
    ):
        subjects = [subject] * len(texts) if isinstance(subject, str) else list(subject)
        if len(subjects) != len(texts):
            raise SteerValueError(
                f"{len(subjects)} subjects for {len(texts)} prompts; give one, or one per prompt."
            )
        for i, (text, sub) in enumerate(zip(texts, subjects)):
            mask[i, token_span(model, text, sub)] = True
    else:
        try:
            mask[:, [int(p) for p in subject]] = True
        except (TypeError, IndexError) as err:
            raise SteerValueError(
                f"subject is a substring of the prompt, token indices in 0..{width - 1}, or a slice; "
                f"got {subject!r}."
            ) from err
    if not mask.any(dim=1).all():
        raise SteerValueError(
            f"subject {subject!r} selects no token in some prompt; nothing would be noised."
        )
    return mask


def _as_list(value) -> list:
    return [value] if isinstance(value, int) else list(value)


def _bytes_per_row(model, width: int) -> int:
    """A generous estimate of one row's activation memory while a block runs (float32)."""
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    return 4 * width * (8 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * width)


def _describe(cell: dict) -> str:
    where = ", ".join(f"{k} {str(v).strip() or repr(v)}" for k, v in cell.items() if k != "value")
    return f"{where}: {cell['value']:.3f}"
