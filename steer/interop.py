"""llama.cpp / repeng control vectors: steering vectors as GGUF files, in and out.

The layout llama.cpp reads (and repeng writes): one F32 tensor ``direction.<N>`` of length ``n_embd``
per layer, added at every token to the output of 0-based block ``N``, which is TransformerLens'
``blocks.N.hook_resid_post``. llama.cpp rejects the whole file when it holds ``direction.0``, so a
direction at block 0's output cannot travel this way. Metadata ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` and ``controlvector.layer_count`` are what the reference
tools write and the loader ignores; steer's provenance rides along in ``controlvector.steer.*`` keys.

Hook points map to blocks' outputs: ``blocks.L.hook_resid_post`` is ``direction.L``, and
``blocks.L.hook_resid_pre`` is the same tensor as ``blocks.{L-1}.hook_resid_post``, so it is
``direction.{L-1}``. Other hook points (``resid_mid``, attention or MLP outputs) are not a block's
output and are refused. A file without steer's keys comes back at ``hook_resid_post``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from steer.errors import SteerValueError
from steer.vector import RESID_POST, SteeringVector

ARCH = "controlvector"
_PREFIX = "controlvector.steer."
_DIRECTION = re.compile(r"^direction\.(\d+)$")
_RESID_PRE = "blocks.{layer}.hook_resid_pre"


def block_outputs(vector: SteeringVector) -> dict[int, torch.Tensor]:
    """``{block N: direction}``: where each of ``vector``'s layers is added in llama.cpp's terms."""
    if vector.hook == RESID_POST:
        shift = 0
    elif vector.hook == _RESID_PRE:
        shift = -1
    else:
        raise SteerValueError(
            f"The vector was read at {vector.hook!r}, which is not a block's output; llama.cpp control "
            "vectors add to block outputs (hook_resid_post, or hook_resid_pre of the next block). "
            "Extract the vector at hook_resid_post to export it."
        )
    out = {layer + shift: direction for layer, direction in vector.directions.items()}
    if 0 in out or -1 in out:
        where = vector.hook_name(0 - shift)
        raise SteerValueError(
            f"The vector has a direction at {where} (block 0's output, or the embeddings), and llama.cpp "
            "rejects a control vector file holding direction.0 (or cannot add to the embeddings). Drop "
            "that layer first: vector.select([...]) with the others."
        )
    return out


def write_control_vector(
    vector: SteeringVector, path: str | os.PathLike, *, coeff: float = 1.0, model_hint: str | None = None
) -> None:
    """Write ``vector`` (times ``coeff``: llama.cpp adds the stored direction as is, times its own
    ``--control-vector-scaled`` factor) as a GGUF control vector. ``model_hint`` defaults to the
    architecture named in the vector's model name, else ``"llama"``."""
    import gguf

    outputs = block_outputs(vector)
    if not np.isfinite(coeff) or coeff == 0:
        raise SteerValueError(f"coeff must be a finite non-zero number, got {coeff}.")
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise SteerValueError(f"Control vector files end in .gguf; got {path.name}.")
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint or _hint(vector.model_name))
    writer.add_uint32(f"{ARCH}.layer_count", len(outputs))
    provenance = {
        "model_name": vector.model_name,
        "d_model": vector.d_model,
        "n_layers": vector.n_layers,
        "hook": vector.hook,
        "positions": vector.positions,
        "method": vector.method,
        "n_pairs": vector.n_pairs,
        "coeff": coeff,
        "residual_norms": {str(k): v for k, v in vector.residual_norms.items()},
    }
    writer.add_string(f"{_PREFIX}provenance", json.dumps(provenance))
    for block, direction in sorted(outputs.items()):
        data = (direction.detach().to("cpu", torch.float32) * coeff).numpy()
        writer.add_tensor(f"direction.{block}", np.ascontiguousarray(data, dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)


def read_control_vector(path: str | os.PathLike, model=None) -> SteeringVector:
    """Read a GGUF control vector (steer's, llama.cpp's ``cvector-generator`` or repeng's).

    steer's own files come back at the hook point they were extracted at, with their provenance and
    ``coeff`` divided back out. Others come back at ``blocks.N.hook_resid_post`` and need ``model`` for
    the model's name and layer count (their metadata only hints at the architecture).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SteerValueError(f"No such control vector file: {path}.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise SteerValueError(f"{path} is not a GGUF file ({err}); is it a llama.cpp control vector?") from err
    arch = _string(reader, "general.architecture")
    if arch != ARCH:
        raise SteerValueError(
            f"{path} is a GGUF file of architecture {arch!r}, not a control vector ('{ARCH}'); "
            "is it a model file?"
        )
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if not match:
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise SteerValueError(f"{path}: {tensor.name} is not a 1-D F32 tensor, as llama.cpp requires.")
        directions[int(match.group(1))] = torch.tensor(np.array(tensor.data, dtype=np.float32))
    if not directions:
        raise SteerValueError(f"{path} holds no direction.<N> tensors; it is not a usable control vector.")
    sizes = {d.shape[0] for d in directions.values()}
    if len(sizes) != 1:
        raise SteerValueError(f"{path}: directions of different lengths {sorted(sizes)}.")
    raw = _string(reader, f"{_PREFIX}provenance")
    if raw is None:
        if model is None:
            raise SteerValueError(
                f"{path} was not written by steer, so it does not say which model it is for; pass the "
                "model: read_control_vector(path, model)."
            )
        vector = SteeringVector(
            directions, model.cfg.model_name, sizes.pop(), model.cfg.n_layers, RESID_POST, "unknown", "gguf"
        )
    else:
        meta = json.loads(raw)
        shift = 1 if meta["hook"] == _RESID_PRE else 0
        coeff = float(meta.get("coeff", 1.0))
        vector = SteeringVector(
            {block + shift: d / coeff for block, d in directions.items()},
            meta["model_name"],
            int(meta["d_model"]),
            int(meta["n_layers"]),
            meta["hook"],
            meta["positions"],
            meta["method"],
            int(meta["n_pairs"]),
            {int(k): float(v) for k, v in meta.get("residual_norms", {}).items()},
        )
    if model is not None:
        vector.check_model(model)
    return vector


def _string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _hint(model_name: str) -> str:
    known = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
    lowered = model_name.lower().replace("-", "").replace("_", "")
    if "smollm" in lowered:
        return "llama"
    return next((k for k in known if k in lowered), "llama")
