"""SteeringVector: arithmetic, files, refusals."""

import json

import pytest
import torch

import steer
from steer.vector import SteeringVector


def make(layers=(1, 2), d=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    fields = {
        "model_name": "m",
        "d_model": d,
        "n_layers": 4,
        "n_pairs": 3,
        "residual_norms": {k: 10.0 for k in layers},
    }
    fields.update(kw)
    return SteeringVector({k: torch.randn(d, generator=g) for k in layers}, **fields)


def test_arithmetic_by_hand():
    a, b = make(seed=1), make(seed=2)
    for layer in (1, 2):
        torch.testing.assert_close((a + b).directions[layer], a.directions[layer] + b.directions[layer])
        torch.testing.assert_close((a - b).directions[layer], a.directions[layer] - b.directions[layer])
        torch.testing.assert_close((2 * a).directions[layer], 2 * a.directions[layer])
        torch.testing.assert_close((a * 0.5).directions[layer], a.directions[layer] / 2)
        torch.testing.assert_close((-a).directions[layer], -a.directions[layer])
        assert a.normalize().norms[layer] == pytest.approx(1.0)
        cos = torch.nn.functional.cosine_similarity(a.directions[layer], b.directions[layer], dim=0)
        assert a.cosine(b)[layer] == pytest.approx(float(cos))
    assert (a + b).method == "(mean_diff) + (mean_diff)" and (a + b).n_pairs == 6
    assert a.select(2).layers == [2] and a.select([2]).residual_norms == {2: 10.0}


def test_arithmetic_refusals():
    a = make()
    with pytest.raises(steer.SteerError, match="different layers"):
        a + make(layers=(1,))
    with pytest.raises(steer.SteerError, match="different spaces"):
        a + make(d=4)
    with pytest.raises(steer.SteerError, match="finite"):
        a * float("nan")
    with pytest.raises(steer.SteerError, match="no layer"):
        a.select(3)


def test_save_load_round_trip_is_exact(tmp_path):
    a = make(positions="last", method="pca")
    path = tmp_path / "v.safetensors"
    a.save(path)
    b = SteeringVector.load(path)
    for field in (
        "model_name",
        "d_model",
        "n_layers",
        "hook",
        "positions",
        "method",
        "n_pairs",
        "residual_norms",
    ):
        assert getattr(a, field) == getattr(b, field)
    assert all(torch.equal(a.directions[k], b.directions[k]) for k in a.layers)
    assert list(tmp_path.iterdir()) == [path]


def test_constructor_refuses_nan_and_bad_layers():
    d = {1: torch.tensor([1.0, float("nan")])}
    with pytest.raises(steer.SteerError, match="NaN"):
        SteeringVector(d, model_name="m", d_model=2, n_layers=4)
    with pytest.raises(steer.SteerError, match=r"outside 0\.\.3"):
        SteeringVector({9: torch.ones(2)}, model_name="m", d_model=2, n_layers=4)
    with pytest.raises(steer.SteerError, match=r"expected \(2,\)"):
        SteeringVector({1: torch.ones(3)}, model_name="m", d_model=2, n_layers=4)
    with pytest.raises(steer.SteerError, match="at least one layer"):
        SteeringVector({}, model_name="m", d_model=2, n_layers=4)


def test_load_refuses_files_that_are_not_vectors(tmp_path, tiny_llama):
    from safetensors.torch import save_file

    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(steer.SteerError, match="not a safetensors file"):
        SteeringVector.load(text)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, other)
    with pytest.raises(steer.SteerError, match="not a steer steering vector"):
        SteeringVector.load(other)
    with pytest.raises(steer.SteerError, match="No such steering vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    # NaN smuggled into a file is refused on load, and the file is left alone.
    nan = tmp_path / "nan.safetensors"
    meta = {
        "model_name": "m",
        "d_model": 2,
        "n_layers": 4,
        "hook": "blocks.{layer}.hook_resid_post",
        "positions": "last",
        "method": "mean_diff",
        "n_pairs": 1,
        "residual_norms": {},
    }
    save_file(
        {"layer.1": torch.tensor([1.0, float("nan")])},
        nan,
        metadata={"format": "steer.steering_vector", "version": "1", "steer": json.dumps(meta)},
    )
    before = nan.read_bytes()
    with pytest.raises(steer.SteerError, match="NaN"):
        SteeringVector.load(nan)
    assert nan.read_bytes() == before


def test_vectors_from_another_model_are_refused(tmp_path, tiny_llama):
    wrong_width = make(d=8)
    path = tmp_path / "v.safetensors"
    wrong_width.save(path)
    with pytest.raises(steer.SteerError, match="d_model 8"):
        SteeringVector.load(path, model=tiny_llama)
    too_deep = make(d=64, layers=(1, 3), n_layers=30)
    with pytest.raises(steer.SteerError, match=r"layer\(s\) \[3\]"):
        too_deep.check_model(tiny_llama)


def test_repr_and_html():
    a = make(layers=(0, 1, 2, 3))
    assert "layers 0-3" in repr(a) and "3 pairs" in repr(a)
    assert "<table>" in a._repr_html_()
