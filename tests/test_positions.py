"""Position selectors against a naive per-token loop, under padding and KV-cache steps."""

import pytest
import torch

from steer.errors import SteerError
from steer.positions import CallState, select, validate

# Row 0: 5 real tokens; row 1: 2 real tokens. Prompt width 5, then 3 generated columns.
LEFT = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
RIGHT_PROMPT = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
SELECTORS = [
    "all",
    "prompt",
    "generated",
    "last",
    "mean",
    0,
    1,
    -1,
    -2,
    4,
    slice(1, None),
    slice(0, 2),
    slice(-2, None),
    torch.tensor([True, False, True]),
    [True, True],
]


def naive(selector, mask, prompt_width):
    """Per token, by hand: [batch, width] over the whole sequence."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    for r in range(mask.shape[0]):
        real = [c for c in range(mask.shape[1]) if mask[r, c]]
        prompt = [c for c in real if c < prompt_width]
        for i, c in enumerate(real):
            in_prompt = c < prompt_width
            if selector == "all":
                hit = True
            elif selector in ("prompt", "mean"):
                hit = in_prompt
            elif selector == "generated":
                hit = not in_prompt
            elif selector == "last":
                hit = c == prompt[-1]
            elif isinstance(selector, int):
                hit = (i == selector) if selector >= 0 else (in_prompt and i == len(prompt) + selector)
            elif isinstance(selector, slice):
                lo = 0 if selector.start is None else selector.start
                lo = lo + len(prompt) if lo < 0 else lo
                hi = selector.stop
                hi = hi + len(prompt) if hi is not None and hi < 0 else hi
                hit = i >= lo and (hi is None or i < hi)
            else:
                mask_list = list(selector.tolist() if isinstance(selector, torch.Tensor) else selector)
                hit = i < len(mask_list) and mask_list[i]
            out[r, c] = hit
    return out


@pytest.mark.parametrize("selector", SELECTORS, ids=repr)
def test_selectors_match_a_naive_loop_with_and_without_kv_cache(selector):
    prompt_width = 5
    full = naive(selector, LEFT, prompt_width)
    # Without a cache: each call recomputes everything so far.
    for width in range(prompt_width, LEFT.shape[1] + 1):
        state = CallState(LEFT[:, :width], past=0, prompt_width=prompt_width)
        assert torch.equal(select(selector, state), full[:, :width])
    # With a cache: the prompt, then one column per call.
    assert torch.equal(
        select(selector, CallState(LEFT[:, :prompt_width], 0, prompt_width)), full[:, :prompt_width]
    )
    for width in range(prompt_width + 1, LEFT.shape[1] + 1):
        state = CallState(LEFT[:, :width], past=width - 1, prompt_width=prompt_width)
        assert torch.equal(select(selector, state), full[:, width - 1 : width])


@pytest.mark.parametrize("selector", ["all", "prompt", "last", 0, -1, slice(1, None)], ids=repr)
def test_right_padding_never_touches_pads(selector):
    state = CallState.plain(RIGHT_PROMPT)
    picked = select(selector, state)
    assert not picked[RIGHT_PROMPT == 0].any()
    assert torch.equal(picked, naive(selector, RIGHT_PROMPT, 5))


def test_same_tokens_whatever_the_padding_side():
    left = CallState.plain(torch.tensor([[0, 0, 0, 1, 1]]))
    right = CallState.plain(torch.tensor([[1, 1, 0, 0, 0]]))
    for selector in ["last", 0, -1, slice(0, 1)]:
        assert select(selector, left)[0, 3:].tolist() == select(selector, right)[0, :2].tolist()


def test_per_row_selectors_and_none_rows():
    state = CallState.plain(RIGHT_PROMPT)
    picked = select(["last", None], state)
    assert picked[0].tolist() == [False, False, False, False, True]
    assert not picked[1].any()
    with pytest.raises(SteerError, match="per-row"):
        select(["last"], state)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("first", "Unknown position selector"),
        (slice(3, 3), "selects no token"),
        (slice(0, 4, 2), "step"),
        (torch.zeros(3, dtype=torch.bool), "selects no token"),
        ([None, None], "None"),
        (2.5, "Not a position selector"),
        (True, "bool"),
    ],
    ids=repr,
)
def test_bad_selectors_are_refused(bad, message):
    with pytest.raises(SteerError, match=message):
        validate(bad)
