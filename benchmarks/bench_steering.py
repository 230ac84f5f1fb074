"""Steered generation speed on the embedded SmolLM2, greedy, 64 new tokens, KV cache on.

- steered_vs_unsteered_b1 / _b8: the same model.generate call inside steer.steering (one vector at one
  layer, positions "all") over outside it, batch 1 and batch 8. Target <= 1.05.
- sweep8_batched_vs_sequential: steer.generate over 8 coefficients as one batched generation, over
  8 generations of one coefficient each. Lower is better.

Interleaved repeats, medians. Usage: python benchmarks/bench_steering.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved

import steer

PROMPTS = [
    "The weather this weekend",
    "My new neighbour is",
    "I just finished reading a book and",
    "Our team meeting",
    "The food at the party was",
    "Yesterday I",
    "The city council decided that the old park near the river",
    "To be honest, my first day at the new job",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = steer.load_model(device="cpu")
    vector = steer.extract(model, steer.example_pairs("sentiment"), args.layer, progress=False)

    def generate(batch):
        return model.generate(
            batch.tokens,
            attention_mask=batch.attention_mask,
            max_new_tokens=args.tokens,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )

    def steered(batch):
        with steer.steering(model, vector, coeff=4.0):
            return generate(batch)

    figures = {}
    for size in (1, 8):
        batch = steer.tokenize(model, PROMPTS[:size])
        times = interleaved(
            {"unsteered": lambda b=batch: generate(b), "steered": lambda b=batch: steered(b)},
            repeats=args.repeats,
        )
        figures[f"steered_vs_unsteered_b{size}"] = round(times["steered"] / times["unsteered"], 4)
        print(f"batch {size}: unsteered {times['unsteered']:.3f} s, steered {times['steered']:.3f} s")

    coeffs = [-8.0, -4.0, -2.0, -1.0, 1.0, 2.0, 4.0, 8.0]
    common = dict(max_new_tokens=args.tokens, compare=False, stop_at_eos=False)
    batched_out = steer.generate(model, PROMPTS[0], vector, coeffs=coeffs, **common)
    for c in coeffs:  # the batched sweep gives the texts of the one-at-a-time runs
        alone = steer.generate(model, PROMPTS[0], vector, coeffs=[c], **common).text(0, coeff=c)
        if alone != batched_out.text(0, coeff=c):
            print(
                f"note: coeff {c:+g} differs between batched and sequential runs (float rounding under padding)"
            )
    times = interleaved(
        {
            "batched": lambda: steer.generate(model, PROMPTS[0], vector, coeffs=coeffs, **common),
            "sequential": lambda: [
                steer.generate(model, PROMPTS[0], vector, coeffs=[c], **common) for c in coeffs
            ],
        },
        repeats=args.repeats,
    )
    figures["sweep8_batched_vs_sequential"] = round(times["batched"] / times["sequential"], 4)
    print(f"sweep of 8: batched {times['batched']:.3f} s, sequential {times['sequential']:.3f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
