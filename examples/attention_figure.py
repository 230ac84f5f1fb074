"""`make figures`: attention steering on the embedded SmolLM2, a schedule-change task.

"The meeting was planned for Monday, but it was moved to Friday. On which day is the meeting?" with the
assistant's answer begun as "The meeting is on"; metric the logit difference of the new day over the old.
Heads are profiled on four such prompts with "moved to <day>" emphasised, the best five steer held-out
prompts. Writes docs/attention_profile.png and docs/attention_maps.png.
"""

import sys
from pathlib import Path

import torch

import steer

TRAIN = [
    ("meeting", "Monday", "Friday"),
    ("party", "Tuesday", "Sunday"),
    ("exam", "Thursday", "Monday"),
    ("dinner", "Saturday", "Wednesday"),
]
HELD_OUT = [
    ("concert", "Monday", "Thursday"),
    ("flight", "Friday", "Tuesday"),
    ("game", "Sunday", "Wednesday"),
]


def task(model, items):
    """Questions, chat prompts with the answer begun, the spans to emphasise, and the metric."""
    question = "The {0} was planned for {1}, but it was moved to {2}. On which day is the {0}?"
    questions = [question.format(*item) for item in items]
    prompts = [
        steer.chat_prompt(model, q, assistant=f"The {item[0]} is on") for q, item in zip(questions, items)
    ]
    spans = [[f"moved to {new}"] for *_, new in items]
    metric = steer.logit_diff([f" {new}" for *_, new in items], [f" {old}" for _, old, _ in items])
    return questions, prompts, spans, metric


def logit_diff(model, prompts, metric, emphasis=None):
    batch = steer.tokenize(model, prompts)
    new = [model.tokenizer(a)["input_ids"][0] for a in metric.answer]
    old = [model.tokenizer(w)["input_ids"][0] for w in metric.wrong]
    with torch.no_grad():
        if emphasis is None:
            logits = model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
        else:
            with emphasis.applied(model, prompts) as b:
                logits = model(b.tokens, attention_mask=b.attention_mask)[:, -1]
    rows = torch.arange(len(prompts))
    return (logits[rows, new] - logits[rows, old]).tolist()


out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
out.mkdir(parents=True, exist_ok=True)
model = steer.load_model()
_, prompts, spans, metric = task(model, TRAIN)
profile = steer.profile_heads(model, prompts, spans, metric)
print(profile)
heads = profile.heads(5)
print("heads:", heads)
questions, held, held_spans, held_metric = task(model, HELD_OUT)
emphasis = steer.Emphasis(held_spans, heads, alpha=0.01)
before, after = logit_diff(model, held, held_metric), logit_diff(model, held, held_metric, emphasis)
for (thing, *_), b, a in zip(HELD_OUT, before, after):
    print(f"held out {thing}: logit diff new - old day {b:+.2f} -> {a:+.2f}")
print(steer.generate(model, questions, emphasis, chat=True, max_new_tokens=20))
profile.plot().savefig(out / "attention_profile.png", dpi=100)
layer, head = heads[0]
maps = steer.attention_maps(
    model, held[0], emphasis=steer.Emphasis([held_spans[0]], heads), layer=layer, head=head
)
print("attention mass on the span, L{}.H{}: {:.2f} -> {:.2f}".format(layer, head, *maps.span_mass()))
maps.plot().savefig(out / "attention_maps.png", dpi=80)
print(f"wrote {out / 'attention_profile.png'} and {out / 'attention_maps.png'}")
