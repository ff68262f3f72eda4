"""Tests of dalle_lesson.bpe, pinned to open_clip's own tokenizer as the independent reference."""

from __future__ import annotations

import gzip
import random
import warnings
from collections import Counter

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean

from dalle_lesson.bpe import (
    BPETokenizer,
    clean_text,
    ids_to_texts,
    load_course_tokenizer,
    merge_pair,
    tokenize_batch,
)

# ---- a varied set of test strings, built here ----------------------------------------

LATIN_WORDS = "a small red circle to the left of big blue square cat dog photo of an astronaut riding horse".split()
CONTRACTIONS = ["'ſ", "it's", "don't", "WE'LL", "they're", "I'm", "you've", "she'd", "rock'n'roll", "o'clock", "'s", "''"]
PUNCTUATION = list(".,;:!?-_()[]{}<>/\\|@#$%^*+=~`\"'") + ["...", "--", "?!", "&amp;", "&lt;3", "&#39;", "&amp;amp;", "</w>"]
NUMBERS = ["0", "7", "42", "2024", "3.14159", "1,000,000", "-5", "1e-9", "٣", "Ⅻ", "½", "²"]
SCRIPTS = [
    "naïve", "café", "Ångström", "straße", "ÉCOLE", "ﬁne", "Привет", "мир", "Ελληνικά", "東京タワー", "中文字符",
    "한국어", "العربية", "עברית", "हिन्दी", "ภาษาไทย", "ქართული", "Ǆemal", "ſ", "İstanbul", "e\u0301", "ｆｕｌｌｗｉｄｔｈ",
]
EMOJI = ["🍕", "😀", "👍🏽", "👩\u200d👩\u200d👧", "🇫🇷", "❤️", "🏳️\u200d🌈", "🤖", "✨✨✨", "☃"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\u3000", "\u00a0", " \t \n "]
ODD = ["\x00", "\x01", "\x7f", "\x1b[31m", "\u200b", "\ufeff", "cafÃ©", "â€œquotedâ€\x9d", "“curly”", "‘x’"]


def varied_strings(count: int = 2500, seed: int = 0) -> list[str]:
    """Random captions mixing every kind of piece above, plus some very long words."""
    rng = random.Random(seed)
    kinds = [LATIN_WORDS, CONTRACTIONS, PUNCTUATION, NUMBERS, SCRIPTS, EMOJI, ODD]
    strings = ["", " ", "a", "A", "\n\n", "<start_of_text>", "x <end_of_text> y"]
    while len(strings) < count:
        pieces = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(kinds)
            piece = rng.choice(kind)
            if rng.random() < 0.2:
                piece = piece.upper()
            pieces.append(piece)
            pieces.append(rng.choice(WHITESPACE) if rng.random() < 0.8 else "")
        roll = rng.random()
        if roll < 0.05:  # a very long word, sometimes made of a rare script
            alphabet = rng.choice(["abcdefghijklmnopqrstuvwxyz", "xyzq", "日本語漢字", "ﬁéß"])
            pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400))))
        elif roll < 0.15:  # random printable ASCII (covers the clean_text fast path)
            pieces = ["".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 60)))]
        elif roll < 0.2:  # random code points from the whole of Unicode (no surrogates)
            pieces = ["".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 20)))]
        strings.append("".join(pieces))
    return strings


STRINGS = varied_strings()


@pytest.fixture(scope="module")
def clip() -> BPETokenizer:
    return BPETokenizer.from_clip()


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def course() -> BPETokenizer:
    return load_course_tokenizer()


# ---- parity with open_clip ------------------------------------------------------------


def test_clean_text_matches_open_clip():
    for text in STRINGS:
        assert clean_text(text) == whitespace_clean(basic_clean(text)).lower(), repr(text)


def test_from_clip_encodes_like_open_clip(clip, reference):
    assert clip.vocab_size == reference.vocab_size == 49408
    mismatches = [text for text in STRINGS if clip.encode(text) != reference.encode(text)]
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]!r}"


def test_from_clip_matches_open_clip_get_tokenizer(clip):
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-B-32")
    captions = STRINGS[:200]
    batch = tokenize(captions)  # [B, 77]: start, ids, end, zeros (truncated to 77)
    for caption, row in zip(captions, batch.tolist()):
        ids = clip.encode(caption)[:75]
        assert row[: len(ids) + 2] == [49406, *ids, 49407]


def test_from_clip_decodes_like_open_clip(clip, reference):
    for text in STRINGS[:1000]:
        ids = reference.encode(text)
        assert clip.decode(ids) == reference.decode(ids)
    rng = random.Random(1)  # arbitrary id sequences too, including half characters
    for _ in range(500):
        ids = [rng.randrange(clip.vocab_size) for _ in range(rng.randint(0, 20))]
        assert clip.decode(ids) == reference.decode(ids)


def test_round_trip_keeps_every_character(clip, course):
    for tokenizer in (clip, course):
        for text in STRINGS:
            words = tokenizer.words(text)
            if any(word in tokenizer.special_tokens for word in words):
                continue  # a special token decodes without the space after it (as in open_clip)
            assert tokenizer.decode(tokenizer.encode(text)) == "".join(word + " " for word in words)


def test_course_merges_file_is_read_identically_by_open_clip(course, tmp_path):
    path = tmp_path / "course_bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(["#version: 0.2", *course.merge_lines()]))
    theirs = SimpleTokenizer(bpe_path=str(path))  # it adds its two special tokens; ours has none
    for text in STRINGS:
        if "_of_text>" in text.lower():
            continue
        assert course.encode(text) == theirs.encode(text), repr(text)


# ---- training -------------------------------------------------------------------------


def train_by_full_recount(tokenizer: BPETokenizer, texts: list[str], vocab_size: int) -> list[tuple[int, int]]:
    """The textbook trainer: recount every pair after every merge (slow but obviously right)."""
    words = Counter(word for text in texts for word in tokenizer.words(text))
    spelled = {word: tokenizer.word_to_base_ids(word) for word in words}
    merges = []
    while 512 + len(merges) < vocab_size:
        pairs = Counter()
        for word, ids in spelled.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], -pair[0], -pair[1]))
        merges.append(best)
        spelled = {word: merge_pair(ids, best, 511 + len(merges)) for word, ids in spelled.items()}
    return merges


@pytest.mark.parametrize("corpus", ["captions", "unicode", "many ties"])
def test_incremental_training_equals_full_recount(corpus):
    if corpus == "many ties":  # a tiny alphabet: many pairs share a count, so tie-breaking matters
        rng = random.Random(4)
        texts = ["".join(rng.choice("ab ab.") for _ in range(rng.randint(1, 30))) for _ in range(300)]
        vocab_size = 620
    elif corpus == "captions":
        from dalle_lesson.data import all_shapes_captions

        texts = all_shapes_captions()[::50]
        vocab_size = 600
    else:
        texts = varied_strings(300, seed=3)
        vocab_size = 900
    tokenizer = BPETokenizer().train(texts, vocab_size)
    assert list(tokenizer.merges) == train_by_full_recount(BPETokenizer(), texts, vocab_size)
    assert tokenizer.vocab_size == vocab_size


def test_training_learns_the_obvious_merges():
    tokenizer = BPETokenizer().train(["aaab aaab aaab", "ab"], 515)
    # "a a" occurs 6 times (twice in each "aaab"), "a b</w>" 4 times; then "aa" + "ab</w>".
    assert tokenizer.merge_lines() == ["a a", "a b</w>", "aa ab</w>"]
    assert tokenizer.encode("aaab") == [514]
    assert tokenizer.encode("ab") == [513]


def test_training_stops_with_a_warning_when_pairs_run_out():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tokenizer = BPETokenizer().train(["abc"], 600)
    assert tokenizer.vocab_size == 514  # a+b, ab+c</w>
    assert tokenizer.encode("abc") == [513]


def test_constructor_rejects_impossible_merges():
    with pytest.raises(ValueError, match="does not exist yet"):
        BPETokenizer([(10, 600)])
    with pytest.raises(ValueError, match="ends a word"):
        BPETokenizer([(300, 10)])


def test_train_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="at least 512"):
        BPETokenizer().train(["abc"], 300)


def test_shipped_course_tokenizer(course):
    assert course.vocab_size == 1024
    ids = course.encode("A small RED circle to the left of a big blue square")
    assert ids == course.encode("a small red circle to the left of a big blue square")
    assert len(ids) == 12  # every word of the shapes captions is one token


# ---- files ----------------------------------------------------------------------------


def test_save_and_load_round_trip(course, tmp_path):
    course.save(tmp_path / "merges.txt")
    loaded = BPETokenizer.load(tmp_path / "merges.txt")
    assert loaded.merges == course.merges
    assert all(loaded.encode(text) == course.encode(text) for text in STRINGS[:300])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "lines, message",
    [
        (["i n"], "line 1: expected a header"),
        (["#version: 0.2", "i n", "i n t"], "line 3: expected two tokens"),
        (["#version: 0.2", "i n", "in qq"], "line 3: 'qq' is not a byte symbol"),
        (["#version: 0.2", "i n", "i n"], "line 3: 'in' was already made"),
        (["#version: 0.2", "a</w> b"], "line 2: 'a</w>' ends a word"),
        (["#version: 0.2", "i n", "", "t h"], "line 3: expected two tokens"),
    ],
)
def test_load_names_the_bad_line(tmp_path, lines, message):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        BPETokenizer.load(path)


def test_load_of_a_missing_or_binary_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "nope.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not a readable UTF-8"):
        BPETokenizer.load(tmp_path / "binary.txt")


# ---- bad input --------------------------------------------------------------------------


def test_empty_text_and_bad_ids(course):
    assert course.encode("") == []
    assert course.encode(" \n\t ") == []
    assert course.decode([]) == ""
    for bad in (1024, 5000, -1):
        with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
            course.decode([5, bad])
    with pytest.raises(TypeError):
        course.encode(None)
    with pytest.raises(TypeError):
        course.decode([1.5])
    assert course.decode(torch.tensor([320, 563])) == course.decode([320, 563]) == "a red "


# ---- DALL·E's fixed-length text --------------------------------------------------------------


def test_tokenize_batch_pads_per_position(course):
    captions = ["a red circle", "", "A BIG blue square above a small green star"]
    batch = tokenize_batch(course, captions, 16)
    assert batch.shape == (3, 16) and batch.dtype == torch.long
    for row, caption in zip(batch.tolist(), captions):
        ids = course.encode(caption)
        assert row[: len(ids)] == ids
        assert row[len(ids):] == [1024 + p for p in range(len(ids), 16)]
    assert ids_to_texts(course, batch) == ["a red circle", "", "a big blue square above a small green star"]


def test_tokenize_batch_truncates_with_a_warning(course):
    captions = ["a red circle", "a big blue square above a small green star"]
    with pytest.warns(UserWarning, match=r"1 of 2 captions had more than text_seq_len=4"):
        batch = tokenize_batch(course, captions, 4)
    assert batch[1].tolist() == course.encode(captions[1])[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_batch(course, captions, 32)  # nothing to cut: no warning
    with pytest.raises(TypeError, match="list of captions"):
        tokenize_batch(course, "a red circle", 8)
    with pytest.raises(ValueError):
        ids_to_texts(course, torch.tensor([[1024 + 4]]))


# ---- the command line ---------------------------------------------------------------------


def test_train_command(tmp_path):
    from dalle_lesson.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(varied_strings(200, seed=5)), encoding="utf-8")
    out = tmp_path / "tok" / "bpe.txt"
    main(["train", "bpe", "--text", str(text), "--vocab-size", "600", "--out", str(out)])
    assert BPETokenizer.load(out).vocab_size == 600
