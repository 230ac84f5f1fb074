"""From contrastive pairs to a SteeringVector: mean difference, PCA of differences, or a linear probe.

All three methods are deterministic: the same pairs and model give the same vector, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from steer.errors import SteerValueError
from steer.hooks import read
from steer.positions import Selector, validate
from steer.prompts import ContrastivePair, pairs_from, token_span, tokenize
from steer.vector import RESID_POST, SteeringVector

METHODS = ("mean_diff", "pca", "probe")
HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": RESID_POST,
}


def extract(
    model,
    pairs: Iterable[Any],
    layers: int | Sequence[int] | None = None,
    *,
    method: str = "mean_diff",
    positions: Selector = "last",
    hook: str = "resid_post",
    padding_side: str = "left",
    batch_size: int = 32,
    progress: bool | None = None,
) -> SteeringVector:
    """Read both sides of every pair and turn the activations into one direction per layer.

    Args:
        pairs: ``ContrastivePair`` objects, ``(positive, negative)`` tuples or dicts.
        layers: one layer, a list, or ``None`` for every layer.
        method: ``"mean_diff"`` (ActAdd / CAA: mean of positives minus mean of negatives),
            ``"pca"`` (RepE / repeng: first principal direction of the pair differences, uncentred),
            or ``"probe"`` (the weight direction of a logistic-regression probe).
            PCA and probe directions are unit vectors scaled by the mean pair difference's projection on
            them, so a coefficient means about the same for every method; their sign always points from
            the negative side to the positive side.
        positions: where to read each text when its pair has no ``read`` of its own; see
            ``steer.positions`` (default ``"last"``: the final token).
        hook: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, or a template with ``{layer}``.
        padding_side: how batches are padded; positions count real tokens, so the vector is the same.
        batch_size: texts per forward pass.
    """
    pairs = pairs_from(pairs)
    if method not in METHODS:
        raise SteerValueError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    template = HOOKS.get(hook, hook)
    if "{layer}" not in template:
        raise SteerValueError(f"hook must be one of {', '.join(HOOKS)} or a template with '{{layer}}'.")
    n_layers = model.cfg.n_layers
    layers = (
        list(range(n_layers)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    )
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < n_layers]
    if bad or not layers:
        raise SteerValueError(
            f"Layers {bad or '[]'} are not in 0..{n_layers - 1}; pick layers of this model."
        )
    validate(positions)

    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    reads = [_read_for(model, p, p.positive, positions) for p in pairs]
    reads += [_read_for(model, p, p.negative, positions) for p in pairs]
    per_pair = any(p.read is not None for p in pairs)
    batch = tokenize(model, texts, padding_side=padding_side)
    names = [template.format(layer=layer) for layer in layers]
    acts = read(
        model, batch, names, reads if per_pair else positions, batch_size=batch_size, progress=progress
    )

    n = len(pairs)
    directions, residual_norms = {}, {}
    for layer, name in zip(layers, names):
        both = acts[name]  # [2n, d_model]
        directions[layer] = _DIRECTION[method](both[:n], both[n:]).cpu()
        residual_norms[layer] = float(both.norm(dim=-1).mean())
    return SteeringVector(
        directions=directions,
        model_name=model.cfg.model_name,
        d_model=model.cfg.d_model,
        n_layers=n_layers,
        hook=template,
        positions="per-pair" if per_pair else str(positions),
        method=method,
        n_pairs=n,
        residual_norms=residual_norms,
    )


def _read_for(model, pair: ContrastivePair, text: str, default: Selector) -> Selector:
    if pair.read is None:
        return default
    if isinstance(pair.read, str):
        return token_span(model, text, pair.read)
    return pair.read


def _mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``[n, d] x [n, d] -> [d]``."""
    return pos.mean(dim=0) - neg.mean(dim=0)


def _scaled(unit: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``unit`` signed towards the positive side and scaled by the mean difference's projection on it."""
    return unit * torch.dot(_mean_diff(pos, neg), unit)


def _pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    diffs = (pos - neg).double()  # [n, d]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return _scaled(vh[0].float(), pos, neg)


def probe_direction(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """Logistic regression ``p(positive | x)`` by full-batch L-BFGS from zero: deterministic."""
    x = torch.cat([pos, neg]).double()
    x = (x - x.mean(dim=0)) / x.std().clamp_min(1e-12)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double().to(x.device)
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    unit = (w.detach() / w.detach().norm().clamp_min(1e-12)).float()
    return _scaled(unit, pos, neg)


_DIRECTION = {"mean_diff": _mean_diff, "pca": _pca, "probe": probe_direction}
