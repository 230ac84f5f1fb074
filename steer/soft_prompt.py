"""Soft prompts (prompt tuning): learned input vectors, trained on a frozen model.

A ``SoftPrompt`` is ``n`` virtual tokens, ``[n, d_model]``, inserted right after BOS (at the start when
the tokenizer adds no BOS, as SmolLM2's does for plain text). The batch carries a placeholder token at
each virtual position, marked real in the attention mask, and a hook on ``hook_embed`` writes the soft
prompt's vectors there. So left padding keeps the pads in front of the soft prompt, right padding keeps
them after the text, and a KV-cache generation sees the virtual tokens once, in its first call.

Deep soft prompts (the prefix-tuning equivalent on this engine) also hold one ``[n, d_model]`` block of
residual-stream vectors per chosen layer, written over the virtual positions' ``hook_resid_pre`` there.

PEFT's prompt-tuning adapters (``adapter_config.json`` + ``adapter_model.safetensors`` holding
``prompt_embeddings`` ``[n_virtual_tokens, d_model]``) go in and out with ``to_peft`` / ``from_peft``.
PEFT puts the virtual tokens before everything, BOS included; steer puts them after BOS. The two agree
for prompts without BOS (plain text on SmolLM2); with BOS they differ by that one token's place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steer.errors import SteerTypeError, SteerValueError
from steer.hooks import attach, forward_last
from steer.positions import CallState, select
from steer.prompts import ContrastivePair, Tokens, pad
from steer.vector import read_file, read_steer_file, write_file

FORMAT = "steer.soft_prompt"
FORMAT_VERSION = 1


@dataclass(eq=False)
class SoftPrompt:
    """Learned input vectors.

    Attributes:
        embeddings: ``[n, d_model]`` float32, the virtual tokens' input embeddings.
        model_name, d_model: the model they were made for.
        init: ``[n, d_model]`` the embeddings before training, if known (``task_vector()`` needs it).
        deep: ``{layer: [n, d_model]}`` residual-stream vectors written at the virtual positions.
        origin: how it was made, as text.
    """

    embeddings: torch.Tensor
    model_name: str
    d_model: int
    init: torch.Tensor | None = None
    deep: dict[int, torch.Tensor] = field(default_factory=dict)
    origin: str = ""

    def __post_init__(self) -> None:
        shapes = [self.embeddings, *self.deep.values()] + ([self.init] if self.init is not None else [])
        for tensor in shapes:
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != self.d_model:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise SteerValueError(f"Soft prompt tensors are [n, {self.d_model}]; got {shape}.")
            if tensor.shape[0] != self.n:
                raise SteerValueError(f"Soft prompt parts disagree on n: {tensor.shape[0]} vs {self.n}.")
            if not torch.isfinite(tensor).all():
                raise SteerValueError("The soft prompt has NaN or inf entries; retrain or reload it.")

    @property
    def n(self) -> int:
        """Number of virtual tokens."""
        return self.embeddings.shape[0]

    # --- making one ---------------------------------------------------------------------------------

    @classmethod
    def from_text(cls, model, text: str) -> SoftPrompt:
        """One virtual token per token of ``text``, initialised to those tokens' embeddings."""
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SteerValueError("The initialisation text tokenizes to nothing; give some words.")
        vectors = _embedding_matrix(model)[torch.tensor(ids)].detach().float().cpu()
        return cls._new(model, vectors, f"text {text!r}")

    @classmethod
    def from_vocab(cls, model, n: int, *, seed: int = 0) -> SoftPrompt:
        """``n`` virtual tokens initialised to the embeddings of randomly sampled vocabulary tokens."""
        _check_n(n)
        matrix = _embedding_matrix(model)
        ids = random.Random(seed).sample(range(matrix.shape[0]), n)
        return cls._new(
            model, matrix[torch.tensor(ids)].detach().float().cpu(), f"vocab sample (seed {seed})"
        )

    @classmethod
    def random(cls, model, n: int, *, seed: int = 0) -> SoftPrompt:
        """``n`` Gaussian virtual tokens, scaled to the embedding matrix's mean row norm."""
        _check_n(n)
        matrix = _embedding_matrix(model).detach().float()
        vectors = torch.randn(n, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
        vectors = vectors / vectors.norm(dim=1, keepdim=True) * matrix.norm(dim=1).mean().cpu()
        return cls._new(model, vectors, f"random (seed {seed})")

    @classmethod
    def _new(cls, model, vectors: torch.Tensor, origin: str) -> SoftPrompt:
        return cls(vectors, model.cfg.model_name, model.cfg.d_model, vectors.clone(), {}, origin)

    def deepen(self, model, layers: Sequence[int] | None = None) -> SoftPrompt:
        """A deep soft prompt: add residual-stream vectors at ``layers`` (default every layer but 0),
        initialised to what this soft prompt already produces there, so that it starts out the same."""
        self.check_model(model)
        chosen = list(range(1, model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
        bad = [x for x in chosen if not 1 <= x < model.cfg.n_layers]
        if bad or not chosen:
            raise SteerValueError(
                f"Deep layers {bad or '[]'} are not in 1..{model.cfg.n_layers - 1} (layer 0's input is the "
                "embedding, which the soft prompt already sets)."
            )
        found: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def fn(x: torch.Tensor, state: CallState) -> None:
                found[layer] = x[0, self.offset(model) : self.offset(model) + self.n].detach().float().cpu()

            return fn

        with torch.no_grad(), self.applied(model, ["."]) as batch:
            hooks = [(f"blocks.{x}.hook_resid_pre", keep(x)) for x in chosen]
            with attach(model, hooks, what="deep soft prompt read"):
                model(
                    batch.tokens.to(model.cfg.device),
                    attention_mask=batch.attention_mask.to(model.cfg.device),
                )
        return replace(
            self, deep={**self.deep, **found}, origin=f"{self.origin}, deep at {len(chosen)} layers"
        )

    # --- using one ----------------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Refuse a model of another width, or one with fewer layers than the deep vectors use."""
        if model.cfg.d_model != self.d_model:
            raise SteerValueError(
                f"This soft prompt is for {self.model_name} (d_model {self.d_model}); the model has d_model "
                f"{model.cfg.d_model}. Train one for this model."
            )
        deepest = max(self.deep, default=0)
        if deepest >= model.cfg.n_layers:
            raise SteerValueError(
                f"Deep layer {deepest} does not exist in a {model.cfg.n_layers}-layer model."
            )

    def tokenize(
        self,
        model,
        texts: str | Sequence[str],
        *,
        padding_side: str = "left",
        use: Sequence[bool] | None = None,
    ) -> tuple[Tokens, list]:
        """Token ids with a placeholder at each virtual position, and the per-row position selectors
        (``slice`` over the virtual tokens, ``None`` in rows where ``use`` is False)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise SteerValueError("No texts to tokenize: pass at least one string.")
        use = [True] * len(texts) if use is None else list(use)
        rows, selectors = [], []
        for text, on in zip(texts, use):
            if not isinstance(text, str):
                raise SteerTypeError(f"Texts are strings; got a {type(text).__name__}.")
            ids = model.tokenizer(text, add_special_tokens=True)["input_ids"]
            ids, selector = self.place(model, ids) if on else (ids, None)
            rows.append(ids)
            selectors.append(selector)
        return pad(rows, model.tokenizer.pad_token_id, padding_side), selectors

    def place(self, model, ids: list[int]) -> tuple[list[int], slice]:
        """``ids`` with a placeholder at each virtual position, and the slice of positions they take."""
        at = self.offset(model)
        return ids[:at] + [model.tokenizer.pad_token_id] * self.n + ids[at:], slice(at, at + self.n)

    @contextlib.contextmanager
    def applied(self, model, texts: str | Sequence[str], *, padding_side: str = "left") -> Iterator[Tokens]:
        """Tokenize ``texts`` with this soft prompt and apply it to forward passes and ``model.generate``
        inside the block, which get the yielded batch::

            with soft.applied(model, texts) as batch:
                logits = model(batch.tokens, attention_mask=batch.attention_mask)
        """
        batch, selectors = self.tokenize(model, texts, padding_side=padding_side)
        with self.hooked(model, selectors):
            yield batch

    @contextlib.contextmanager
    def hooked(self, model, selectors: list, parameters: dict | None = None) -> Iterator[None]:
        """Write the soft prompt at the positions ``selectors`` pick (one per row, from ``tokenize``).

        ``parameters``: tensors to write instead of the stored ones (``{"embed": ..., layer: ...}``),
        so training can differentiate through them.
        """
        self.check_model(model)
        values = parameters or {"embed": self.embeddings, **self.deep}
        hooks = [("hook_embed", _writer(values["embed"], selectors))]
        hooks += [(f"blocks.{x}.hook_resid_pre", _writer(values[x], selectors)) for x in sorted(self.deep)]
        with attach(model, hooks, what="soft prompt"):
            yield

    def offset(self, model) -> int:
        """Where the virtual tokens go: after BOS if the tokenizer starts texts with it."""
        tok = model.tokenizer
        first = tok("a", add_special_tokens=True)["input_ids"][:1]
        return int(tok.bos_token_id is not None and first == [tok.bos_token_id])

    # --- inspecting one -----------------------------------------------------------------------------

    def nearest_tokens(self, model, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each virtual token, the ``k`` vocabulary tokens whose embeddings are closest by cosine."""
        self.check_model(model)
        matrix = torch.nn.functional.normalize(_embedding_matrix(model).detach().float(), dim=1)
        sims = torch.nn.functional.normalize(self.embeddings.to(matrix.device), dim=1) @ matrix.T
        top = sims.topk(k, dim=1)
        return [
            [(model.tokenizer.decode([i]), round(float(s), 4)) for s, i in zip(vals.tolist(), ids.tolist())]
            for vals, ids in zip(top.values, top.indices)
        ]

    def as_vector(self, model, texts: Sequence[str], layers: Sequence[int] | None = None):
        """The soft prompt's effect as a ``SteeringVector``: at each layer, the mean shift of the
        residual stream (``resid_post``) at each text's last token that the soft prompt causes.
        Compare it with a steering vector by ``vector.cosine(other)``."""
        from steer.hooks import read
        from steer.prompts import tokenize
        from steer.vector import SteeringVector

        chosen = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        names = [f"blocks.{x}.hook_resid_post" for x in chosen]
        with torch.no_grad():
            plain = read(model, tokenize(model, texts), names, "last", progress=False)
            batch, selectors = self.tokenize(model, texts)
            with self.hooked(model, selectors):
                soft = read(model, batch, names, "last", progress=False)
        directions = {x: (soft[n] - plain[n]).mean(dim=0).cpu() for x, n in zip(chosen, names)}
        return SteeringVector(
            directions,
            self.model_name,
            self.d_model,
            model.cfg.n_layers,
            method="soft_prompt",
            n_pairs=len(list(texts)),
        )

    # --- arithmetic ---------------------------------------------------------------------------------

    def task_vector(self) -> SoftPrompt:
        """This soft prompt minus its initialisation: what training added."""
        if self.init is None:
            raise SteerValueError("This soft prompt does not know its initialisation; no task vector.")
        return replace(self, embeddings=self.embeddings - self.init, init=None, deep={}, origin="task vector")

    def _combine(self, other: SoftPrompt, sign: float, what: str) -> SoftPrompt:
        if not isinstance(other, SoftPrompt):
            return NotImplemented
        if (other.n, other.d_model) != (self.n, self.d_model) or set(other.deep) != set(self.deep):
            raise SteerValueError(
                f"Cannot {what} soft prompts of different shapes: {self.n} x {self.d_model} (deep layers "
                f"{sorted(self.deep)}) and {other.n} x {other.d_model} (deep layers {sorted(other.deep)})."
            )
        deep = {x: self.deep[x] + sign * other.deep[x] for x in self.deep}
        origin = (
            f"({self.origin or 'soft prompt'}) {'+' if sign > 0 else '-'} ({other.origin or 'soft prompt'})"
        )
        return replace(
            self, embeddings=self.embeddings + sign * other.embeddings, init=None, deep=deep, origin=origin
        )

    def __add__(self, other: SoftPrompt) -> SoftPrompt:
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: SoftPrompt) -> SoftPrompt:
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, scale: float) -> SoftPrompt:
        if not isinstance(scale, (int, float)):
            return NotImplemented
        deep = {x: v * scale for x, v in self.deep.items()}
        return replace(
            self,
            embeddings=self.embeddings * scale,
            init=None,
            deep=deep,
            origin=f"{scale:g} * ({self.origin})",
        )

    __rmul__ = __mul__

    def __neg__(self) -> SoftPrompt:
        return self * -1.0

    # --- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """A safetensors file: ``embeddings``, ``init``, ``deep.{L}``, provenance as JSON metadata."""
        tensors = {"embeddings": self.embeddings}
        if self.init is not None:
            tensors["init"] = self.init
        tensors.update({f"deep.{x}": v for x, v in self.deep.items()})
        meta = {"model_name": self.model_name, "d_model": self.d_model, "origin": self.origin}
        write_file(path, tensors, FORMAT, FORMAT_VERSION, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> SoftPrompt:
        """Read a file written by ``save``; with ``model``, also check that it fits."""
        meta, tensors = read_steer_file(
            path, "soft prompt", FORMAT, FORMAT_VERSION, "For PEFT adapters use SoftPrompt.from_peft(folder)."
        )
        if "embeddings" not in tensors:
            raise SteerValueError(f"{path} has no 'embeddings' tensor; it is not a soft prompt.")
        deep = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("deep.")}
        soft = cls(
            tensors["embeddings"],
            meta["model_name"],
            int(meta["d_model"]),
            tensors.get("init"),
            deep,
            meta["origin"],
        )
        if model is not None:
            soft.check_model(model)
        return soft

    def to_peft(self, folder: str | os.PathLike, model) -> Path:
        """Write a PEFT prompt-tuning adapter (``adapter_config.json``, ``adapter_model.safetensors``).

        PEFT cannot hold deep vectors; a deep soft prompt is refused."""
        from safetensors.torch import save_file

        self.check_model(model)
        if self.deep:
            raise SteerValueError(
                "PEFT's prompt tuning has no per-layer vectors; export a plain soft prompt."
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.n,
            "token_dim": self.d_model,
            "num_transformer_submodules": 1,
            "num_attention_heads": model.cfg.n_heads,
            "num_layers": model.cfg.n_layers,
            "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": self.model_name,
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        weights = {"prompt_embeddings": self.embeddings.detach().to("cpu", torch.float32).contiguous()}
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        return folder

    @classmethod
    def from_peft(cls, folder: str | os.PathLike, model) -> SoftPrompt:
        """Read a PEFT prompt-tuning adapter folder."""
        folder = Path(folder)
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            raise SteerValueError(f"{folder} has no adapter_config.json; is it a PEFT adapter folder?")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("peft_type") != "PROMPT_TUNING":
            raise SteerValueError(
                f"{folder} holds a {config.get('peft_type')!r} adapter; only PROMPT_TUNING adapters are soft prompts."
            )
        _, tensors = read_file(folder / "adapter_model.safetensors", "PEFT adapter")
        if "prompt_embeddings" not in tensors:
            raise SteerValueError(f"{folder}/adapter_model.safetensors has no 'prompt_embeddings' tensor.")
        vectors = tensors["prompt_embeddings"].float()
        soft = cls(
            vectors,
            config.get("base_model_name_or_path") or model.cfg.model_name,
            vectors.shape[1],
            None,
            {},
            f"PEFT adapter {folder.name}",
        )
        soft.check_model(model)
        return soft

    def __repr__(self) -> str:
        deep = f", deep at {len(self.deep)} layers" if self.deep else ""
        return f"SoftPrompt({self.n} virtual tokens, {self.model_name}, {self.origin}{deep})"


# --- training ---------------------------------------------------------------------------------------


@dataclass
class Training:
    """What ``train_soft_prompt`` did: the best soft prompt (lowest validation loss) and the loss curves."""

    soft_prompt: SoftPrompt
    train_loss: list[float]
    val_loss: list[tuple[int, float]]
    best_step: int
    stopped: str

    @property
    def best_val_loss(self) -> float:
        return min((v for _, v in self.val_loss), default=float("nan"))

    def plot(self, **kwargs):
        """The training and validation loss curves."""
        from steer import plot

        return plot.training_curve(self, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Training({len(self.train_loss)} steps, best validation loss {self.best_val_loss:.4f} at step "
            f"{self.best_step}; {self.stopped})"
        )


def train_soft_prompt(
    model,
    soft: SoftPrompt,
    data: Sequence,
    *,
    val: Sequence | None = None,
    val_fraction: float = 0.2,
    steps: int = 100,
    lr: float = 0.1,
    warmup: int = 10,
    weight_decay: float = 0.0,
    batch_size: int = 8,
    eval_every: int = 10,
    patience: int = 5,
    seed: int = 0,
    progress: bool | None = None,
) -> Training:
    """Train ``soft`` (and its deep vectors) on a frozen model; returns the best by validation loss.

    Args:
        data: ``(prompt, completion)`` pairs (tuples or dicts with those keys) for the language-model
            loss on the completion's tokens; or ``ContrastivePair`` objects for the contrastive loss
            ``-log sigmoid(log p(positive) - log p(negative))`` over whole texts.
        val: validation items; default a seeded ``val_fraction`` of ``data``.
        steps, lr, warmup: AdamW steps, peak learning rate (prompt tuning wants large ones, 1e-2 to 3e-1)
            and linear warm-up steps.
        eval_every, patience: validate every so many steps; stop after ``patience`` validations
            without improvement.

    Only the soft prompt's tensors get gradients; the model's weights are never touched. A NaN or
    infinite loss stops training and keeps the best soft prompt so far, saying why in ``stopped``.
    """
    from steer.prompts import split

    soft.check_model(model)
    if not steps > 0 or not lr > 0 or batch_size < 1 or eval_every < 1 or warmup < 0:
        raise SteerValueError(
            f"steps, lr, batch_size and eval_every must be positive and warmup non-negative; got steps={steps}, "
            f"lr={lr}, batch_size={batch_size}, eval_every={eval_every}, warmup={warmup}."
        )
    items = list(data)
    if not items:
        raise SteerValueError("No training data; give (prompt, completion) pairs or ContrastivePairs.")
    if val is None:
        items, val_items = split(items, val_fraction, seed=seed)
    else:
        val_items = list(val)
    if not items or not val_items:
        raise SteerValueError("Training and validation sets must both be non-empty; give more data.")
    loss_fn = _loss(model, soft, items + val_items)
    params = {"embed": soft.embeddings.clone().to(model.cfg.device).requires_grad_(True)}
    params.update({x: v.clone().to(model.cfg.device).requires_grad_(True) for x, v in soft.deep.items()})
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    order = random.Random(seed)
    best = (math.inf, 0, {k: v.detach().clone() for k, v in params.items()})
    train_loss: list[float] = []
    val_loss: list[tuple[int, float]] = []
    stopped, waited = f"finished {steps} steps", 0

    def validate() -> float:
        with torch.no_grad():
            losses = [
                loss_fn(val_items[i : i + batch_size], params) for i in range(0, len(val_items), batch_size)
            ]
        return float(sum(loss * n for loss, n in losses) / len(val_items))

    bar = tqdm(
        range(1, steps + 1),
        desc="prompt tuning",
        disable=not (progress if progress is not None else True),
        leave=False,
    )
    for step in bar:
        batch = order.sample(items, min(batch_size, len(items)))
        with torch.enable_grad():
            loss, _ = loss_fn(batch, params)
            if not torch.isfinite(loss):
                stopped = f"stopped at step {step}: the loss became {loss.item()}; kept the best soft prompt (step {best[1]})"
                break
            grads = torch.autograd.grad(loss, list(params.values()))
        for p, g in zip(params.values(), grads):
            p.grad = g
        optimizer.step()
        schedule.step()
        train_loss.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % eval_every == 0 or step == steps:
            current = validate()
            val_loss.append((step, current))
            if not math.isfinite(current):
                stopped = f"stopped at step {step}: validation loss {current}; kept the best soft prompt (step {best[1]})"
                break
            if current < best[0]:
                best, waited = (current, step, {k: v.detach().clone() for k, v in params.items()}), 0
            else:
                waited += 1
                if waited >= patience:
                    stopped = f"early stop at step {step}: no better validation loss for {patience} checks"
                    break
    bar.close()
    kept = best[2]
    trained = replace(
        soft,
        embeddings=kept["embed"].float().cpu(),
        deep={x: kept[x].float().cpu() for x in soft.deep},
        origin=f"{soft.origin}, tuned {len(train_loss)} steps",
    )
    return Training(trained, train_loss, val_loss, best[1], stopped)


def _loss(model, soft: SoftPrompt, every: list):
    """``fn(items, params) -> (mean loss, count)`` for the objective the items call for."""
    contrastive = isinstance(every[0], ContrastivePair)
    if contrastive and not all(isinstance(i, ContrastivePair) for i in every):
        raise SteerTypeError("Mix of ContrastivePairs and other items; use one kind of training data.")
    if not contrastive:
        every = [_completion(i) for i in every]
    device = model.cfg.device
    tok = model.tokenizer

    def lm(items, params):
        prompts = [p for p, _ in items]
        targets = [tok(c, add_special_tokens=False)["input_ids"] for _, c in items]
        if any(not t for t in targets):
            raise SteerValueError("A completion tokenizes to nothing; give each a word or more.")
        batch, selectors = soft.tokenize(model, prompts)
        rows = [
            ids[mask.bool()].tolist() + t for ids, mask, t in zip(batch.tokens, batch.attention_mask, targets)
        ]
        full = pad(rows, tok.pad_token_id, "left")
        width = max(len(t) for t in targets)
        labels = torch.full((len(items), width), -100)
        for i, t in enumerate(targets):
            labels[i, width - len(t) :] = torch.tensor(t)
        # Left padding ends every row in the last column, so the completions' predictions are the last columns.
        with soft.hooked(model, selectors, params):
            logits = forward_last(model, full.tokens.to(device), full.attention_mask.to(device), width + 1)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=-100
        )
        return loss, len(items)

    def pairwise(items, params):
        texts = [t for pair in items for t in (pair.positive, pair.negative)]
        batch, selectors = soft.tokenize(model, texts)
        with soft.hooked(model, selectors, params):
            logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, batch.tokens[:, 1:, None].to(device))[..., 0]
        # Score each text's own tokens: real, and after the virtual tokens.
        counted = batch.attention_mask[:, 1:].clone()
        for row, sel in enumerate(selectors):
            first = int((batch.attention_mask[row] == 0).sum())  # left pads
            counted[row, : first + sel.stop - 1] = 0
        total = (logp * counted.to(device)).sum(dim=1)
        margin = total[0::2] - total[1::2]
        return -torch.nn.functional.logsigmoid(margin).mean(), len(items)

    return pairwise if contrastive else lm


def _completion(item) -> tuple[str, str]:
    if isinstance(item, dict) and "prompt" in item and "completion" in item:
        return str(item["prompt"]), str(item["completion"])
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    raise SteerTypeError(
        f"Training items are (prompt, completion) pairs or dicts with 'prompt' and 'completion'; got {item!r}."
    )


def _writer(values: torch.Tensor, selectors: list):
    """A hook writing ``values[k]`` at the k-th position each row's selector picks."""

    def fn(x: torch.Tensor, state: CallState) -> torch.Tensor | None:
        picked = select(selectors, state)  # [batch, new]
        if not picked.any():
            return None  # a decode step after the prompt: the virtual tokens are in the KV cache
        rows = picked.any(dim=1)
        out = x.clone()
        out[picked] = values.to(x.dtype).to(x.device).repeat(int(rows.sum()), 1)
        return out

    return fn


def _embedding_matrix(model) -> torch.Tensor:
    return model.original_model.get_input_embeddings().weight


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise SteerValueError(f"n is the number of virtual tokens, 0 or more; got n={n!r}.")
