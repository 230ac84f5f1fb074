"""steer.generate: layout of rows, sampling with a seed, refusals."""

import pytest
import torch

import steer
from steer.steering import Intervention


def test_rows_per_prompt_and_coefficient(smollm, sentiment):
    out = steer.generate(
        smollm, ["Hello", "The sky"], sentiment, coeffs=[-2.0, 2.0], layers=[10], max_new_tokens=4
    )
    assert [(r.prompt, r.steered, r.coeff) for r in out.rows] == [
        ("Hello", False, None),
        ("Hello", True, -2.0),
        ("Hello", True, 2.0),
        ("The sky", False, None),
        ("The sky", True, -2.0),
        ("The sky", True, 2.0),
    ]
    assert "coeff -2" in str(out) and "unsteered" in str(out)
    assert out.records()[1] == {
        "prompt": "Hello",
        "steered": True,
        "coeff": -2.0,
        "text": out.text(0, coeff=-2.0),
    }
    unsteered = steer.generate(smollm, ["Hello", "The sky"], max_new_tokens=4)
    assert [r.text for r in unsteered.rows] == [out.text(0, steered=False), out.text(1, steered=False)]


def test_interventions_and_stop_at_eos(smollm, sentiment):
    out = steer.generate(
        smollm, "Hi", Intervention(sentiment, 4.0, layers=10), chat=True, max_new_tokens=6, stop_at_eos=False
    )
    assert [r.label for r in out.rows] == ["unsteered", "steered"]
    assert len(smollm.tokenizer(out.text(0))["input_ids"]) >= 5


def test_sampling_with_a_seed_repeats_and_leaves_global_rng_alone(smollm, sentiment):
    state = torch.random.get_rng_state()
    kwargs = dict(coeffs=[3.0], layers=[10], do_sample=True, temperature=1.0, max_new_tokens=8)
    a = steer.generate(smollm, "Once upon a time", sentiment, seed=7, **kwargs)
    b = steer.generate(smollm, "Once upon a time", sentiment, seed=7, **kwargs)
    c = steer.generate(smollm, "Once upon a time", sentiment, seed=8, **kwargs)
    assert a.rows == b.rows and a.rows != c.rows
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((), {"max_new_tokens": 0}, "at least 1"),
        (("V", "V"), {}, "one SteeringVector"),
        (("V", "I"), {}, "not both"),
        (("V",), {"coeffs": []}, "empty"),
        (("I",), {"coeffs": [1.0, 2.0]}, "carry their own coeff"),
    ],
)
def test_refusals(smollm, sentiment, args, kwargs, message):
    items = [{"V": sentiment, "I": Intervention(sentiment, 1.0)}[a] for a in args]
    with pytest.raises(steer.SteerError, match=message):
        steer.generate(smollm, "Hi", *items, **kwargs)
    with pytest.raises(steer.SteerError, match="No prompts"):
        steer.generate(smollm, [])
