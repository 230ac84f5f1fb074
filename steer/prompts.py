"""Text in, token batches out: chat formatting and padding-aware tokenization.

BOS policy (one rule, applied everywhere in steer): text is tokenized exactly as the model's own
Hugging Face tokenizer tokenizes it with ``add_special_tokens=True``; steer never adds a BOS of its
own. For SmolLM2 that means plain text starts with its first word, and chat prompts start with
``<|im_start|>``, which is that model's BOS token, because the chat template writes it. Models whose
tokenizer adds a BOS (Llama 2/3, Gemma) get it as their tokenizer gives it. ``load_model`` sets the
bridge's ``default_prepend_bos`` to match, so ``model.to_tokens(text)`` agrees with ``tokenize``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from steer.errors import SteerTypeError, SteerValueError


@dataclass(frozen=True)
class Tokens:
    """A padded batch of token ids.

    tokens: ``[batch, pos]`` int64 ids; pads sit on ``padding_side``.
    attention_mask: ``[batch, pos]`` int64, 1 on real tokens, 0 on pads.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    padding_side: str

    @property
    def lengths(self) -> torch.Tensor:
        """``[batch]`` number of real tokens per row."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> Tokens:
        return Tokens(self.tokens.to(device), self.attention_mask.to(device), self.padding_side)


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise SteerTypeError(
            f"Expected a model from steer.load_model or a Hugging Face tokenizer, got "
            f"{type(model_or_tokenizer).__name__}."
        )
    return tokenizer


def tokenize(model_or_tokenizer: Any, texts: str | Sequence[str], *, padding_side: str = "left") -> Tokens:
    """Tokenize one text or a batch, padded on ``padding_side``, following the BOS policy above.

    Left padding (the default) keeps every row's last real token in the last column, which is what
    generation needs; right padding keeps every row's first token in column 0.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if padding_side not in ("left", "right"):
        raise SteerValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not batch:
        raise SteerValueError("No texts to tokenize: pass at least one string.")
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise SteerTypeError(f"Text {i} is a {type(text).__name__}, not a str.")
    ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in batch]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise SteerValueError(f"Texts {empty} tokenize to nothing; give each text at least one character.")
    if tokenizer.pad_token_id is None:
        raise SteerValueError(
            "The tokenizer has no pad token; load the model with steer.load_model, which sets one."
        )
    return pad(ids, tokenizer.pad_token_id, padding_side)


def pad(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left") -> Tokens:
    """Token id lists as one padded batch with its attention mask."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Tokens(tokens, mask, padding_side)


def chat_prompt(
    model_or_tokenizer: Any,
    user: str,
    *,
    system: str | None = None,
    assistant: str | None = None,
) -> str:
    """Format one user turn with the model's chat template, ready for the assistant to answer.

    ``system`` adds a system message (otherwise the template's default, if any, applies).
    ``assistant`` starts the assistant's answer, so generation continues from it, e.g. ``"(A"``
    or ``"Sure, "``.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise SteerValueError("This tokenizer has no chat template; format the prompt as plain text instead.")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + (assistant or "")


@dataclass(frozen=True)
class ContrastivePair:
    """Two texts that differ in the concept to extract: ``positive`` has it, ``negative`` has its opposite.

    read: where to read each text. ``None`` uses the extractor's ``positions``; an int is a token index
        (negative counts from the end, ``-1`` the last token); a slice averages those tokens; a str is a
        substring of both texts whose tokens are averaged (its last occurrence).
    """

    positive: str
    negative: str
    read: int | str | slice | None = None


def pairs_from(data: Iterable[Any]) -> list[ContrastivePair]:
    """Pairs from ``ContrastivePair`` objects, ``(positive, negative)`` tuples or dicts with those keys."""
    pairs = []
    for i, item in enumerate(data):
        if isinstance(item, ContrastivePair):
            pair = item
        elif isinstance(item, dict):
            missing = {"positive", "negative"} - item.keys()
            if missing:
                raise SteerValueError(
                    f"Pair {i} lacks {sorted(missing)}; each pair needs 'positive' and 'negative'."
                )
            pair = ContrastivePair(item["positive"], item["negative"], _read_value(item.get("read")))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            pair = ContrastivePair(*item)
        else:
            raise SteerTypeError(f"Pair {i} is a {type(item).__name__}; use (positive, negative) or a dict.")
        if not isinstance(pair.positive, str) or not isinstance(pair.negative, str):
            raise SteerTypeError(f"Pair {i}'s texts must be strings.")
        if pair.positive == pair.negative:
            raise SteerValueError(
                f"Pair {i} has the same text on both sides ({pair.positive[:60]!r}), so it carries no contrast; "
                "fix or drop it."
            )
        pairs.append(pair)
    if not pairs:
        raise SteerValueError("The pair list is empty; give at least one (positive, negative) pair.")
    return pairs


def load_pairs(path: str | os.PathLike) -> list[ContrastivePair]:
    """Pairs from a ``.jsonl`` file (one object per line) or a ``.csv`` file with a header row.

    Both use the fields ``positive``, ``negative`` and optionally ``read``.
    """
    path = Path(path)
    if not path.is_file():
        raise SteerValueError(f"No such pair file: {path}.")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SteerValueError(f"{path}:{n} is not valid JSON: {err.msg}.") from None
        return pairs_from(rows)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return pairs_from(csv.DictReader(f))
    raise SteerValueError(f"{path} is neither .jsonl nor .csv; pair files use one of those.")


def example_pairs(name: str) -> list[ContrastivePair]:
    """A small pair set shipped with steer: ``"sentiment"`` or ``"formality"``."""
    with resources.as_file(_data_file(name, ".jsonl", exclude="_ab")) as real:
        return load_pairs(real)


@dataclass(frozen=True)
class ABItem:
    """A multiple-choice behaviour question (CAA format): the question lists the choices; ``matching`` is
    the letter of the answer showing the behaviour, ``not_matching`` the other one."""

    question: str
    matching: str
    not_matching: str

    def choice(self, letter: str) -> str:
        """The text of choice ``letter``, from the question's ``(A) ...`` lines."""
        match = re.search(rf"^\s*\({re.escape(letter)}\)\s*(.+?)\s*$", self.question, re.MULTILINE)
        if match is None:
            raise SteerValueError(
                f"The question does not list a choice '({letter}) ...' on its own line, so its text is unknown: "
                f"{self.question[:80]!r}."
            )
        return match.group(1)


def ab_items(items: Iterable[Any]) -> list[ABItem]:
    """A/B items from ``ABItem`` objects or CAA dicts ``{"question", "answer_matching_behavior": "(A)",
    "answer_not_matching_behavior": "(B)"}``."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, ABItem):
            out.append(item)
            continue
        try:
            question = item["question"]
            yes, no = item["answer_matching_behavior"], item["answer_not_matching_behavior"]
        except (KeyError, TypeError):
            raise SteerValueError(
                f"A/B item {i} needs 'question', 'answer_matching_behavior' and 'answer_not_matching_behavior'."
            ) from None
        yes, no = _letter(yes), _letter(no)
        if yes == no:
            raise SteerValueError(f"A/B item {i} gives the same answer letter {yes!r} on both sides.")
        out.append(ABItem(question, yes, no))
    if not out:
        raise SteerValueError("The item list is empty; give at least one A/B item.")
    return out


def example_ab_items(name: str = "cheerful") -> list[ABItem]:
    """A/B items shipped with steer: ``"cheerful"`` (answers cheerfully rather than gloomily; 50 items,
    the matching letter alternating between A and B)."""
    path = _data_file(f"{name}_ab", ".jsonl")
    with resources.as_file(path) as real:
        lines = real.read_text(encoding="utf-8").splitlines()
    return ab_items(json.loads(line) for line in lines if line.strip())


def ab_pairs(
    model_or_tokenizer: Any, items: Iterable[Any], *, system: str | None = None, answer: str = "letter"
) -> list[ContrastivePair]:
    """A/B items as chat-formatted contrastive pairs.

    ``answer="letter"`` (CAA): the question followed by the start of the matching answer, ``"(A"``, versus
    the other letter, both read at the letter. ``answer="text"``: the question followed by the text of the
    matching choice versus the other choice, each read as the mean over the answer's tokens; for models
    too small to tie letters to choices.
    """
    pairs = []
    for item in ab_items(items):
        if answer == "letter":
            prompt = chat_prompt(model_or_tokenizer, item.question, system=system, assistant="(")
            pairs.append(ContrastivePair(prompt + item.matching, prompt + item.not_matching, read=-1))
        elif answer == "text":
            prompt = chat_prompt(model_or_tokenizer, item.question, system=system)
            yes, no = item.choice(item.matching), item.choice(item.not_matching)
            answer_start = _n_tokens(model_or_tokenizer, prompt)
            pairs.append(ContrastivePair(prompt + yes, prompt + no, read=slice(answer_start, None)))
        else:
            raise SteerValueError(f"answer must be 'letter' or 'text', got {answer!r}.")
    return pairs_from(pairs)


@dataclass(frozen=True)
class PatchingPrompts:
    """Clean and corrupted prompts, pair by pair the same token length, with the next tokens that tell
    them apart: ``answers[i]`` is right after ``clean[i]``, ``wrongs[i]`` after ``corrupted[i]``."""

    clean: list[str]
    corrupted: list[str]
    answers: list[str]
    wrongs: list[str]


IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {b} gave a {thing} to",
    "Then, {a} and {b} were working at the {place}. After a long and busy day, {b} gave the {thing} to",
)
_IOI_NAMES = "Mary John Tom Anna James Sarah David Paul Mark Peter Alice Chris Jane Daniel Adam Sam".split()
_IOI_PLACES = "store park school beach office station market library garden hospital".split()
_IOI_THINGS = "drink book ball letter gift pen ticket cake key bag".split()


def example_ioi(n: int = 8, *, template: int = 0, seed: int = 0) -> PatchingPrompts:
    """An indirect-object task: "When Mary and John went to the store, John gave a drink to" -> " Mary".

    The corrupted prompt repeats the other name ("..., Mary gave a drink to"), which turns the answer
    into " John". Names, places and things are single tokens for SmolLM2's tokenizer, so every prompt
    of one ``template`` (an index into ``IOI_TEMPLATES``) has the same length. Seeded, deterministic.
    """
    if n < 1 or not 0 <= template < len(IOI_TEMPLATES):
        raise SteerValueError(f"example_ioi needs n >= 1 and template in 0..{len(IOI_TEMPLATES) - 1}.")
    rng = random.Random(seed)
    text = IOI_TEMPLATES[template]
    clean, corrupted, answers, wrongs = [], [], [], []
    for _ in range(n):
        a, b = rng.sample(_IOI_NAMES, 2)
        place, thing = rng.choice(_IOI_PLACES), rng.choice(_IOI_THINGS)
        head, tail = text.rsplit("{b}", 1)
        clean.append((head + b + tail).format(a=a, b=b, place=place, thing=thing))
        corrupted.append((head + a + tail).format(a=a, b=b, place=place, thing=thing))
        answers.append(" " + a)
        wrongs.append(" " + b)
    return PatchingPrompts(clean, corrupted, answers, wrongs)


def _n_tokens(model_or_tokenizer: Any, text: str) -> int:
    return len(_tokenizer_of(model_or_tokenizer)(text, add_special_tokens=True)["input_ids"])


def split(items: Sequence[Any], test_fraction: float = 0.25, *, seed: int = 0) -> tuple[list, list]:
    """Shuffle (seeded) and split any list of pairs or items into ``(train, test)``."""
    if not 0 < test_fraction < 1:
        raise SteerValueError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    items = list(items)
    n_test = round(len(items) * test_fraction)
    if n_test < 1 or n_test >= len(items):
        raise SteerValueError(
            f"Splitting {len(items)} items with test_fraction={test_fraction} leaves one side empty; "
            "use more items or another fraction."
        )
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [items[i] for i in train], [items[i] for i in test]


def token_span(model_or_tokenizer: Any, text: str, substring: str) -> slice:
    """Token indices covering the last occurrence of ``substring`` in ``text`` (BOS policy as ``tokenize``)."""
    tokenizer = _tokenizer_of(model_or_tokenizer)
    start = text.rfind(substring)
    if start < 0 or not substring:
        raise SteerValueError(f"{substring!r} does not occur in {text[:80]!r}; pick a span of the text.")
    end = start + len(substring)
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return slice(hit[0], hit[-1] + 1)


def _letter(answer: str) -> str:
    """``"(A)"``, ``" (A"`` or ``"A"`` -> ``"A"``."""
    return answer.strip().removeprefix("(").removesuffix(")").strip()


def _data_file(name: str, suffix: str, exclude: str | None = None):
    data = resources.files("steer") / "data"
    path = data / f"{name}{suffix}"
    if not path.is_file() or (exclude and exclude in name):
        known = sorted(
            p.name.removesuffix(suffix)
            for p in data.iterdir()
            if p.name.endswith(suffix) and not (exclude and exclude in p.name)
        )
        raise SteerValueError(f"No shipped data set {name!r}; there are {', '.join(known)}.")
    return path


def _read_value(value: Any) -> int | str | None:
    """CSV cells are strings: an integer-looking ``read`` is an index."""
    if value in (None, ""):
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def token_mask(model_or_tokenizer: Any, text: str, spans: Sequence[str | tuple[int, int]]) -> list[bool]:
    """One bool per token of ``text`` (BOS policy as ``tokenize``): whether it lies in any of ``spans``.

    A span is a substring (every occurrence counts) or ``(start, end)`` character offsets into ``text``.
    A token counts when it shares a non-space character with a span, so the leading space a token
    carries does not pull it into the span before it.
    """
    tokenizer = _tokenizer_of(model_or_tokenizer)
    ranges = []
    for span in spans:
        if isinstance(span, str):
            found = [m.start() for m in re.finditer(re.escape(span), text)] if span.strip() else []
            if not found:
                raise SteerValueError(
                    f"The span {span!r} does not occur in the prompt {text[:80]!r}; give a substring of "
                    "the prompt as it is tokenized (after any chat template), or character offsets."
                )
            ranges += [(start, start + len(span)) for start in found]
        else:
            start, end = span
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
                raise SteerValueError(
                    f"The character span {span!r} is not inside the prompt (0..{len(text)}); give "
                    "(start, end) with 0 <= start < end <= len(prompt)."
                )
            if not text[start:end].strip():
                raise SteerValueError(f"The character span {span!r} covers only whitespace.")
            ranges.append((start, end))
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    return [any(text[max(a, s) : min(b, e)].strip() for s, e in ranges) for a, b in offsets]
