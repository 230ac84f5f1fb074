import pytest
import torch
from test_hooks import _assert_clean
from transformer_lens import patching as tl_patching

import steer
from steer import model as steer_model
from steer.patching import GRIDS

IOI = steer.example_ioi(2)  # template 0: 14 tokens; position 9 is the second name ("S2"), 13 the last


def _ids(model, texts):
    return steer.tokenize(model, texts).tokens


def _tl_metric(model, answers, wrongs):
    """The logit difference as a plain function of the logits, built from the tokenizer directly."""
    right = torch.tensor([model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers])
    wrong = torch.tensor([model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in wrongs])
    rows = torch.arange(len(answers))

    def metric(logits):
        last = logits[:, -1]
        return (last[rows, right] - last[rows, wrong]).mean()

    return metric


def _cells(width, heads):
    """A grid's cells within one layer, in steer's order, for its axes after "layer"."""

    def cells(rest):
        if rest == ("pos",):
            return [(p,) for p in range(width)]
        if rest == ("head",):
            return [(h,) for h in range(heads)]
        return [(h, p) for h in range(heads) for p in range(width)]

    return cells


def _naive(model, target, source, metric, what, cells_of_layer):
    """One full forward pass per cell with a plain TransformerLens hook: the oracle for every grid.

    The residual stream between attention and MLP is set through the attention output (the bridge's
    hook_resid_mid only feeds the MLP's norm): attn_out = wanted resid_mid - this run's resid_pre."""
    hook, rest = GRIDS[what]
    with torch.no_grad():
        _, cache = model.run_with_cache(source)
    out, pre = [], {}
    for layer in range(model.cfg.n_layers):
        src = cache[hook.format(layer)]
        for index in cells_of_layer(rest):

            def fn(act, hook, index=index, src=src):
                act = act.clone()
                if what == "resid_mid":
                    act[:, index[0]] = src[:, index[0]] - pre["x"][:, index[0]]
                elif what == "pattern":
                    act[:, index[0]] = src[:, index[0]]
                elif rest == ("pos",):
                    act[:, index[0]] = src[:, index[0]]
                elif rest == ("head",):
                    act[:, :, index[0]] = src[:, :, index[0]]
                else:  # (head, pos); hook_z is [batch, pos, head, d_head]
                    act[:, index[1], index[0]] = src[:, index[1], index[0]]
                return act

            def keep_pre(act, hook):
                pre["x"] = act

            fwd = [(hook.format(layer), fn)]
            if what == "resid_mid":
                fwd = [(f"blocks.{layer}.hook_resid_pre", keep_pre), (f"blocks.{layer}.hook_attn_out", fn)]
            with torch.no_grad(), model.hooks(fwd_hooks=fwd):
                out.append(metric(model(target)).item())
    return torch.tensor(out)


@pytest.mark.parametrize("what", list(GRIDS))
def test_every_grid_equals_a_naive_loop_on_a_tiny_gqa_model(tiny_llama, what):
    model = tiny_llama  # 4 query heads sharing 2 key/value heads
    width, heads = _ids(model, IOI.clean).shape[1], model.cfg.n_heads
    metric = _tl_metric(model, IOI.answers, IOI.wrongs)

    cells = _cells(width, heads)

    for direction in ("denoise", "noise"):
        source, target = (IOI.clean, IOI.corrupted) if direction == "denoise" else (IOI.corrupted, IOI.clean)
        expected = _naive(model, _ids(model, target), _ids(model, source), metric, what, cells)
        builtin = steer.patch(
            model,
            IOI.clean,
            IOI.corrupted,
            steer.logit_diff(IOI.answers, IOI.wrongs),
            what,
            direction=direction,
            normalize=False,
            progress=False,
        )
        torch.testing.assert_close(builtin.values.flatten(), expected, atol=1e-5, rtol=0)
    # A user metric over the full logits goes the other path (every position unembedded).
    user = steer.patch(model, IOI.clean, IOI.corrupted, metric, what, direction="noise", normalize=False)
    torch.testing.assert_close(user.values.flatten(), expected, atol=1e-5, rtol=0)
    assert builtin.axes == ("layer", *GRIDS[what][1])
    _assert_clean(model)


@pytest.mark.parametrize("what", ["resid_pre", "head_pos", "pattern"])
def test_a_gpt2_model_patches_like_a_naive_loop(what):
    """Learned positions, LayerNorm and biases: nothing in the engine is Llama-specific."""
    model = steer_model.tiny("gpt2", n_layers=2, d_model=64, n_heads=4, seed=1)
    width, heads = _ids(model, IOI.clean).shape[1], model.cfg.n_heads
    metric = _tl_metric(model, IOI.answers, IOI.wrongs)

    cells = _cells(width, heads)

    expected = _naive(model, _ids(model, IOI.corrupted), _ids(model, IOI.clean), metric, what, cells)
    ours = steer.patch(model, IOI.clean, IOI.corrupted, metric, what, normalize=False)
    torch.testing.assert_close(ours.values.flatten(), expected, atol=1e-5, rtol=0)


def test_results_do_not_depend_on_chunk_size(tiny_llama):
    kw = dict(metric=steer.logit_diff(IOI.answers, IOI.wrongs), what="head_pos", normalize=False)
    grids = [
        steer.patch(tiny_llama, IOI.clean, IOI.corrupted, batch_size=size, **kw) for size in (1, 5, 1000)
    ]
    grids.append(steer.patch(tiny_llama, IOI.clean, IOI.corrupted, memory_mb=0.01, **kw))
    for other in grids[1:]:
        torch.testing.assert_close(other.values, grids[0].values, atol=1e-5, rtol=0)


def test_exact_grids_equal_transformer_lens_patching_on_the_real_model(smollm):
    """TransformerLens' own loop, on a subset of cells (its index_df) to keep the test short."""
    import pandas as pd

    task = steer.example_ioi(2, seed=1)
    clean, corrupted = _ids(smollm, task.clean), _ids(smollm, task.corrupted)
    metric = _tl_metric(smollm, task.answers, task.wrongs)
    with torch.no_grad():
        _, cache = smollm.run_with_cache(clean)
    layers = [0, 9, 20, 29]
    cells = pd.DataFrame([(x, p) for x in layers for p in range(clean.shape[1])], columns=["layer", "pos"])
    theirs = tl_patching.get_act_patch_resid_pre(
        smollm, corrupted, cache, metric, index_axis_names=None, index_df=cells
    )
    ours = steer.patch(
        smollm, task.clean, task.corrupted, metric, "resid_pre", layers=layers, normalize=False
    )
    torch.testing.assert_close(ours.values.flatten(), theirs.cpu(), atol=1e-4, rtol=0)

    layers = [3, 17]
    heads = pd.DataFrame([(x, h) for x in layers for h in range(9)], columns=["layer", "head_index"])
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
        smollm, corrupted, cache, metric, index_axis_names=None, index_df=heads
    )
    ours = steer.patch(smollm, task.clean, task.corrupted, metric, "head", layers=layers, normalize=False)
    assert ours.values.shape == (2, 9)  # every query head, though SmolLM2 has 3 key/value heads
    torch.testing.assert_close(ours.values.flatten(), theirs.cpu(), atol=1e-4, rtol=0)
    _assert_clean(smollm)


def test_patching_everything_restores_clean_and_patching_nothing_changes_nothing(smollm):
    metric = steer.logit_diff(IOI.answers, IOI.wrongs)
    whole = steer.patch(smollm, IOI.clean, IOI.corrupted, metric, "resid_pre", positions="all")
    assert whole.axes == ("layer", "pos") and whole.labels["pos"] == ["all"]
    torch.testing.assert_close(whole.values, torch.ones(30, 1), atol=1e-4, rtol=0)
    # Before the first token that differs (the second name, position 9) clean and corrupted activations
    # are identical at every layer, so copying them is no patch at all.
    early = steer.patch(smollm, IOI.clean, IOI.corrupted, metric, "resid_pre", positions=range(9))
    torch.testing.assert_close(early.values, torch.zeros(30, 9), atol=1e-4, rtol=0)


def _linear_toy(zero_queries: bool, zero_mlp: bool):
    """A tiny Llama whose last block is linear in every activation patched there: RMS norms turned
    into the identity (huge epsilon, matching weight), the last MLP zeroed (unless its output is what
    is patched) and, optionally, the last attention's queries zeroed so that its pattern is uniform
    whatever the input."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = steer_model.tiny("llama", n_layers=2, d_model=64, n_heads=4, seed=3)
    hf = model.original_model
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, LlamaRMSNorm):
                module.variance_epsilon = 1e8
                module.weight.mul_(1e4)
        hf.model.embed_tokens.weight.mul_(100)  # tied to the unembedding: logit differences of order 1
        last = hf.model.layers[-1]
        if zero_mlp:
            last.mlp.down_proj.weight.zero_()
        if zero_queries:
            last.self_attn.q_proj.weight.zero_()
    return model


@pytest.mark.parametrize("what", list(GRIDS))
def test_attribution_is_exact_where_the_metric_is_linear(what):
    model = _linear_toy(zero_queries=what == "resid_pre", zero_mlp=what != "mlp_out")
    metric = steer.logit_diff(IOI.answers, IOI.wrongs)
    kw = dict(layers=[1], normalize=False)
    exact = steer.patch(model, IOI.clean, IOI.corrupted, metric, what, **kw)
    estimate = steer.attribution_patch(model, IOI.clean, IOI.corrupted, metric, what, **kw)
    spread = (exact.values - exact.corrupted).abs().max().item()
    assert spread > 1e-4, "the toy must have something to attribute"
    # Float32 rounding of values around exact.corrupted (which may be far from 0) bounds the tolerance too.
    atol = max(1e-3 * spread, 1e-6 * abs(exact.corrupted))
    torch.testing.assert_close(estimate.values, exact.values, atol=atol, rtol=0)


def test_ioi_on_the_real_model(smollm):
    """Which layers and positions carry the indirect object: the second name early, the last token late."""
    task = steer.example_ioi(4, seed=2)
    metric = steer.logit_diff(task.answers, task.wrongs)
    exact = steer.patch(smollm, task.clean, task.corrupted, metric, "resid_pre")
    print(exact)
    assert exact.clean > 1 and exact.corrupted < -1
    s2, last = 9, 13
    assert exact.values[:12, s2].min() > 0.8  # early layers: the answer sits at the second name
    assert exact.values[27:, last].min() > 0.8  # late layers: it has moved to the last token
    assert exact.values[:, :s2].abs().max() < 1e-3
    estimate = steer.attribution_patch(smollm, task.clean, task.corrupted, metric, "resid_pre")
    correlation = estimate.correlation(exact)
    print(f"attribution vs exact, resid_pre: correlation {correlation:.3f}")
    assert correlation > 0.5
    heads = steer.patch(smollm, task.clean, task.corrupted, metric, "head", layers=range(15, 30))
    heads_estimate = steer.attribution_patch(
        smollm, task.clean, task.corrupted, metric, "head", layers=range(15, 30)
    )
    print(heads)
    print(f"attribution vs exact, heads: correlation {heads_estimate.correlation(heads):.3f}")
    assert heads_estimate.correlation(heads) > 0


def test_causal_trace_restores_the_answer(smollm):
    prompt = "The Eiffel Tower is located in the city of"
    metric = steer.answer_prob(" Paris")
    trace = steer.causal_trace(smollm, prompt, metric, subject="Eiffel Tower", samples=4, seed=0)
    print(trace)
    width = len(trace.labels["pos"])
    assert trace.axes == ("layer", "pos") and trace.values.shape == (30, width)
    assert [label.endswith("*") for label in trace.labels["pos"]][:5] == [False, True, True, True, False]
    assert trace.clean > trace.corrupted
    # The last layer's output at the last position is all the logits depend on.
    assert trace.values[29, -1].item() == pytest.approx(1.0, abs=1e-4)
    # Noise touches only the subject's tokens; positions before them never differ.
    assert trace.values[:, 0].abs().max() < 1e-4
    again = steer.causal_trace(smollm, prompt, metric, subject="Eiffel Tower", samples=4, seed=0)
    torch.testing.assert_close(again.values, trace.values)
    windowed = steer.causal_trace(smollm, prompt, metric, subject=[1, 2], what="mlp_out", window=5, samples=2)
    assert windowed.notes["window"] == 5 and windowed.values.shape == (30, width)


def test_causal_trace_with_a_window_equals_a_naive_loop(tiny_llama):
    model, prompt, window, samples, scale = tiny_llama, "When Mary and John went", 3, 2, 2.0
    trace = steer.causal_trace(
        model,
        prompt,
        steer.answer_prob(" home"),
        subject=[1],
        what="mlp_out",
        window=window,
        samples=samples,
        noise=scale,
        seed=5,
        normalize=False,
    )
    tokens = _ids(model, [prompt] * samples)
    width, d = tokens.shape[1], model.cfg.d_model
    # The documented noise: N(0, (noise * std of the embedding matrix)^2), drawn in the shape
    # [samples * prompts, pos, d_model] from a generator seeded with seed, at the subject's tokens.
    sigma = scale * model.original_model.get_input_embeddings().weight.std().item()
    draws = torch.randn(samples, width, d, generator=torch.Generator().manual_seed(5)) * sigma
    draws[:, [p for p in range(width) if p != 1]] = 0
    answer = model.tokenizer(" home", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    expected = []
    for layer in range(model.cfg.n_layers):
        low = max(0, min(layer - window // 2, model.cfg.n_layers - window))
        for pos in range(width):

            def restore(act, hook, pos=pos):
                act = act.clone()
                act[:, pos] = cache[hook.name][:, pos]
                return act

            fwd = [("hook_embed", lambda act, hook: act + draws)]
            fwd += [(f"blocks.{x}.hook_mlp_out", restore) for x in range(low, min(low + window, 3))]
            with torch.no_grad(), model.hooks(fwd_hooks=fwd):
                expected.append(model(tokens)[:, -1].softmax(-1)[:, answer].mean().item())
    torch.testing.assert_close(trace.values.flatten(), torch.tensor(expected), atol=1e-6, rtol=1e-4)


def test_result_table_frame_and_figure(tiny_llama):
    result = steer.patch(tiny_llama, IOI.clean, IOI.corrupted, steer.logit_diff(IOI.answers, IOI.wrongs))
    text = str(result)
    assert "exact patching of resid_pre" in text and "top cells" in text and IOI.answers[0].strip() in text
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "pos", "value"] and len(frame) == result.values.numel()
    torch.testing.assert_close(
        result.raw(), result.corrupted + result.values * (result.clean - result.corrupted)
    )
    fig = result.plot()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert IOI.answers[0] in labels
    three = steer.patch(
        tiny_llama, IOI.clean, IOI.corrupted, steer.logit_diff(IOI.answers, IOI.wrongs), "head_pos"
    )
    three.plot()
    import matplotlib.pyplot as plt

    plt.close("all")


def test_bad_input_is_refused_and_leaves_the_model_unhooked(tiny_llama):
    model = tiny_llama
    metric = steer.logit_diff(IOI.answers, IOI.wrongs)
    with pytest.raises(
        steer.SteerValueError,
        match=r"first differ at position 2 \(\[' went'\] vs \['anne', ' Smith', ' went'\]\).*same number of tokens",
    ):
        steer.patch(model, "When Mary went", "When Maryanne Smith went", steer.logit_diff(" a", " b"))
    with pytest.raises(steer.SteerValueError, match="same length"):
        steer.patch(
            model,
            ["When Mary went", "When Mary went home"],
            ["When John went", "When John went home"],
            steer.logit_diff(" a", " b"),
        )
    with pytest.raises(steer.SteerValueError, match=r"' Maryanne' is 2 tokens \[' Mary', 'anne'\]"):
        steer.patch(model, IOI.clean, IOI.corrupted, steer.logit_diff(" Maryanne", " John"))
    with pytest.raises(steer.SteerValueError, match="Unknown patching grid"):
        steer.patch(model, IOI.clean, IOI.corrupted, metric, "resid_sideways")
    with pytest.raises(steer.SteerValueError, match="no hook point"):
        steer.patch(model, IOI.clean, IOI.corrupted, metric, "blocks.{}.hook_nothing")
    with pytest.raises(steer.SteerError, match="never fired"):
        steer.patch(model, IOI.clean, IOI.corrupted, metric, "blocks.{}.attn.hook_hidden_states")
    with pytest.raises(steer.SteerValueError, match="one number"):
        steer.patch(model, IOI.clean, IOI.corrupted, lambda logits: logits[:, -1, :3])
    with pytest.raises(steer.SteerValueError, match=r"not in 0\.\.2"):
        steer.patch(model, IOI.clean, IOI.corrupted, metric, layers=[3])
    with pytest.raises(steer.SteerValueError, match="both the clean and the corrupted"):
        steer.patch(model, IOI.clean, IOI.clean, metric)
    with pytest.raises(steer.SteerValueError, match="does not occur"):
        steer.causal_trace(model, "When Mary went", steer.answer_prob(" a"), subject="Paris")
    _assert_clean(model)
