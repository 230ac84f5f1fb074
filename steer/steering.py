"""Interventions on the residual stream and the ``steering`` context that applies them.

Operators, for the residual ``h`` at a selected position, direction ``v`` and unit direction ``u``:
    add       h + c v
    ablate    h - c (h . u) u            (c = 1 removes the component along u)
    clamp     h + (c - h . u) u          (the component along u becomes c)
    add_norm  (h + c v) |h| / |h + c v|  (adds c v, then restores the norm of h)

With ``relative=True`` the coefficient is a fraction of the layer's typical residual norm (recorded in
the vector at extraction): ``add`` then adds ``c * norm * u`` and ``clamp`` sets the component to
``c * norm``. A coefficient is a number or one number per batch row, so a sweep runs as one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from steer.errors import SteerTypeError, SteerValueError
from steer.hooks import HookFn, attach
from steer.positions import CallState, Selector, select, validate
from steer.vector import SteeringVector

OPS = ("add", "ablate", "clamp", "add_norm")


@dataclass(frozen=True, eq=False)
class Intervention:
    """One vector applied at some layers and positions with one operator.

    coeff: a number, or a sequence / 1-D tensor with one number per batch row.
    layers: the vector's layers to use; ``None`` means all of them.
    positions: a selector (see ``steer.positions``); in a per-row list, ``None`` leaves a row alone.
    """

    vector: SteeringVector
    coeff: float | Sequence[float] | torch.Tensor = 1.0
    layers: int | Sequence[int] | None = None
    positions: Selector = "all"
    op: str = "add"
    relative: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise SteerTypeError(f"Expected a SteeringVector, got {type(self.vector).__name__}.")
        if self.op not in OPS:
            raise SteerValueError(f"Unknown operator {self.op!r}; use one of {', '.join(OPS)}.")
        coeff = torch.as_tensor(self.coeff, dtype=torch.float32)
        if coeff.ndim > 1 or coeff.numel() == 0:
            raise SteerValueError("coeff must be a number or a 1-D sequence with one number per batch row.")
        if not torch.isfinite(coeff).all():
            raise SteerValueError(f"coeff must be finite, got {self.coeff!r}.")
        missing = [layer for layer in self.layer_list if layer not in self.vector.directions]
        if missing:
            raise SteerValueError(
                f"The vector has no layer(s) {missing}; it was extracted at layers {self.vector.layers}."
            )
        if self.relative and self.op in ("add", "add_norm", "clamp"):
            unknown = [layer for layer in self.layer_list if not self.vector.residual_norms.get(layer)]
            if unknown:
                raise SteerValueError(
                    f"relative=True needs the residual norm at layer(s) {unknown}, which this vector does "
                    "not record; use an absolute coefficient or re-extract the vector."
                )
        validate(self.positions)

    @property
    def layer_list(self) -> list[int]:
        if self.layers is None:
            return self.vector.layers
        return [self.layers] if isinstance(self.layers, int) else list(self.layers)


@contextlib.contextmanager
def steering(
    model,
    *items: SteeringVector | Intervention,
    coeff: float | Sequence[float] | torch.Tensor = 1.0,
    layers: int | Sequence[int] | None = None,
    positions: Selector = "all",
    op: str = "add",
    relative: bool = False,
) -> Iterator[None]:
    """Steer every forward pass and ``model.generate`` call inside the ``with`` block.

    ``steering(model, vector, coeff=4.0, layers=[12])`` applies one vector; ``steering(model,
    Intervention(v1, 4.0), Intervention(v2, op="ablate"))`` composes several, in order. The hooks come
    off when the block ends, also when an exception escapes it. Positions mean the same tokens with or
    without the KV cache and under any padding (see ``steer.positions``).
    """
    if not items:
        raise SteerValueError("Nothing to steer with: pass a SteeringVector or Intervention objects.")
    interventions = []
    for item in items:
        if isinstance(item, Intervention):
            interventions.append(item)
        else:
            interventions.append(Intervention(item, coeff, layers, positions, op, relative))
    for intervention in interventions:
        intervention.vector.check_model(model)
    param = next(model.parameters())
    hooks = [
        (iv.vector.hook_name(layer), edit_fn(iv, layer, param.device, param.dtype))
        for iv in interventions
        for layer in iv.layer_list
    ]
    with attach(model, hooks, what="steering"):
        yield


def edit_fn(iv: Intervention, layer: int, device: torch.device, dtype: torch.dtype) -> HookFn:
    """The hook applying ``iv`` at ``layer``; everything that does not depend on the call is done here, once."""
    direction = iv.vector.directions[layer].to(device=device, dtype=dtype)
    unit = direction / direction.norm().clamp_min(1e-12)
    coeff = torch.as_tensor(iv.coeff, dtype=dtype, device=device)
    if iv.relative:
        coeff = coeff * iv.vector.residual_norms.get(layer, 1.0)
        if iv.op in ("add", "add_norm"):
            direction = unit
    memo: dict[str, object] = {"state": None, "picked": None}

    def fn(h: torch.Tensor, state: CallState) -> torch.Tensor:
        """``h``: ``[batch, pos, d_model]``."""
        if memo["state"] is not state:  # one selection per forward call, shared by nothing else
            memo["state"], memo["picked"] = state, select(iv.positions, state)
        picked: torch.Tensor = memo["picked"]
        if not picked.any():
            return h
        c = _per_row(coeff, h.shape[0])
        if iv.op == "add":
            new = h + c * direction
        elif iv.op == "ablate":
            new = h - c * (h @ unit).unsqueeze(-1) * unit
        elif iv.op == "clamp":
            new = h + (c - (h @ unit).unsqueeze(-1)) * unit
        else:
            added = h + c * direction
            new = added * (h.norm(dim=-1, keepdim=True) / added.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return torch.where(picked.unsqueeze(-1), new, h)

    return fn


def _per_row(coeff: torch.Tensor, batch: int) -> torch.Tensor:
    """A coefficient shaped to broadcast over ``[batch, pos, d_model]``."""
    if coeff.ndim == 0:
        return coeff
    if coeff.shape[0] != batch:
        raise SteerValueError(
            f"{coeff.shape[0]} per-row coefficients for a batch of {batch} rows; give one per row "
            "or a single number."
        )
    return coeff.view(batch, 1, 1)
