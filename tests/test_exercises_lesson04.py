"""The lesson-04 checkers accept right answers and reject wrong ones."""

import pytest
import torch

from dalle_lesson import attention
from dalle_lesson.exercises import lesson04


def test_conv_keys():
    mask = attention.image_mask("conv", 32)
    lesson04.check_conv_keys(int(mask[16 * 32 + 16].sum()), int(mask[0].sum()))
    with pytest.raises(AssertionError, match="middle"):
        lesson04.check_conv_keys(66, 1)  # counted the keys to the right as well
    with pytest.raises(AssertionError, match="corner"):
        lesson04.check_conv_keys(61, 0)


def test_unanswered_prints_and_passes(capsys):
    lesson04.check_conv_keys(None, None)
    lesson04.check_column_attention(None)
    assert capsys.readouterr().out.count("Not answered yet") == 2


def test_column_attention_right_and_wrong():
    def right(q, k, v, text_len, size):
        return attention.dense_attention(q, k, v, attention.attention_mask("column", text_len, size))

    def row_instead(q, k, v, text_len, size):
        return attention.dense_attention(q, k, v, attention.attention_mask("row", text_len, size))

    lesson04.check_column_attention(right)
    with pytest.raises(AssertionError, match="wrong output"):
        lesson04.check_column_attention(row_instead)
    with pytest.raises(AssertionError, match="output should be"):
        lesson04.check_column_attention(lambda q, k, v, t, s: q[:, :, :t])


def test_mask_handicap_reads_the_numbers():
    lesson04.check_mask_handicap(2.47, 2.44, False)
    lesson04.check_mask_handicap(2.40, 2.60, True)
    with pytest.raises(AssertionError, match="read the numbers"):
        lesson04.check_mask_handicap(2.47, 2.44, True)
    with pytest.raises(AssertionError, match="did not train|not what a trained"):
        lesson04.check_mask_handicap(6.2, 2.44, False)
