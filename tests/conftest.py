import os

# Nothing may come from a model hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import steer
from steer import model as steer_model


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct as a bridge (from the user's weight cache)."""
    return steer.load_model(device="cpu")


@pytest.fixture(scope="session")
def hf_smollm(smollm):
    """An independent plain Hugging Face copy of the same weights: the oracle, never wrapped by a bridge."""
    from transformers import AutoModelForCausalLM

    entry = steer_model.gguf_cache_entry(steer_model.embedded_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


def layer_outputs(hf, tokenizer, texts, layer, reduce="last"):
    """The oracle: each text run alone through a plain Hugging Face model, with a plain PyTorch forward
    hook on decoder layer ``layer`` (= TransformerLens ``blocks.{layer}.hook_resid_post``). ``[n, d]``."""
    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = hf.model.layers[layer].register_forward_hook(hook)
    rows = []
    try:
        for text in texts:
            captured.clear()
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                hf(input_ids=ids)
            h = captured[0][0]  # [pos, d]
            rows.append(h[-1] if reduce == "last" else h.mean(dim=0) if reduce == "mean" else h[reduce])
    finally:
        handle.remove()
    return torch.stack(rows)


@pytest.fixture(scope="session")
def tiny_llama():
    return steer_model.tiny("llama", n_layers=3, d_model=64, n_heads=4, seed=0)


@pytest.fixture(scope="session")
def sentiment(smollm):
    """A mean-difference sentiment vector from the shipped pairs (40 of them), at a few middle layers."""
    return steer.extract(smollm, steer.example_pairs("sentiment"), [6, 10, 12])
