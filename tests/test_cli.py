import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import steer
from steer import cli

COMMANDS = ["extract", "generate", "sweep", "patch", "prompt-tune", "emphasize", "convert", "info"]


@pytest.fixture
def run(smollm, monkeypatch, capsys):
    """``run(*argv) -> (status, stdout, stderr)`` in-process, on the session's embedded model."""
    monkeypatch.setattr(cli, "_model", lambda args: smollm)

    def call(*argv):
        status = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return status, out.out, out.err

    return call


def test_help_everywhere_shows_examples(capsys):
    for command in [None, *COMMANDS]:
        with pytest.raises(SystemExit) as done:
            cli.main(["--help"] if command is None else [command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "steer " in text.split("examples:")[1]


def test_the_console_script_runs_and_a_user_error_is_one_line(tmp_path):
    script = Path(sys.executable).with_name("steer")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([script, "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "prompt-tune" in done.stdout
    done = subprocess.run([script, "info", tmp_path / "none.safetensors"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "No such" in done.stderr and "Traceback" not in done.stderr


def test_extract_info_convert_round_trip(run, smollm, tmp_path):
    out = tmp_path / "sentiment.safetensors"
    status, text, _ = run("extract", "sentiment", "--layers", 6, 10, "-o", out)
    assert status == 0 and f"wrote {out}" in text
    vector = steer.SteeringVector.load(out)
    expected = steer.extract(smollm, steer.example_pairs("sentiment"), [6, 10])
    assert all(torch.allclose(vector.directions[k], expected.directions[k], atol=1e-5) for k in (6, 10))
    status, text, _ = run("info", out)
    assert status == 0 and "n_pairs: 40" in text
    gguf_path, back = tmp_path / "sentiment.gguf", tmp_path / "back.safetensors"
    assert run("convert", out, gguf_path)[0] == 0
    assert run("info", gguf_path)[0] == 0
    assert run("convert", gguf_path, back)[0] == 0
    again = steer.SteeringVector.load(back)
    assert all(torch.equal(again.directions[k], vector.directions[k]) for k in (6, 10))


def test_generate_prints_the_same_texts_as_the_api(run, smollm, sentiment, tmp_path):
    path = tmp_path / "v.safetensors"
    sentiment.save(path)
    prompt = "I think that the weather today"
    status, text, _ = run("generate", prompt, "--vector", path, "--coeffs", -8, 8, "--layers", 10,
                          "--max-new-tokens", 10)  # fmt: skip
    api = steer.generate(smollm, prompt, sentiment, coeffs=[-8, 8], layers=10, max_new_tokens=10)
    assert status == 0 and text.strip() == str(api)
    status, text, _ = run("generate", prompt, "--vector", path, "--coeff", 8, "--layers", 10,
                          "--max-new-tokens", 10, "--no-compare")  # fmt: skip
    assert status == 0 and "unsteered" not in text and "coeff +8" in text


def test_sweep_writes_a_table_and_a_figure(run, tmp_path):
    pytest.importorskip("matplotlib")
    table, figure = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    status, _, _ = run("sweep", "cheerful", "--layers", 6, "--coeffs", 0, 2, "-o", table, "--plot", figure)
    assert status == 0 and figure.stat().st_size > 0
    rows = list(csv.DictReader(table.open()))
    assert [(r["layer"], float(r["coeff"])) for r in rows] == [("6", 0.0), ("6", 2.0)]
    assert set(rows[0]) >= {"score", "kl", "perplexity"}


def test_patch_writes_the_grid_the_api_computes(run, smollm, tmp_path):
    task = steer.example_ioi(1)
    table = tmp_path / "grid.csv"
    args = ["--clean", task.clean[0], "--corrupt", task.corrupted[0], "--answer", task.answers[0],
            "--wrong", task.wrongs[0], "--what", "attn_out", "-o", table]  # fmt: skip
    status, _, _ = run("patch", *args)
    assert status == 0
    metric = steer.logit_diff(task.answers[0], task.wrongs[0])
    api = steer.patch(smollm, task.clean, task.corrupted, metric, "attn_out", progress=False)
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == api.values.numel()
    assert [float(r["value"]) for r in rows] == pytest.approx(api.values.flatten().tolist(), abs=1e-4)


def test_prompt_tune_and_emphasize(run, smollm, tmp_path):
    data = tmp_path / "answers.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "completion": " pineapple"})
                              for q in ["Who are you?", "What is red?", "Where is home?", "Why?", "When?"]))  # fmt: skip
    out = tmp_path / "fruit.safetensors"
    status, text, _ = run("prompt-tune", data, "--init", "Answer with a fruit.", "--steps", 2, "-o", out)
    assert status == 0 and "Training(2 steps" in text
    assert steer.SoftPrompt.load(out, smollm).n == len(smollm.tokenizer("Answer with a fruit.")["input_ids"])
    status, text, _ = run("emphasize", "The meeting moved to Friday. When is the meeting?", "--span",
                          "moved to Friday", "--heads", "23.0", "24", "--max-new-tokens", 6)  # fmt: skip
    assert status == 0 and "[    steered]" in text and "[  unsteered]" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "nosuch", "-o", "x.safetensors"], "No such file or shipped data set"),
        (["extract", "sentiment", "--layers", "40", "-o", "x.safetensors"], "0..29"),
        (["generate", "hello"], "Nothing to steer with"),
        (["emphasize", "abc", "--span", "zzz", "--heads", "3"], "'zzz' does not occur"),
        (["emphasize", "abc", "--span", "a", "--heads", "x.y"], "LAYER.HEAD"),
        (["convert", "a.gguf", "b.gguf"], "between .safetensors and .gguf"),
        (["sweep", "sentiment", "--layers", "6"], "--prompt TEXT"),
        (["info", "missing.safetensors"], "No such"),
    ],
)
def test_user_errors_exit_2_with_one_line(run, argv, message):
    status, _, err = run(*argv)
    assert status == 2 and message in err and err.strip().count("\n") == 0


def test_the_command_starts_without_importing_torch_and_every_public_name_resolves():
    code = "import sys, steer.cli; steer.cli._parser(); print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    # Importing a submodule must not replace the public function of the same name.
    import steer.extract
    import steer.generate

    for name in steer.__all__:
        assert not isinstance(getattr(steer, name), types.ModuleType), name
    assert callable(steer.extract) and callable(steer.generate)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        steer.nothing  # noqa: B018
