
"""Evaluation: scores against hand computations, KL, sweeps against one-cell-at-a-time runs, best(), bad input."""

import itertools
import math
import warnings

import pytest
import torch

import steer
from steer import evaluate as ev
from steer.prompts import example_ab_items, split
from steer.steering import Intervention

ITEMS = example_ab_items("cheerful")


def test_ab_letter_scores_match_plain_hf_logits(smollm, hf_smollm):
    items = ITEMS[:4]
    got = ev.score(smollm, ev.ab_behaviour(smollm, items))
    tok = smollm.tokenizer
    for item, value in zip(items, got.per_item):
        prompt = steer.chat_prompt(smollm, item.question, assistant="(")
        with torch.no_grad():
            logits = hf_smollm(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
        a, b = logits[tok(item.matching)["input_ids"][0]], logits[tok(item.not_matching)["input_ids"][0]]
        assert value == pytest.approx(float(torch.softmax(torch.stack([a, b]), 0)[0]), abs=1e-4)
    assert got.items == items and len(got.per_item) == 4


def test_text_answers_and_multi_token_completions_match_hand_log_probs(smollm, hf_smollm):
    tok = smollm.tokenizer
    behaviour = ev.completion_behaviour(
        smollm, ["The weather today is", "I feel"], [" very sunny"], [" quite grim", " bad"]
    )
    got = ev.score(smollm, behaviour, batch_size=3)

    def logp(prompt, completion):
        base = tok(prompt)["input_ids"]
        full = tok(prompt + completion)["input_ids"]
        with torch.no_grad():
            lp = hf_smollm(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
        return sum(float(lp[i - 1, full[i]]) for i in range(len(base), len(full)))

    for prompt, value in zip(behaviour.prompts, got.per_item):
        neg = torch.logsumexp(torch.tensor([logp(prompt, " quite grim"), logp(prompt, " bad")]), 0)
        assert value == pytest.approx(logp(prompt, " very sunny") - float(neg), abs=2e-3)


def test_kl_is_zero_at_coefficient_zero_and_grows(smollm, sentiment):
    zero = ev.side_effects(smollm, Intervention(sentiment, 0.0, layers=10))
    assert zero.kl == 0.0
    kls = [ev.side_effects(smollm, Intervention(sentiment, c, layers=10)).kl for c in (1.0, 4.0, 8.0)]
    assert 0 < kls[0] < kls[1] < kls[2]
    plain = ev.side_effects(smollm)
    assert plain.kl == 0.0 and 1 < plain.perplexity < 1000 and plain.n_texts == 20


def test_measuring_cost_inside_a_steering_block_warns(smollm, sentiment):
    texts = steer.neutral_text()[:2]
    with steer.steering(smollm, sentiment, coeff=4.0, layers=[10]):
        with pytest.warns(UserWarning, match="call side_effects outside the 'with' block"):
            inside = steer.side_effects(smollm, texts=texts)
    assert inside.kl == pytest.approx(0.0, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outside = steer.side_effects(smollm, steer.Intervention(sentiment, 4.0, [10]), texts=texts)
    assert outside.kl > 0.01


def test_sweep_equals_cells_computed_one_at_a_time(smollm, sentiment):
    behaviour = ev.ab_behaviour(smollm, ITEMS[:5])
    coeffs = [-4.0, 0.0, 3.0]
    neutral = ev.neutral_text()[:4]
    grid = ev.sweep(
        smollm, behaviour, sentiment, [6, 12], coeffs, neutral=neutral, batch_size=4, progress=False
    )
    assert len(grid.cells) == 6
    for cell in grid.cells:
        iv = Intervention(sentiment, cell.coeff, layers=cell.layer)
        with steer.steering(smollm, iv):
            alone = ev.score(smollm, behaviour)
        cost = ev.side_effects(smollm, iv, texts=neutral)
        assert cell.per_item == pytest.approx(alone.per_item, abs=1e-4)
        assert cell.kl == pytest.approx(cost.kl, abs=1e-4)
        assert cell.perplexity == pytest.approx(cost.perplexity, rel=1e-4)
    records = grid.records()
    assert records[0].keys() == {"method", "layer", "coeff", "score", "shift", "kl", "perplexity"}
    assert "KL from unsteered" in str(grid)


def test_method_by_layer_sweep_and_its_figures(smollm, tmp_path):
    pairs = steer.example_pairs("sentiment")[:8]
    vectors = {m: steer.extract(smollm, pairs, [4, 8], method=m) for m in ("mean_diff", "pca")}
    grid = ev.sweep(smollm, ev.ab_behaviour(smollm, ITEMS[:3]), vectors, coeffs=[-1.0, 1.0], neutral=False)
    assert {(c.method, c.layer) for c in grid.cells} == set(itertools.product(["mean_diff", "pca"], [4, 8]))
    assert all(c.kl is None for c in grid.cells)
    for kind in ("heatmap", "curves"):
        fig = grid.plot(kind, method="pca")
        fig.savefig(tmp_path / f"{kind}.png")
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000


def test_best_follows_the_rule_on_a_constructed_table():
    def cell(layer, coeff, score, kl):
        return ev.Cell("m", layer, coeff, score, kl, None, [score])

    grid = ev.Sweep(
        "s",
        [cell(1, 1, 0.6, 0.05), cell(1, 2, 0.9, 0.4), cell(2, 1, 0.7, 0.09), cell(2, -1, 0.1, 0.08)],
        [],
        0.5,
    )
    assert grid.best(kl_max=0.1) == grid.cells[2]
    assert grid.best() == grid.cells[1]
    assert grid.best(kl_max=0.1, direction=-1) == grid.cells[3]
    with pytest.raises(steer.SteerError, match="No cell"):
        grid.best(kl_max=0.01)


def test_cheerful_persona_shifts_monotonically_with_bounded_kl(smollm, capsys):
    """On the real model: 44 A/B items of our own (cheerful vs gloomy answers), vectors from the training
    split at several layers, scored on the held-out split. SmolLM2-135M cannot tie answer letters to
    choices (near chance even on trivial questions), so both extraction and score use the answers' text."""
    assert len(ITEMS) >= 40
    train, test = split(ITEMS, 0.3, seed=0)
    vector = steer.extract(smollm, steer.ab_pairs(smollm, train, answer="text"), [3, 6, 9, 12, 15])
    behaviour = ev.ab_behaviour(smollm, test, answer="text")
    coeffs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    kl_bound = 0.3
    grid = ev.sweep(smollm, behaviour, vector, coeffs=coeffs, progress=False)
    best = grid.best(kl_max=kl_bound)
    row = sorted((c for c in grid.cells if c.layer == best.layer), key=lambda c: c.coeff)
    with capsys.disabled():
        print(
            f"\n{grid}\nbest cell under KL {kl_bound}: layer {best.layer}, coeff {best.coeff:+g}, score {best.score:.3f}"
        )
    assert best.score > grid.baseline + 0.1
    assert all(a.score < b.score for a, b in itertools.pairwise(row)), [c.score for c in row]
    assert all(c.kl <= kl_bound for c in row)
    assert set(grid.items) == set(test) and not set(test) & set(train)


def test_generation_scores_with_a_scorer_that_fails_on_some_rows(smollm, sentiment):
    calls = []

    def scorer(text):
        calls.append(text)
        if len(calls) == 1:
            raise RuntimeError("broken scorer")
        return float("nan") if len(calls) == 2 else float(len(text))

    with pytest.warns(UserWarning, match="failed on 2 of 3"):
        rows = ev.score_generations(
            smollm, "The day was", sentiment.select(10), [-4.0, 0.0, 4.0], scorer=scorer, max_new_tokens=5
        )
    assert [r.error is not None for r in rows] == [True, True, False]
    assert "broken scorer" in rows[0].error and rows[2].score == len(rows[2].text)


def test_built_in_projection_score_rises_with_the_coefficient(smollm, sentiment):
    rows = ev.score_generations(
        smollm, ["The day was", "My neighbour"], sentiment.select(10), [-6.0, 6.0], max_new_tokens=10
    )
    by_coeff = {c: [r.score for r in rows if r.coeff == c] for c in (-6.0, 6.0)}
    assert all(lo < hi for lo, hi in zip(by_coeff[-6.0], by_coeff[6.0]))


def test_token_projections_render(smollm, sentiment):
    view = ev.projections(smollm, "I love this wonderful day", sentiment, layer=10)
    assert (
        len(view.tokens)
        == len(view.values)
        == len(smollm.tokenizer("I love this wonderful day")["input_ids"])
    )
    assert "<span" in view._repr_html_() and "\x1b[48;2;" in str(view)
    unit = sentiment.directions[10] / sentiment.directions[10].norm()
    acts = steer.read(
        smollm, steer.tokenize(smollm, "I love this wonderful day"), ["blocks.10.hook_resid_post"], 1
    )
    assert view.values[1] == pytest.approx(float(acts["blocks.10.hook_resid_post"][0] @ unit), abs=1e-3)


def test_layer_scan_finds_sentiment_readable(smollm, tmp_path):
    scan = ev.layer_scan(smollm, steer.example_pairs("sentiment"), [0, 6, 12], folds=4)
    assert len(scan.accuracy) == 3 and all(0 <= a <= 1 for a in scan.accuracy)
    # The pairs end in the same word on both sides, so layer 0 (the embedding of that word) is at chance.
    assert scan.accuracy[0] < 0.7 and scan.accuracy[2] >= 0.8 and scan.best() == 12
    assert scan.separation[0] < 0.5 < scan.separation[2]
    scan.plot().savefig(tmp_path / "scan.png")


def test_bad_input(smollm, sentiment):
    two_letter = [
        {
            "question": "Q?",
            "answer_matching_behavior": "(Option one)",
            "answer_not_matching_behavior": "(Option two)",
        }
    ]
    with pytest.raises(steer.SteerError, match="single tokens"):
        ev.score(smollm, ev.ab_behaviour(smollm, two_letter))
    with pytest.raises(steer.SteerError, match="neutral text is empty"):
        ev.side_effects(smollm, texts=["", "  "])
    with pytest.raises(steer.SteerError, match="resid_post"):
        pre = steer.extract(smollm, [("good", "bad")], 3, hook="resid_pre")
        ev.sweep(smollm, ev.ab_behaviour(smollm, ITEMS[:2]), pre)
    with pytest.raises(steer.SteerError, match="finite"):
        ev.sweep(smollm, ev.ab_behaviour(smollm, ITEMS[:2]), sentiment, coeffs=[math.nan])
    with pytest.raises(steer.SteerError, match="test_fraction"):
        split(ITEMS, 1.5)
