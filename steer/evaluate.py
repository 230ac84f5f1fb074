"""Did the steering work, and what did it cost?

Behaviour scores read the log-probabilities of candidate completions after each item's prompt:
    ab_behaviour          probability of the answer letter matching the behaviour, normalised over the two
    completion_behaviour  log-odds of a set of positive completions over a set of negative ones (with one
                          token each, the logit difference)
``score`` measures the model as it is: call it inside ``steer.steering`` to score a steered model.
``side_effects`` measures the cost on neutral text: KL divergence of next-token distributions from the
unsteered model's, and perplexity. ``sweep`` runs a layer x coefficient (x method) grid of both, each
layer's coefficients batched as per-row coefficients, the unsteered reference computed once.
``score_generations`` scores open-ended generations with a function of the text or, built in, the mean
projection of the generated tokens' activations on the vector; ``projections`` gives token-level
readings; ``layer_scan`` says where a concept is linearly readable.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm

from steer.errors import SteerError, SteerValueError
from steer.extract import probe_direction
from steer.generate import generate
from steer.hooks import active, attach, cache_rows, read, resume, trunk
from steer.positions import CallState, Selector, is_per_row
from steer.prompts import ContrastivePair, Tokens, ab_items, chat_prompt, pad, pairs_from, tokenize
from steer.soft_prompt import SoftPrompt
from steer.steering import Intervention, edit_fn, steering
from steer.vector import RESID_POST, SteeringVector

DEFAULT_COEFFS = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
AB_NAME = "p(matching answer)"
# A shared prefix shorter than this is not worth a separate pass.
_MIN_PREFIX = 8


def neutral_text() -> list[str]:
    """The neutral sample shipped with steer: 20 plain factual sentences we wrote."""
    text = (resources.files("steer") / "data" / "neutral.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Behaviour:
    """A behaviour measure over items.

    prompts: one per item. candidates: per item, the completions whose log-probabilities are read.
    reduce: ``[items, candidates]`` log-probabilities -> ``[items]`` scores. items: what was measured.
    """

    name: str
    prompts: list[str]
    candidates: list[tuple[str, ...]]
    reduce: Callable[[torch.Tensor], torch.Tensor]
    items: list

    def __len__(self) -> int:
        return len(self.prompts)


def ab_behaviour(
    model, items: Iterable[Any], *, system: str | None = None, answer: str = "letter"
) -> Behaviour:
    """P(the answer matching the behaviour), normalised over the item's two answers.

    ``answer="letter"`` (CAA's measure): the next-token probabilities of the two letters after the chat
    prompt and an opening ``"("`` of the assistant's answer. ``answer="text"``: the probabilities of the
    two choices' full texts as the assistant's answer, for models too small to tie letters to choices.
    """
    items = ab_items(items)
    if answer == "letter":
        prompts = [chat_prompt(model, item.question, system=system, assistant="(") for item in items]
        candidates = [(item.matching, item.not_matching) for item in items]
    elif answer == "text":
        prompts = [chat_prompt(model, item.question, system=system) for item in items]
        candidates = [(item.choice(item.matching), item.choice(item.not_matching)) for item in items]
    else:
        raise SteerValueError(f"answer must be 'letter' or 'text', got {answer!r}.")
    name = AB_NAME if answer == "letter" else "p(matching answer text)"
    return Behaviour(name, prompts, candidates, lambda logp: logp.softmax(dim=-1)[:, 0], items)


def completion_behaviour(
    model, prompts: Sequence[str], positive: Sequence[str], negative: Sequence[str]
) -> Behaviour:
    """``logsumexp log p(positive) - logsumexp log p(negative)`` per prompt: the log-odds of any positive
    completion over any negative one. With one single-token completion per side this is the logit
    difference."""
    if not prompts or not positive or not negative:
        raise SteerValueError(
            "completion_behaviour needs prompts and at least one positive and one negative completion."
        )
    k = len(positive)
    return Behaviour(
        "log-odds(positive completion)",
        list(prompts),
        [tuple(positive) + tuple(negative)] * len(prompts),
        lambda logp: logp[:, :k].logsumexp(dim=-1) - logp[:, k:].logsumexp(dim=-1),
        list(prompts),
    )


@dataclass(frozen=True)
class Score:
    """A behaviour score: the mean and one value per item, with the items it used."""

    name: str
    per_item: list[float]
    items: list

    @property
    def mean(self) -> float:
        return sum(self.per_item) / len(self.per_item)

    def __repr__(self) -> str:
        return f"Score({self.name} = {self.mean:.4f} over {len(self.per_item)} items)"


def score(
    model, behaviour: Behaviour, *, batch_size: int = 32, soft_prompt: SoftPrompt | None = None
) -> Score:
    """Score the model as it is now (inside ``steer.steering`` for a steered model), with
    ``soft_prompt`` in front of every prompt if given."""
    plan = _Plan.build(model, behaviour)
    chunks = plan.forward(model, batch_size, soft_prompt)
    logp = plan.items([plan.readout(model, logits, rows) for rows, logits in chunks])
    return Score(behaviour.name, behaviour.reduce(logp).tolist(), behaviour.items)


@dataclass(frozen=True)
class SideEffects:
    """Cost on neutral text: mean KL(unsteered || steered) of next-token distributions, and perplexity."""

    kl: float
    perplexity: float
    n_texts: int


def side_effects(
    model,
    *interventions: Intervention,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    soft_prompt: SoftPrompt | None = None,
) -> SideEffects:
    """KL divergence from the unsteered model and perplexity on ``texts`` (default ``neutral_text()``),
    under the given interventions and with ``soft_prompt`` in front of each text, if given; both are
    measured on the texts' own tokens."""
    _warn_if_steered(model, "side_effects")
    neutral = _Neutral.build(model, texts, batch_size)
    kls, nlls = [], []
    with steering(model, *interventions) if interventions else contextlib.nullcontext():
        for rows, logits in neutral.plan.forward(model, batch_size, soft_prompt):
            kl, nll = neutral.compare(logits, rows)
            kls.append(kl)
            nlls.append(nll)
    return SideEffects(
        torch.cat(kls).mean().item(), math.exp(torch.cat(nlls).mean().item()), len(neutral.texts)
    )


def _warn_if_steered(model, what: str) -> None:
    """Both sides of a comparison with the unsteered model would be steered inside another context."""
    running = active(model)
    if running:
        warnings.warn(
            f"{what} ran while {', '.join(running)} was active on the model, so its 'unsteered' reference "
            f"is steered too and the KL divergence measures nothing; call {what} outside the 'with' block "
            "and pass the interventions to it instead.",
            stacklevel=3,
        )


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep."""

    method: str
    layer: int
    coeff: float
    score: float
    kl: float | None
    perplexity: float | None
    per_item: list[float] = field(repr=False)


@dataclass(frozen=True)
class Sweep:
    """A layer x coefficient (x method) grid of a behaviour score and its side-effect cost."""

    behaviour: str
    cells: list[Cell]
    items: list = field(repr=False)
    baseline: float = 0.0

    def records(self) -> list[dict]:
        """One dict per cell: method, layer, coeff, score, shift (from unsteered), kl, perplexity."""
        return [
            {
                "method": c.method,
                "layer": c.layer,
                "coeff": c.coeff,
                "score": c.score,
                "shift": c.score - self.baseline,
                "kl": c.kl,
                "perplexity": c.perplexity,
            }
            for c in self.cells
        ]

    def to_frame(self):
        """The records as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.records())

    def best(self, *, kl_max: float | None = None, direction: int = 1) -> Cell:
        """The cell with the largest behaviour shift (``direction=-1``: most negative) among those whose KL
        stays at or under ``kl_max`` (the refusal-direction paper's rule)."""
        if direction not in (1, -1):
            raise SteerValueError("direction is 1 (raise the score) or -1 (lower it).")
        allowed = [c for c in self.cells if kl_max is None or (c.kl is not None and c.kl <= kl_max)]
        if not allowed:
            raise SteerValueError(f"No cell has KL <= {kl_max}; raise kl_max or sweep smaller coefficients.")
        return max(allowed, key=lambda c: (direction * c.score, -abs(c.coeff)))

    def grid(
        self, method: str | None = None, value: str = "score"
    ) -> tuple[list[int], list[float], torch.Tensor]:
        """``(layers, coeffs, [layers, coeffs] tensor of value)`` for one method."""
        method = method or self.cells[0].method
        cells = [c for c in self.cells if c.method == method]
        layers = sorted({c.layer for c in cells})
        coeffs = sorted({c.coeff for c in cells})
        out = torch.full((len(layers), len(coeffs)), float("nan"))
        for c in cells:
            v = getattr(c, value)
            out[layers.index(c.layer), coeffs.index(c.coeff)] = float("nan") if v is None else v
        return layers, coeffs, out

    def __str__(self) -> str:
        lines = []
        for method in dict.fromkeys(c.method for c in self.cells):
            layers, coeffs, scores = self.grid(method)
            _, _, kls = self.grid(method, "kl")
            lines.append(f"{self.behaviour} [{method}]   (KL from unsteered in brackets)")
            lines.append("layer " + "".join(f"{c:>16g}" for c in coeffs))
            for i, layer in enumerate(layers):
                cells = "".join(f"{s:>8.3f} [{k:5.3f}]" for s, k in zip(scores[i].tolist(), kls[i].tolist()))
                lines.append(f"{layer:>5} {cells}")
        return "\n".join(lines)

    def plot(self, kind: str = "heatmap", **kwargs):
        """``"heatmap"``: layer x coefficient with the KL bound marked; ``"curves"``: score against coefficient."""
        from steer import plot

        return plot.sweep_heatmap(self, **kwargs) if kind == "heatmap" else plot.sweep_curves(self, **kwargs)


def sweep(
    model,
    behaviour: Behaviour,
    vectors: SteeringVector | dict[str, SteeringVector],
    layers: Sequence[int] | None = None,
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    *,
    neutral: Sequence[str] | bool = True,
    op: str = "add",
    relative: bool = False,
    positions: Selector = "all",
    batch_size: int = 64,
    progress: bool | None = None,
) -> Sweep:
    """Score ``behaviour`` and the side-effect cost at every (method, layer, coefficient).

    Args:
        vectors: one vector, or ``{method name: vector}`` for a method x layer comparison.
        layers: default every layer the vector(s) have.
        neutral: texts for KL and perplexity; ``True`` for ``neutral_text()``, ``False`` to skip.
        op, relative, positions: as in ``steer.steering``.

    Items (and neutral texts) run in chunks: each chunk once unsteered, which is also the coefficient-0
    column, then per method and layer all nonzero coefficients stacked as per-row coefficients in one
    batch that re-runs only the blocks after the layer (see ``_grid_pass``). Measure with no other
    steering context active.
    """
    vectors = {"vector": vectors} if isinstance(vectors, SteeringVector) else dict(vectors)
    if not vectors:
        raise SteerValueError("No vectors to sweep.")
    _warn_if_steered(model, "sweep")
    coeffs = [float(c) for c in coeffs]
    if not coeffs or not all(math.isfinite(c) for c in coeffs):
        raise SteerValueError("coeffs must be a non-empty list of finite numbers.")
    for v in vectors.values():
        v.check_model(model)
    grid_layers = (
        layers if layers is not None else sorted(set.intersection(*(set(v.layers) for v in vectors.values())))
    )
    for name, v in vectors.items():
        missing = [layer for layer in grid_layers if layer not in v.directions]
        if missing:
            raise SteerValueError(f"Vector {name!r} has no layer(s) {missing}; it has {v.layers}.")

    not_resid_post = [name for name, v in vectors.items() if v.hook != RESID_POST]
    if not_resid_post:
        raise SteerValueError(
            f"sweep() resumes the model after the steered layer's output, so it takes vectors read at "
            f"{RESID_POST!r}; {not_resid_post} are not. Extract with hook='resid_post', or score each cell "
            "with steer.steering() and score()."
        )

    steered = [c for c in coeffs if c != 0.0]
    kw = dict(op=op, relative=relative, positions=positions)
    plan = _Plan.build(model, behaviour)

    def read_behaviour(out: torch.Tensor, rows: list[int], resid: bool) -> torch.Tensor:
        return plan.readout(model, out, rows, resid=resid)

    passes = [(plan, read_behaviour)]
    if neutral is not False:
        reference = _Neutral.build(model, None if neutral is True else list(neutral), batch_size)

        def read_neutral(out: torch.Tensor, rows: list[int], resid: bool) -> torch.Tensor:
            logits = model.unembed(model.ln_final(out)) if resid else out
            return torch.stack(reference.compare(logits, rows), dim=1)  # [rows, (kl, nll)]

        passes.append((reference.plan, read_neutral))
    total = sum(len(p.rows) for p, _ in passes) * len(vectors) * len(grid_layers)
    with tqdm(total=total, desc="sweep", disable=progress is False) as bar:
        results = [
            _grid_pass(model, p, read, vectors, grid_layers, steered, batch_size, bar, kw)
            for p, read in passes
        ]

    base, steered_logp = results[0]
    unsteered = behaviour.reduce(plan.items([base]))
    base_ppl = math.exp(results[1][0][:, 1].mean().item()) if neutral is not False else None
    cells = []
    for name in vectors:
        for layer in grid_layers:
            for c in coeffs:
                if c == 0.0:
                    cells.append(
                        Cell(
                            name,
                            layer,
                            c,
                            unsteered.mean().item(),
                            0.0 if base_ppl else None,
                            base_ppl,
                            unsteered.tolist(),
                        )
                    )
                    continue
                per_item = behaviour.reduce(plan.items([steered_logp[(name, layer, c)]]))
                kl = ppl = None
                if neutral is not False:
                    cost = results[1][1][(name, layer, c)]
                    kl, ppl = cost[:, 0].mean().item(), math.exp(cost[:, 1].mean().item())
                cells.append(Cell(name, layer, c, per_item.mean().item(), kl, ppl, per_item.tolist()))
    return Sweep(behaviour.name, cells, behaviour.items, unsteered.mean().item())


def _grid_pass(model, plan, read, vectors, layers, coeffs, batch_size, bar, kw) -> tuple[torch.Tensor, dict]:
    """One plan through the grid: ``(unsteered reads, {(method, layer, coeff): steered reads})``, each
    with one entry per plan row, in row order.

    Rows of similar length share a chunk, so little of each batch is padding. Each chunk runs once
    unsteered (keeping the residual stream at every swept layer); then, per method and layer, all nonzero
    coefficients are stacked into one batch that re-runs only the blocks after the layer. A prefix that
    every row shares (a chat template's system prompt) runs once per (method, layer, coefficient) and its
    keys and values serve every row.
    """
    order = sorted(range(len(plan.rows)), key=lambda r: len(plan.rows[r]))
    per_chunk = max(1, batch_size // max(1, len(coeffs)))
    prefix = plan.shared_prefix() if coeffs and _prefix_safe(kw["positions"]) else 0
    heads = {}
    if prefix >= _MIN_PREFIX:
        head = trunk(model, _pad(model, [plan.rows[0][:prefix]]), layers, keep_cache=True)
        for name, vector in vectors.items():
            for layer in layers:
                heads[(name, layer)] = _resume_steered(model, head, vector, layer, coeffs, **kw)[1]
    base, steered = [], {}
    for start in range(0, len(order), per_chunk):
        rows = order[start : start + per_chunk]
        n = len(rows)
        if heads:
            shared = cache_rows(head.cache, torch.zeros(n, dtype=torch.long))
            kept = trunk(model, plan.batch(model, rows, skip=prefix), layers, past=shared)
        else:
            kept = trunk(model, plan.batch(model, rows), layers)
        base.append(read(kept.logits, rows, False))
        for name, vector in vectors.items():
            for layer in layers:
                bar.update(n)
                if not coeffs:
                    continue
                cache = None
                if heads:  # coefficient-major rows: each coefficient's prefix serves its n rows
                    each = torch.arange(len(coeffs)).repeat_interleave(n)
                    cache = cache_rows(heads[(name, layer)], each, first_layer=layer + 1)
                with torch.inference_mode():
                    final, _ = _resume_steered(model, kept, vector, layer, coeffs, cache=cache, **kw)
                    for i, c in enumerate(coeffs):
                        steered.setdefault((name, layer, c), []).append(
                            read(final[i * n : (i + 1) * n], rows, True)
                        )
    restore = torch.argsort(torch.tensor(order))
    base_rows = torch.cat(base)
    restore = restore.to(base_rows.device)
    return base_rows[restore], {key: torch.cat(parts)[restore] for key, parts in steered.items()}


def _prefix_safe(positions) -> bool:
    """Whether a selector picks the same prefix tokens in every row, whatever the row's length (selectors
    counted from the prompt's end do not)."""
    if isinstance(positions, str):
        return positions in ("all", "prompt", "mean", "generated")
    if isinstance(positions, int):
        return positions >= 0
    if isinstance(positions, slice):
        return all(b is None or b >= 0 for b in (positions.start, positions.stop))
    return not is_per_row(positions)


def _resume_steered(model, kept, vector, layer, coeffs, *, cache=None, op, relative, positions):
    """``(final residual stream, cache)`` with ``vector`` applied at ``layer`` once per coefficient, the
    rows coefficient-major: ``[k * batch, ...]``."""
    batch = kept.state.batch
    resid = kept.resid[layer].repeat(len(coeffs), 1, 1)
    state = CallState(kept.state.mask.repeat(len(coeffs), 1), kept.state.past, kept.state.prompt_width)
    iv = Intervention(vector, [c for c in coeffs for _ in range(batch)], layer, positions, op, relative)
    param = next(model.parameters())
    edited = edit_fn(iv, layer, param.device, param.dtype)(resid, state)
    return resume(model, kept, layer, edited, cache)


class _Plan:
    """Token rows for a behaviour (or plain texts) and, per row, where to read which token log-probs."""

    def __init__(self, rows: list[list[int]], targets: list, single: bool, n_cands: int):
        self.rows, self.targets, self.single, self.n_cands = rows, targets, single, n_cands

    @classmethod
    def build(cls, model, behaviour: Behaviour) -> _Plan:
        tokenizer = model.tokenizer
        n_cands = {len(c) for c in behaviour.candidates}
        if len(n_cands) != 1:
            raise SteerValueError("Every item must have the same number of candidate completions.")
        ids = []
        for prompt, cands in zip(behaviour.prompts, behaviour.candidates):
            base = tokenizer(prompt)["input_ids"]
            item = []
            for cand in cands:
                full = tokenizer(prompt + cand)["input_ids"]
                if full[: len(base)] != base or len(full) == len(base):
                    raise SteerValueError(
                        f"The completion {cand!r} merges with the end of its prompt when tokenized (or is "
                        "empty), so its probability cannot be read after the prompt. End the prompt with the "
                        "separator, or start the completion with a space."
                    )
                item.append(full[len(base) :])
            ids.append((base, item))
        single = all(len(c) == 1 for _, item in ids for c in item)
        if behaviour.name == AB_NAME and not single:
            bad = next(c for _, item in ids for c in item if len(c) != 1)
            raise SteerValueError(
                f"Answer letters must tokenize to single tokens after the prompt; {tokenizer.decode(bad)!r} "
                "does not. Use single letters such as A and B."
            )
        if single:  # one row per item; every candidate read at its last position
            return cls(
                [base for base, _ in ids], [[c[0] for c in item] for _, item in ids], True, n_cands.pop()
            )
        rows = [base + c for base, item in ids for c in item]
        return cls(rows, [c for _, item in ids for c in item], False, n_cands.pop())

    @classmethod
    def texts(cls, model, texts: list[str]) -> _Plan:
        return cls([model.tokenizer(t)["input_ids"] for t in texts], [None] * len(texts), False, 1)

    def items(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Joined ``readout`` chunks as ``[items, candidates]``."""
        return torch.cat(chunks).view(-1, self.n_cands)

    def batch(self, model, rows, skip: int = 0) -> Tokens:
        """The rows left-padded; with ``skip``, only their tokens after the first ``skip``, whose cached
        prefix the attention mask still covers."""
        batch = _pad(model, [self.rows[i][skip:] for i in rows])
        if not skip:
            return batch
        ones = torch.ones(
            len(rows), skip, dtype=batch.attention_mask.dtype, device=batch.attention_mask.device
        )
        return Tokens(batch.tokens, torch.cat([ones, batch.attention_mask], dim=1), "left")

    def shared_prefix(self) -> int:
        """How many leading tokens every row shares, leaving each row its read positions and one more.
        Plain texts are read at every position, so they share none."""
        if self.targets[0] is None:
            return 0
        keep = min(len(r) for r in self.rows) - 1
        if not self.single:
            keep -= max(len(t) for t in self.targets)
        n = 0
        while n < keep and len({r[n] for r in self.rows}) == 1:
            n += 1
        return n

    def forward(self, model, batch_size: int, soft_prompt: SoftPrompt | None = None):
        """``(rows, logits)`` chunk by chunk, through the model as it is, with ``soft_prompt`` if given
        (its virtual tokens sit before the positions read, which are counted from each row's end)."""
        for start in range(0, len(self.rows), batch_size):
            rows = range(start, min(start + batch_size, len(self.rows)))
            if soft_prompt is None:
                batch, applied = self.batch(model, rows), contextlib.nullcontext()
            else:
                placed = [soft_prompt.place(model, self.rows[i]) for i in rows]
                batch = _pad(model, [ids for ids, _ in placed])
                applied = soft_prompt.hooked(model, [where for _, where in placed])
            with torch.no_grad(), applied:
                yield rows, model(batch.tokens, attention_mask=batch.attention_mask)

    def readout(self, model, out: torch.Tensor, rows: range, resid: bool = False) -> torch.Tensor:
        """Log-probs read from ``out`` (logits, or with ``resid`` the final residual stream, of which only
        the positions read are unembedded): ``[rows, candidates]``, or ``[rows]`` when each candidate has
        a row of its own. ``items()`` regroups joined chunks."""
        if self.single:
            last = out[:, -1:]
            logits = model.unembed(model.ln_final(last)) if resid else last
            logp = logits[:, 0].float().log_softmax(dim=-1)
            return torch.stack([logp[i, self.targets[r]] for i, r in enumerate(rows)])
        sums = []
        for i, r in enumerate(rows):
            target = torch.tensor(self.targets[r], device=out.device)
            span = out[i : i + 1, -len(target) - 1 : -1]
            logits = model.unembed(model.ln_final(span)) if resid else span
            sums.append(logits[0].float().log_softmax(dim=-1).gather(1, target[:, None]).sum())
        return torch.stack(sums)  # [rows]; the caller groups rows into items once chunks are joined


def _pad(model, rows: list[list[int]]) -> Tokens:
    """Left-pad token id lists into a batch on the model's device."""
    return pad(rows, model.tokenizer.pad_token_id).to(next(model.parameters()).device)


class _Neutral:
    """Neutral texts and the unsteered model's next-token log-probs on them, computed once."""

    def __init__(self, texts: list[str], plan: _Plan, reference: list[torch.Tensor]):
        self.texts, self.plan, self.reference = texts, plan, reference

    @classmethod
    def build(cls, model, texts: Sequence[str] | None, batch_size: int) -> _Neutral:
        texts = neutral_text() if texts is None else [t for t in texts if t.strip()]
        if not texts:
            raise SteerValueError("The neutral text is empty; pass some plain sentences or use the default.")
        plan = _Plan.texts(model, texts)
        if any(len(r) < 2 for r in plan.rows):
            raise SteerValueError("Each neutral text needs at least two tokens, so one can be predicted.")
        self = cls(texts, plan, [])
        for rows, logits in plan.forward(model, batch_size):
            self.reference += [_next_logp(logits[i], len(plan.rows[r])) for i, r in enumerate(rows)]
        return self

    def compare(self, logits: torch.Tensor, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: KL(unsteered || these logits) averaged over predicted positions, and the mean NLL."""
        kls, nlls = [], []
        for i, r in enumerate(rows):
            logp = _next_logp(logits[i], len(self.plan.rows[r]))
            ref = self.reference[r]
            kls.append((ref.exp() * (ref - logp)).sum(dim=-1).mean().clamp_min(0.0))
            target = torch.tensor(self.plan.rows[r][1:], device=logp.device)
            nlls.append(-logp.gather(1, target[:, None]).mean())
        return torch.stack(kls), torch.stack(nlls)


def _next_logp(logits: torch.Tensor, length: int) -> torch.Tensor:
    """``[length - 1, vocab]`` next-token log-probs of a left-padded row of ``length`` real tokens."""
    return logits[-length:-1].float().log_softmax(dim=-1)


@dataclass(frozen=True)
class GenerationScore:
    """One scored generation; ``error`` says why its score is missing."""

    prompt: str
    coeff: float | None
    text: str
    score: float | None
    error: str | None = None


def score_generations(
    model,
    prompts: str | Sequence[str],
    vector: SteeringVector,
    coeffs: Sequence[float] = (0.0,),
    *,
    scorer: Callable[[str], float] | None = None,
    layer: int | None = None,
    max_new_tokens: int = 40,
    **generate_kwargs: Any,
) -> list[GenerationScore]:
    """Generate at each coefficient (one batch) and score every text.

    ``scorer`` maps a text to a number. Without one, the score is built in: the mean projection of the
    generated tokens' residual-stream activations (at ``layer``, default the vector's first) on the
    vector's unit direction, read on the unsteered model, a "how much of the concept is in this text".
    A scorer that raises or returns NaN marks that row and the rest go on; the failures are reported
    together in one warning at the end.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    gens = generate(
        model,
        prompts,
        vector,
        coeffs=list(coeffs),
        compare=False,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    if scorer is None:
        layer = vector.layers[0] if layer is None else layer
        values = _generated_projection(model, gens.rows, vector, layer)
    rows, failures = [], []
    for i, g in enumerate(gens.rows):
        if scorer is None:
            rows.append(GenerationScore(g.prompt, g.coeff, g.text, values[i]))
            continue
        try:
            value = float(scorer(g.text))
            error = None if math.isfinite(value) else f"scorer returned {value}"
        except Exception as err:  # a user scorer may raise anything: mark the row, go on
            value, error = None, f"{type(err).__name__}: {err}"
        if error:
            failures.append(f"row {i} (coeff {g.coeff}): {error}")
            value = None
        rows.append(GenerationScore(g.prompt, g.coeff, g.text, value, error))
    if failures:
        warnings.warn(
            f"The scorer failed on {len(failures)} of {len(rows)} generations: " + "; ".join(failures),
            stacklevel=2,
        )
    return rows


def _generated_projection(model, rows, vector: SteeringVector, layer: int) -> list[float | None]:
    unit = vector.directions[layer] / vector.directions[layer].norm()
    texts = [r.prompt + r.text for r in rows]
    starts = [len(model.tokenizer(r.prompt)["input_ids"]) for r in rows]
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    keep = [i for i in range(len(rows)) if lengths[i] > starts[i]]
    values: list[float | None] = [None] * len(rows)
    if keep:
        batch = tokenize(model, [texts[i] for i in keep])
        name = vector.hook_name(layer)
        acts = read(model, batch, [name], [slice(starts[i], None) for i in keep], progress=False)[name]
        for j, i in enumerate(keep):
            values[i] = float(acts[j].cpu() @ unit)
    return values


@dataclass(frozen=True)
class TokenProjections:
    """Per-token projections of the residual stream on a direction: ``tokens[i]`` has ``values[i]``."""

    tokens: list[str]
    values: list[float]
    layer: int

    def _repr_html_(self) -> str:
        from steer import plot

        return plot.tokens_html(self.tokens, self.values)

    def __str__(self) -> str:
        from steer import plot

        return plot.tokens_ansi(self.tokens, self.values)


def projections(model, text: str, vector: SteeringVector, layer: int | None = None) -> TokenProjections:
    """How much of the vector's concept each token of ``text`` carries: the projection of the residual
    stream at ``layer`` on the unit direction. Shows as colours in a notebook (HTML) and terminal (ANSI)."""
    layer = vector.layers[0] if layer is None else layer
    if layer not in vector.directions:
        raise SteerValueError(f"The vector has no layer {layer}; it has {vector.layers}.")
    vector.check_model(model)
    batch = tokenize(model, text)
    name = vector.hook_name(layer)
    unit = vector.directions[layer] / vector.directions[layer].norm()
    got = []

    def keep(h: torch.Tensor, state) -> None:
        got.append(h[0].float().cpu() @ unit)

    with attach(model, [(name, keep)], what="projection"), torch.no_grad():
        model(batch.tokens.to(next(model.parameters()).device), stop_at_layer=layer + 1)
    ids = batch.tokens[0].tolist()
    return TokenProjections([model.tokenizer.decode([i]) for i in ids], got[0].tolist(), layer)


@dataclass(frozen=True)
class LayerScan:
    """Per layer: cross-validated probe accuracy on held-out pairs, and the held-out separation (d') of the
    two sides along the mean-difference direction fitted on the training folds."""

    layers: list[int]
    accuracy: list[float]
    separation: list[float]
    folds: int
    n_pairs: int

    def records(self) -> list[dict]:
        return [
            {"layer": layer, "accuracy": a, "separation": s}
            for layer, a, s in zip(self.layers, self.accuracy, self.separation)
        ]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records())

    def best(self) -> int:
        """The layer where the two sides separate most."""
        return self.layers[max(range(len(self.layers)), key=lambda i: (self.accuracy[i], self.separation[i]))]

    def plot(self, **kwargs):
        from steer import plot

        return plot.layer_scan(self, **kwargs)


def layer_scan(
    model,
    pairs: Iterable[Any],
    layers: Sequence[int] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    positions: Selector = "last",
    batch_size: int = 32,
) -> LayerScan:
    """Where is the concept readable? One batched read of every layer, then k-fold cross-validation over
    pairs (both sides of a pair in the same fold)."""
    pairs = pairs_from(pairs)
    n = len(pairs)
    if not 2 <= folds <= n:
        raise SteerValueError(f"folds must be between 2 and the number of pairs ({n}), got {folds}.")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    reads = [_pair_read(p) if p.read is not None else positions for p in pairs]
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    batch = tokenize(model, texts)
    acts = read(
        model,
        batch,
        names,
        reads + reads if any(p.read is not None for p in pairs) else positions,
        batch_size=batch_size,
    )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[order] = torch.arange(n) % folds
    accuracy, separation = [], []
    for name in names:
        pos, neg = acts[name][:n].cpu(), acts[name][n:].cpu()
        correct, total, seps = 0, 0, []
        for f in range(folds):
            test, train = fold_of == f, fold_of != f
            direction = probe_direction(pos[train], neg[train])
            unit = direction / direction.norm().clamp_min(1e-12)
            threshold = ((pos[train] @ unit).mean() + (neg[train] @ unit).mean()) / 2
            correct += int(((pos[test] @ unit) > threshold).sum() + ((neg[test] @ unit) <= threshold).sum())
            total += 2 * int(test.sum())
            md = pos[train].mean(0) - neg[train].mean(0)
            md = md / md.norm().clamp_min(1e-12)
            p, q = pos[test] @ md, neg[test] @ md
            spread = torch.cat([p - p.mean(), q - q.mean()]).std().clamp_min(1e-12)
            seps.append(float((p.mean() - q.mean()) / spread))
        accuracy.append(correct / total)
        separation.append(sum(seps) / len(seps))
    return LayerScan(layers, accuracy, separation, folds, n)


def _pair_read(pair: ContrastivePair):
    if isinstance(pair.read, str):
        raise SteerError("layer_scan reads pairs at an index; substring reads are for extract().")
    return pair.read
