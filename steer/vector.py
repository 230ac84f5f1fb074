"""SteeringVector: one direction per layer, with where it came from; arithmetic; safetensors files."""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from steer.errors import SteerTypeError, SteerValueError

FORMAT = "steer.steering_vector"
FORMAT_VERSION = 1
RESID_POST = "blocks.{layer}.hook_resid_post"


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Directions in the residual stream, one ``[d_model]`` float32 tensor per layer.

    Attributes:
        directions: ``{layer: [d_model]}``.
        model_name, d_model, n_layers: the model the vector was read from.
        hook: hook point template with ``{layer}``, e.g. ``"blocks.{layer}.hook_resid_post"``.
        positions: the read positions, as text (``"last"``, ``"mean"``, ...).
        method: how it was made (``"mean_diff"``, ``"pca"``, ``"probe"``, or an arithmetic expression).
        n_pairs: how many contrastive pairs it was computed from.
        residual_norms: ``{layer: typical L2 norm of the residual stream there}`` at the read positions,
            the scale that ``relative=True`` coefficients are measured against.
    """

    directions: dict[int, torch.Tensor]
    model_name: str
    d_model: int
    n_layers: int
    hook: str = RESID_POST
    positions: str = "last"
    method: str = "mean_diff"
    n_pairs: int = 0
    residual_norms: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise SteerValueError("A steering vector needs at least one layer.")
        if "{layer}" not in self.hook:
            raise SteerValueError(f"hook must be a template with '{{layer}}', got {self.hook!r}.")
        for layer, direction in self.directions.items():
            if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise SteerValueError(
                    f"Layer {layer!r} is outside 0..{self.n_layers - 1} of {self.model_name}."
                )
            if not isinstance(direction, torch.Tensor) or direction.shape != (self.d_model,):
                shape = tuple(direction.shape) if isinstance(direction, torch.Tensor) else type(direction)
                raise SteerValueError(
                    f"Layer {layer}'s direction has shape {shape}; expected ({self.d_model},) for d_model "
                    f"{self.d_model}."
                )
            if not torch.isfinite(direction).all():
                raise SteerValueError(
                    f"Layer {layer}'s direction has NaN or inf entries; recompute it from finite activations."
                )

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def norms(self) -> dict[int, float]:
        """``{layer: L2 norm of the direction}``."""
        return {layer: float(self.directions[layer].norm()) for layer in self.layers}

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)

    def select(self, layers: int | list[int]) -> SteeringVector:
        """The same vector restricted to ``layers``."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise SteerValueError(f"The vector has no layer(s) {missing}; it has {self.layers}.")
        return replace(
            self,
            directions={layer: self.directions[layer] for layer in layers},
            residual_norms={k: v for k, v in self.residual_norms.items() if k in layers},
        )

    def normalize(self) -> SteeringVector:
        """Unit-norm direction at every layer."""
        return self._map(lambda d: d / d.norm().clamp_min(1e-12), "normalize({})")

    def cosine(self, other: SteeringVector) -> dict[int, float]:
        """``{layer: cosine similarity}`` over the layers both vectors have."""
        self._check_compatible(other)
        shared = [layer for layer in self.layers if layer in other.directions]
        return {
            layer: float(torch.cosine_similarity(self.directions[layer], other.directions[layer], dim=0))
            for layer in shared
        }

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, lambda a, b: a + b, "+")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, lambda a, b: a - b, "-")

    def __mul__(self, scale: float) -> SteeringVector:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise SteerTypeError(f"A steering vector can be scaled by a finite number, not {scale!r}.")
        return self._map(lambda d: d * scale, f"{scale} * ({{}})")

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self._map(lambda d: -d, "-({})")

    def _map(self, fn, expression: str) -> SteeringVector:
        return replace(
            self,
            directions={k: fn(v) for k, v in self.directions.items()},
            method=expression.format(self.method),
        )

    def _combine(self, other: SteeringVector, fn, op: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other)
        if set(self.layers) != set(other.layers):
            raise SteerValueError(
                f"Cannot combine vectors over different layers ({self.layers} and {other.layers}); "
                "use .select(layers) on both first."
            )
        return replace(
            self,
            directions={k: fn(v, other.directions[k]) for k, v in self.directions.items()},
            method=f"({self.method}) {op} ({other.method})",
            n_pairs=self.n_pairs + other.n_pairs,
        )

    def _check_compatible(self, other: SteeringVector) -> None:
        if (self.d_model, self.hook) != (other.d_model, other.hook):
            raise SteerValueError(
                f"These vectors live in different spaces: d_model {self.d_model} at {self.hook!r} versus "
                f"d_model {other.d_model} at {other.hook!r}."
            )

    def check_model(self, model) -> None:
        """Refuse a model this vector cannot be used on (other d_model, missing layers)."""
        if model.cfg.d_model != self.d_model:
            raise SteerValueError(
                f"This vector was read from {self.model_name} (d_model {self.d_model}); the model has d_model "
                f"{model.cfg.d_model}. Extract a vector from this model instead."
            )
        too_deep = [layer for layer in self.layers if layer >= model.cfg.n_layers]
        if too_deep:
            raise SteerValueError(
                f"The vector has layer(s) {too_deep}, but the model only has layers "
                f"0..{model.cfg.n_layers - 1}. Use .select(layers) to keep the ones it has."
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: one tensor ``layer.{L}`` per layer, provenance as JSON metadata."""
        tensors = {
            f"layer.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in self.directions.items()
        }
        meta = {
            "model_name": self.model_name,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "hook": self.hook,
            "positions": self.positions,
            "method": self.method,
            "n_pairs": self.n_pairs,
            "residual_norms": {str(k): v for k, v in self.residual_norms.items()},
        }
        write_file(path, tensors, FORMAT, FORMAT_VERSION, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> SteeringVector:
        """Read a file written by ``save``; with ``model``, also check the vector fits it."""
        meta, tensors = read_steer_file(
            path,
            "steering vector",
            FORMAT,
            FORMAT_VERSION,
            "Save vectors with SteeringVector.save; for llama.cpp GGUF control vectors use steer.interop.",
        )
        directions = {}
        for key, tensor in tensors.items():
            if not re.fullmatch(r"layer\.\d+", key):
                raise SteerValueError(
                    f"{path} holds an unexpected tensor {key!r}; it is not a steering vector."
                )
            directions[int(key.split(".")[1])] = tensor.to(torch.float32)
        vector = cls(
            directions=directions,
            model_name=meta["model_name"],
            d_model=int(meta["d_model"]),
            n_layers=int(meta["n_layers"]),
            hook=meta["hook"],
            positions=meta["positions"],
            method=meta["method"],
            n_pairs=int(meta["n_pairs"]),
            residual_norms={int(k): float(v) for k, v in meta["residual_norms"].items()},
        )
        if model is not None:
            vector.check_model(model)
        return vector

    def __repr__(self) -> str:
        layers = _compact(self.layers)
        norms = self.norms
        mean_norm = sum(norms.values()) / len(norms)
        return (
            f"SteeringVector({self.method}, {self.model_name}, layers {layers}, hook {self.hook!r}, "
            f"positions {self.positions!r}, {self.n_pairs} pairs, mean norm {mean_norm:.3g})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{layer}</td><td>{norm:.4g}</td>"
            f"<td>{self.residual_norms.get(layer, float('nan')):.4g}</td>"
            f"<td>{norm / self.residual_norms[layer] if self.residual_norms.get(layer) else float('nan'):.3f}</td></tr>"
            for layer, norm in self.norms.items()
        )
        title = html.escape(
            f"SteeringVector · {self.method} · {self.model_name} · hook {self.hook} · positions "
            f"{self.positions} · {self.n_pairs} pairs"
        )
        return (
            f"<div><b>{title}</b><table><thead><tr><th>layer</th><th>norm</th><th>residual norm</th>"
            f"<th>ratio</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )


def write_file(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str, version: int, meta: dict
) -> None:
    """Write float32 ``tensors`` and JSON ``meta`` as a safetensors file tagged ``kind``, through a
    temporary file so that a failed write leaves any existing file as it was."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"format": kind, "version": str(version), "steer": json.dumps(meta)})
    tmp.replace(path)


def read_file(path: str | os.PathLike, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file; never unpickles anything."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SteerValueError(f"No such {what} file: {path}.")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SteerValueError(f"{path} is not a safetensors file ({err}); is it a {what}?") from err


def read_steer_file(
    path: str | os.PathLike, what: str, kind: str, version: int, hint: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(JSON metadata, tensors)`` of a file ``write_file`` tagged ``kind``, refusing other safetensors
    files (``hint`` says where those belong) and files from a newer format ``version``."""
    header, tensors = read_file(path, what)
    if header.get("format") != kind:
        raise SteerValueError(
            f"{path} is a safetensors file but not a steer {what} (no '{kind}' metadata). {hint}"
        )
    if int(header.get("version", 0)) > version:
        raise SteerValueError(
            f"{path} was written by a newer steer (format {header['version']}); upgrade steer."
        )
    return json.loads(header["steer"]), tensors


def _compact(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)
