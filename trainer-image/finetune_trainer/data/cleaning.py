"""Stage 3: text cleanup and duplicate detection.

Normalisation (``preprocessing.normalize``) comes in two strengths, because the text a model trains on
must stay the text users send:

- ``safe`` (the default, :func:`normalize_safe`): Unicode NFC (composed accents: the same characters,
  one encoding), line endings unified to ``\n``, invisible characters removed (zero-width space, word
  joiner, byte-order mark, soft hyphen) and C0 control characters except tab and newline, trailing
  spaces and tabs cut at each line end. Indentation, tabs, runs of spaces, blank lines, full-width CJK
  punctuation and compatibility characters (``x²``, ``½``, ``ﬁ``) are kept, and so are ZWJ/ZWNJ
  (they join emoji sequences and are spelling in Persian and Indic scripts).
- ``aggressive`` (:func:`normalize_aggressive`): NFKC (full-width letters, ligatures, superscripts and
  fractions folded to plain forms: ``x²`` -> ``x2``), every zero-width character removed, runs of
  spaces/tabs collapsed to one space (code loses its indentation), at most one blank line in a row,
  ends stripped. Only for data where those differences are noise.

Duplicates are judged on a *dedupe key*: the aggressive form of the record's key text (see
:func:`~finetune_trainer.data.formats.key_text`), casefolded, with all whitespace collapsed -- so
"Hello  World", "hello world" and "ＨＥＬＬＯ world" are the same example whatever the training text
keeps. Labels are not part of the key: two classification rows with the same text and different
labels are a *label conflict*, handled by ``preprocessing.labelConflicts`` (see :mod:`.prepare`).

The :class:`DuplicateIndex` is the only global state of the pipeline: a 16-byte hash per row for exact
duplicates and a 128-value MinHash signature (512 bytes) per row for near duplicates.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Callable

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

NUM_PERM = 128
SHINGLE_WORDS = 5
MINHASH_SEED = 1
# LSH band layout weighted 95% against false negatives: every candidate is verified against its stored
# signature, so a false positive costs one comparison, while a false negative is a missed duplicate.
# At threshold 0.85 this misses ~0.6% of pairs at similarity 0.9 (the balanced default misses ~19%).
LSH_WEIGHTS = (0.05, 0.95)
MINHASH_SCHEME = "affine32"  # 32-bit values: 512 bytes per signature; pinned so stored signatures stay comparable

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)  # no meaning, unlike ZWJ/ZWNJ
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r" +\n")
_TRAILING_BLANKS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_ANY_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def _line_endings(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_safe(text: str) -> str:
    """NFC, line endings, invisible and control characters, trailing spaces; nothing that changes meaning."""
    text = _line_endings(unicodedata.normalize("NFC", text)).translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    return _TRAILING_BLANKS.sub("", text)


def normalize_aggressive(text: str) -> str:
    """NFKC plus whitespace collapsing (see the module docstring): for noisy text, and for dedupe keys."""
    text = unicodedata.normalize("NFKC", text)
    text = _line_endings(text).translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


EXPANSION_CHUNK = 1 << 16  # characters normalised at a time by nfkc_expansion


def nfkc_expansion(text: str) -> float:
    """How many times longer NFKC makes ``text`` (1.0 when it changes nothing).

    One character can become up to 18 (U+FDFA), so normalising a long hostile row at once could take 18
    times its memory, and the dedupe key always applies NFKC. This measures chunk by chunk, holding one
    chunk's result at a time; ``dataset.limits.maxNormalizationExpansion`` refuses rows past the cap
    before anything normalises them whole. (A chunk boundary may split a character from a combining mark
    that follows it; that moves the count by a character, which does not matter for a ratio.)
    """
    if not text or text.isascii() or unicodedata.is_normalized("NFKC", text):
        return 1.0
    grown = sum(len(unicodedata.normalize("NFKC", text[i : i + EXPANSION_CHUNK])) for i in range(0, len(text), EXPANSION_CHUNK))
    return grown / len(text)


NORMALIZERS: dict[str, Callable[[str], str]] = {"safe": normalize_safe, "aggressive": normalize_aggressive}
"""``preprocessing.normalize`` -> the function applied to the training text (``none``: nothing)."""


def dedupe_key(text: str) -> str:
    """The form two texts are compared in: aggressively normalised, casefolded, whitespace collapsed."""
    return _ANY_SPACE.sub(" ", normalize_aggressive(text).casefold()).strip()


def key_hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def shingles(key: str) -> list[bytes]:
    """The distinct word 5-grams of ``key``; a text of fewer than 5 words is one shingle (itself)."""
    words = _WORD.findall(key)
    if len(words) < SHINGLE_WORDS:
        return [" ".join(words).encode("utf-8")]
    return sorted({" ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8") for i in range(len(words) - SHINGLE_WORDS + 1)})


_PERMUTATIONS = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations  # drawn once, not per row


def signature(key: str) -> np.ndarray:
    """The MinHash signature of ``key``'s shingles (128 uint32 values)."""
    mh = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME, permutations=_PERMUTATIONS)
    mh.update_batch(shingles(key))
    return mh.hashvalues.astype(np.uint32)


def _lean(sig: np.ndarray) -> LeanMinHash:
    return LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme=MINHASH_SCHEME)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures (the fraction of equal MinHash values)."""
    return float(np.count_nonzero(a == b)) / len(a)


class DuplicateIndex:
    """Exact and near-duplicate lookup over the rows added so far.

    Near duplicates: two texts are near-duplicates when the *estimated Jaccard similarity of their sets
    of word 5-grams* (shingles) is at least ``near_threshold`` (``preprocessing.dedupe.nearThreshold``).
    Jaccard = shared shingles / all distinct shingles of the two. Intuition for the default 0.85: in a
    100-word text one changed word alters up to 5 of its 96 shingles (J ~ 0.9, caught); in a 30-word
    text the same edit gives J ~ 0.7 (kept). So the threshold catches boilerplate, templated rows and
    lightly edited copies of longer texts, not paraphrases. Texts under 5 words are one shingle, so
    they match only when equal. MinHash LSH (datasketch) proposes candidates in sub-linear time; every
    candidate is confirmed with the signatures, which removes the LSH's false positives (so the LSH is
    tuned for recall, see ``LSH_WEIGHTS``).
    """

    def __init__(self, near_threshold: float, near: bool = True):
        self.near_threshold = near_threshold
        self.near = near
        self._exact: dict[bytes, int] = {}
        self._signatures = np.empty((1024 if near else 0, NUM_PERM), dtype=np.uint32)
        self._rows = 0
        self._lsh = MinHashLSH(threshold=near_threshold, num_perm=NUM_PERM, weights=LSH_WEIGHTS) if near else None

    def __len__(self) -> int:
        return self._rows

    def exact_match(self, hash_: bytes) -> int | None:
        """Id of the row with this key hash, if any."""
        return self._exact.get(hash_)

    def near_match(self, sig: np.ndarray) -> int | None:
        """Id of the lowest-numbered row whose signature is at least ``near_threshold`` similar, if any."""
        if self._lsh is None or not self._rows:
            return None
        candidates = sorted(self._lsh.query(_lean(sig)))
        for candidate in candidates:
            if similarity(sig, self._signatures[candidate]) >= self.near_threshold:
                return candidate
        return None

    def similarity_to(self, row_id: int, sig: np.ndarray) -> float:
        """Estimated Jaccard similarity of ``sig`` to the stored row ``row_id`` (1.0 without signatures)."""
        return similarity(sig, self._signatures[row_id]) if self._lsh is not None else 1.0

    def add(self, hash_: bytes, sig: np.ndarray | None) -> int:
        """Add a row; returns its id (ids count up from 0 in insertion order)."""
        row_id = self._rows
        self._rows += 1
        self._exact.setdefault(hash_, row_id)
        if self._lsh is not None:
            assert sig is not None
            if row_id == len(self._signatures):
                self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
            self._signatures[row_id] = sig
            self._lsh.insert(row_id, _lean(sig), check_duplication=False)
        return row_id
