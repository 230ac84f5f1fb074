"""Steered generation: steered and unsteered (or one row per coefficient) side by side, in one batch."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.attention import Emphasis
from steer.errors import SteerTypeError, SteerValueError
from steer.positions import Selector, is_per_row
from steer.prompts import chat_prompt, tokenize
from steer.soft_prompt import SoftPrompt
from steer.steering import Intervention, steering
from steer.vector import SteeringVector


@dataclass(frozen=True)
class Generation:
    """One generated text, its prompt, whether it was steered, and with which coefficient of a sweep."""

    prompt: str
    steered: bool
    coeff: float | None
    text: str

    @property
    def label(self) -> str:
        if not self.steered:
            return "unsteered"
        return "steered" if self.coeff is None else f"coeff {self.coeff:+g}"


@dataclass(frozen=True)
class Generations:
    """Generated texts, one per (prompt, coefficient), in prompt-major order."""

    rows: list[Generation]

    def text(self, prompt: int | str = 0, *, steered: bool = True, coeff: float | None = None) -> str:
        """The text for a prompt (by index or text): steered (at ``coeff``, for a sweep) or unsteered."""
        prompts = list(dict.fromkeys(r.prompt for r in self.rows))
        key = prompts[prompt] if isinstance(prompt, int) else prompt
        for row in self.rows:
            if row.prompt == key and row.steered == steered and (coeff is None or row.coeff == coeff):
                return row.text
        raise KeyError(f"No generation for prompt {key!r} (steered={steered}, coeff={coeff}).")

    def records(self) -> list[dict]:
        return [
            {"prompt": r.prompt, "steered": r.steered, "coeff": r.coeff, "text": r.text} for r in self.rows
        ]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records())

    def __str__(self) -> str:
        lines, last = [], None
        for row in self.rows:
            if row.prompt != last:
                lines.append(f"== {row.prompt!r}")
                last = row.prompt
            lines.append(f"  [{row.label:>11}] {row.text!r}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        cells = "".join(
            f"<tr><td>{html.escape(r.prompt[-60:])}</td>"
            f"<td>{r.label}</td>"
            f"<td style='text-align:left'>{html.escape(r.text)}</td></tr>"
            for r in self.rows
        )
        return f"<table><tr><th>prompt</th><th>coeff</th><th>text</th></tr>{cells}</table>"


def generate(
    model,
    prompts: str | Sequence[str],
    *items: SteeringVector | Intervention | Emphasis,
    coeffs: float | Sequence[float] = 1.0,
    layers: int | Sequence[int] | None = None,
    positions: Selector = "all",
    op: str = "add",
    relative: bool = False,
    compare: bool = True,
    chat: bool = False,
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    soft_prompt: SoftPrompt | None = None,
) -> Generations:
    """Generate from every prompt, steered and (with ``compare``) unsteered, as one batched generation.

    With one ``SteeringVector``, ``coeffs`` may list several coefficients: each prompt is generated once
    per coefficient, all rows in one batch with per-row coefficients. With ``Intervention`` objects
    (each with its own coefficient), each prompt is generated steered by all of them. ``chat=True``
    wraps each prompt in the model's chat template first. Greedy by default; with ``do_sample`` a
    ``seed`` makes the samples repeatable without touching the global random state. Rows stop at EOS
    unless ``stop_at_eos=False``, which always generates ``max_new_tokens`` tokens. A ``soft_prompt``
    is applied to the steered rows (alone, or together with the steering), and so is an ``Emphasis``
    (attention steering) passed among ``items``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SteerValueError("No prompts to generate from.")
    if max_new_tokens < 1:
        raise SteerValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    coeff_list = [coeffs] if isinstance(coeffs, (int, float)) else list(coeffs)
    vectors = [i for i in items if isinstance(i, SteeringVector)]
    given = [i for i in items if isinstance(i, Intervention)]
    emphases = [i for i in items if isinstance(i, Emphasis)]
    other = [i for i in items if not isinstance(i, (SteeringVector, Intervention, Emphasis))]
    if other:
        raise SteerTypeError(
            f"generate() steers with SteeringVector, Intervention or Emphasis objects, not "
            f"{type(other[0]).__name__}; pass prompts first, then those."
        )
    if len(emphases) > 1:
        raise SteerValueError("Pass at most one Emphasis; list all its spans and heads in that one.")
    if vectors and given:
        raise SteerValueError(
            "Pass either one SteeringVector with coeffs, or Intervention objects, not both."
        )
    if len(vectors) > 1:
        raise SteerValueError(
            "Pass one SteeringVector (combine several with + first) or Intervention objects."
        )
    if given and coeffs != 1.0:
        raise SteerValueError("coeffs sweeps a single SteeringVector; Interventions carry their own coeff.")
    if any(torch.as_tensor(iv.coeff).ndim or is_per_row(iv.positions) for iv in given):
        raise SteerValueError(
            "generate() lays out its own batch rows, so Interventions passed to it take one coefficient "
            "and one position selector, not per-row lists."
        )
    if not coeff_list:
        raise SteerValueError("coeffs is empty; give at least one coefficient.")

    # Variants per prompt: None = unsteered, else a coefficient (or True for "the interventions as given").
    variants: list = ([None] if compare or not (items or soft_prompt) else []) + (
        coeff_list if vectors else [True] if given or emphases or soft_prompt is not None else []
    )
    texts = [chat_prompt(model, p) if chat else p for p in prompts]
    rows = [(p, t, v) for p, t in zip(prompts, texts) for v in variants]
    steered = [v is not None for _, _, v in rows]
    if soft_prompt is None:
        batch, soft = tokenize(model, [t for _, t, _ in rows]), contextlib.nullcontext()
    else:
        batch, selectors = soft_prompt.tokenize(model, [t for _, t, _ in rows], use=steered)
        soft = soft_prompt.hooked(model, selectors)
    emphasis = contextlib.nullcontext()
    if emphases:
        masks = [m for m in emphases[0].token_masks(model, texts) for _ in variants]
        if soft_prompt is not None:  # the virtual tokens sit inside the steered rows' prompts
            at, blank = soft_prompt.offset(model), [False] * soft_prompt.n
            masks = [m[:at] + blank + m[at:] if s else m for m, s in zip(masks, steered)]
        emphasis = emphases[0].hooked(model, [m if s else None for m, s in zip(masks, steered)])
    per_row_positions = [positions if s else None for s in steered]

    if vectors:
        coeff_rows = [0.0 if v is None else float(v) for _, _, v in rows]
        active = [Intervention(vectors[0], coeff_rows, layers, per_row_positions, op, relative)]
    else:
        active = [
            Intervention(
                iv.vector,
                iv.coeff,
                iv.layers,
                [iv.positions if s else None for s in steered],
                iv.op,
                iv.relative,
            )
            for iv in given
        ]
    context = steering(model, *active) if active and any(steered) else contextlib.nullcontext()
    device = next(model.parameters()).device
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        soft,
        emphasis,
        context,
        torch.no_grad(),
    ):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            batch.tokens.to(device),
            attention_mask=batch.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            use_past_kv_cache=use_cache,
            stop_at_eos=stop_at_eos,
            return_type="tokens",
            verbose=False,
        )
    eos = model.tokenizer.eos_token_id
    results = []
    for (prompt, _, variant), row in zip(rows, out[:, batch.tokens.shape[1] :].tolist()):
        row = row[: row.index(eos)] if stop_at_eos and eos in row else row
        coeff = float(variant) if vectors and variant is not None else None
        text = model.tokenizer.decode(row, skip_special_tokens=True)
        results.append(Generation(prompt, variant is not None, coeff, text))
    return Generations(results)
