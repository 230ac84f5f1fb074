"""`make figures`: activation patching on the embedded SmolLM2, an indirect-object task.

Eight prompts like "When Mary and John went to the store, John gave a drink to" (-> " Mary"), corrupted by
repeating the other name (-> " John"); metric the logit difference of the two names, normalised 0 =
corrupted, 1 = clean. Exact and attribution grids of the residual stream (resid_pre, layer x position)
side by side, and the exact head grid. Writes docs/patching_ioi.png.
"""

import sys
from pathlib import Path

import matplotlib.pyplot as plt

import steer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
out.mkdir(parents=True, exist_ok=True)
model = steer.load_model()
task = steer.example_ioi(8)
metric = steer.logit_diff(task.answers, task.wrongs)
exact = steer.patch(model, task.clean, task.corrupted, metric, "resid_pre")
estimate = steer.attribution_patch(model, task.clean, task.corrupted, metric, "resid_pre")
heads = steer.patch(model, task.clean, task.corrupted, metric, "head")
print(exact)
print(heads)
print(f"attribution vs exact (resid_pre): correlation {estimate.correlation(exact):.3f}")
fig, axes = plt.subplots(1, 3, figsize=(17, 6.5), gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
for result, ax in zip((exact, estimate, heads), axes):
    result.plot(ax=ax)
fig.suptitle(
    f"{task.clean[0]!r} -> {task.answers[0]!r} (8 prompts; corrupted: {task.corrupted[0]!r})", fontsize=10
)
fig.tight_layout()
fig.savefig(out / "patching_ioi.png", dpi=100)
print(f"wrote {out / 'patching_ioi.png'}")
