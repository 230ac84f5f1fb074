"""Head profiling speed: every head of the embedded SmolLM2 (30 layers x 9 heads) emphasising a span alone.

Four chat prompts ("The meeting was planned for Monday, but it was moved to Friday. On which day is the
meeting?" with the answer begun), span "moved to <day>", metric the logit difference of the new day over the
old one, alpha 0.01.

- naive_vs_profile: a plain loop (for each head, one forward pass of the four prompts with the emphasis
  applied) over steer.profile_heads (one unsteered pass, then each layer's heads in one batch resumed at
  that layer and at the first emphasised token, from the kept residual stream and KV cache).
- max_abs_diff: the largest difference between the two grids of effects.

Interleaved repeats, medians. Usage: python benchmarks/bench_attention.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved

import steer

DAYS = [("meeting", "Monday", "Friday"), ("party", "Tuesday", "Sunday"), ("exam", "Thursday", "Monday"),
        ("dinner", "Saturday", "Wednesday")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = steer.load_model(device="cpu")
    question = "The {0} was planned for {1}, but it was moved to {2}. On which day is the {0}?"
    prompts = [steer.chat_prompt(model, question.format(*d), assistant=f"The {d[0]} is on") for d in DAYS]
    spans = [[f"moved to {new}"] for *_, new in DAYS]
    new = torch.tensor([model.tokenizer(f" {n}")["input_ids"][0] for *_, n in DAYS])
    old = torch.tensor([model.tokenizer(f" {o}")["input_ids"][0] for _, o, _ in DAYS])
    metric = steer.logit_diff([f" {n}" for *_, n in DAYS], [f" {o}" for _, o, _ in DAYS])
    rows = torch.arange(len(DAYS))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    grids: dict[str, torch.Tensor] = {}

    def diff(logits: torch.Tensor) -> float:
        return float((logits[rows, -1, new] - logits[rows, -1, old]).mean())

    def naive() -> None:
        batch = steer.tokenize(model, prompts)
        baseline = diff(model(batch.tokens, attention_mask=batch.attention_mask))
        effects = torch.empty(n_layers, n_heads)
        for layer in range(n_layers):
            for head in range(n_heads):
                with steer.Emphasis(spans, [(layer, head)], 0.01).applied(model, prompts) as b:
                    effects[layer, head] = diff(model(b.tokens, attention_mask=b.attention_mask)) - baseline
        grids["naive"] = effects

    def profiled() -> None:
        grids["profile"] = steer.profile_heads(model, prompts, spans, metric, progress=False).effects

    times = interleaved({"naive": naive, "profile": profiled}, repeats=args.repeats, warmup=0)
    figures = {
        "naive_vs_profile": round(times["naive"] / times["profile"], 2),
        "naive_s": round(times["naive"], 1),
        "profile_s": round(times["profile"], 1),
        "max_abs_diff": float(f"{(grids['naive'] - grids['profile']).abs().max():.2e}"),
    }
    print(f"naive loop {times['naive']:.1f} s, profile_heads {times['profile']:.1f} s (270 heads, 4 prompts)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
