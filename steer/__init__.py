"""steer: activation steering for PyTorch language models on TransformerLens."""

from steer.attention import AttentionMaps, Emphasis, HeadProfile, attention_maps, profile_heads
from steer.errors import SteerError, SteerTypeError, SteerValueError
from steer.evaluate import (
    ab_behaviour,
    completion_behaviour,
    layer_scan,
    neutral_text,
    projections,
    score,
    score_generations,
    side_effects,
    sweep,
)
from steer.extract import extract
from steer.generate import Generation, Generations, generate
from steer.hooks import read
from steer.interop import read_control_vector, write_control_vector
from steer.metrics import answer_prob, logit_diff
from steer.model import load_model
from steer.patching import PatchResult, attribution_patch, causal_trace, patch
from steer.prompts import (
    ABItem,
    ContrastivePair,
    PatchingPrompts,
    Tokens,
    ab_items,
    ab_pairs,
    chat_prompt,
    example_ab_items,
    example_ioi,
    example_pairs,
    load_pairs,
    pairs_from,
    split,
    tokenize,
)
from steer.soft_prompt import SoftPrompt, Training, train_soft_prompt
from steer.steering import Intervention, steering
from steer.vector import SteeringVector

__all__ = [
    "ABItem",
    "AttentionMaps",
    "ContrastivePair",
    "Emphasis",
    "Generation",
    "Generations",
    "HeadProfile",
    "Intervention",
    "PatchResult",
    "PatchingPrompts",
    "SoftPrompt",
    "SteerError",
    "SteerTypeError",
    "SteerValueError",
    "SteeringVector",
    "Tokens",
    "Training",
    "ab_behaviour",
    "ab_items",
    "ab_pairs",
    "answer_prob",
    "attention_maps",
    "attribution_patch",
    "causal_trace",
    "chat_prompt",
    "completion_behaviour",
    "example_ab_items",
    "example_ioi",
    "example_pairs",
    "extract",
    "generate",
    "layer_scan",
    "load_model",
    "load_pairs",
    "logit_diff",
    "neutral_text",
    "pairs_from",
    "patch",
    "profile_heads",
    "projections",
    "read",
    "read_control_vector",
    "score",
    "score_generations",
    "side_effects",
    "split",
    "steering",
    "sweep",
    "tokenize",
    "train_soft_prompt",
    "write_control_vector",
]
