import gguf
import numpy as np
import pytest
import torch

import steer
from steer import model as steer_model
from steer.errors import SteerValueError
from steer.interop import read_control_vector, write_control_vector


def _fields(reader):
    out = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode()
        elif field.types:
            out[name] = field.parts[field.data[0]].tolist()[0]
    return out


def test_export_reads_back_identically_with_the_gguf_package(sentiment, tmp_path):
    path = tmp_path / "sentiment.gguf"
    write_control_vector(sentiment, path)
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 3
    assert sorted(t.name for t in reader.tensors) == ["direction.10", "direction.12", "direction.6"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [576]
        layer = int(tensor.name.split(".")[1])
        assert np.array_equal(np.asarray(tensor.data), sentiment.directions[layer].numpy())
    back = read_control_vector(path)
    assert back.layers == sentiment.layers and back.hook == sentiment.hook
    assert all(torch.equal(back.directions[k], sentiment.directions[k]) for k in sentiment.layers)
    assert (back.model_name, back.method, back.n_pairs, back.positions) == (
        sentiment.model_name, sentiment.method, sentiment.n_pairs, sentiment.positions
    )  # fmt: skip
    assert back.residual_norms == pytest.approx(sentiment.residual_norms)


def test_a_coefficient_is_baked_into_the_file_and_divided_back_out(sentiment, tmp_path):
    path = tmp_path / "doubled.gguf"
    write_control_vector(sentiment, path, coeff=2.0)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "direction.6")
    assert np.array_equal(np.asarray(tensor.data), 2.0 * sentiment.directions[6].numpy())
    assert torch.equal(read_control_vector(path).directions[6], sentiment.directions[6])


def test_resid_pre_maps_to_the_previous_blocks_output_and_steers_the_same(tiny_llama, tmp_path):
    pairs = steer.example_pairs("sentiment")[:8]
    pre = steer.extract(tiny_llama, pairs, [2], hook="resid_pre")
    path = tmp_path / "pre.gguf"
    write_control_vector(pre, path)
    assert [t.name for t in gguf.GGUFReader(path).tensors] == ["direction.1"]
    assert read_control_vector(path).hook == pre.hook  # steer's own file keeps its hook point

    foreign = tmp_path / "foreign.gguf"  # as llama.cpp's tools write it: no steer metadata
    writer = gguf.GGUFWriter(foreign, "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.1", pre.directions[2].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SteerValueError, match="pass the model"):
        read_control_vector(foreign)
    post = read_control_vector(foreign, tiny_llama)
    assert post.hook == "blocks.{layer}.hook_resid_post" and post.layers == [1]

    tokens = steer.tokenize(tiny_llama, ["I think the film was", "a b"])
    with torch.no_grad():
        with steer.steering(tiny_llama, pre, coeff=3.0):
            at_pre = tiny_llama(tokens.tokens, attention_mask=tokens.attention_mask)
        with steer.steering(tiny_llama, post, coeff=3.0):
            at_post = tiny_llama(tokens.tokens, attention_mask=tokens.attention_mask)
        plain = tiny_llama(tokens.tokens, attention_mask=tokens.attention_mask)
    assert torch.equal(at_pre, at_post) and not torch.equal(at_pre, plain)


def test_points_llama_cpp_cannot_take_are_refused(tiny_llama, tmp_path):
    pairs = steer.example_pairs("sentiment")[:8]
    path = tmp_path / "v.gguf"
    cases = [
        (steer.extract(tiny_llama, pairs, [0, 1]), "direction.0"),
        (steer.extract(tiny_llama, pairs, [1], hook="resid_pre"), "direction.0"),
        (steer.extract(tiny_llama, pairs, [1], hook="resid_mid"), "not a block's output"),
    ]
    for vector, message in cases:
        with pytest.raises(SteerValueError, match=message):
            write_control_vector(vector, path)
        assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(SteerValueError, match=r"\.gguf"):
        write_control_vector(cases[0][0].select([1]), tmp_path / "v.safetensors")


def test_wrong_files_are_refused(smollm, sentiment, tmp_path):
    saved = tmp_path / "v.safetensors"
    sentiment.save(saved)
    with pytest.raises(SteerValueError, match="not a GGUF file"):
        read_control_vector(saved)
    with pytest.raises(SteerValueError, match="architecture 'llama', not a control vector"):
        read_control_vector(steer_model.embedded_gguf_path())
    with pytest.raises(SteerValueError, match="No such"):
        read_control_vector(tmp_path / "missing.gguf")
    path = tmp_path / "v.gguf"
    write_control_vector(sentiment, path)
    other = steer_model.tiny("llama", n_layers=3, d_model=64, n_heads=4, seed=0)
    with pytest.raises(SteerValueError, match="d_model"):
        read_control_vector(path, other)
    assert read_control_vector(path, smollm).layers == [6, 10, 12]
