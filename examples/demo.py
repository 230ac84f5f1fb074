"""`make demo`: the embedded SmolLM2 answers a question, then writes steered and unsteered side by side."""

import steer

model = steer.load_model()

question = "What is the capital of France?"
answer = steer.generate(model, question, chat=True, max_new_tokens=30)
print(f"User: {question}\nSmolLM2: {answer.text(0, steered=False).strip()}\n")

pairs = steer.example_pairs("sentiment")
vector = steer.extract(model, pairs, layers=10)
print(f"{vector}\n")
prompts = ["I think that the weather today", "My opinion of the new film is"]
print(steer.generate(model, prompts, vector, coeffs=[-8.0, 8.0], max_new_tokens=24))
