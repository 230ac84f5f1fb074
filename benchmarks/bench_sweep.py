"""Sweep speed: a 6-layer x 7-coefficient grid over 50 A/B items (CAA letter score) on the embedded SmolLM2.

- naive_vs_batched: a naive loop (one steered forward per layer, coefficient and item, through
  steer.steering) over steer.evaluate.sweep (the unsteered pass run once per chunk of items, each
  layer's coefficients stacked into one batch, and only the blocks after the steered layer re-run).
  Higher is better; target >= 5.
- max_abs_diff: the largest difference between the two grids' per-item probabilities.

Both measure the behaviour only (no side-effect cost), with the same vector. One run of each: the naive
loop takes minutes. Usage: python benchmarks/bench_sweep.py [--items N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import steer
from steer import evaluate

LAYERS = [4, 8, 12, 16, 20, 24]
COEFFS = [-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=50)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = steer.load_model(device="cpu")
    items = steer.example_ab_items("cheerful")[: args.items]
    vector = steer.extract(model, steer.example_pairs("sentiment"), LAYERS, progress=False)
    behaviour = evaluate.ab_behaviour(model, items)
    tok = model.tokenizer
    rows = [steer.tokenize(model, prompt) for prompt in behaviour.prompts]
    letters = [[tok(c)["input_ids"][0] for c in cands] for cands in behaviour.candidates]

    start = time.perf_counter()
    grid = evaluate.sweep(model, behaviour, vector, LAYERS, COEFFS, neutral=False, progress=False)
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    naive = {}
    for layer in LAYERS:
        for coeff in COEFFS:
            with steer.steering(model, vector, coeff=coeff, layers=[layer]):
                for i, batch in enumerate(rows):
                    logits = model(batch.tokens)[0, -1]
                    naive[(layer, coeff, i)] = float(logits[letters[i]].softmax(dim=0)[0])
    naive_s = time.perf_counter() - start

    diff = max(
        abs(naive[(cell.layer, cell.coeff, i)] - p) for cell in grid.cells for i, p in enumerate(cell.per_item)
    )
    figures = {
        "naive_vs_batched": round(naive_s / batched_s, 2),
        "max_abs_diff": float(f"{diff:.3g}"),
        "naive_s": round(naive_s, 1),
        "batched_s": round(batched_s, 1),
        "cells": len(grid.cells),
        "items": len(items),
    }
    print(f"naive loop {naive_s:.1f} s ({len(naive)} forwards), sweep {batched_s:.1f} s; max |diff| {diff:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
