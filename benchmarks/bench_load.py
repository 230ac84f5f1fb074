"""Load and forward speed of the embedded model.

- warm_vs_cold_load: load_model() served from the weight cache, over load_model() with an empty cache
  (dequantising the GGUF and writing the cache), each in a fresh cache folder. Lower is better.
- bridge_vs_hf_forward: a TransformerBridge forward over a plain Hugging Face forward (same weights,
  eager attention as the bridge uses) on the same left-padded batch. 1.0 means no overhead.

Usage: python benchmarks/bench_load.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved
from transformers import AutoModelForCausalLM

import steer
from steer import model as steer_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="load repeats (each cold load takes ~20 s)")
    parser.add_argument("--forward-repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    root = tempfile.mkdtemp(prefix="steer-bench-")
    warm_cache = os.path.join(root, "warm")
    os.environ["STEER_CACHE"] = warm_cache
    steer.load_model(device="cpu")  # fills the warm cache

    def cold():
        cache = tempfile.mkdtemp(dir=root)
        os.environ["STEER_CACHE"] = cache
        steer.load_model(device="cpu")
        shutil.rmtree(cache)

    def warm():
        os.environ["STEER_CACHE"] = warm_cache
        steer.load_model(device="cpu")

    load = interleaved({"cold": cold, "warm": warm}, repeats=args.repeats, warmup=0)

    os.environ["STEER_CACHE"] = warm_cache
    bridge = steer.load_model(device="cpu")
    entry = steer_model.gguf_cache_entry(steer_model.embedded_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [
        steer.chat_prompt(bridge, f"Tell me something interesting about the number {i}.") for i in range(8)
    ]
    batch = steer.tokenize(bridge, prompts)
    forward = interleaved(
        {
            "bridge": lambda: bridge(batch.tokens, attention_mask=batch.attention_mask),
            "hf": lambda: hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits,
        },
        repeats=args.forward_repeats,
    )
    shutil.rmtree(root)

    figures = {
        "warm_vs_cold_load": round(load["warm"] / load["cold"], 4),
        "bridge_vs_hf_forward": round(forward["bridge"] / forward["hf"], 4),
        "cold_load_s": round(load["cold"], 3),
        "warm_load_s": round(load["warm"], 3),
        "bridge_forward_s": round(forward["bridge"], 4),
        "hf_forward_s": round(forward["hf"], 4),
        "forward_batch": list(batch.tokens.shape),
    }
    print(f"cold load {load['cold']:.2f} s, warm load {load['warm']:.2f} s")
    ms = {k: f"{v * 1e3:.1f} ms" for k, v in forward.items()}
    print(f"forward {tuple(batch.tokens.shape)}: bridge {ms['bridge']}, hf {ms['hf']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
