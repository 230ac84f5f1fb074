"""steer: activation steering for PyTorch language models on TransformerLens."""

from steer.errors import SteerError, SteerTypeError, SteerValueError
from steer.model import load_model
from steer.prompts import Tokens, chat_prompt, tokenize

__all__ = [
    "SteerError",
    "SteerTypeError",
    "SteerValueError",
    "Tokens",
    "chat_prompt",
    "load_model",
    "tokenize",
]
