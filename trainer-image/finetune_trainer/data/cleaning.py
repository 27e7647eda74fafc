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

The :class:`DuplicateIndex` is the only global state of the pipeline: per row a 16-byte hash for exact
duplicates and 12 LSH band keys for near duplicates in numpy arrays (~170 bytes), with the 128-value MinHash
signature (512 bytes) spilled to a temporary file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from typing import Callable, Sequence

import numpy as np
from datasketch.lsh import _optimal_param
from rensa import RMinHash  # pinned (constraints.txt): signatures are compared only within one preparation, but another release may hash differently

NUM_PERM = 128
SHINGLE_WORDS = 5
MINHASH_SEED = 1
# LSH band layout weighted 95% against false negatives: every candidate is verified against its stored
# signature, so a false positive costs one comparison, while a false negative is a missed duplicate.
# At threshold 0.85 this misses ~0.6% of pairs at similarity 0.9 (the balanced default misses ~19%).
LSH_WEIGHTS = (0.05, 0.95)

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)  # no meaning, unlike ZWJ/ZWNJ
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r" +\n")
_TRAILING_BLANKS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")


def _line_endings(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_safe(text: str) -> str:
    """NFC, line endings, invisible and control characters, trailing spaces; nothing that changes meaning.

    (Here and in :func:`normalize_aggressive` a step is skipped where a substring test shows it would change nothing:
    the invisible characters are not ASCII, ``$`` matches only before a newline or at the end. The result is the
    same; the tests compare it with every step run.)"""
    text = _line_endings(unicodedata.normalize("NFC", text))
    if not text.isascii():
        text = text.translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING_BLANKS.sub("", text)
    return text


def normalize_aggressive(text: str) -> str:
    """NFKC plus whitespace collapsing (see the module docstring): for noisy text, and for dedupe keys."""
    text = _line_endings(unicodedata.normalize("NFKC", text))
    if not text.isascii():  # the zero-width characters are not ASCII
        text = text.translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text)
    if not text.isascii() or "  " in text or "\t" in text:  # else every run of spaces is one plain space already
        text = _SPACES.sub(" ", text)
    if " \n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n" in text:
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
    # str.split() splits at runs of the characters re's \s matches (str.isspace, the same set: a test checks every
    # code point), so this is re.sub(r"\s+", " ", ...).strip() at a third of the cost.
    return " ".join(normalize_aggressive(text).casefold().split())


def key_hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def shingles(key: str) -> list[bytes]:
    """The distinct word 5-grams of ``key``; a text of fewer than 5 words is one shingle (itself)."""
    words = _WORD.findall(key)
    if len(words) < SHINGLE_WORDS:
        return [" ".join(words).encode("utf-8")]
    return sorted({" ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8") for i in range(len(words) - SHINGLE_WORDS + 1)})


def signature(key: str) -> np.ndarray:
    """The MinHash signature of ``key``'s shingles (128 uint32 values)."""
    return signatures([key])[0]


def signatures(keys: Sequence[str]) -> np.ndarray:
    """The MinHash signatures of ``keys`` as one (len(keys), 128) uint32 array: rensa's RMinHash (Rust), seeded,
    over each key's :func:`shingles`, computed for the whole batch in one call."""
    if not keys:
        return np.empty((0, NUM_PERM), dtype=np.uint32)
    matrix = RMinHash.digest_matrix_from_token_sets([_shingle_list(key) for key in keys], NUM_PERM, MINHASH_SEED)
    return np.asarray(matrix.to_rows(), dtype=np.uint32)


def _words(key: str) -> list[str]:
    """``_WORD.findall(key)``: for a key of ASCII letters and digits between spaces (most keys) the words are what
    ``str.split`` gives, at about half the cost."""
    if key.isascii() and key.replace(" ", "").isalnum():
        return key.split()
    return _WORD.findall(key)


def _shingle_list(key: str) -> list[str]:
    """:func:`shingles` as MinHash needs them: the same 5-grams, as str, unsorted, repeats left in (a minimum is the
    same over a list and over its set; rensa hashes a str as its UTF-8 bytes). About 1.6x faster."""
    words = _words(key)
    if len(words) < SHINGLE_WORDS:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(SHINGLE_WORDS)))))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures (the fraction of equal MinHash values)."""
    return float(np.count_nonzero(a == b)) / len(a)


def hash_words(hashes: Sequence[bytes]) -> np.ndarray:
    """16-byte key hashes as an (n, 2) uint64 array (the index's form of them)."""
    return np.frombuffer(b"".join(hashes), dtype=np.uint64).reshape(len(hashes), 2) if hashes else np.empty((0, 2), np.uint64)


_MIX = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: folds a band's values into one key (collisions only add candidates)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 key per LSH band of each signature: (n, bands); equal band values give equal keys."""
    values = sigs[:, : bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    keys = np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # the band number is part of the key
    keys = np.broadcast_to(keys, (len(sigs), bands)).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            keys = (keys * _MIX) ^ values[:, :, j]
    return keys


class _SortedRuns:
    """An append-only multimap uint64 key -> row id in a few sorted numpy runs, merged log-structured (a new run is
    merged with the previous while it is at least as large), so a batch insert or lookup costs O(log n) binary
    searches per key and memory is 12 bytes an entry -- no Python object per entry."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], rows[order].astype(np.uint32)))
        while len(self._runs) > 1 and len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            (k2, r2), (k1, r1) = self._runs.pop(), self._runs.pop()
            keys_, rows_ = np.concatenate([k1, k2]), np.concatenate([r1, r2])
            order = np.argsort(keys_, kind="stable")
            self._runs.append((keys_[order], rows_[order]))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (position in ``keys``, row id) whose keys are equal."""
        found_q, found_rows = [], []
        order = np.argsort(keys)  # sorted needles: each binary search starts where the last ended (far fewer cache misses)
        needles = keys[order]
        for run_keys, run_rows in self._runs:
            lo = np.searchsorted(run_keys, needles, "left")
            hit = np.flatnonzero(run_keys[np.minimum(lo, len(run_keys) - 1)] == needles)  # most keys are in no run
            if not len(hit):
                continue
            lo = lo[hit]
            counts = np.searchsorted(run_keys, needles[hit], "right") - lo
            total = int(counts.sum())
            q = np.repeat(order[hit], counts)
            starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            found_q.append(q)
            found_rows.append(run_rows[starts + np.arange(total)])
        if not found_q:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(found_q), np.concatenate(found_rows).astype(np.int64)


NONE, EXACT, NEAR = 0, 1, 2  # match kinds of DuplicateIndex.match/dedupe


class DuplicateIndex:
    """Exact and near-duplicate lookup over the rows added so far.

    Near duplicates: two texts are near-duplicates when the *estimated Jaccard similarity of their sets
    of word 5-grams* (shingles) is at least ``near_threshold`` (``preprocessing.dedupe.nearThreshold``).
    Jaccard = shared shingles / all distinct shingles of the two. Intuition for the default 0.85: in a
    100-word text one changed word alters up to 5 of its 96 shingles (J ~ 0.9, caught); in a 30-word
    text the same edit gives J ~ 0.7 (kept). So the threshold catches boilerplate, templated rows and
    lightly edited copies of longer texts, not paraphrases. Texts under 5 words are one shingle, so
    they match only when equal. MinHash LSH proposes candidates in sub-linear time: a signature's 128
    values are cut into bands (:data:`LSH_WEIGHTS` picks the layout, with datasketch's optimiser; 12 bands of
    10 at 0.85) and rows sharing any band's values are candidates; every candidate is confirmed with the
    signatures, which removes the LSH's false positives (so the LSH is tuned for recall).

    Memory: the index keeps, per row, its key hash (16 bytes) and band keys (12 bytes each) in sorted numpy runs
    (:class:`_SortedRuns`); the 512-byte signatures go to an unnamed temporary file in ``spill_dir`` and only the
    candidates' are read back. Rows are looked up and added a batch at a time (:meth:`dedupe`, :meth:`match`,
    :meth:`add_batch`).
    """

    def __init__(self, near_threshold: float, near: bool = True, spill_dir: str | os.PathLike[str] | None = None):
        self.near_threshold = near_threshold
        self.near = near
        self.bands, self.band_rows = _optimal_param(near_threshold, NUM_PERM, *LSH_WEIGHTS) if near else (0, 0)
        self._rows = 0
        self._exact = _SortedRuns()
        self._hash_low = np.empty(1024, np.uint64)  # the second 8 bytes of each row's hash (confirms exact matches), grown by doubling
        self._lsh = _SortedRuns()
        self._sig_file = tempfile.TemporaryFile(dir=spill_dir) if near else None
        self._sig_map: np.ndarray | None = None  # memory map of the signature file, reopened as it grows

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        if self._sig_file is not None:
            self._sig_map = None
            self._sig_file.close()

    # ------------------------------------------------------------------ batch API

    def add_batch(self, hashes: np.ndarray, sigs: np.ndarray | None) -> None:
        """Add rows (``hashes``: (n, 2) uint64 from :func:`hash_words`; ``sigs``: (n, 128) or None); ids count up."""
        n = len(hashes)
        if not n:
            return
        ids = np.arange(self._rows, self._rows + n, dtype=np.int64)
        self._exact.add(hashes[:, 0].copy(), ids)
        if self._rows + n > len(self._hash_low):
            grown = np.empty(max(2 * len(self._hash_low), self._rows + n), np.uint64)
            grown[: self._rows] = self._hash_low[: self._rows]
            self._hash_low = grown
        self._hash_low[self._rows : self._rows + n] = hashes[:, 1]
        if self.near:
            assert sigs is not None and self._sig_file is not None
            self._lsh.add(band_keys(sigs, self.bands, self.band_rows).ravel(), np.repeat(ids, self.bands))
            self._sig_file.seek(0, os.SEEK_END)
            self._sig_file.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
            self._sig_map = None
        self._rows += n

    def stored_signatures(self, rows: np.ndarray) -> np.ndarray:
        """The stored signatures of row ids ``rows`` (read from the spill file)."""
        assert self._sig_file is not None
        if self._sig_map is None:
            self._sig_file.flush()
            self._sig_map = np.memmap(self._sig_file, dtype=np.uint32, mode="r", shape=(self._rows, NUM_PERM))
        return np.asarray(self._sig_map[rows])

    def match(self, hashes: np.ndarray, sigs: np.ndarray | None, exact: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each row: (kind NONE/EXACT/NEAR, the lowest matching row id or -1, similarity) against the index.
        EXACT wins over NEAR; NEAR is the lowest-numbered row at least ``near_threshold`` similar."""
        n = len(hashes)
        kind = np.zeros(n, np.int8)
        matched = np.full(n, -1, np.int64)
        sim = np.zeros(n, np.float64)
        if not n or not self._rows:
            return kind, matched, sim
        if exact:
            q, rows = self._exact.lookup(hashes[:, 0].copy())
            ok = self._hash_low[rows] == hashes[q, 1]
            q, rows = q[ok], rows[ok]
            if len(q):
                order = np.lexsort((rows, q))
                first_q, first = np.unique(q[order], return_index=True)
                kind[first_q], matched[first_q], sim[first_q] = EXACT, rows[order][first], 1.0
        if self.near and sigs is not None:
            open_rows = np.flatnonzero(kind == NONE)
            keys = band_keys(sigs[open_rows], self.bands, self.band_rows).ravel()
            q, rows = self._lsh.lookup(keys)
            if len(q):
                q = open_rows[q // self.bands]
                pairs = np.unique(q.astype(np.int64) << 32 | rows)  # sorted by (query, row), each pair once
                q, rows = pairs >> 32, pairs & 0xFFFFFFFF
                sims = np.count_nonzero(self.stored_signatures(rows) == sigs[q], axis=1) / NUM_PERM
                ok = sims >= self.near_threshold
                first_q, first = np.unique(q[ok], return_index=True)
                kind[first_q], matched[first_q], sim[first_q] = NEAR, rows[ok][first], sims[ok][first]
        return kind, matched, sim

    def dedupe(self, hashes: np.ndarray, sigs: np.ndarray | None, exact: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`match` for a batch of rows in order, each also against the batch's earlier *kept* rows; the kept
        rows (kind NONE) are added, with ids in order. A batch behaves exactly as its rows added one by one."""
        kind, matched, sim = self.match(hashes, sigs, exact)
        n = len(hashes)
        # Pairs (i, j), j < i, within the batch that are near-duplicates: their band keys and similarity.
        near_of: dict[int, list[tuple[int, float]]] = {}
        open_rows = np.flatnonzero(kind == NONE)  # rows not already matched in the index
        if self.near and sigs is not None and len(open_rows) > 1:
            keys = band_keys(sigs[open_rows], self.bands, self.band_rows).ravel()
            rows = np.repeat(open_rows, self.bands)
            order = np.lexsort((rows, keys))
            keys, rows = keys[order], rows[order]
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            sizes = np.diff(np.r_[starts, len(keys)])
            pairs: set[tuple[int, int]] = set()
            for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
                group = rows[start : start + size].tolist()
                pairs.update((i, j) for a, j in enumerate(group) for i in group[a + 1 :] if j < i)
            if pairs:
                pi, pj = np.array(sorted(pairs)).T
                sims = np.count_nonzero(sigs[pi] == sigs[pj], axis=1) / NUM_PERM
                for i, j, s in zip(pi.tolist(), pj.tolist(), sims.tolist()):
                    if s >= self.near_threshold:
                        near_of.setdefault(i, []).append((j, s))
        batch_ids: dict[int, int] = {}  # batch position of a kept row -> its id
        first_hash: dict[tuple[int, int], int] = {}
        kept: list[int] = []
        kinds, matches, sims = kind.tolist(), matched.tolist(), sim.tolist()
        for i, h in enumerate(zip(hashes[:, 0].tolist(), hashes[:, 1].tolist())):
            if kinds[i] == NONE and exact and h in first_hash:
                kinds[i], matches[i], sims[i] = EXACT, first_hash[h], 1.0
            if kinds[i] == NONE:
                for j, s in near_of.get(i, ()):  # ascending j: the lowest-numbered kept row
                    if j in batch_ids:
                        kinds[i], matches[i], sims[i] = NEAR, batch_ids[j], s
                        break
            if kinds[i] == NONE:
                batch_ids[i] = self._rows + len(kept)
                first_hash.setdefault(h, batch_ids[i])
                kept.append(i)
        kind, matched, sim = np.array(kinds, np.int8), np.array(matches, np.int64), np.array(sims, np.float64)
        keep = np.asarray(kept, dtype=np.int64)
        self.add_batch(hashes[keep], sigs[keep] if sigs is not None else None)
        return kind, matched, sim

    # ------------------------------------------------------------------ one row at a time (tests, small callers)

    def exact_match(self, hash_: bytes) -> int | None:
        """Id of the lowest-numbered row with this key hash, if any."""
        kind, matched, _ = self.match(hash_words([hash_]), None)
        return int(matched[0]) if kind[0] == EXACT else None

    def near_match(self, sig: np.ndarray) -> int | None:
        """Id of the lowest-numbered row whose signature is at least ``near_threshold`` similar, if any."""
        kind, matched, _ = self.match(np.zeros((1, 2), np.uint64), sig[None, :], exact=False)
        return int(matched[0]) if kind[0] == NEAR else None

    def similarity_to(self, row_id: int, sig: np.ndarray) -> float:
        """Estimated Jaccard similarity of ``sig`` to the stored row ``row_id`` (1.0 without signatures)."""
        return similarity(sig, self.stored_signatures(np.array([row_id]))[0]) if self.near else 1.0

    def add(self, hash_: bytes, sig: np.ndarray | None) -> int:
        """Add a row; returns its id (ids count up from 0 in insertion order)."""
        self.add_batch(hash_words([hash_]), sig[None, :] if sig is not None else None)
        return self._rows - 1
