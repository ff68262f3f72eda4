"""The lesson 03 checkers accept a right answer and reject a wrong one."""

import pytest

from dalle_lesson import bpe
from dalle_lesson.exercises import lesson03


def test_none_only_says_what_is_expected(capsys):
    lesson03.check_shapes_merges(None)
    lesson03.check_longest_emoji_name(None, None, None)
    lesson03.check_padding_with_zero(None, None)
    assert capsys.readouterr().out.count("Not answered yet") == 3


def test_merges_until_whole_words():
    # the merges come out as a + b</w> (three times), then x + y</w> (once)
    tokenizer = bpe.BPETokenizer().train(["ab ab ab xy"], bpe.N_BASE + 2)
    assert lesson03.merges_until_whole_words(tokenizer, ["ab"]) == 1
    assert lesson03.merges_until_whole_words(tokenizer, ["ab", "xy"]) == 2


def test_shapes_merges():
    lesson03.check_shapes_merges(109)  # the shapes captions' words, all single tokens after 109 merges
    with pytest.raises(AssertionError, match="vocabulary size"):
        lesson03.check_shapes_merges(109 + bpe.N_BASE)
    with pytest.raises(AssertionError, match="still"):
        lesson03.check_shapes_merges(60)


def test_longest_emoji_name():
    lesson03.check_longest_emoji_name("flag: british indian ocean territory", 20, 6)
    with pytest.raises(AssertionError, match="look at every name"):
        lesson03.check_longest_emoji_name("grinning face", 4, 2)
    with pytest.raises(AssertionError, match="CLIP"):
        lesson03.check_longest_emoji_name("flag: british indian ocean territory", 20, 20)


def test_padding_with_zero():
    course = bpe.load_course_tokenizer()
    ids = course.encode("a red circle")
    lesson03.check_padding_with_zero("!", course.decode(ids + [0] * (16 - len(ids))))
    with pytest.raises(AssertionError, match="token 0"):
        lesson03.check_padding_with_zero("a</w>", "a red circle")
    with pytest.raises(AssertionError, match="padded with zeros"):
        lesson03.check_padding_with_zero("!", "a red circle")
