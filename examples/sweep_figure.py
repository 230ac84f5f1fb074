"""`make figures`: a real layer x coefficient sweep on the embedded SmolLM2, drawn as a heat map and curves.

The behaviour: our 50 A/B items "answers cheerfully rather than gloomily", scored on a held-out 30% by the
probability of the cheerful answer's text; vectors from the other 70% at five layers; the side-effect cost
is the KL divergence on the shipped neutral text. Writes docs/sweep_heatmap.png and docs/sweep_curves.png.
"""

import sys
from pathlib import Path

import steer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
out.mkdir(parents=True, exist_ok=True)
model = steer.load_model()
train, test = steer.split(steer.example_ab_items("cheerful"), 0.3, seed=0)
vector = steer.extract(model, steer.ab_pairs(model, train, answer="text"), [3, 6, 9, 12, 15])
grid = steer.sweep(model, steer.ab_behaviour(model, test, answer="text"), vector, coeffs=[-2, -1, -0.5, 0, 0.5, 1, 2])
print(grid)
best = grid.best(kl_max=0.3)
print(f"best under KL 0.3: layer {best.layer}, coeff {best.coeff:+g}, score {best.score:.3f} (unsteered {grid.baseline:.3f})")
grid.plot("heatmap", kl_max=0.3).savefig(out / "sweep_heatmap.png", dpi=110)
grid.plot("curves").savefig(out / "sweep_curves.png", dpi=110)
print(f"wrote {out / 'sweep_heatmap.png'} and {out / 'sweep_curves.png'}")
