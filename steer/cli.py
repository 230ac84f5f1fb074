"""The ``steer`` command: steering vectors, generation, sweeps, patching, soft prompts and attention
steering from a terminal, on the embedded SmolLM2 unless ``--model`` names another.

A user error (a missing file, a layer the model lacks, a span not in the prompt) prints one line
naming the problem and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from steer.errors import SteerError, SteerValueError

EXAMPLES = {
    "steer": """examples:
  steer extract sentiment --layers 6 10 -o sentiment.safetensors
  steer generate "I think that the weather today" --vector sentiment.safetensors --coeffs -8 8 --layers 10
  steer sweep cheerful --layers 3 6 9 --coeffs -2 0 2 -o sweep.csv --plot sweep.png
  steer patch --clean "When Mary and John went to the store, John gave a drink to" \\
      --corrupt "When Mary and John went to the store, Mary gave a drink to" --answer " Mary" --wrong " John"
  steer prompt-tune answers.jsonl --init "Answer with one fruit." -o fruit.safetensors
  steer emphasize "The meeting moved to Friday. When is it?" --span "moved to Friday" --heads 23.0 23.2
  steer convert sentiment.safetensors sentiment.gguf
  steer info sentiment.gguf

DATA arguments are a .jsonl/.csv file or a data set shipped with steer: sentiment, formality (pairs),
cheerful (A/B items).""",
    "extract": """examples:
  steer extract sentiment --layers 6 10 12 -o sentiment.safetensors
  steer extract my_pairs.jsonl --layers 8 --method pca --positions mean -o mine.safetensors
  steer extract cheerful --layers 6 --answer text -o cheerful.safetensors    # from A/B items""",
    "generate": """examples:
  steer generate "I think that the weather today" --vector sentiment.safetensors --coeffs -8 8 --layers 10
  steer generate "Tell me about your day." --chat --vector v.safetensors --coeffs 4 --positions generated
  steer generate "Question: What is two plus two?\\nAnswer:" --soft-prompt fruit.safetensors""",
    "sweep": """examples:
  steer sweep cheerful --layers 3 6 9 --coeffs -2 0 2 -o sweep.csv --plot sweep.png
  steer sweep sentiment --layers 6 10 --prompt "The food was" --positive " great" --negative " awful" """,
    "patch": """examples:
  steer patch --clean "When Mary and John went to the store, John gave a drink to" \\
      --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
      --answer " Mary" --wrong " John" --what resid_pre -o grid.csv --plot grid.png
  steer patch --clean ... --corrupt ... --answer ... --wrong ... --what head --method attribution""",
    "prompt-tune": """examples:
  steer prompt-tune answers.jsonl --init "Answer with one fruit." --steps 40 -o fruit.safetensors
  steer prompt-tune sentiment --tokens 8 --steps 30 -o positive.safetensors --plot loss.png
DATA holds {"prompt": ..., "completion": ...} rows (language-model loss on the completion) or
contrastive pairs (raise the positive side over the negative).""",
    "emphasize": """examples:
  steer emphasize "The meeting was planned for Monday, but it was moved to Friday. On which day is the \\
meeting?" --chat --span "moved to Friday" --heads 23.0 23.2 24.5 --alpha 0.01
  --heads takes LAYER.HEAD pairs or whole LAYERs.""",
    "convert": """examples:
  steer convert sentiment.safetensors sentiment.gguf     # for llama.cpp --control-vector / repeng
  steer convert from-llama-cpp.gguf vector.safetensors   # a file steer did not write needs the model""",
    "info": """examples:
  steer info sentiment.safetensors
  steer info sentiment.gguf""",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except SteerError as err:
        print(f"steer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="steer",
        description="Activation steering for language models on TransformerLens.",
        epilog=EXAMPLES["steer"],
        formatter_class=raw,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, run) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=summary, description=summary, epilog=EXAMPLES[name], formatter_class=raw
        )
        p.set_defaults(run=run)
        return p

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="a .gguf file, a Hugging Face folder or name (default: SmolLM2-135M)")
        p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

    p = command("extract", "Extract a steering vector from contrastive pairs.", _extract)
    p.add_argument("data", metavar="DATA", help="pairs or A/B items: a file or a shipped set")
    p.add_argument("--layers", type=int, nargs="+", help="layers to read (default: all)")
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    p.add_argument("--hook", default="resid_post", help="resid_pre, resid_mid or resid_post")
    p.add_argument("--positions", default="last", help="last, mean, or a token index")
    p.add_argument("--answer", default="letter", choices=["letter", "text"], help="for A/B items")
    p.add_argument("-o", "--output", required=True, help="the .safetensors (or .gguf) file to write")
    model_options(p)

    p = command("generate", "Generate text, steered next to unsteered.", _generate)
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--vector", help="a steering vector file (.safetensors or .gguf)")
    p.add_argument("--coeffs", type=float, nargs="+", default=[4.0], help="one row per coefficient")
    p.add_argument("--layers", type=int, nargs="+", help="the vector's layers to use (default: all)")
    p.add_argument("--positions", default="all", help="all, prompt, generated, last, or a token index")
    p.add_argument("--soft-prompt", help="a soft prompt file to apply")
    p.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=True, help="show the unsteered text too"
    )
    _generation_options(p)
    model_options(p)

    p = command("sweep", "Score a layer x coefficient grid of a behaviour and its side-effect cost.", _sweep)
    p.add_argument("data", metavar="DATA", help="A/B items (or pairs with --prompt/--positive/--negative)")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--coeffs", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0, 4.0])
    p.add_argument("--vector", help="a vector file; default: extracted from a training split of DATA")
    p.add_argument("--answer", default="text", choices=["letter", "text"], help="for A/B items")
    p.add_argument("--prompt", action="append", help="with pairs: a prompt to score (repeatable)")
    p.add_argument("--positive", action="append", help="with pairs: a completion showing the behaviour")
    p.add_argument("--negative", action="append", help="with pairs: a completion not showing it")
    p.add_argument("-o", "--output", help="results as CSV")
    p.add_argument("--plot", help="a heat map figure (.png, .pdf, ...)")
    model_options(p)

    p = command("patch", "Activation patching between a clean and a corrupted prompt.", _patch)
    p.add_argument("--clean", action="append", required=True, help="clean prompt (repeatable)")
    p.add_argument("--corrupt", action="append", required=True, help="corrupted prompt, one per clean")
    p.add_argument(
        "--answer", action="append", required=True, help="the clean answer token (one or per prompt)"
    )
    p.add_argument("--wrong", action="append", required=True, help="the corrupted answer token")
    p.add_argument(
        "--what", default="resid_pre", help="resid_pre, resid_mid, resid_post, attn_out, mlp_out, head, ..."
    )
    p.add_argument("--method", default="exact", choices=["exact", "attribution"])
    p.add_argument("-o", "--output", help="the grid as CSV")
    p.add_argument("--plot", help="a heat map figure")
    model_options(p)

    p = command("prompt-tune", "Train a soft prompt on a frozen model.", _prompt_tune)
    p.add_argument("data", metavar="DATA", help="prompt/completion rows or pairs: a file or a shipped set")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init", help="initialise from this text's token embeddings")
    init.add_argument("--tokens", type=int, default=8, help="or this many sampled vocabulary tokens")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--plot", help="a loss curve figure")
    model_options(p)

    p = command(
        "emphasize", "Generate with chosen attention heads emphasising spans of the prompt.", _emphasize
    )
    p.add_argument("prompt")
    p.add_argument("--span", action="append", required=True, help="a substring to emphasise (repeatable)")
    p.add_argument("--heads", nargs="+", required=True, help="LAYER.HEAD pairs or LAYERs")
    p.add_argument("--alpha", type=float, default=0.01, help="factor on attention elsewhere (default 0.01)")
    _generation_options(p)
    model_options(p)

    p = command("convert", "Convert a steering vector between steer's .safetensors and GGUF.", _convert)
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--coeff", type=float, default=1.0, help="strength baked into a GGUF file")
    model_options(p)

    p = command("info", "Describe a vector, soft prompt or control vector file.", _info)
    p.add_argument("file")
    return parser


def _generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, help="seed for sampling")


# --- commands -------------------------------------------------------------------------------------


def _extract(args) -> None:
    import steer

    kind, data = _data(args.data)
    model = _model(args)
    pairs = steer.ab_pairs(model, data, answer=args.answer) if kind == "items" else data
    vector = steer.extract(
        model, pairs, args.layers, method=args.method, positions=_position(args.positions), hook=args.hook
    )
    _write_vector(vector, args.output)
    print(f"{vector!r}\nwrote {args.output}")


def _generate(args) -> None:
    import steer

    model = _model(args)
    items, kw = [], {}
    if args.vector:
        items.append(_read_vector(args.vector, model))
        kw = dict(coeffs=args.coeffs, layers=args.layers, positions=_position(args.positions))
    soft = steer.SoftPrompt.load(args.soft_prompt, model) if args.soft_prompt else None
    if not items and soft is None:
        raise SteerValueError("Nothing to steer with: give --vector FILE and/or --soft-prompt FILE.")
    out = steer.generate(
        model, args.prompt, *items, soft_prompt=soft, compare=args.compare, **kw, **_gen_kwargs(args)
    )
    print(out)


def _sweep(args) -> None:
    import steer

    kind, data = _data(args.data)
    model = _model(args)
    if kind == "items":
        train, test = steer.split(data, 0.3, seed=0)
        behaviour = steer.ab_behaviour(model, test, answer=args.answer)
        pairs = steer.ab_pairs(model, train, answer=args.answer)
    else:
        if not (args.prompt and args.positive and args.negative):
            raise SteerValueError(
                "Sweeping with pairs needs what to score: --prompt TEXT --positive ' word' --negative "
                "' word' (each repeatable), or give A/B items (e.g. 'cheerful')."
            )
        behaviour = steer.completion_behaviour(model, args.prompt, args.positive, args.negative)
        pairs = data
    vector = _read_vector(args.vector, model) if args.vector else steer.extract(model, pairs, args.layers)
    grid = steer.sweep(model, behaviour, vector, args.layers, args.coeffs)
    print(grid)
    if args.output:
        _write_csv(args.output, grid.records())
    if args.plot:
        _save(grid.plot("heatmap"), args.plot)


def _patch(args) -> None:
    import steer

    model = _model(args)
    metric = steer.logit_diff(_one_or_all(args.answer), _one_or_all(args.wrong))
    run = steer.patch if args.method == "exact" else steer.attribution_patch
    result = run(model, args.clean, args.corrupt, metric, args.what)
    print(result)
    if args.output:
        _write_csv(args.output, result.records())
    if args.plot:
        _save(result.plot(), args.plot)


def _prompt_tune(args) -> None:
    import steer

    rows = _rows(args.data)
    model = _model(args)
    soft = (
        steer.SoftPrompt.from_text(model, args.init)
        if args.init
        else steer.SoftPrompt.from_vocab(model, args.tokens)
    )
    result = steer.train_soft_prompt(
        model, soft, rows, steps=args.steps, lr=args.lr, batch_size=args.batch_size
    )
    result.soft_prompt.save(args.output)
    print(f"{result!r}\nwrote {args.output}")
    if args.plot:
        _save(result.plot(), args.plot)


def _emphasize(args) -> None:
    import steer

    emphasis = steer.Emphasis(args.span, [_head(text) for text in args.heads], args.alpha)
    model = _model(args)
    print(steer.generate(model, args.prompt, emphasis, **_gen_kwargs(args)))


def _convert(args) -> None:
    source, target = Path(args.source), Path(args.target)
    kinds = {source.suffix.lower(), target.suffix.lower()}
    if kinds != {".safetensors", ".gguf"}:
        raise SteerValueError(
            f"convert goes between .safetensors and .gguf; got {source.name} -> {target.name}."
        )
    model = _model(args) if args.model else None
    vector = _read_vector(source, model)
    _write_vector(vector, target, coeff=args.coeff)
    print(f"{vector!r}\nwrote {target}")


def _info(args) -> None:
    import steer
    from steer.vector import read_file

    path = Path(args.file)
    if path.suffix.lower() == ".gguf":
        print(repr(steer.read_control_vector(path)))
        return
    header, _ = read_file(path, "steer")
    kind = header.get("format", "")
    if kind == "steer.soft_prompt":
        print(repr(steer.SoftPrompt.load(path)))
    elif kind == "steer.steering_vector":
        print(repr(steer.SteeringVector.load(path)))
    else:
        raise SteerValueError(f"{path} is a safetensors file but not one steer wrote (format {kind!r}).")
    meta = json.loads(header.get("steer", "{}"))
    for key, value in meta.items():
        if not isinstance(value, (dict, list)):
            print(f"  {key}: {value}")


# --- helpers --------------------------------------------------------------------------------------


def _model(args):
    from steer.model import load_model

    return load_model(args.model, device=args.device)


def _data(name: str) -> tuple[str, list]:
    """``("pairs" | "items", data)`` from a file or a shipped set."""
    import steer

    path = Path(name)
    if path.is_file():
        first = _first_row(path)
        if "question" in first:
            lines = path.read_text(encoding="utf-8").splitlines()
            return "items", steer.ab_items(json.loads(line) for line in lines if line.strip())
        return "pairs", steer.load_pairs(path)
    if name == "cheerful":
        return "items", steer.example_ab_items(name)
    if name in ("sentiment", "formality"):
        return "pairs", steer.example_pairs(name)
    raise SteerValueError(
        f"No such file or shipped data set: {name!r}. Shipped: sentiment, formality (pairs), cheerful "
        "(A/B items); files are .jsonl or .csv."
    )


def _rows(name: str) -> list:
    """Prompt-tuning data: prompt/completion rows, or contrastive pairs."""
    path = Path(name)
    if path.is_file() and "prompt" in _first_row(path):
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kind, data = _data(name)
    if kind == "items":
        raise SteerValueError("prompt-tune takes prompt/completion rows or pairs, not A/B items.")
    return data


def _first_row(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return next(csv.DictReader(text.splitlines()), {})
    if path.suffix != ".jsonl":
        raise SteerValueError(f"{path} is neither .jsonl nor .csv; data files are one of those.")
    line = next((line for line in text.splitlines() if line.strip()), "{}")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise SteerValueError(f"{path}: the first line is not JSON ({err.msg}).") from None
    if not isinstance(row, dict):
        raise SteerValueError(f"{path}: each line should be a JSON object.")
    return row


def _read_vector(path, model=None):
    import steer

    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return steer.read_control_vector(path, model)
    return steer.SteeringVector.load(path, model)


def _write_vector(vector, path, coeff: float = 1.0) -> None:
    import steer

    if Path(path).suffix.lower() == ".gguf":
        steer.write_control_vector(vector, path, coeff=coeff)
    elif coeff != 1.0:
        raise SteerValueError("--coeff applies to GGUF output only; a .safetensors vector stores directions.")
    else:
        vector.save(path)


def _position(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def _head(text: str):
    try:
        if "." in text:
            layer, head = text.split(".")
            return int(layer), int(head)
        return int(text)
    except ValueError:
        raise SteerValueError(f"--heads takes LAYER.HEAD or LAYER, e.g. 23.0 or 14; got {text!r}.") from None


def _one_or_all(values: list[str]):
    return values[0] if len(values) == 1 else values


def _gen_kwargs(args) -> dict:
    return dict(chat=args.chat, max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed)


def _write_csv(path: str, records: list[dict]) -> None:
    if not records:
        raise SteerValueError("Nothing to write: the result has no rows.")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(f"wrote {path}")


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
