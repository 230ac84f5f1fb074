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
