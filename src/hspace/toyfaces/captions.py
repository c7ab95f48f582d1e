"""Captions of toy faces (the text of ``toysd``) and the word-level CLIP tokenizer that reads them.

Grammar: ``"a face"`` followed by one phrase per attribute, in ``ORDER``, joined by ", ":

- binary attributes, both polarities named (``BINARY_PHRASES``): "smiling" / "neutral", "eyes open" / "eyes closed",
  "with glasses" / "without glasses", "with a hat" / "without a hat";
- continuous attributes as words for equal parts of their range (``CONTINUOUS_WORDS``): hair "black / brown /
  auburn / blonde hair" (quarters of hair_color), skin "light / medium / dark skin" (thirds of skin_tone), yaw
  "facing left / front / right" (thirds of [-1, 1]; negative yaw turns the head left), background "red / yellow /
  green / cyan / blue / magenta background" (the nearest sixth of the hue circle).

``caption(attributes)`` (no ``rng``) names exactly the attributes given, in that order: ``caption({"smile": True})`` is
"a face, smiling". With ``rng`` (training) every phrase is dropped with probability ``drop``, so that an attribute
the prompt does not name stays free, and the whole caption is "" with probability ``empty`` (the unconditional branch
of classifier-free guidance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import HspaceError

BINARY_PHRASES: dict[str, tuple[str, str]] = {  # attribute: (phrase when True, phrase when False)
    "smile": ("smiling", "neutral"),
    "eyes_open": ("eyes open", "eyes closed"),
    "glasses": ("with glasses", "without glasses"),
    "hat": ("with a hat", "without a hat"),
}
CONTINUOUS_WORDS: dict[str, tuple[tuple[str, ...], float, float]] = {  # attribute: (words low .. high, range)
    "hair_color": (("black hair", "brown hair", "auburn hair", "blonde hair"), 0.0, 1.0),
    "skin_tone": (("light skin", "medium skin", "dark skin"), 0.0, 1.0),
    "yaw": (("facing left", "facing front", "facing right"), -1.0, 1.0),
}
BACKGROUND_WORDS = ("red background", "yellow background", "green background", "cyan background", "blue background", "magenta background")
ORDER = ("smile", "eyes_open", "glasses", "hat", "hair_color", "skin_tone", "yaw", "background")
SUBJECT = "a face"
MAX_TOKENS = 32  # the tokenizer's model_max_length: the longest caption is 26 words and commas, plus BOS and EOS


def phrase(attribute: str, value) -> str:
    """The words of one attribute's value (a bool for a binary attribute, a number for a continuous one)."""
    if attribute in BINARY_PHRASES:
        if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
            raise HspaceError(f"{attribute} must be True or False (or 1 / 0), got {value!r}")
        return BINARY_PHRASES[attribute][0 if value else 1]
    if attribute == "background":
        return BACKGROUND_WORDS[int(np.floor(float(value) % 1.0 * 6 + 0.5)) % 6]
    if attribute in CONTINUOUS_WORDS:
        words, low, high = CONTINUOUS_WORDS[attribute]
        value = float(value)
        if not low <= value <= high:
            raise HspaceError(f"{attribute} must be in [{low}, {high}], got {value!r}")
        return words[min(len(words) - 1, int((value - low) / (high - low) * len(words)))]
    raise HspaceError(f"unknown attribute {attribute!r}; valid: {', '.join(ORDER)}")


def caption(attributes: dict, rng: np.random.Generator | None = None, drop: float = 0.3, empty: float = 0.1) -> str:
    """The caption of a face's ``attributes`` (module doc); with ``rng``, phrases dropped as in training."""
    unknown = sorted(set(attributes) - set(ORDER))
    if unknown:
        raise HspaceError(f"unknown attribute {unknown[0]!r}; valid: {', '.join(ORDER)}")
    if rng is not None and rng.random() < empty:
        return ""
    phrases = [phrase(name, attributes[name]) for name in ORDER if name in attributes]
    if rng is not None:
        keep = rng.random(len(phrases)) >= drop
        phrases = [p for p, k in zip(phrases, keep) if k]
    return ", ".join([SUBJECT, *phrases])


def flip(prompt_attributes: dict, attribute: str) -> dict:
    """The same attributes with one binary attribute negated: the prompt edit of a comparison."""
    if attribute not in BINARY_PHRASES:
        raise HspaceError(f"{attribute!r} is not a binary attribute; valid: {', '.join(BINARY_PHRASES)}")
    return {**prompt_attributes, attribute: not prompt_attributes.get(attribute, False)}


def vocabulary() -> list[str]:
    """Every word of the grammar, in a fixed order."""
    text = " ".join([SUBJECT, *(p for pair in BINARY_PHRASES.values() for p in pair),
                     *(w for words, _, _ in CONTINUOUS_WORDS.values() for w in words), *BACKGROUND_WORDS])
    return list(dict.fromkeys(text.split()))


def write_tokenizer(folder: str | Path):
    """A CLIPTokenizer whose tokens are the grammar's words (each one token), the comma, single letters (any other
    lower-case word falls back to them) and CLIP's start/end tokens; saved in ``folder`` (vocab.json, merges.txt)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), ",</w>"]
    merges: dict[tuple[str, str], int] = {}
    for word in vocabulary():  # merges added until CLIP's BPE reads each word as one token
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(pieces) > 1:  # a merge of the lowest rank applies only where no other does: earlier words keep theirs
            merges[(pieces[0], pieces[1])] = len(merges)
            tokens.append(pieces[0] + pieces[1])
            pieces = _bpe(pieces, merges)
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    split = [w for w in vocabulary() if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise HspaceError(f"the toysd tokenizer splits {split}: each word of the grammar must be one token")
    return tokenizer


def _bpe(pieces: list[str], merges: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merging of one word: the pair of the lowest rank merged everywhere, until none applies."""
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces
