import pytest
import torch

import steer
from steer import model as steer_model


@pytest.fixture(scope="module")
def tok():
    return steer_model._embedded_tokenizer()


def test_left_and_right_padding_layouts(tok):
    texts = ["one two three four", "one"]
    left = steer.tokenize(tok, texts)
    right = steer.tokenize(tok, texts, padding_side="right")
    ids = [tok(t)["input_ids"] for t in texts]
    assert left.tokens[1, -len(ids[1]) :].tolist() == ids[1]
    assert right.tokens[1, : len(ids[1])].tolist() == ids[1]
    assert left.lengths.tolist() == right.lengths.tolist() == [len(i) for i in ids]
    assert (left.tokens[left.attention_mask == 0] == tok.pad_token_id).all()
    assert torch.equal(left.tokens[0], right.tokens[0])


def test_tokenize_rejects_bad_input(tok):
    with pytest.raises(steer.SteerError, match="at least one string"):
        steer.tokenize(tok, [])
    with pytest.raises(steer.SteerError, match="tokenize to nothing"):
        steer.tokenize(tok, ["fine", ""])
    with pytest.raises(steer.SteerTypeError):
        steer.tokenize(tok, ["fine", 3])
    with pytest.raises(steer.SteerError, match="padding_side"):
        steer.tokenize(tok, "x", padding_side="middle")
    with pytest.raises(steer.SteerTypeError):
        steer.tokenize(object(), "x")


def test_chat_prompt_with_system_and_answer_start(tok):
    text = steer.chat_prompt(tok, "Pick one.", system="Be brief.", assistant="(A")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPick one.<|im_end|>\n"
        "<|im_start|>assistant\n(A"
    )
    default = steer.chat_prompt(tok, "Hi")
    assert default.startswith("<|im_start|>system\n") and default.endswith("<|im_start|>assistant\n")
