"""Reading activations, and the lifetime and firing of hooks."""

import pytest
import torch
from conftest import layer_outputs

import steer
from steer import hooks

TEXTS = [
    "I love sunny days at the beach",
    "No",
    "The committee will meet again next Tuesday to decide",
    "Cats sleep a lot",
    "What a day",
    "Hello there, how are you doing this fine morning?",
    "Bad",
    "It was fine, I suppose",
    "One more sentence that is a bit longer than the rest of them here",
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("reduce", ["last", "mean", 0])
def test_reads_equal_plain_forward_hooks_on_the_hf_model(smollm, hf_smollm, side, batch_size, reduce):
    layer = 7
    batch = steer.tokenize(smollm, TEXTS, padding_side=side)
    got = hooks.read(smollm, batch, [f"blocks.{layer}.hook_resid_post"], reduce, batch_size=batch_size)
    want = layer_outputs(hf_smollm, smollm.tokenizer, TEXTS, layer, reduce)
    torch.testing.assert_close(got[f"blocks.{layer}.hook_resid_post"], want, atol=2e-4, rtol=1e-4)


def test_read_several_hooks_at_once_and_per_row_positions(tiny_llama):
    batch = steer.tokenize(tiny_llama, ["one two three four", "five six"])
    names = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"]
    both = hooks.read(tiny_llama, batch, names, [1, -1])
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    for name in names:
        full = cache[name]
        # Row 0 is unpadded (token 1 = column 1); row 1 is left-padded, its last token is the last column.
        torch.testing.assert_close(both[name][0], full[0, 1])
        torch.testing.assert_close(both[name][1], full[1, -1])


def test_read_refuses_positions_past_the_end(tiny_llama):
    batch = steer.tokenize(tiny_llama, ["a b c d e f", "a"])
    with pytest.raises(steer.SteerError, match=r"row\(s\) \[1\]"):
        hooks.read(tiny_llama, batch, ["blocks.0.hook_resid_post"], 3)


def test_unknown_hooks_and_layers_are_named(tiny_llama):
    batch = steer.tokenize(tiny_llama, "hello")
    with pytest.raises(steer.SteerError, match=r"outside 0\.\.2"):
        hooks.read(tiny_llama, batch, ["blocks.7.hook_resid_post"])
    with pytest.raises(steer.SteerError, match="no hook point"):
        hooks.read(tiny_llama, batch, ["blocks.0.hook_nonsense"])
    with pytest.raises(steer.SteerError, match="set_use_attn_result"):
        hooks.read(tiny_llama, batch, ["blocks.0.attn.hook_result"])


def test_a_hook_point_that_never_fires_is_an_error(tiny_llama):
    batch = steer.tokenize(tiny_llama, "hello there")
    # TransformerBridge accepts this name on a Llama but never calls it.
    with pytest.raises(steer.SteerError, match="never fired"):
        with hooks.attach(tiny_llama, [("blocks.0.attn.hook_hidden_states", lambda h, s: None)]):
            tiny_llama(batch.tokens)
    _assert_clean(tiny_llama)


def test_hooks_come_off_after_an_exception(tiny_llama):
    batch = steer.tokenize(tiny_llama, "hello there")
    with torch.no_grad():
        before = tiny_llama(batch.tokens)

    def boom(h, state):
        return h * 2

    with pytest.raises(RuntimeError, match="inside"):
        with hooks.attach(tiny_llama, [("blocks.1.hook_resid_post", boom)]):
            with torch.no_grad():
                assert not torch.equal(tiny_llama(batch.tokens), before)
            raise RuntimeError("inside")
    _assert_clean(tiny_llama)
    with torch.no_grad():
        assert torch.equal(tiny_llama(batch.tokens), before)


def _assert_clean(model):
    assert not hooks._trackers
    assert "generate" not in model.__dict__
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert not model.original_model._forward_hooks and not model.original_model._forward_pre_hooks
    assert not model.blocks[0]._forward_pre_hooks
