"""Extraction against hand computations, and its bad input."""

import pytest
import torch
from conftest import layer_outputs

import steer

PAIRS = steer.example_pairs("sentiment")[:8]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_mean_difference_equals_a_hand_computation(smollm, hf_smollm, batch_size, side):
    layers = [3, 12]
    vector = steer.extract(smollm, PAIRS, layers, batch_size=batch_size, padding_side=side)
    for layer in layers:
        pos = layer_outputs(hf_smollm, smollm.tokenizer, [p.positive for p in PAIRS], layer)
        neg = layer_outputs(hf_smollm, smollm.tokenizer, [p.negative for p in PAIRS], layer)
        torch.testing.assert_close(vector.directions[layer], pos.mean(0) - neg.mean(0), atol=2e-4, rtol=1e-4)
        norms = torch.cat([pos, neg]).norm(dim=-1).mean()
        assert vector.residual_norms[layer] == pytest.approx(float(norms), rel=1e-4)
    assert vector.n_pairs == 8 and vector.d_model == 576 and vector.hook == "blocks.{layer}.hook_resid_post"


def test_per_pair_read_spans_use_the_named_tokens(smollm, hf_smollm):
    pairs = [steer.ContrastivePair("I love this movie, it is", "I hate this movie, it is", read="love")]
    pairs.append(steer.ContrastivePair("I adore my dog, she", "I loathe my dog, she", read=1))
    vector = steer.extract(
        smollm, [steer.ContrastivePair(p.positive, p.negative, "movie") for p in pairs[:1]], 5
    )
    ids = smollm.tokenizer(pairs[0].positive)["input_ids"]
    span = steer.prompts.token_span(smollm, pairs[0].positive, "movie")
    assert smollm.tokenizer.decode(ids[span]).strip() == "movie"
    pos = layer_outputs(hf_smollm, smollm.tokenizer, [pairs[0].positive], 5, span.start)
    neg = layer_outputs(hf_smollm, smollm.tokenizer, [pairs[0].negative], 5, span.start)
    torch.testing.assert_close(vector.directions[5], (pos - neg)[0], atol=2e-4, rtol=1e-4)
    assert vector.positions == "per-pair"


def test_pca_and_probe_point_to_the_positive_side_and_are_deterministic(smollm):
    mean = steer.extract(smollm, PAIRS, 10)
    for method in ("pca", "probe"):
        first = steer.extract(smollm, PAIRS, 10, method=method)
        again = steer.extract(smollm, PAIRS, 10, method=method)
        assert torch.equal(first.directions[10], again.directions[10])
        assert first.cosine(mean)[10] > 0.3, method
        # Scaled so that the mean difference's projection on the unit direction is its norm.
        unit = first.directions[10] / first.directions[10].norm()
        assert float(first.directions[10].norm()) == pytest.approx(
            float(mean.directions[10] @ unit), rel=1e-4
        )


def test_pca_of_one_pair_is_its_difference(tiny_llama):
    pair = [("a happy cat", "a sad cat")]
    pca = steer.extract(tiny_llama, pair, 1, method="pca")
    diff = steer.extract(tiny_llama, pair, 1)
    torch.testing.assert_close(pca.directions[1], diff.directions[1], atol=1e-5, rtol=1e-4)


def test_all_layers_by_default(tiny_llama):
    assert steer.extract(tiny_llama, [("yes", "no")]).layers == [0, 1, 2]


@pytest.mark.parametrize(
    "pairs, kwargs, message",
    [
        ([], {}, "empty"),
        ([("same", "same")], {}, "same text on both sides"),
        ([("a", "b")], {"layers": [3]}, r"not in 0\.\.2"),
        ([("a", "b")], {"layers": -1}, r"not in 0\.\.2"),
        ([("a", "b")], {"method": "magic"}, "Unknown method"),
        ([("a", "b")], {"hook": "blocks.hook"}, "template"),
        ([("a", "b")], {"positions": "first"}, "Unknown position selector"),
        ([{"positive": "a"}], {}, "lacks"),
    ],
)
def test_bad_input(tiny_llama, pairs, kwargs, message):
    with pytest.raises(steer.SteerError, match=message):
        steer.extract(tiny_llama, pairs, **kwargs)


def test_pair_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"positive": "good", "negative": "bad"}\n\n{"positive": "up", "negative": "down", "read": -1}\n'
    )
    csv = tmp_path / "p.csv"
    csv.write_text('positive,negative,read\ngood,bad,\n"up, high",down,-1\nwarm,cold,arm\n')
    assert steer.load_pairs(jsonl) == [
        steer.ContrastivePair("good", "bad"),
        steer.ContrastivePair("up", "down", -1),
    ]
    assert steer.load_pairs(csv) == [
        steer.ContrastivePair("good", "bad"),
        steer.ContrastivePair("up, high", "down", -1),
        steer.ContrastivePair("warm", "cold", "arm"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "x", "negative": "y"}\n{oops\n')
    with pytest.raises(steer.SteerError, match=r"bad\.jsonl:2"):
        steer.load_pairs(bad)
    with pytest.raises(steer.SteerError, match="neither"):
        steer.load_pairs(_touch(tmp_path / "p.txt"))


def _touch(path):
    path.write_text("")
    return path


def test_example_sets_ship_with_the_package():
    assert len(steer.example_pairs("sentiment")) >= 32
    assert len(steer.example_pairs("formality")) >= 20
    with pytest.raises(steer.SteerError, match="sentiment"):
        steer.example_pairs("nope")


def test_ab_pairs_end_at_the_answer_letter(smollm):
    items = [
        {
            "question": "Do you like rain?\n\nChoices:\n(A) Yes, very much\n(B) No, not at all",
            "answer_matching_behavior": "(A)",
            "answer_not_matching_behavior": " (B)",
        }
    ]
    [pair] = steer.ab_pairs(smollm, items)
    assert pair.positive.endswith("<|im_start|>assistant\n(A") and pair.negative.endswith("assistant\n(B")
    assert pair.read == -1
    last = smollm.tokenizer.convert_ids_to_tokens(smollm.tokenizer(pair.positive)["input_ids"][-1])
    assert "A" in last
    with pytest.raises(steer.SteerError, match="needs 'question'"):
        steer.ab_pairs(smollm, [{"question": "x"}])
