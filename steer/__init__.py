"""steer: activation steering for PyTorch language models on TransformerLens.

The public API, re-exported from the modules that hold it. Names load on first use, so ``import steer``
and the ``steer`` command start without importing torch and TransformerLens until they are needed.
"""

import importlib
import sys
import types

_EXPORTS: dict[str, tuple[str, ...]] = {
    "attention": (
        "AttentionMaps",
        "Emphasis",
        "HeadProfile",
        "attention_maps",
        "profile_heads",
    ),
    "errors": (
        "SteerError",
        "SteerTypeError",
        "SteerValueError",
    ),
    "evaluate": (
        "ab_behaviour",
        "completion_behaviour",
        "layer_scan",
        "neutral_text",
        "projections",
        "score",
        "score_generations",
        "side_effects",
        "sweep",
    ),
    "extract": ("extract",),
    "generate": (
        "Generation",
        "Generations",
        "generate",
    ),
    "hooks": ("read",),
    "interop": (
        "read_control_vector",
        "write_control_vector",
    ),
    "metrics": (
        "answer_prob",
        "logit_diff",
    ),
    "model": ("load_model",),
    "patching": (
        "PatchResult",
        "attribution_patch",
        "causal_trace",
        "patch",
    ),
    "prompts": (
        "ABItem",
        "ContrastivePair",
        "PatchingPrompts",
        "Tokens",
        "ab_items",
        "ab_pairs",
        "chat_prompt",
        "example_ab_items",
        "example_ioi",
        "example_pairs",
        "load_pairs",
        "pairs_from",
        "split",
        "tokenize",
    ),
    "soft_prompt": (
        "SoftPrompt",
        "Training",
        "train_soft_prompt",
    ),
    "steering": (
        "Intervention",
        "steering",
    ),
    "vector": ("SteeringVector",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f"steer.{_HOME[name]}"), name)
    else:
        try:  # a submodule, e.g. steer.positions
            value = importlib.import_module(f"steer.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"steer.{name}":
                raise
            raise AttributeError(f"module 'steer' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing steer.extract makes Python set the attribute steer.extract to that submodule; the
        # function of the same name stays the public one, as an eager re-export would leave it.
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
