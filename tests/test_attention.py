import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

import steer
from steer import hooks
from steer.attention import Emphasis, HeadProfile, attention_maps, profile_heads
from steer.errors import SteerError, SteerTypeError, SteerValueError

QUESTION = "The concert was planned for Monday, but it was moved to Thursday. On which day is the concert?"
SPAN = "moved to Thursday"


def _prompt(model, assistant="The concert is on"):
    return steer.chat_prompt(model, QUESTION, assistant=assistant)


def _ids(model, text):
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def test_alpha_one_changes_nothing_bit_for_bit(smollm):
    text = _prompt(smollm)
    ids = _ids(smollm, text)
    with torch.no_grad():
        plain = smollm(ids)
        with Emphasis(SPAN, [3, (20, 1), (23, 0)], alpha=1.0).applied(smollm, text) as batch:
            same = smollm(batch.tokens)
    assert torch.equal(plain, same)
    out = steer.generate(smollm, QUESTION, Emphasis(SPAN, [(23, 0)], alpha=1.0), chat=True, max_new_tokens=8)
    assert out.text(steered=True) == out.text(steered=False)
    assert not hooks._trackers


@pytest.fixture
def oracle(hf_smollm):
    """The plain Hugging Face model with its eager attention re-weighted by hand: for ``heads`` of layer
    ``layer``, ``log(alpha)`` added to the scores of prompt keys outside ``span`` (a bool per prompt token)."""
    setting: dict = {}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        batch, n_heads, queries, keys = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        if attention_mask is None:  # a registered attention gets no mask; one unpadded row needs only this
            causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
            attention_mask = torch.zeros(queries, keys).masked_fill(~causal, -math.inf)[None, None]
        if module.layer_idx in setting["heads"]:
            bias = attention_mask.expand(batch, n_heads, queries, keys).clone()
            span = setting["span"]
            down = torch.tensor([k < len(span) and not span[k] for k in range(keys)])
            for head in setting["heads"][module.layer_idx]:
                bias[:, head, :, down] += math.log(setting["alpha"])
            attention_mask = bias
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register("steer_oracle", attention)
    hf_smollm.set_attn_implementation("steer_oracle")
    try:
        yield hf_smollm, setting
    finally:
        hf_smollm.set_attn_implementation("eager")


def test_emphasis_matches_a_hand_reweighted_eager_attention_in_forward_and_cached_generation(smollm, oracle):
    hf, setting = oracle
    text = _prompt(smollm)
    emphasis = Emphasis(SPAN, [(20, 1), (23, 0), (23, 2), 24], alpha=0.05)
    setting.update(heads=emphasis.head_map(smollm), span=emphasis.token_masks(smollm, [text])[0], alpha=0.05)
    assert sum(setting["span"]) == 3  # " moved", " to", " Thursday"
    ids = _ids(smollm, text)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        plain = smollm(ids)
        with emphasis.applied(smollm, text) as batch:
            got = smollm(batch.tokens)
    assert (got - expected).abs().max() < 1e-3
    assert (got - plain).abs().max() > 0.5  # the emphasis does something

    with torch.no_grad():
        want = hf.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=smollm.tokenizer.pad_token_id
        )
    want_text = smollm.tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    for use_cache in (True, False):
        out = steer.generate(
            smollm, text, emphasis, max_new_tokens=12, stop_at_eos=False, use_cache=use_cache
        )
        assert out.text(steered=True) == want_text
    assert out.text(steered=True) != out.text(steered=False)


def _patterns(model, layers):
    """Hooks keeping every call's attention pattern ``[batch, head, query, key]`` at ``layers``."""
    found = {layer: [] for layer in layers}

    def keep(layer):
        return lambda pattern, state: found[layer].append(pattern.detach().clone())

    return found, [(f"blocks.{layer}.attn.hook_pattern", keep(layer)) for layer in layers]


def test_emphasis_moves_chosen_heads_to_the_span_and_leaves_other_heads_alone(smollm):
    text = _prompt(smollm)
    ids = _ids(smollm, text)
    emphasis = Emphasis(SPAN, [(20, 1), (20, 6)], alpha=0.01)
    span = torch.tensor(emphasis.token_masks(smollm, [text])[0])
    first = int(span.nonzero()[0])
    runs = []
    for steering_on in (False, True):
        found, readers = _patterns(smollm, [19, 20])
        with torch.no_grad(), hooks.attach(smollm, readers):
            if steering_on:
                with emphasis.applied(smollm, text):
                    smollm(ids, stop_at_layer=21)
            else:
                smollm(ids, stop_at_layer=21)
        runs.append({layer: p[0][0] for layer, p in found.items()})
    before, after = runs
    mass = lambda p: p[first:][:, span].sum(-1).mean()  # noqa: E731  over queries that see the span
    for head in (1, 6):
        assert mass(after[20][head]) > 4 * mass(before[20][head])
        assert torch.allclose(after[20][head].sum(-1), torch.ones(ids.shape[1]), atol=1e-5)
    for head in (0, 2, 3, 4, 5, 7, 8):
        assert torch.equal(after[20][head], before[20][head])
    assert torch.equal(after[19], before[19])


def test_generated_queries_see_the_prompt_reweighted_under_the_kv_cache(smollm):
    text = _prompt(smollm)
    alpha = 0.01
    emphasis = Emphasis(SPAN, [(20, 1)], alpha=alpha)
    span = torch.tensor(emphasis.token_masks(smollm, [text])[0])
    found: dict = {"scores": [], "pattern": []}
    # Attached before generate() attaches the emphasis, so the scores are read before it edits them.
    readers = [
        ("blocks.20.attn.hook_attn_scores", lambda x, state: found["scores"].append(x.detach().clone())),
        ("blocks.20.attn.hook_pattern", lambda x, state: found["pattern"].append(x.detach().clone())),
    ]
    with hooks.attach(smollm, readers):
        out = steer.generate(smollm, text, emphasis, compare=False, max_new_tokens=4, stop_at_eos=False)
    steps = [(s, p) for s, p in zip(found["scores"], found["pattern"]) if s.shape[2] == 1]
    assert len(steps) == 3  # the first token comes from the prompt's pass, then one cached call per token
    for scores, pattern in steps:
        keys = scores.shape[-1]
        down = torch.zeros(keys, dtype=torch.bool)
        down[: len(span)] = ~span  # prompt keys outside the span; generated keys are not prompt
        by_hand = (scores[0, 1, 0] + math.log(alpha) * down).softmax(-1)
        assert torch.allclose(pattern[0, 1, 0], by_hand, atol=1e-6)
        assert torch.allclose(pattern[0, 0, 0], scores[0, 0, 0].softmax(-1), atol=1e-6)  # a head not chosen
        assert float(pattern[0, 1, 0, : len(span)][span].sum()) > 2 * float(
            scores[0, 1, 0].softmax(-1)[: len(span)][span].sum()
        )
    assert out.text(steered=True)


def test_padded_batches_match_single_prompts(tiny_llama):
    texts = ["the cat sat on the mat today", "a dog", "my cat is asleep"]
    emphasis = Emphasis([["cat"], ["dog"], ["cat", (0, 2)]], [(1, 0), (2, 3), 0], alpha=0.1)
    singles = []
    for text, spans in zip(texts, emphasis.spans):
        with torch.no_grad(), Emphasis(spans, emphasis.heads, 0.1).applied(tiny_llama, text) as b:
            singles.append(tiny_llama(b.tokens, attention_mask=b.attention_mask)[0, -1])
    for side in ("left", "right"):
        with torch.no_grad(), emphasis.applied(tiny_llama, texts, padding_side=side) as batch:
            logits = tiny_llama(batch.tokens, attention_mask=batch.attention_mask)
        last = (
            batch.attention_mask.sum(1) - 1
            if side == "right"
            else torch.full((3,), batch.tokens.shape[1] - 1)
        )
        for i in range(3):
            assert torch.allclose(logits[i, last[i]], singles[i], atol=1e-5)


def test_generate_gives_each_prompt_its_own_spans_and_leaves_unsteered_rows_alone(tiny_llama):
    texts = ["the cat sat on the mat and", "a dog ran"]
    spans = [["cat sat"], ["dog"]]
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    out = steer.generate(tiny_llama, texts, Emphasis(spans, [(1, 0), (2, 1)], 1e-3), **kw)
    plain = steer.generate(tiny_llama, texts, **kw)
    for i, (text, span) in enumerate(zip(texts, spans)):
        alone = steer.generate(tiny_llama, text, Emphasis(span, [(1, 0), (2, 1)], 1e-3), compare=False, **kw)
        assert out.text(i, steered=True) == alone.text(0, steered=True)
        assert out.text(i, steered=False) == plain.text(i, steered=False)
    assert [out.text(i) for i in range(2)] != [plain.text(i, steered=False) for i in range(2)]


def test_profile_matches_a_naive_loop_over_heads_and_layers(tiny_llama):
    texts = ["the cat sat on the mat", "a dog and a big old cat played outside"]  # span late, padded
    metric = lambda logits: logits[:, -1, 7].mean() - logits[:, -1, 11].mean()  # noqa: E731
    by_head = profile_heads(tiny_llama, texts, "cat", metric, alpha=0.05, batch_size=6, progress=False)
    by_layer = profile_heads(tiny_llama, texts, "cat", metric, alpha=0.05, by="layer", progress=False)
    batch = steer.tokenize(tiny_llama, texts)

    def naive(heads):
        with torch.no_grad(), Emphasis("cat", heads, 0.05).applied(tiny_llama, texts) as b:
            assert torch.equal(b.tokens, batch.tokens)
            return float(metric(tiny_llama(b.tokens, attention_mask=b.attention_mask)))

    with torch.no_grad():
        baseline = float(metric(tiny_llama(batch.tokens, attention_mask=batch.attention_mask)))
    assert by_head.baseline == pytest.approx(baseline, abs=1e-5)
    for layer in range(3):
        assert by_layer.effects[layer, 0] == pytest.approx(naive([layer]) - baseline, abs=1e-5)
        for head in range(4):
            assert by_head.effects[layer, head] == pytest.approx(naive([(layer, head)]) - baseline, abs=1e-5)
    layer, head, effect = by_head.top(1)[0]
    assert effect == float(by_head.effects.max())
    assert by_head.heads(2) == [(x, h) for x, h, e in by_head.top(2) if e > 0]
    assert all(isinstance(x, int) for x in by_layer.heads(3))
    assert len(by_head.to_frame()) == 12
    assert "L" in str(by_head)
    only = profile_heads(tiny_llama, texts, "cat", metric, alpha=0.05, layers=[2], progress=False)
    assert only.effects[:2].isnan().all() and torch.allclose(only.effects[2], by_head.effects[2], atol=1e-6)


def test_profile_finds_heads_that_help_on_the_real_model(smollm):
    items = [("meeting", "Monday", "Friday"), ("party", "Tuesday", "Sunday")]
    prompts = [
        steer.chat_prompt(
            smollm,
            f"The {thing} was planned for {old}, but it was moved to {new}. On which day is the {thing}?",
            assistant=f"The {thing} is on",
        )
        for thing, old, new in items
    ]
    metric = steer.logit_diff([f" {new}" for *_, new in items], [f" {old}" for _, old, _ in items])
    profile = profile_heads(smollm, prompts, [[f"moved to {new}"] for *_, new in items], metric, layers=[23])
    print(profile)
    best = profile.heads(3)
    assert best and all(layer == 23 for layer, _ in best)
    assert profile.top(1)[0][2] > 1.0


def test_figures_and_span_mass(tiny_llama):
    pytest.importorskip("matplotlib")
    text = "the cat sat on the mat"
    maps = attention_maps(tiny_llama, text, Emphasis("cat", [(1, 2)], 0.01), 1, 2)
    before, after = maps.span_mass()
    assert after > 0.9 > before
    assert maps.before.shape == (len(maps.tokens), len(maps.tokens))
    fig = maps.plot()
    assert len(fig.axes) == 2
    profile = HeadProfile(torch.randn(3, 4), 0.5, "metric", "head", 0.01)
    assert len(profile.plot(k=5).axes) >= 2


def test_a_soft_prompt_shifts_the_emphasised_tokens_with_it(smollm):
    text = _prompt(smollm)
    soft = steer.SoftPrompt.from_text(smollm, "Read carefully.")
    emphasis = Emphasis(SPAN, [(20, 1)], alpha=1e-4)
    span = emphasis.token_masks(smollm, [text])[0]
    at = soft.offset(smollm)
    columns = span[:at] + [False] * soft.n + span[at:]
    found, readers = _patterns(smollm, [20])
    with hooks.attach(smollm, readers):
        steer.generate(smollm, text, emphasis, soft_prompt=soft, compare=False, max_new_tokens=1)
    pattern = found[20][0][0, 1]  # the prompt's pass: [query, key]
    assert pattern.shape[-1] == len(columns)
    assert float(pattern[-1, torch.tensor(columns)].sum()) > 0.95
    unshifted = torch.tensor(span + [False] * soft.n)
    assert float(pattern[-1, unshifted].sum()) < 0.5


def test_bad_input_is_refused(smollm, tiny_llama):
    text = _prompt(smollm)
    with pytest.raises(SteerValueError, match="'moved to Tuesday' does not occur"):
        steer.generate(smollm, QUESTION, Emphasis("moved to Tuesday", [(20, 1)]), chat=True)
    with pytest.raises(SteerValueError, match="not inside the prompt"):
        Emphasis((5, 10_000), [(20, 1)]).token_masks(smollm, [text])
    for alpha in (0, -1.0, math.nan, math.inf):
        with pytest.raises(SteerValueError, match="alpha"):
            Emphasis(SPAN, [(20, 1)], alpha=alpha)
    with pytest.raises(SteerValueError, match="heads"):
        Emphasis(SPAN, [])
    with pytest.raises(SteerTypeError, match="layer, head"):
        Emphasis(SPAN, [(1, 2, 3)])
    with pytest.raises(SteerValueError, match=r"Layer 30 is outside 0\.\.29"):
        Emphasis(SPAN, [(30, 0)]).head_map(smollm)
    with pytest.raises(SteerValueError, match=r"Head 9 is outside 0\.\.8"):
        Emphasis(SPAN, [(3, 9)]).head_map(smollm)
    with pytest.raises(SteerValueError, match="2 lists of spans for 1 prompts"):
        Emphasis([["a"], ["b"]], [1]).token_masks(smollm, [text])
    with pytest.raises(SteerTypeError, match="not str"):
        steer.generate(smollm, QUESTION, "moved to Thursday")
    with pytest.raises(SteerValueError, match="by must be"):
        profile_heads(tiny_llama, ["a cat"], "cat", lambda x: x.mean(), by="neuron")
    assert not hooks._trackers


def test_a_model_that_ignores_score_edits_is_refused(monkeypatch):
    from steer import attention

    model = steer.model.tiny("llama", n_layers=2, d_model=32, n_heads=2, seed=1)
    attn = model.blocks[0].attn
    seen = {}
    attn.hook_attn_scores.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    softmax = attn._masked_softmax
    # An attention that reports its scores but softmaxes the unedited ones.
    monkeypatch.setattr(attn, "_masked_softmax", lambda scores, dtype=None: softmax(seen["x"], dtype=dtype))
    monkeypatch.setattr(attention, "_editable", attention.weakref.WeakKeyDictionary())
    with pytest.raises(SteerError, match="does not use an edit"):
        with Emphasis("a", [(0, 1)]).applied(model, "a b c"):
            pass
    assert not hooks._trackers
