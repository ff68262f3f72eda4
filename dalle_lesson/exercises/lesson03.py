"""Checkers for the exercises of lesson 03 (byte-pair encoding). Each one recomputes the
answer from the package's tokenizers and data, all deterministic."""

from __future__ import annotations

import functools
import warnings

from dalle_lesson.bpe import BPETokenizer, CLIP_MERGE_COUNT, N_BASE, load_course_tokenizer
from dalle_lesson.data import EmojiDataset, all_shapes_captions
from dalle_lesson.exercises import correct, unanswered


@functools.lru_cache(maxsize=1)
def _shapes_words() -> tuple[str, ...]:

    splitter = BPETokenizer()
    return tuple(sorted({word for caption in all_shapes_captions() for word in splitter.words(caption)}))


def merges_until_whole_words(tokenizer, words) -> int:
    """The smallest n such that the first n merges of ``tokenizer`` make every word one token.

    Merges only ever glue, so once a word is one token it stays one: binary search works."""
    merges = list(tokenizer.merges)
    low, high = 0, len(merges)
    while low < high:
        middle = (low + high) // 2
        partial = BPETokenizer(merges[:middle])
        if all(len(partial.encode(word)) == 1 for word in words):
            high = middle
        else:
            low = middle + 1
    return low


@functools.lru_cache(maxsize=1)
def _shapes_answer():
    """A tokenizer trained on the shapes captions alone, and the merges it needs (cached: a few seconds)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it runs out of pairs long before 4096: that is expected
        shapes_only = BPETokenizer().train(all_shapes_captions(), 4096)
    return shapes_only, merges_until_whole_words(shapes_only, _shapes_words())


def check_shapes_merges(n_merges: int | None) -> None:
    """Exercise 1: merges a tokenizer trained on the shapes captions alone needs before every
    shapes caption is exactly one token per word."""
    if unanswered(n_merges, expects="a number of merges"):
        return
    shapes_only, want = _shapes_answer()
    words = _shapes_words()
    if n_merges == want + N_BASE:
        raise AssertionError(f"{n_merges} is the vocabulary size; the merges are what it adds to the {N_BASE} "
                             f"byte symbols")
    if n_merges < want:
        partial = BPETokenizer(list(shapes_only.merges)[:n_merges])
        split = next(word for word in words if len(partial.encode(word)) > 1)
        pieces = [partial.token_name(i) for i in partial.encode(split)]
        raise AssertionError(f"after {n_merges} merges {split!r} is still {len(pieces)} tokens, {pieces}: "
                             f"keep merging")
    assert n_merges == want, (f"every word is one token already after {want} merges, fewer than {n_merges}: "
                              f"find the first n that works")
    correct(f"{want} merges make all {len(words)} shapes words single tokens; then no pair is left to merge, "
            f"so training stops there too")


def check_longest_emoji_name(name: str | None, course_tokens: int | None, clip_tokens: int | None) -> None:
    """Exercise 2: the emoji name the course tokenizer splits into the most tokens, that
    number, and the number of tokens CLIP's tokenizer gives the same name."""
    if unanswered(name, course_tokens, clip_tokens,
                  expects="the emoji name with the most course tokens, its course count and its CLIP count"):
        return

    course = load_course_tokenizer()
    names = EmojiDataset().names
    counts = {emoji: len(course.encode(emoji)) for emoji in names}
    most = max(counts.values())
    longest = [emoji for emoji, count in counts.items() if count == most]
    assert name in counts, f"{name!r} is not one of the emoji names (data.EmojiDataset().names)"
    assert course_tokens == counts[name], (
        f"the course tokenizer gives {name!r} {counts[name]} tokens, not {course_tokens}: len(course.encode(name))")
    assert counts[name] == most, (
        f"{name!r} has {counts[name]} course tokens, but {longest[0]!r} has {most}: look at every name")
    clip_count = len(BPETokenizer.from_clip().encode(name))
    assert clip_tokens == clip_count, (
        f"CLIP's tokenizer gives {name!r} {clip_count} tokens, not {clip_tokens}: BPETokenizer.from_clip(), "
        f"without the start and end tokens")
    also = f" (tied with {len(longest) - 1} other)" if len(longest) > 1 else ""
    correct(f"{name!r}{also}: {most} course tokens against {clip_count} for CLIP. Place names are rare in the "
            f"course's captions, so its {len(course.merges)} merges never made them words; CLIP's "
            f"{CLIP_MERGE_COUNT:,} merges, learned from web text, made most of them whole words")


def check_padding_with_zero(token_name: str | None, decoded: str | None, caption: str = "a red circle",
                            text_seq_len: int = 16) -> None:
    """Exercise 3: which token id 0 is in the course tokenizer (``token_name(0)``), and what
    ``decode`` gives for ``caption`` padded to ``text_seq_len`` with id 0 instead of the padding ids."""
    if unanswered(token_name, decoded, expects="the name of token 0 and the decoded zero-padded caption"):
        return
    course = load_course_tokenizer()
    assert token_name == course.token_name(0), (
        f"token 0 of the course tokenizer is {course.token_name(0)!r}, not {token_name!r}: course.token_name(0)")
    ids = course.encode(caption)
    want = course.decode(ids + [0] * (text_seq_len - len(ids)))
    assert decoded == want, (
        f"{caption!r} encoded, padded with zeros to {text_seq_len} ids and decoded gives {want!r}, not "
        f"{decoded!r}: course.decode(ids + [0] * (text_seq_len - len(ids)))")
    correct(f"id 0 is {token_name!r}, a real byte, so the padded caption reads {decoded!r}: the model could not "
            f"tell padding from text, and every empty slot would share one embedding")
