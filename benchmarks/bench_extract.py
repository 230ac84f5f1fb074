"""Extraction speed: 64 contrastive pairs at one middle layer of the embedded SmolLM2.

- extract_vs_floor: steer.extract over the floor, a plain PyTorch batched forward of the unwrapped Hugging
  Face model that stops right after the layer (a forward hook raises) and keeps the last token. Target <= 1.2.
- extract_vs_full_depth: steer.extract over a full-depth forward with output_hidden_states=True.
- extract_vs_steering_vectors / extract_vs_repeng: against those packages' extractors, when they import.

Same tokens, same batch size, interleaved repeats, medians. Usage: python benchmarks/bench_extract.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _timing import interleaved
from transformers import AutoModelForCausalLM

import steer
from steer import model as steer_model


class _Stop(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = steer.load_model(device="cpu")
    entry = steer_model.gguf_cache_entry(steer_model.embedded_gguf_path())
    hf = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, attn_implementation="eager").eval()
    pairs = (steer.example_pairs("sentiment") + steer.example_pairs("formality"))[:64]
    assert len(pairs) == 64
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    layer, size = args.layer, args.batch_size
    # The baselines get each chunk tokenized on its own (no padding wider than the chunk needs), before timing.
    chunks = [steer.tokenize(model, texts[i : i + size]) for i in range(0, len(texts), size)]

    def ours():
        return steer.extract(model, pairs, layer, batch_size=size, progress=False)

    def floor():
        kept = []

        def grab(module, inputs, output):
            kept.append((output[0] if isinstance(output, tuple) else output)[:, -1])
            raise _Stop

        handle = hf.model.layers[layer].register_forward_hook(grab)
        try:
            for chunk in chunks:
                try:
                    hf(input_ids=chunk.tokens, attention_mask=chunk.attention_mask)
                except _Stop:
                    pass
        finally:
            handle.remove()
        acts = torch.cat(kept)
        return acts[:64].mean(0) - acts[64:].mean(0)

    def full_depth():
        kept = []
        for chunk in chunks:
            out = hf(input_ids=chunk.tokens, attention_mask=chunk.attention_mask, output_hidden_states=True)
            kept.append(out.hidden_states[layer + 1][:, -1])
        acts = torch.cat(kept)
        return acts[:64].mean(0) - acts[64:].mean(0)

    # The same numbers, before timing anything.
    torch.testing.assert_close(ours().directions[layer], floor(), atol=1e-3, rtol=1e-3)

    candidates = {"steer": ours, "floor": floor, "full_depth": full_depth}
    anchors = {}
    if importlib.util.find_spec("steering_vectors"):
        from steering_vectors import train_steering_vector

        sv_pairs = [(p.positive, p.negative) for p in pairs]
        candidates["steering_vectors"] = lambda: train_steering_vector(
            hf, model.tokenizer, sv_pairs, layers=[layer], batch_size=size, show_progress=False
        )
        anchors["steering_vectors"] = "extract_vs_steering_vectors"
    if importlib.util.find_spec("repeng"):
        from repeng import ControlModel, ControlVector, DatasetEntry

        control = ControlModel(hf, [layer])
        entries = [DatasetEntry(positive=p.positive, negative=p.negative) for p in pairs]
        candidates["repeng"] = lambda: ControlVector.train(control, model.tokenizer, entries, batch_size=size)
        anchors["repeng"] = "extract_vs_repeng"

    times = interleaved(candidates, repeats=args.repeats)
    figures = {
        "extract_vs_floor": round(times["steer"] / times["floor"], 3),
        "extract_vs_full_depth": round(times["steer"] / times["full_depth"], 3),
    }
    for name, key in anchors.items():
        figures[key] = round(times["steer"] / times[name], 3)
    figures.update({f"{name}_s": round(t, 3) for name, t in times.items()})
    skipped = [n for n in ("steering_vectors", "repeng") if n not in anchors]
    for name, t in times.items():
        print(f"{name:>17}: {t:.3f} s")
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
