"""`make demo`: load the embedded SmolLM2 and answer a chat question, greedily."""

import steer

model = steer.load_model()
question = "What is the capital of France?"
batch = steer.tokenize(model, steer.chat_prompt(model, question))
out = model.generate(
    batch.tokens,
    attention_mask=batch.attention_mask,
    max_new_tokens=40,
    do_sample=False,
    return_type="tokens",
    verbose=False,
)
answer = model.tokenizer.decode(out[0, batch.tokens.shape[1] :], skip_special_tokens=True)
print(f"User: {question}\nSmolLM2: {answer.strip()}")
