"""Numbers read from a model's logits: what patching and head profiling measure.

``logit_diff(answer, wrong)`` and ``answer_prob(answer)`` read the next-token logits at each prompt's
last position; any function of the logits ``[prompts, pos, d_vocab]`` returning one number works too.
``Scorer`` binds a metric to a model and a batch layout, scoring many runs of the same prompts at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import torch

from steer.errors import SteerTypeError, SteerValueError


@dataclass(frozen=True)
class Metric:
    """A number read from the next-token logits at each prompt's last position, averaged over prompts.

    Made by ``logit_diff`` or ``answer_prob``; answers are strings that must be single tokens, one
    string for every prompt or one per prompt.
    """

    kind: str
    answer: str | tuple[str, ...]
    wrong: str | tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return "logit difference" if self.kind == "logit_diff" else "answer probability"


def logit_diff(answer: str | Sequence[str], wrong: str | Sequence[str]) -> Metric:
    """logit(answer) - logit(wrong) at the last position, averaged over prompts."""
    return Metric("logit_diff", _strings(answer, "answer"), _strings(wrong, "wrong"))


def answer_prob(answer: str | Sequence[str]) -> Metric:
    """The probability of ``answer`` as the next token, averaged over prompts."""
    return Metric("prob", _strings(answer, "answer"))


MetricLike = Metric | Callable[[torch.Tensor], torch.Tensor]


class Scorer:
    """A metric bound to a model and a batch: logits of ``cells * rows`` runs -> one value per cell."""

    def __init__(self, name: str, rows: int, last_only: bool, fn: Callable) -> None:
        self.name, self.rows, self.last_only, self._fn = name, rows, last_only, fn

    @classmethod
    def build(cls, model, metric: MetricLike, rows: int, prompts: int) -> Scorer:
        if isinstance(metric, Metric):
            answer = answer_ids(model, metric.answer, prompts, "answer").repeat(rows // prompts)
            wrong = None
            if metric.kind == "logit_diff":
                wrong = answer_ids(model, metric.wrong, prompts, "wrong").repeat(rows // prompts)

            def fn(logits: torch.Tensor) -> torch.Tensor:
                """``[cells * rows, d_vocab]`` -> ``[cells]``"""
                logits = einops.rearrange(logits.float(), "(cell row) vocab -> cell row vocab", row=rows)
                pick = lambda ids, x: x.gather(-1, ids.to(x.device).expand(x.shape[0], -1)[..., None])[..., 0]  # noqa: E731
                if wrong is None:
                    return pick(answer, logits.softmax(-1)).mean(dim=1)
                return (pick(answer, logits) - pick(wrong, logits)).mean(dim=1)

            return cls(metric.name, rows, True, fn)
        if not callable(metric):
            raise SteerTypeError(
                f"metric is a {type(metric).__name__}; pass steer.logit_diff(...), steer.answer_prob(...) "
                "or a function of the logits [prompts, pos, d_vocab] returning one number."
            )

        def user(logits: torch.Tensor) -> torch.Tensor:
            out = []
            for cell in logits.split(rows):
                value = metric(cell)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise SteerValueError(
                        f"The metric returned {shape}; it must return one number (a scalar tensor) for "
                        "the batch of prompts, e.g. a mean over them."
                    )
                out.append(value.reshape(()))
            return torch.stack(out)

        return cls(getattr(metric, "__name__", "metric"), rows, False, user)

    @property
    def keep(self) -> int | None:
        """How many final positions' logits this metric reads (``None``: all)."""
        return 1 if self.last_only else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: ``[cells * rows, pos, d_vocab]``, or ``[cells * rows, d_vocab]`` at the last position
        when ``last_only``. Returns ``[cells]``."""
        if self.last_only and logits.ndim == 3:
            logits = logits[:, -1]
        return self._fn(logits)


def answer_ids(model, answers, prompts: int, role: str) -> torch.Tensor:
    strings = [answers] * prompts if isinstance(answers, str) else list(answers)
    if len(strings) != prompts:
        raise SteerValueError(
            f"{len(strings)} {role} strings for {prompts} prompts; give one, or one per prompt."
        )
    ids = []
    for text in strings:
        found = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            pieces = [model.tokenizer.decode([t]) for t in found]
            raise SteerValueError(
                f"The {role} {text!r} is {len(found)} tokens {pieces}, not one; the metric compares "
                "next-token logits, so pick a single-token answer (often with a leading space, e.g. ' Mary')."
            )
        ids.append(found[0])
    return torch.tensor(ids)


def _strings(value, role: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    values = tuple(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise SteerTypeError(f"{role} is a string or a list of strings (one per prompt); got {value!r}.")
    return values
