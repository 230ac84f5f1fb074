"""Steering: exactness, positions under padding and the KV cache, operators, composition, refusals."""

import itertools

import pytest
import torch
from test_hooks import _assert_clean

import steer
from steer import hooks
from steer.steering import Intervention

PROMPTS = [
    "The weather this weekend",
    "My new neighbour is",
    "I just finished reading a book and",
    "Our team meeting",
    "The food at the party was",
    "Yesterday I",
    "The city council decided that the old park near the river",
    "To be honest, my first day at the new job",
]
SELECTORS = ["all", "prompt", "generated", "last", 2, slice(3, None), torch.tensor([False, True, True])]


def logits(model, batch):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask)


def test_coeff_zero_is_bit_for_bit_and_exit_restores_the_model(smollm, sentiment):
    batch = steer.tokenize(smollm, PROMPTS[:3])
    before = logits(smollm, batch)
    with steer.steering(smollm, sentiment, coeff=0.0):
        assert torch.equal(logits(smollm, batch), before)
    with steer.steering(smollm, sentiment, coeff=4.0):
        assert not torch.allclose(logits(smollm, batch), before)
    assert torch.equal(logits(smollm, batch), before)
    with pytest.raises(KeyError):
        with steer.steering(smollm, sentiment, coeff=4.0, layers=[10]):
            raise KeyError("escape")
    assert torch.equal(logits(smollm, batch), before)
    _assert_clean(smollm)


@pytest.mark.parametrize("selector", SELECTORS, ids=repr)
def test_kv_cache_and_full_recompute_steer_the_same_tokens(smollm, sentiment, selector):
    kwargs = dict(coeffs=[0.6], layers=[10], positions=selector, relative=True, max_new_tokens=12)
    cached = steer.generate(smollm, PROMPTS[:3], sentiment, use_cache=True, **kwargs)
    recomputed = steer.generate(smollm, PROMPTS[:3], sentiment, use_cache=False, **kwargs)
    assert cached.rows == recomputed.rows
    changed = [cached.text(i, coeff=0.6) != cached.text(i, steered=False) for i in range(3)]
    assert any(changed), "the steering must change something for this test to mean anything"


def test_a_prompt_alone_equals_the_same_prompt_in_a_left_padded_batch(smollm, sentiment):
    kwargs = dict(coeffs=[-0.5, 0.5], layers=[10], relative=True, max_new_tokens=10, compare=False)
    together = steer.generate(smollm, PROMPTS, sentiment, **kwargs)
    assert len({len(smollm.tokenizer(p)["input_ids"]) for p in PROMPTS}) > 3, "prompts must differ in length"
    for i, prompt in enumerate(PROMPTS):
        alone = steer.generate(smollm, prompt, sentiment, **kwargs)
        for c in (-0.5, 0.5):
            assert alone.text(0, coeff=c) == together.text(i, coeff=c), prompt


@pytest.mark.parametrize("selector", ["generated", slice(4, None)], ids=repr)
def test_kv_cache_positions_match_a_naive_loop_on_plain_hf(smollm, hf_smollm, sentiment, selector):
    """Oracle: greedy decoding without a cache on an unwrapped HF model, a plain forward hook adding the
    vector at positions worked out by hand."""
    layer, coeff, steps = 10, 6.0, 8
    prompts = PROMPTS[:2]
    direction = sentiment.directions[layer]
    got = steer.generate(
        smollm,
        prompts,
        sentiment,
        coeffs=[coeff],
        layers=[layer],
        positions=selector,
        max_new_tokens=steps,
        compare=False,
    )
    for i, prompt in enumerate(prompts):
        ids = smollm.tokenizer(prompt)["input_ids"]
        first = len(ids) if selector == "generated" else 4

        def hook(module, args, output, first=first):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[:, first:] += coeff * direction
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = hf_smollm.model.layers[layer].register_forward_hook(hook)
        try:
            for _ in range(steps):
                with torch.no_grad():
                    nxt = int(hf_smollm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == smollm.tokenizer.eos_token_id:
                    break
                ids.append(nxt)
        finally:
            handle.remove()
        want = smollm.tokenizer.decode(
            ids[len(smollm.tokenizer(prompt)["input_ids"]) :], skip_special_tokens=True
        )
        assert got.text(i, coeff=coeff) == want


def test_generated_only_leaves_the_prompt_alone(smollm, sentiment):
    batch = steer.tokenize(smollm, PROMPTS[:2])
    before = logits(smollm, batch)
    with steer.steering(smollm, sentiment, coeff=8.0, layers=[10], positions="generated"):
        assert torch.equal(logits(smollm, batch), before)
    out = steer.generate(
        smollm, PROMPTS[:2], sentiment, coeffs=[8.0], layers=[10], positions="generated", max_new_tokens=10
    )
    for i in range(2):
        steered, plain = out.text(i, coeff=8.0), out.text(i, steered=False)
        first = smollm.tokenizer(steered)["input_ids"][0]
        assert first == smollm.tokenizer(plain)["input_ids"][0], "the first token comes from prompt logits"
        assert steered != plain


def test_prompt_only_does_nothing_on_decode_steps(smollm, sentiment):
    """A recorder before and after the steering hook: decode steps must pass through untouched."""
    name = "blocks.10.hook_resid_post"
    seen = {"before": [], "after": []}

    def recorder(key):
        def fn(h, state):
            seen[key].append((state.past, h.clone()))

        return fn

    batch = steer.tokenize(smollm, PROMPTS[:2])
    with hooks.attach(smollm, [(name, recorder("before"))]):
        with steer.steering(smollm, sentiment, coeff=8.0, layers=[10], positions="prompt"):
            with hooks.attach(smollm, [(name, recorder("after"))]):
                smollm.generate(
                    batch.tokens,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=5,
                    do_sample=False,
                    verbose=False,
                )
    assert len(seen["before"]) == len(seen["after"]) == 5
    (past0, b0), (_, a0) = seen["before"][0], seen["after"][0]
    assert past0 == 0 and not torch.equal(a0, b0)
    for (past, b), (_, a) in zip(seen["before"][1:], seen["after"][1:]):
        assert past > 0 and torch.equal(a, b)
    _assert_clean(smollm)


def _read_after(model, name, batch, *interventions):
    got = []
    with (
        steer.steering(model, *interventions),
        hooks.attach(model, [(name, lambda h, s: got.append(h.clone()))]),
    ):
        logits(model, batch)
    return got[0]


def test_ablate_clamp_and_norm_preserving_add(smollm, sentiment):
    name = "blocks.10.hook_resid_post"
    unit = sentiment.directions[10] / sentiment.directions[10].norm()
    batch = steer.tokenize(smollm, PROMPTS[:3])
    real = batch.attention_mask.bool()
    plain = _read_after(smollm, name, batch, Intervention(sentiment, 0.0, layers=10))
    assert (plain[real] @ unit).abs().max() > 0.1

    ablated = _read_after(smollm, name, batch, Intervention(sentiment, layers=10, op="ablate"))
    assert (ablated[real] @ unit).abs().max() < 1e-4

    clamped = _read_after(smollm, name, batch, Intervention(sentiment, 3.5, layers=10, op="clamp"))
    torch.testing.assert_close(clamped[real] @ unit, torch.full((int(real.sum()),), 3.5), atol=1e-4, rtol=0)

    kept = _read_after(smollm, name, batch, Intervention(sentiment, 4.0, layers=10, op="add_norm"))
    torch.testing.assert_close(kept[real].norm(dim=-1), plain[real].norm(dim=-1), atol=1e-3, rtol=1e-5)
    assert not torch.allclose(kept[real], plain[real])

    relative = _read_after(smollm, name, batch, Intervention(sentiment, 0.25, layers=10, relative=True))
    step = 0.25 * sentiment.residual_norms[10] * unit
    torch.testing.assert_close(
        relative[real] - plain[real], step.expand_as(plain[real]), atol=1e-3, rtol=1e-4
    )


def test_interventions_compose_and_per_row_coefficients_match_separate_runs(smollm, sentiment):
    batch = steer.tokenize(smollm, [PROMPTS[0]] * 3)
    v = sentiment.select(10)
    both = logits_under(smollm, batch, Intervention(v, 2.0), Intervention(v, 3.0))
    once = logits_under(smollm, batch, Intervention(v, 5.0))
    torch.testing.assert_close(both, once, atol=1e-4, rtol=1e-4)
    rows = logits_under(smollm, batch, Intervention(v, [0.0, 2.0, 4.0]))
    for i, c in enumerate([0.0, 2.0, 4.0]):
        torch.testing.assert_close(rows[i], logits_under(smollm, batch, Intervention(v, c))[i])


def logits_under(model, batch, *interventions):
    with steer.steering(model, *interventions):
        return logits(model, batch)


def test_bad_input_leaves_the_model_unhooked(smollm, sentiment, tiny_llama):
    batch = steer.tokenize(smollm, PROMPTS[:2])
    bad = [
        (dict(coeff=float("nan")), "finite"),
        (dict(coeff=float("inf")), "finite"),
        (dict(layers=[11]), r"no layer\(s\) \[11\]"),
        (dict(positions=slice(2, 2)), "selects no token"),
        (dict(positions="middle"), "Unknown position selector"),
        (dict(op="multiply"), "Unknown operator"),
    ]
    for kwargs, message in bad:
        with pytest.raises(steer.SteerError, match=message):
            with steer.steering(smollm, sentiment, **kwargs):
                pass
        _assert_clean(smollm)
    with pytest.raises(steer.SteerError, match="d_model 576"):
        with steer.steering(tiny_llama, sentiment):
            pass
    with pytest.raises(steer.SteerError, match="3 per-row coefficients for a batch of 2"):
        with steer.steering(smollm, sentiment, coeff=[1.0, 2.0, 3.0], layers=[10]):
            logits(smollm, batch)
    with pytest.raises(steer.SteerError, match="Nothing to steer"):
        with steer.steering(smollm):
            pass
    _assert_clean(smollm)


def test_steering_at_a_hook_that_never_fires_is_an_error(tiny_llama):
    vector = steer.SteeringVector(
        {0: torch.ones(64)},
        model_name="tiny",
        d_model=64,
        n_layers=3,
        hook="blocks.{layer}.attn.hook_hidden_states",
    )
    with pytest.raises(steer.SteerError, match="never fired"):
        with steer.steering(tiny_llama, vector):
            logits(tiny_llama, steer.tokenize(tiny_llama, "hello"))
    _assert_clean(tiny_llama)


def test_sentiment_vector_shifts_held_out_sentiment_monotonically(smollm, capsys):
    """Behaviour on the real model: a vector from 40 pairs moves the log-odds of positive over negative
    next words on prompts not used for extraction, monotonically over coefficients -8..8 at layer 10."""
    pairs = steer.example_pairs("sentiment")
    assert len(pairs) >= 32
    vector = steer.extract(smollm, pairs, 10)
    held_out = [
        "I went to the new restaurant yesterday and the food was",
        "My week at work has been",
        "The movie I watched last night was",
        "Honestly, the service at this hotel is",
        "Our trip to the lake this summer was",
        "The weather this weekend looks",
    ]
    assert not {p.positive for p in pairs} & set(held_out)
    good = [" great", " wonderful", " amazing", " good", " fantastic", " excellent"]
    bad = [" terrible", " awful", " bad", " horrible", " disappointing", " poor"]
    good_ids = [smollm.tokenizer(w)["input_ids"][0] for w in good]
    bad_ids = [smollm.tokenizer(w)["input_ids"][0] for w in bad]
    coeffs = [-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0]
    batch = steer.tokenize(smollm, [p for p in held_out for _ in coeffs])
    with steer.steering(smollm, vector, coeff=coeffs * len(held_out)):
        logp = logits(smollm, batch)[:, -1].log_softmax(-1)
    score = (logp[:, good_ids].logsumexp(-1) - logp[:, bad_ids].logsumexp(-1)).view(
        len(held_out), len(coeffs)
    )
    mean = score.mean(0).tolist()
    with capsys.disabled():
        print("\nsentiment log-odds (positive vs negative next word), layer 10, mean over 6 held-out prompts")
        print("  coeff: " + " ".join(f"{c:>6.1f}" for c in coeffs))
        print("  score: " + " ".join(f"{s:>6.2f}" for s in mean))
    assert all(a < b for a, b in itertools.pairwise(mean)), mean


def test_steering_resid_mid_moves_the_residual_stream_not_just_the_mlp_input(smollm, hf_smollm):
    """Oracle: a plain PyTorch hook adding the vector to the attention block's output on plain HF,
    which is adding it to the residual stream between attention and MLP."""
    layer, d = 8, smollm.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 2
    vector = steer.SteeringVector(
        {layer: v}, smollm.cfg.model_name, d, smollm.cfg.n_layers, hook="blocks.{layer}.hook_resid_mid"
    )
    batch = steer.tokenize(smollm, ["The weather today is", "I think that"])

    def add(module, args, output):
        return (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v

    handle = hf_smollm.model.layers[layer].self_attn.register_forward_hook(add)
    try:
        with torch.no_grad():
            expected = hf_smollm(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    finally:
        handle.remove()
    with torch.no_grad(), steer.steering(smollm, vector, coeff=1.0, positions="all"):
        ours = smollm(batch.tokens, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-3, rtol=1e-3)
    _assert_clean(smollm)
