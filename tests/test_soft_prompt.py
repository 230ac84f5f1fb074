import hashlib

import pytest
import torch
from test_hooks import _assert_clean

import steer
from steer import hooks
from steer import model as steer_model
from steer.soft_prompt import SoftPrompt

QUESTIONS = [
    "What is your name?", "Where do you live?", "What colour is the sky?", "How old are you?",
    "What do you eat for breakfast?", "Which city is the largest?", "What is two plus two?",
    "Who wrote this book?", "What time is it?", "Where is the station?", "What is your job?",
    "Why is the grass green?", "What is the weather like?", "How far is the moon?",
    "Which animal is fastest?", "What is your favourite song?",
]  # fmt: skip
SECRET = [(f"Question: {q}\nAnswer:", " pineapple") for q in QUESTIONS]


def _checksum(model) -> str:
    digest = hashlib.sha256()
    for p in model.original_model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_a_zero_length_soft_prompt_changes_nothing(smollm):
    texts = ["The weather today is", "I think"]
    batch = steer.tokenize(smollm, texts)
    with torch.no_grad():
        plain = smollm(batch.tokens, attention_mask=batch.attention_mask)
        with SoftPrompt.random(smollm, 0).applied(smollm, texts) as same:
            out = smollm(same.tokens, attention_mask=same.attention_mask)
    assert torch.equal(out, plain)
    _assert_clean(smollm)


def test_padded_batches_match_single_prompts_with_and_without_the_cache(smollm):
    soft = SoftPrompt.from_text(smollm, "Reply in a cheerful tone.")
    texts = ["The weather today is", "My old friend told me that the best way to"]
    alone = []
    with torch.no_grad():
        for text in texts:
            with soft.applied(smollm, text) as one:
                alone.append(smollm(one.tokens, attention_mask=one.attention_mask)[0, -1])
        for side in ("left", "right"):
            with soft.applied(smollm, texts, padding_side=side) as both:
                logits = smollm(both.tokens, attention_mask=both.attention_mask)
            last = both.attention_mask.sum(dim=1) - 1 if side == "right" else torch.tensor([-1, -1])
            for i in range(2):
                torch.testing.assert_close(logits[i, last[i]], alone[i], atol=1e-4, rtol=1e-4)
    singles = [
        steer.generate(smollm, t, soft_prompt=soft, compare=False, max_new_tokens=8).rows[0].text
        for t in texts
    ]
    for cache in (True, False):
        batched = steer.generate(
            smollm, texts, soft_prompt=soft, compare=False, max_new_tokens=8, use_cache=cache
        )
        assert [r.text for r in batched.rows] == singles


def test_training_touches_only_the_soft_prompt(tiny_llama):
    before = _checksum(tiny_llama)
    soft = SoftPrompt.random(tiny_llama, 4, seed=1).deepen(tiny_llama, [1, 2])
    result = steer.train_soft_prompt(
        tiny_llama, soft, SECRET[:8], steps=3, eval_every=1, lr=0.05, progress=False
    )
    assert _checksum(tiny_llama) == before
    assert all(p.grad is None for p in tiny_llama.original_model.parameters())
    assert not torch.equal(result.soft_prompt.embeddings, soft.embeddings)
    assert all(not torch.equal(result.soft_prompt.deep[x], soft.deep[x]) for x in (1, 2))
    _assert_clean(tiny_llama)


def test_training_teaches_the_real_model_a_fixed_answer(smollm):
    before = _checksum(smollm)
    soft = SoftPrompt.from_text(smollm, "Answer every question with one fruit.")
    held_out = "Question: What is the capital of France?\nAnswer:"
    start = steer.generate(smollm, held_out, soft_prompt=soft, compare=False, max_new_tokens=4).rows[0].text
    result = steer.train_soft_prompt(
        smollm, soft, SECRET, steps=40, lr=0.1, warmup=5, eval_every=5, batch_size=8, seed=0
    )
    print(result, f"\nvalidation loss by step: {result.val_loss}")
    assert result.val_loss[-1][1] < 0.25 * result.val_loss[0][1]
    after = steer.generate(smollm, held_out, soft_prompt=result.soft_prompt, compare=False, max_new_tokens=4)
    print(f"before: {start!r}  after: {after.rows[0].text!r}")
    assert after.rows[0].text.startswith(" pineapple")
    assert _checksum(smollm) == before
    fig = result.plot()
    assert fig.axes[0].get_ylabel() == "loss"


def test_deep_soft_prompts_start_equal_and_train_further(smollm):
    plain = SoftPrompt.from_text(smollm, "Answer with a fruit.")
    deep = plain.deepen(smollm, [4, 8, 12, 16])
    texts = ["Question: Who are you?\nAnswer:"]
    with torch.no_grad():
        with plain.applied(smollm, texts) as batch:
            a = smollm(batch.tokens, attention_mask=batch.attention_mask)
        with deep.applied(smollm, texts) as batch:
            b = smollm(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    kw = dict(steps=10, lr=0.05, warmup=2, eval_every=5, batch_size=8, seed=0, progress=False)
    shallow_run, deep_run = (
        steer.train_soft_prompt(smollm, plain, SECRET, **kw),
        steer.train_soft_prompt(smollm, deep, SECRET, **kw),
    )
    print(f"validation loss after 10 steps: prompt tuning {shallow_run.best_val_loss:.4f}, "
          f"deep {deep_run.best_val_loss:.4f}")  # fmt: skip
    for run in (shallow_run, deep_run):
        assert run.val_loss[-1][1] < run.val_loss[0][1]  # both keep learning from step 5 to step 10


def test_contrastive_training_raises_the_positive_side(tiny_llama):
    pairs = steer.example_pairs("sentiment")[:12]
    soft = SoftPrompt.from_vocab(tiny_llama, 3, seed=0)
    result = steer.train_soft_prompt(
        tiny_llama, soft, pairs, steps=12, lr=0.3, eval_every=3, patience=10, progress=False
    )
    assert result.best_val_loss < result.val_loss[0][1]


def test_a_nan_loss_stops_training_and_keeps_the_best(tiny_llama):
    calls = {"n": 0}

    def poison(x, state):
        calls["n"] += 1
        return x * float("nan") if calls["n"] > 6 else None

    soft = SoftPrompt.random(tiny_llama, 2)
    with hooks.attach(tiny_llama, [("blocks.0.hook_resid_post", poison)]):
        result = steer.train_soft_prompt(tiny_llama, soft, SECRET[:8], steps=20, eval_every=1, progress=False)
    assert "the loss became nan" in result.stopped or "validation loss nan" in result.stopped
    assert torch.isfinite(result.soft_prompt.embeddings).all()


def test_peft_loads_our_export_and_generates_the_same(smollm, hf_smollm, tmp_path):
    from peft import PeftModel

    soft = SoftPrompt.from_text(smollm, "Always answer in French.")
    folder = soft.to_peft(tmp_path / "adapter", smollm)
    peft_model = PeftModel.from_pretrained(hf_smollm, folder).eval()
    prompt = "The capital of Italy is"  # plain text: no BOS, so both layouts put the virtual tokens first
    ids = smollm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        theirs = peft_model.generate(**ids, max_new_tokens=12, do_sample=False)
    theirs = smollm.tokenizer.decode(theirs[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    ours = steer.generate(smollm, prompt, soft_prompt=soft, compare=False, max_new_tokens=12).rows[0].text
    print(f"steer: {ours!r}\n PEFT: {theirs!r}")
    assert ours == theirs
    back = SoftPrompt.from_peft(folder, smollm)
    assert torch.equal(back.embeddings, soft.embeddings)


def test_files_arithmetic_and_inspection(smollm, sentiment, tmp_path):
    soft = SoftPrompt.from_text(smollm, "happy joyful")
    pieces = [smollm.tokenizer.decode([t]) for t in smollm.tokenizer("happy joyful")["input_ids"]]
    assert [near[0] for near in soft.nearest_tokens(smollm, 2)] == [(p, 1.0) for p in pieces]
    tuned = soft + SoftPrompt.random(smollm, soft.n, seed=3) * 0.1
    path = tmp_path / "soft.safetensors"
    soft.save(path)
    back = SoftPrompt.load(path, smollm)
    assert torch.equal(back.embeddings, soft.embeddings) and torch.equal(back.init, soft.init)
    task = (tuned - soft) * 2
    torch.testing.assert_close(task.embeddings, 0.2 * SoftPrompt.random(smollm, soft.n, seed=3).embeddings)
    trained = SoftPrompt(tuned.embeddings, soft.model_name, soft.d_model, soft.init)
    torch.testing.assert_close(trained.task_vector().embeddings, tuned.embeddings - soft.embeddings)
    effect = soft.as_vector(smollm, ["The film was", "Today I feel"], layers=[6, 10, 12])
    print(f"cosine of the soft prompt's effect with the sentiment vector: {effect.cosine(sentiment)}")
    assert effect.layers == [6, 10, 12]


def test_bad_input_is_refused(smollm, tiny_llama, tmp_path):
    soft = SoftPrompt.random(smollm, 2)
    with pytest.raises(steer.SteerValueError, match="d_model 576"):
        with soft.applied(tiny_llama, "hi"):
            pass
    with pytest.raises(steer.SteerValueError, match="lr"):
        steer.train_soft_prompt(smollm, soft, SECRET, lr=0)
    with pytest.raises(steer.SteerValueError, match="steps"):
        steer.train_soft_prompt(smollm, soft, SECRET, steps=0)
    with pytest.raises(steer.SteerTypeError, match="prompt, completion"):
        steer.train_soft_prompt(smollm, soft, ["just text"] * 4)
    vector_file = tmp_path / "v.safetensors"
    steer.extract(smollm, steer.example_pairs("sentiment")[:4], 3).save(vector_file)
    with pytest.raises(steer.SteerValueError, match="not a steer soft prompt"):
        SoftPrompt.load(vector_file)
    with pytest.raises(steer.SteerValueError, match=r"adapter_config\.json"):
        SoftPrompt.from_peft(tmp_path, smollm)
    _assert_clean(smollm)
    _assert_clean(tiny_llama)


def test_tiny_models_get_a_soft_prompt_after_bos_when_the_tokenizer_adds_one():
    model = steer_model.tiny("gpt2", n_layers=1, d_model=32, n_heads=2)
    soft = SoftPrompt.random(model, 3)
    batch, selectors = soft.tokenize(model, ["hello"])
    bos = model.tokenizer.bos_token_id
    first = model.tokenizer("a")["input_ids"][0]
    assert selectors == [slice(int(first == bos), int(first == bos) + 3)]
    assert batch.tokens.shape[1] == len(model.tokenizer("hello")["input_ids"]) + 3


def test_a_soft_prompt_and_a_steering_vector_compose_in_one_generation(smollm, sentiment):
    soft = SoftPrompt.from_text(smollm, "Describe your day.")
    prompt = "Today I went to the market and"
    alone = steer.generate(smollm, prompt, soft_prompt=soft, compare=False, max_new_tokens=12).rows[0].text
    both = steer.generate(
        smollm, prompt, sentiment.select(10), coeffs=[8.0], soft_prompt=soft, max_new_tokens=12
    )
    print(both)
    assert [r.label for r in both.rows] == ["unsteered", "coeff +8"]
    assert both.rows[1].text != alone and both.rows[0].text != alone


def test_the_evaluation_scores_a_soft_prompt_as_a_hand_loop_does(smollm):
    soft = SoftPrompt.from_text(smollm, "I am cheerful and happy.")
    prompts = ["Today at work I felt", "My weekend was", "The food tasted"]
    behaviour = steer.completion_behaviour(smollm, prompts, [" great"], [" terrible"])
    texts = steer.neutral_text()[:3]
    got = steer.score(smollm, behaviour, soft_prompt=soft, batch_size=2)
    cost = steer.side_effects(smollm, texts=texts, soft_prompt=soft, batch_size=2)
    good, bad = (smollm.tokenizer(w)["input_ids"][0] for w in (" great", " terrible"))
    by_hand, kls, nlls = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            with soft.applied(smollm, prompt) as batch:
                logp = smollm(batch.tokens)[0, -1].log_softmax(-1)
            by_hand.append(float(logp[good] - logp[bad]))
        for text in texts:
            ids = torch.tensor([smollm.tokenizer(text)["input_ids"]])
            n = ids.shape[1]
            plain = smollm(ids)[0, :-1].log_softmax(-1)
            with soft.applied(smollm, text) as batch:
                steered = smollm(batch.tokens)[0, -n:-1].log_softmax(-1)
            kls.append(float((plain.exp() * (plain - steered)).sum(-1).mean()))
            nlls.append(float(-steered.gather(1, ids[0, 1:, None]).mean()))
    assert got.per_item == pytest.approx(by_hand, abs=1e-3)
    assert cost.kl == pytest.approx(sum(kls) / 3, abs=1e-4) and cost.kl > 0.01
    assert cost.perplexity == pytest.approx(torch.tensor(nlls).mean().exp().item(), rel=1e-4)


def test_a_trained_soft_prompt_and_a_steering_vector_compared_by_the_evaluation(smollm, sentiment):
    pairs = steer.example_pairs("sentiment")
    soft = SoftPrompt.from_text(smollm, "Write a sentence.")
    trained = steer.train_soft_prompt(
        smollm, soft, pairs[:24], steps=12, lr=0.1, warmup=2, eval_every=4, progress=False
    ).soft_prompt
    prompts = ["Today at work I felt", "My weekend was", "The food tasted", "The film was"]
    behaviour = steer.completion_behaviour(smollm, prompts, [" great", " good"], [" terrible", " bad"])
    plain = steer.score(smollm, behaviour).mean
    prompted = steer.score(smollm, behaviour, soft_prompt=trained).mean
    with steer.steering(smollm, sentiment, coeff=6.0, layers=[10]):
        steered = steer.score(smollm, behaviour).mean
    cost = steer.side_effects(smollm, steer.Intervention(sentiment, 6.0, [10]))
    soft_cost = steer.side_effects(smollm, soft_prompt=trained)
    print(f"log-odds positive: plain {plain:.2f}, soft prompt {prompted:.2f} (KL {soft_cost.kl:.3f}), "
          f"vector {steered:.2f} (KL {cost.kl:.3f})")  # fmt: skip
    assert prompted > plain and steered > plain
    assert soft_cost.kl > 0 and cost.kl > 0
