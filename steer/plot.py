"""Figures (matplotlib) and token highlighting (HTML for notebooks, ANSI colours for terminals).

matplotlib is imported only when a figure is drawn; it comes with the ``dev`` extra.
"""

from __future__ import annotations

import html
import math
from typing import Any


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        from steer.errors import SteerError

        raise SteerError("Figures need matplotlib: pip install matplotlib") from None
    return plt


def sweep_heatmap(sweep: Any, *, method: str | None = None, kl_max: float | None = 0.1, ax=None):
    """Layer x coefficient heat map of the behaviour score; cells whose KL exceeds ``kl_max`` are hatched
    and every cell is annotated with its KL. Returns the figure."""
    plt = _pyplot()
    layers, coeffs, scores = sweep.grid(method)
    _, _, kls = sweep.grid(method, "kl")
    fig, ax = (
        (ax.figure, ax)
        if ax is not None
        else plt.subplots(figsize=(1.1 * len(coeffs) + 2, 0.45 * len(layers) + 1.6))
    )
    image = ax.imshow(
        scores.numpy(), aspect="auto", cmap="RdBu_r" if scores.min() < 0 else "viridis", origin="lower"
    )
    fig.colorbar(image, ax=ax, label=sweep.behaviour)
    ax.set_xticks(range(len(coeffs)), [f"{c:g}" for c in coeffs])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("coefficient")
    ax.set_ylabel("layer")
    low, high = float(scores.nan_to_num(0).min()), float(scores.nan_to_num(0).max())
    for i in range(len(layers)):
        for j in range(len(coeffs)):
            kl = kls[i, j].item()
            if math.isnan(kl):
                continue
            over = kl_max is not None and kl > kl_max
            dark = (scores[i, j].item() - low) / ((high - low) or 1.0) < 0.45  # the map's low end is dark
            colour = "white" if dark or over else "black"
            ax.text(j, i, f"{kl:.2f}", ha="center", va="center", fontsize=7, color=colour)
            if over:
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey", lw=0)
                )
    bound = f"; hatched: KL > {kl_max:g}" if kl_max is not None else ""
    ax.set_title(f"{sweep.behaviour} (numbers: KL from unsteered{bound})", fontsize=9)
    fig.tight_layout()
    return fig


def sweep_curves(sweep: Any, *, method: str | None = None, ax=None):
    """Behaviour score against coefficient, one curve per layer. Returns the figure."""
    plt = _pyplot()
    layers, coeffs, scores = sweep.grid(method)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    colours = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for i, layer in enumerate(layers):
        ax.plot(coeffs, scores[i].tolist(), marker="o", color=colours[i], label=f"layer {layer}")
    ax.axhline(sweep.baseline, color="grey", lw=0.8, ls="--", label="unsteered")
    ax.set_xlabel("coefficient")
    ax.set_ylabel(sweep.behaviour)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def layer_scan(scan: Any, *, ax=None):
    """Probe accuracy and separation per layer. Returns the figure."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    ax.plot(scan.layers, scan.accuracy, marker="o", color="tab:blue", label="probe accuracy (held out)")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy", color="tab:blue")
    twin = ax.twinx()
    twin.plot(scan.layers, scan.separation, marker="s", color="tab:orange", label="separation (d')")
    twin.set_ylabel("separation (d')", color="tab:orange")
    ax.set_title(f"Where the concept is readable ({scan.folds}-fold CV, {scan.n_pairs} pairs)", fontsize=9)
    fig.tight_layout()
    return fig


def patch_heatmap(result: Any, *, rows: int = 16, ax=None):
    """Heat map of a patching grid: layers down, positions (token strings) or heads across.

    A (layer, head, pos) grid shows the ``rows`` (layer, head) pairs with the largest effect. Colours
    are centred on the target run's value (0 = corrupted for denoising), so blue cells move the
    metric towards the clean run and red ones away. Returns the figure.
    """
    plt = _pyplot()
    values, axes = result.effect(), result.axes
    if len(axes) == 3:
        strongest = values.abs().amax(dim=2).flatten().topk(min(rows, values.shape[0] * values.shape[1]))
        picked = sorted(strongest.indices.tolist())
        n_heads = values.shape[1]
        row_labels = [f"L{result.labels['layer'][i // n_heads]}.H{i % n_heads}" for i in picked]
        values = values.flatten(0, 1)[picked]
        row_name, col_name = "layer.head", axes[2]
    else:
        row_labels = [str(x) for x in result.labels[axes[0]]]
        row_name, col_name = axes
    col_labels = [str(x) if col_name != "pos" else repr(str(x))[1:-1] for x in result.labels[col_name]]
    height, width = values.shape
    fig, ax = (
        (ax.figure, ax)
        if ax is not None
        else plt.subplots(figsize=(min(16, 0.42 * width + 2.5), min(12, 0.24 * height + 1.8)))
    )
    limit = float(values.abs().max()) or 1.0
    shown = values + result.baseline()
    image = ax.imshow(
        shown.numpy(),
        aspect="auto",
        cmap="RdBu",
        vmin=result.baseline() - limit,
        vmax=result.baseline() + limit,
    )
    scale = "normalised: 0 = corrupted, 1 = clean" if result.normalized else result.metric
    fig.colorbar(image, ax=ax, label=scale)
    ax.set_xticks(range(width), col_labels, rotation=90 if col_name == "pos" else 0, fontsize=8)
    step = max(1, height // 30)
    ax.set_yticks(range(0, height, step), row_labels[::step], fontsize=8)
    ax.set_xlabel("position" if col_name == "pos" else col_name)
    ax.set_ylabel(row_name)
    ax.set_title(
        f"{result.method} patching of {result.what} ({result.direction}), {result.metric}", fontsize=9
    )
    fig.tight_layout()
    return fig


def training_curve(training: Any, *, ax=None):
    """Training loss per step and validation loss at each check, with the kept (best) step marked."""
    plt = _pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(training.train_loss) + 1)
    ax.plot(steps, training.train_loss, color="tab:blue", lw=1, alpha=0.7, label="training batch")
    if training.val_loss:
        at, values = zip(*training.val_loss)
        ax.plot(at, values, marker="o", color="tab:orange", label="validation")
    if training.best_step:
        ax.axvline(
            training.best_step, color="grey", ls="--", lw=0.8, label=f"kept (step {training.best_step})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(training.stopped, fontsize=9)
    fig.tight_layout()
    return fig


def attention_maps(maps: Any):
    """One head's attention pattern without and with emphasis, side by side; emphasised tokens in bold
    red on the key axis, and each panel's mean attention mass on them in its title."""
    plt = _pyplot()
    n = len(maps.tokens)
    size = min(14, 0.22 * n + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size + 0.6), sharey=True)
    labels = [repr(t)[1:-1].replace("Ġ", " ").replace("Ċ", "\\n") for t in maps.tokens]
    masses = maps.span_mass()
    for ax, pattern, name, mass in zip(axes, (maps.before, maps.after), ("unsteered", "emphasised"), masses):
        ax.imshow(pattern.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        for tick, inside in zip(ax.get_xticklabels(), maps.emphasised):
            if inside:
                tick.set_color("tab:red")
                tick.set_fontweight("bold")
        ax.set_xlabel("key")
        ax.set_title(f"{name}: {mass:.0%} of attention on the spans", fontsize=9)
    axes[0].set_ylabel("query")
    fig.suptitle(f"L{maps.layer}.H{maps.head}, alpha {maps.alpha:g}", fontsize=10)
    fig.tight_layout()
    return fig


def head_profile(profile: Any, *, k: int = 15):
    """Effect of emphasising with each head (or layer) alone: a layer x head map and the ``k`` best
    ranked as bars."""
    plt = _pyplot()
    effects = profile.effects
    by_head = profile.by == "head"
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, max(3.5, 0.16 * effects.shape[0] + 1.5)), width_ratios=(1, 1.3)
    )
    limit = float(effects.nan_to_num(0).abs().max()) or 1.0
    image = left.imshow(effects.numpy(), aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit, origin="lower")
    fig.colorbar(image, ax=left, label=f"change in {profile.metric}")
    left.set_ylabel("layer")
    left.set_xlabel("head" if by_head else "")
    left.set_xticks(range(effects.shape[1]) if by_head else [])
    left.set_title(f"each {'head' if by_head else 'layer'} alone, alpha {profile.alpha:g}", fontsize=9)
    best = profile.top(k)
    names = [f"L{layer}" if head is None else f"L{layer}.H{head}" for layer, head, _ in best]
    values = [effect for *_, effect in best]
    right.barh(range(len(best)), values, color=["tab:blue" if v > 0 else "tab:red" for v in values])
    right.set_yticks(range(len(best)), names, fontsize=8)
    right.invert_yaxis()
    right.axvline(0, color="grey", lw=0.8)
    right.set_xlabel(f"change in {profile.metric} (unsteered {profile.baseline:.3g})")
    right.set_title(f"best {len(best)}", fontsize=9)
    fig.tight_layout()
    return fig


def _scale(values: list[float]) -> list[float]:
    """Values mapped to [-1, 1] by the largest magnitude."""
    top = max((abs(v) for v in values), default=0.0) or 1.0
    return [v / top for v in values]


def tokens_html(tokens: list[str], values: list[float]) -> str:
    """Tokens on a red (negative) / blue (positive) background by value; hover shows the number."""
    spans = []
    for token, value, s in zip(tokens, values, _scale(values)):
        rgb = "33, 102, 172" if s >= 0 else "178, 24, 43"
        text = html.escape(token).replace("\n", "↵<br>")
        spans.append(
            f"<span title='{value:.3f}' style='background: rgba({rgb}, {abs(s):.2f}); "
            f"padding: 1px 0; border-radius: 2px'>{text}</span>"
        )
    return "<div style='line-height: 1.8; font-family: monospace'>" + "".join(spans) + "</div>"


def tokens_ansi(tokens: list[str], values: list[float]) -> str:
    """Tokens with a 24-bit ANSI background: blue for positive, red for negative, stronger for larger."""
    out = []
    for token, s in zip(tokens, _scale(values)):
        base = (33, 102, 172) if s >= 0 else (178, 24, 43)
        r, g, b = (round(255 + (c - 255) * abs(s)) for c in base)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token}\x1b[0m")
    return "".join(out)
