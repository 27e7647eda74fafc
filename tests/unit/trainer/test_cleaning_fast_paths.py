"""The normalisers and the dedupe key skip steps that would change nothing (substring tests, ``str.split`` for the
whitespace collapse); they must give exactly what running every step gives: compared with the full step-by-step
forms on random strings over every character the steps treat specially, and re's ``\\s`` checked to be
``str.isspace`` on every code point."""

from __future__ import annotations

import random
import re
import sys
import unicodedata

from finetune_trainer.data import cleaning
from finetune_trainer.data.cleaning import dedupe_key, normalize_aggressive, normalize_safe

# The step-by-step forms (every step, always), as they were before the fast paths.
_ANY_SPACE = re.compile(r"\s+")


def _safe_ref(text: str) -> str:
    text = cleaning._line_endings(unicodedata.normalize("NFC", text)).translate(cleaning._INVISIBLE)
    text = cleaning._CONTROL.sub("", text)
    return cleaning._TRAILING_BLANKS.sub("", text)


def _aggressive_ref(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = cleaning._line_endings(text).translate(cleaning._ZERO_WIDTH)
    text = cleaning._CONTROL.sub("", text)
    text = cleaning._SPACES.sub(" ", text)
    text = cleaning._TRAILING.sub("\n", text)
    text = cleaning._BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _key_ref(text: str) -> str:
    return _ANY_SPACE.sub(" ", _aggressive_ref(text).casefold()).strip()


SPECIAL = (
    " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00\x07\x7f\x85\u00a0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
    "\u200b\u200c\u200d\u2060\ufeff\u00ad"  # whitespace of every kind, controls, zero-width and invisible characters
    "\u0301\u0308e\u00e9\ufb01\uff21\u00b2\u00bd\u2126\u212b\u1e9e\u0130\u03a3\u00df"  # combining marks, compatibility forms, case oddities
)
PLAIN = "abcXYZ019.,-'!"


def _strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\n", "  \n\n\n  ", "a \n", "a\t\n", "a \t", "\n\n\n", "x" * 5]
    for _ in range(n):
        pool = rng.choice([PLAIN + " ", PLAIN + " \n\t", PLAIN + SPECIAL, SPECIAL])
        out.append("".join(rng.choice(pool) for _ in range(rng.randrange(0, 40))))
    return out


def test_re_whitespace_is_str_isspace_on_every_code_point():
    space = re.compile(r"\s")
    assert [cp for cp in range(sys.maxunicode + 1) if (space.match(chr(cp)) is not None) != chr(cp).isspace()] == []


def test_normalisers_and_key_equal_every_step_run():
    for text in _strings(30000, 0):
        assert normalize_safe(text) == _safe_ref(text), repr(text)
        assert normalize_aggressive(text) == _aggressive_ref(text), repr(text)
        assert dedupe_key(text) == _key_ref(text), repr(text)


def test_shingle_words_equal_the_word_pattern():
    keys = _strings(30000, 1) + [dedupe_key(t) for t in _strings(5000, 2)]
    keys += ["a", "a b", " a  b ", "a_b c", "x1 y2", "ab-cd ef", "naïve idea", "a\tb", "123 456", "[email] me"]
    for key in keys:
        assert cleaning._words(key) == cleaning._WORD.findall(key), repr(key)
