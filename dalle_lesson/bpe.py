"""Byte-pair encoding: train a tokenizer from scratch, or load CLIP's, with one class.

DALL·E reads its caption as at most 256 BPE tokens. This module turns text into those
token ids and back.

How it works (the same steps for a tokenizer we train and for CLIP's):

1. Clean the text as CLIP does: ``ftfy.fix_text``, HTML unescape (twice), collapse runs of
   whitespace to one space, lowercase (:func:`clean_text`).
2. Split it into words with CLIP's regular expression (:data:`WORD_PATTERN`): runs of
   letters, single digits, runs of punctuation, and English contractions (``'s``, ``'ll``).
   Whitespace is dropped here; merges never cross a word boundary.
3. Spell every word as its UTF-8 bytes. The base vocabulary holds each of the 256 bytes
   twice: once as "inside a word" and once as "last byte of a word" (written ``x</w>``).
   So any text, in any script, with emoji, has a spelling: nothing is ever unknown.
4. Apply the learned merges, lowest rank first, until no learned pair is left.

The ids: 0..255 are the bytes inside a word, 256..511 the same bytes ending a word (in
CLIP's order, which lists printable bytes first), 512.. one id per merge in the order they
were learned, then special tokens (CLIP has ``<start_of_text>`` and ``<end_of_text>``).
:meth:`BPETokenizer.train` learns merges from your texts; :meth:`BPETokenizer.from_clip`
loads the first 48,894 merges of the file OpenAI made for CLIP, as CLIP does. The merges file is
CLIP's own text format (one merge per line, bytes shown as printable characters), so a
file we save can be read by open_clip too, and CLIP's file is read by :meth:`load`.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.util
import operator
import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

from dalle_lesson.checkpoint import atomic_write

END_OF_WORD = "</w>"
# CLIP's word splitter: contractions, runs of letters, one digit at a time, runs of other
# symbols. Whitespace matches nothing, so it disappears.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
N_BYTES = 256
N_BASE = 2 * N_BYTES  # every byte inside a word, and every byte ending a word

CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # ships inside the open_clip package
CLIP_MERGE_COUNT = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of that file
CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
FILE_HEADER = "#version: 0.2 (dalle-lesson BPE merges in CLIP's format: one merge per line, in order)"


# --------------------------------------------------------------------------------------
# Text before BPE: cleaning and the byte alphabet
# --------------------------------------------------------------------------------------


# Bytes that are visible Latin-1 characters: they stand for themselves in a merges file.
PRINTABLE_BYTES = (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1))


@functools.lru_cache(maxsize=None)
def byte_alphabet() -> tuple[int, ...]:
    """The 256 byte values in CLIP's order: the 188 printable bytes first, then the rest.

    Base id ``i`` (and ``i + 256`` at the end of a word) is byte ``byte_alphabet()[i]``.
    """
    return PRINTABLE_BYTES + tuple(b for b in range(N_BYTES) if b not in PRINTABLE_BYTES)


@functools.lru_cache(maxsize=None)
def byte_symbols() -> dict[int, str]:
    """Byte value -> the printable character that stands for it in a merges file.

    Printable bytes stand for themselves; the 68 others (space, control bytes, ...) are
    shifted, in byte order, to the characters from U+0100 on (the space becomes ``Ġ``), so
    a merges file is plain, visible text with no spaces inside a token.
    """
    others = [b for b in range(N_BYTES) if b not in PRINTABLE_BYTES]
    return {b: chr(b) for b in PRINTABLE_BYTES} | {b: chr(N_BYTES + k) for k, b in enumerate(others)}


def token_text(raw: bytes) -> str:
    """Bytes of a token as written in a merges file: ``b"cat</w>"`` -> ``"cat</w>"``."""
    ends_word = raw.endswith(END_OF_WORD.encode())
    raw = raw[: -len(END_OF_WORD)] if ends_word else raw
    symbols = byte_symbols()
    return "".join(symbols[b] for b in raw) + (END_OF_WORD if ends_word else "")


def _is_plain_ascii(text: str) -> bool:
    # Printable ASCII without '&': ftfy.fix_text and html.unescape leave such text unchanged
    # (tests/test_bpe.py checks this on thousands of strings), so we may skip them.
    return text.isascii() and text.isprintable() and "&" not in text


def clean_text(text: str) -> str:
    """Normalise text exactly as open_clip's tokenizer does before BPE.

    ftfy repairs mojibake and odd characters, HTML entities are unescaped twice (``&amp;amp;``),
    whitespace runs become one space, and everything is lowercased.
    """
    if not _is_plain_ascii(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------
# The core of BPE: merging a pair everywhere in a sequence of ids
# --------------------------------------------------------------------------------------


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, left to right."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


class BPETokenizer:
    """A byte-level BPE tokenizer with CLIP's cleaning, word split and end-of-word bytes.

    ``BPETokenizer()`` knows only the 512 base symbols; :meth:`train` learns merges, and
    :meth:`from_clip` / :meth:`load` read them from a file.

    Args:
        merges: pairs of ids, in the order they were learned; merge ``k`` makes id ``512 + k``.
        special_tokens: strings that are matched whole in the text and get the last ids.
    """

    def __init__(self, merges: Sequence[tuple[int, int]] = (), special_tokens: Sequence[str] = ()):
        self.special_tokens = list(special_tokens)
        self._set_merges(merges)

    # ---- the vocabulary ------------------------------------------------------------

    def _set_merges(self, merges: Sequence[tuple[int, int]]) -> None:
        alphabet = byte_alphabet()
        self.byte_to_id = {byte: index for index, byte in enumerate(alphabet)}
        # Each token's bytes, with the end-of-word mark written out as b"</w>", exactly as
        # open_clip decodes (it replaces "</w>" by a space after joining the bytes).
        self.token_bytes = [bytes([b]) for b in alphabet] + [bytes([b]) + END_OF_WORD.encode() for b in alphabet]
        self.merges: dict[tuple[int, int], int] = {}
        for left, right in merges:
            if not (0 <= left < len(self.token_bytes) and 0 <= right < len(self.token_bytes)):
                raise ValueError(f"merge {len(self.merges)} ({left}, {right}) uses an id that does not exist yet")
            if self.token_bytes[left].endswith(END_OF_WORD.encode()) and left >= N_BYTES:
                raise ValueError(f"merge {len(self.merges)} ({left}, {right}): token {left} ends a word, nothing follows it")
            self.merges[(left, right)] = len(self.token_bytes)
            self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.special_ids = {token: len(self.token_bytes) + k for k, token in enumerate(self.special_tokens)}
        self.token_bytes += [token.encode() for token in self.special_tokens]
        specials = "|".join(regex.escape(token) for token in self.special_tokens)
        self.word_pattern = regex.compile((specials + "|" if specials else "") + WORD_PATTERN, regex.IGNORECASE)
        self.cache: dict[str, tuple[int, ...]] = {token: (index,) for token, index in self.special_ids.items()}

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 512 base symbols + merges + special tokens."""
        return len(self.token_bytes)

    def token_name(self, index: int) -> str:
        """How token ``index`` is written in a merges file, e.g. ``'circle</w>'``."""
        self._check_id(index)
        if index >= self.vocab_size - len(self.special_tokens):
            return self.special_tokens[index - (self.vocab_size - len(self.special_tokens))]
        return token_text(self.token_bytes[index])

    # ---- encoding ------------------------------------------------------------------

    def words(self, text: str) -> list[str]:
        """Clean ``text`` and split it into the words BPE works on (merges stay inside one)."""
        return self.word_pattern.findall(clean_text(text))

    def word_to_base_ids(self, word: str) -> list[int]:
        """A word spelled as base ids: one per UTF-8 byte, the last one marked end-of-word."""
        ids = [self.byte_to_id[b] for b in word.encode("utf-8")]
        ids[-1] += N_BYTES
        return ids

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if word in self.cache:
            return self.cache[word]
        ids = self.word_to_base_ids(word)
        while len(ids) > 1:
            # Merge ids were handed out in learning order, so the smallest new id = the earliest merge.
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = merge_pair(ids, pair, self.merges[pair])
        if len(self.cache) > 100_000:  # keep memory bounded on endless streams of new words
            self.cache = {token: (index,) for token, index in self.special_ids.items()}
        self.cache[word] = tuple(ids)
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned and lowercased as CLIP does); ``""`` gives ``[]``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for word in self.words(text):
            ids.extend(self._word_ids(word))
        return ids

    # ---- decoding ------------------------------------------------------------------

    def _check_id(self, index: int) -> None:
        if not 0 <= index < self.vocab_size:
            raise ValueError(
                f"token id {index} is outside this tokenizer's vocabulary (ids 0..{self.vocab_size - 1}); "
                "padding ids from tokenize_batch must be removed first (see ids_to_texts)"
            )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: every end-of-word becomes a space, as in open_clip."""
        ids = [operator.index(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        for index in ids:
            self._check_id(index)
        raw = b"".join(self.token_bytes[index] for index in ids)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    # ---- training ------------------------------------------------------------------

    def train(self, texts: Iterable[str], vocab_size: int, verbose: bool = False) -> "BPETokenizer":
        """Learn ``vocab_size - 512`` merges from ``texts`` (replacing any merges held before).

        Counts every adjacent pair of ids inside every distinct word (weighted by how often the
        word occurs), merges the most frequent pair (ties: the smallest ids), and repeats.
        After a merge only the words that contained the pair are re-counted, and a heap finds
        the next most frequent pair, so a merge costs time for the words it touches, not for
        the whole corpus.
        """
        if vocab_size < N_BASE + len(self.special_tokens):
            raise ValueError(f"vocab_size must be at least {N_BASE} (the byte symbols), got {vocab_size}")
        word_counts = Counter(word for text in texts for word in self.words(text))
        words = [self.word_to_base_ids(word) for word in word_counts]
        counts = list(word_counts.values())
        pair_counts: Counter = Counter()
        words_with_pair: dict[tuple[int, int], set[int]] = defaultdict(set)
        for index, (ids, count) in enumerate(zip(words, counts)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
                words_with_pair[pair].add(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        token_bytes = self.token_bytes[:N_BASE]  # to name new tokens in verbose output
        n_merges = vocab_size - N_BASE - len(self.special_tokens)
        while len(merges) < n_merges:
            best = None
            while heap:
                negative_count, pair = heapq.heappop(heap)
                if pair_counts.get(pair) == -negative_count:  # skip entries made stale by earlier merges
                    best = pair
                    break
            if best is None:
                warnings.warn(f"the texts ran out of pairs to merge after {len(merges)} merges; vocab_size is {N_BASE + len(merges)}")
                break
            new_id = N_BASE + len(merges)
            merges.append(best)
            change: Counter = Counter()
            for index in words_with_pair.pop(best):
                old = words[index]
                new = merge_pair(old, best, new_id)
                if len(new) == len(old):
                    continue  # the pair left this word in an earlier merge
                for pair in zip(old, old[1:]):
                    change[pair] -= counts[index]
                for pair in zip(new, new[1:]):
                    change[pair] += counts[index]
                    words_with_pair[pair].add(index)
                words[index] = new
            for pair, delta in change.items():
                if delta:
                    pair_counts[pair] += delta
                    if pair_counts[pair] > 0:
                        heapq.heappush(heap, (-pair_counts[pair], pair))
                    else:
                        del pair_counts[pair]
            token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
            if verbose:
                print(f"merge {len(merges)}: {token_text(token_bytes[best[0]])} + {token_text(token_bytes[best[1]])}"
                      f" -> {token_text(token_bytes[-1])} (id {new_id}, {-negative_count} times)")
        self._set_merges(merges)
        return self

    # ---- files ---------------------------------------------------------------------

    def merge_lines(self) -> list[str]:
        """The merges as CLIP writes them: ``"left right"`` per merge, in learning order."""
        return [f"{self.token_name(left)} {self.token_name(right)}" for left, right in self.merges]

    def save(self, path: str | os.PathLike) -> None:
        """Write the merges file (a header line, then one merge per line), atomically."""
        text = "\n".join([FILE_HEADER, *self.merge_lines()]) + "\n"
        atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))

    @classmethod
    def load(
        cls, path: str | os.PathLike, max_merges: int | None = None, special_tokens: Sequence[str] = ()
    ) -> "BPETokenizer":
        """Read a merges file written by :meth:`save` or by CLIP (``.gz`` is read as gzip).

        The first line is a header and is skipped (as CLIP does); ``max_merges`` keeps only the
        first merges. A line that is not two known tokens is an error naming the line.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no merges file at {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as file:
                lines = file.read().split("\n")
        except (UnicodeDecodeError, OSError) as error:
            raise ValueError(f"{path} is not a readable UTF-8 merges file: {error}") from None
        if "#version" not in lines[0]:
            raise ValueError(f"{path}, line 1: expected a header line containing '#version', got {lines[0][:80]!r}")
        body = lines[1:]
        while body and not body[-1].strip():
            body.pop()
        if max_merges is not None:
            body = body[:max_merges]

        tokenizer = cls()
        ids = {tokenizer.token_name(index): index for index in range(N_BASE)}
        merges = []
        for number, line in enumerate(body, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}, line {number}: expected two tokens separated by a space, got {line!r}")
            left, right = parts
            for part in parts:
                if part not in ids:
                    raise ValueError(
                        f"{path}, line {number}: {part!r} is not a byte symbol or the result of an earlier merge"
                    )
            if left.endswith(END_OF_WORD):
                raise ValueError(f"{path}, line {number}: {left!r} ends a word, so nothing can follow it")
            if left + right in ids:
                raise ValueError(f"{path}, line {number}: {left + right!r} was already made by an earlier merge")
            ids[left + right] = N_BASE + len(merges)
            merges.append((ids[left], ids[right]))
        return cls(merges, special_tokens)

    @classmethod
    def from_clip(cls) -> "BPETokenizer":
        """CLIP's tokenizer, read from the merges file inside the installed open_clip package.

        Gives exactly the ids of ``open_clip.get_tokenizer("ViT-B-32")`` without the start and
        end tokens (vocab 49,408 = 512 byte symbols + 48,894 merges + 2 special tokens).
        """
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("from_clip() needs the open_clip_torch package: pip install open_clip_torch")
        path = Path(list(spec.submodule_search_locations)[0]) / CLIP_MERGES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"open_clip is installed but {path} is missing; reinstall open_clip_torch")
        return cls.load(path, max_merges=CLIP_MERGE_COUNT, special_tokens=CLIP_SPECIAL_TOKENS)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={self.special_tokens})"


# --------------------------------------------------------------------------------------
# The course tokenizer and DALL·E's fixed-length text
# --------------------------------------------------------------------------------------

COURSE_TOKENIZER = "tokenizer/course_bpe.txt"
COURSE_VOCAB_SIZE = 1024


def course_corpus(include_emoji: bool = True) -> list[str]:
    """The course's captions: every shapes caption, plus the emoji names."""
    from dalle_lesson.data import EmojiDataset, all_shapes_captions

    texts = all_shapes_captions()
    if include_emoji:
        texts += EmojiDataset().names
    return texts


def load_course_tokenizer() -> BPETokenizer:
    """The course's tokenizer (vocab 1024), shipped as data/tokenizer/course_bpe.txt."""
    from dalle_lesson.data import shipped_path

    return BPETokenizer.load(shipped_path(COURSE_TOKENIZER))


def tokenize_batch(tokenizer: BPETokenizer, captions: Sequence[str], text_seq_len: int) -> torch.Tensor:
    """Captions -> LongTensor[B, text_seq_len] for DALL·E.

    Captions longer than ``text_seq_len`` tokens are cut (with one warning saying how many).
    Empty positions get DALL·E's learned padding: position ``p`` holds id
    ``tokenizer.vocab_size + p``, a different id per position and never a real token, so the
    text embedding needs ``tokenizer.vocab_size + text_seq_len`` rows.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize_batch expects a list of captions; wrap a single caption as [caption]")
    if text_seq_len < 1:
        raise ValueError(f"text_seq_len must be at least 1, got {text_seq_len}")
    batch = tokenizer.vocab_size + torch.arange(text_seq_len).repeat(len(captions), 1)
    truncated = 0
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption)
        if len(ids) > text_seq_len:
            truncated += 1
            ids = ids[:text_seq_len]
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    if truncated:
        warnings.warn(
            f"{truncated} of {len(captions)} captions had more than text_seq_len={text_seq_len} tokens "
            "and were truncated",
            stacklevel=2,
        )
    return batch


def ids_to_texts(tokenizer: BPETokenizer, batch: torch.Tensor) -> list[str]:
    """The inverse of :func:`tokenize_batch`: drop the padding ids and decode each row."""
    if batch.dim() != 2:
        raise ValueError(f"expected a LongTensor[B, text_seq_len], got shape {tuple(batch.shape)}")
    pad_limit = tokenizer.vocab_size + batch.shape[1]
    if (batch < 0).any() or (batch >= pad_limit).any():
        raise ValueError(f"ids must lie in 0..{pad_limit - 1} (tokens, then one padding id per position)")
    return [tokenizer.decode([i for i in row if i < tokenizer.vocab_size]).strip() for row in batch.tolist()]
