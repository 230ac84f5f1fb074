"""steer: activation steering for PyTorch language models on TransformerLens."""

from steer.errors import SteerError, SteerTypeError, SteerValueError
from steer.extract import extract
from steer.generate import Generation, Generations, generate
from steer.hooks import read
from steer.model import load_model
from steer.prompts import (
    ContrastivePair,
    Tokens,
    ab_pairs,
    chat_prompt,
    example_pairs,
    load_pairs,
    pairs_from,
    tokenize,
)
from steer.steering import Intervention, steering
from steer.vector import SteeringVector

__all__ = [
    "ContrastivePair",
    "Generation",
    "Generations",
    "Intervention",
    "SteerError",
    "SteerTypeError",
    "SteerValueError",
    "SteeringVector",
    "Tokens",
    "ab_pairs",
    "chat_prompt",
    "example_pairs",
    "extract",
    "generate",
    "load_model",
    "load_pairs",
    "pairs_from",
    "read",
    "steering",
    "tokenize",
]
