"""Activation patching speed: a full resid_pre (layer x position) grid on the embedded SmolLM2.

One indirect-object prompt pair of 23 tokens (30 layers x 23 positions = 690 patched runs), metric the
logit difference between the two names at the last position.

- tl_vs_exact_batched: TransformerLens' transformer_lens.patching.get_act_patch_resid_pre (one forward
  pass per cell) over steer.patch (batched; each run starts at its layer and position). Target >= 4.
- exact_vs_attribution: steer.patch over steer.attribution_patch (two forward passes, one backward).
  Target >= 20.
- max_abs_diff_vs_tl: the largest difference between the two exact grids (raw logit differences).
- attribution_correlation: Pearson correlation of the attribution grid with the exact one.

Interleaved repeats, medians. Usage: python benchmarks/bench_patching.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved
from transformer_lens import patching as tl_patching

import steer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = steer.load_model(device="cpu")
    task = steer.example_ioi(1, template=1)
    metric = steer.logit_diff(task.answers, task.wrongs)
    clean, corrupted = (steer.tokenize(model, texts).tokens for texts in (task.clean, task.corrupted))
    right, wrong = (
        model.tokenizer(t[0], add_special_tokens=False)["input_ids"][0] for t in (task.answers, task.wrongs)
    )
    _, clean_cache = model.run_with_cache(clean)

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, right] - logits[:, -1, wrong]).mean()

    def tl():
        return tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, tl_metric)

    def exact():
        return steer.patch(
            model, task.clean, task.corrupted, metric, "resid_pre", normalize=False, progress=False
        )

    def attribution():
        return steer.attribution_patch(
            model, task.clean, task.corrupted, metric, "resid_pre", normalize=False
        )

    ours, estimate = exact(), attribution()
    theirs = tl()
    diff = (ours.values - theirs.cpu()).abs().max().item()
    correlation = ours.correlation(estimate)
    print(ours)
    # TransformerLens' loop is run only inside the timed repeats: a warm-up of it would cost minutes.
    times = interleaved({"tl": tl, "exact": exact, "attribution": attribution}, args.repeats, warmup=0)
    for name, t in times.items():
        print(f"{name:>12}: {t:.3f} s")
    figures = {
        "tl_vs_exact_batched": round(times["tl"] / times["exact"], 2),
        "exact_vs_attribution": round(times["exact"] / times["attribution"], 2),
        "max_abs_diff_vs_tl": float(f"{diff:.3g}"),
        "attribution_correlation": round(correlation, 3),
        "tokens": clean.shape[1],
        **{f"{name}_s": round(t, 3) for name, t in times.items()},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
