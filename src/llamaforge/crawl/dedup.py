"""Near-duplicate detection: character-level ROUGE-L (bit-parallel LCS) and DedupIndex, the
instructions kept so far with a numpy prefilter that leaves exact LCS to the few candidates."""

from __future__ import annotations

import unicodedata

import numpy as np


def normalize_for_rouge(text: str) -> str:
    """Lower-cased letters and digits only (CJK characters are letters): the units ROUGE-L
    compares. Word-based ROUGE would see a whole Chinese sentence as one token."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def _char_masks(a: str) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    return masks


def _lcs_from_masks(masks: dict[str, int], m: int, b: str) -> int:
    # Bit-parallel LCS (Allison & Dix 1986; Hyyrö 2004): bit j of v is cleared once a[:j+1]
    # gains a match; one pass over b, a few big-int operations per character.
    full = (1 << m) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings."""
    if not a or not b:
        return 0
    return _lcs_from_masks(_char_masks(a), len(a), b)


def rouge_l(a: str, b: str) -> float:
    """Character-level ROUGE-L F-measure, 2·LCS / (len(a) + len(b)), on normalized text."""
    a, b = normalize_for_rouge(a), normalize_for_rouge(b)
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class DedupIndex:
    """The instructions collected so far, for near-duplicate checks (ROUGE-L > threshold).

    Exact LCS against thousands of instructions per new item is too slow in Python, so each
    instruction also keeps a histogram of its characters hashed into _BUCKETS bins. Summing
    min(count_a, count_b) over bins bounds the LCS from above (hash collisions only raise it),
    and one numpy pass discards every instruction whose bound cannot pass the threshold; the
    exact LCS runs only for the few that remain.
    """

    _BUCKETS = 256

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._texts: list[str] = []
        self._lengths = np.zeros(1024, dtype=np.int64)
        # Column j is the histogram of instruction j; stored bin-major so that gathering the
        # few bins of a new instruction reads contiguous rows.
        self._hist = np.zeros((self._BUCKETS, 1024), dtype=np.uint16)

    def __len__(self) -> int:
        return len(self._texts)

    def _histogram(self, text: str) -> np.ndarray:
        codes = np.fromiter((ord(ch) % self._BUCKETS for ch in text), dtype=np.int64, count=len(text))
        return np.bincount(codes, minlength=self._BUCKETS)

    def is_duplicate(self, instruction: str) -> bool:
        text = normalize_for_rouge(instruction)
        n = len(self._texts)
        if not text or not n:
            return False
        hist = self._histogram(text)
        bins = np.flatnonzero(hist)
        bound = np.minimum(self._hist[bins, :n], hist[bins, None]).sum(axis=0)
        # rouge <= 2·bound / (m + n_j); keep the ties, the exact test below decides them.
        candidates = np.flatnonzero(2 * bound >= self.threshold * (len(text) + self._lengths[:n]))
        if not len(candidates):
            return False
        masks = _char_masks(text)
        for j in candidates:
            other = self._texts[j]
            if 2 * _lcs_from_masks(masks, len(text), other) / (len(text) + len(other)) > self.threshold:
                return True
        return False

    def add(self, instruction: str) -> None:
        text = normalize_for_rouge(instruction)
        n = len(self._texts)
        if n == self._lengths.shape[0]:
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            self._hist = np.concatenate([self._hist, np.zeros_like(self._hist)], axis=1)
        self._texts.append(text)
        self._lengths[n] = len(text)
        self._hist[:, n] = np.minimum(self._histogram(text), np.iinfo(np.uint16).max)
