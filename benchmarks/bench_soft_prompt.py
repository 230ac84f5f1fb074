"""Prompt-tuning speed: training steps per second, steer versus PEFT, on the embedded SmolLM2.

Both train 8 virtual tokens on the same batch of 8 (prompt, completion) pairs with AdamW at the same
learning rate, on the same weights: steer through its TransformerBridge (a hook writes the virtual
tokens; the loss reads only the completion's logits), PEFT through get_peft_model on a plain Hugging
Face copy (labels masked to the completion, as its causal-LM loss needs). Validation is off in both.

- steer_vs_peft_steps_per_s: steer's steps per second over PEFT's. Target >= 0.9.

Interleaved repeats of a block of steps, medians. Usage: python benchmarks/bench_soft_prompt.py
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved
from transformers import AutoModelForCausalLM

import steer
from steer import model as steer_model

QUESTIONS = [
    "What is your name?", "Where do you live?", "What colour is the sky?", "How old are you?",
    "What do you eat for breakfast?", "Which city is the largest?", "What is two plus two?",
    "Who wrote this book?",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    args = parser.parse_args()
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = steer.load_model(device="cpu")
    data = [(f"Question: {q}\nAnswer:", " pineapple") for q in QUESTIONS]
    soft = steer.SoftPrompt.from_vocab(model, 8, seed=0)

    def ours():
        steer.train_soft_prompt(
            model, soft, data, val=data[:1], steps=args.steps, lr=0.1, warmup=0,
            batch_size=8, eval_every=10**9, progress=False,
        )  # fmt: skip

    entry = steer_model.gguf_cache_entry(steer_model.embedded_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, attn_implementation="eager").eval()
    peft_model = get_peft_model(
        hf, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8)
    )
    tok = model.tokenizer
    rows = [tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] for p, c in data]
    batch = steer.prompts.pad(rows, tok.pad_token_id, "left")
    labels = batch.tokens.clone()
    labels[:, :-1] = -100  # the completion (" pineapple") is the last token of every row
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)

    def theirs():
        for _ in range(args.steps):
            out = peft_model(input_ids=batch.tokens, attention_mask=batch.attention_mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    times = interleaved({"steer": ours, "peft": theirs}, args.repeats)
    for name, t in times.items():
        print(f"{name:>6}: {args.steps / t:.2f} steps/s ({t:.3f} s per {args.steps} steps)")
    figures = {
        "steer_vs_peft_steps_per_s": round(times["peft"] / times["steer"], 3),
        "steer_steps_per_s": round(args.steps / times["steer"], 3),
        "peft_steps_per_s": round(args.steps / times["peft"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
