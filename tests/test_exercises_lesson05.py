"""The lesson-05 checkers accept right answers and reject wrong ones."""

import pytest
import torch

from dalle_lesson.exercises import lesson05
from dalle_lesson.sampling import filter_logits, top_k_filter, top_p_filter


def test_filter_order():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    k_then_p = torch.isfinite(filter_logits(logits, top_k=8, top_p=0.5))
    p_then_k = torch.isfinite(top_k_filter(top_p_filter(logits, 0.5), 8))
    lesson05.check_filter_order(logits, k_then_p, p_then_k, top_k=8, top_p=0.5)
    with pytest.raises(AssertionError, match="top-p then top-k"):
        lesson05.check_filter_order(logits, k_then_p, k_then_p, top_k=8, top_p=0.5)
    with pytest.raises(AssertionError, match="top-k then top-p"):
        only_k = torch.isfinite(top_k_filter(logits, 8))  # forgot the second filter
        lesson05.check_filter_order(logits, only_k, p_then_k, top_k=8, top_p=0.5)


def test_batch_timing():
    lesson05.check_batch_timing({1: 1.0, 4: 0.43, 16: 0.17})
    with pytest.raises(AssertionError, match="not less"):
        lesson05.check_batch_timing({1: 0.2, 4: 0.8, 16: 3.2})  # the batch's time, not per image
    with pytest.raises(AssertionError, match="1, 4 and 16"):
        lesson05.check_batch_timing({1: 1.0})


class _TinyPipeline:
    """Enough of a Pipeline for the completion checker: a dVAE that encodes to a fixed grid."""

    class _DVAE:
        def encode(self, images):
            return torch.arange(16).view(1, 4, 4) % 5

    class _Model:
        class config:
            image_vocab_size = 5

    dvae, model = _DVAE(), _Model()


def test_left_half_completion():
    def right(codes, caption, seed=0):
        out = codes.clone()
        generator = torch.Generator().manual_seed(seed)
        out[..., 2:] = torch.randint(0, 5, out[..., 2:].shape, generator=generator)
        return out

    lesson05.check_left_half_completion(right, _TinyPipeline())
    with pytest.raises(AssertionError, match="nothing was drawn"):
        lesson05.check_left_half_completion(lambda codes, caption, seed=0: codes.clone(), _TinyPipeline())
    with pytest.raises(AssertionError, match="left half"):
        lesson05.check_left_half_completion(lambda c, caption, seed=0: (c + 1) % 5, _TinyPipeline())
    with pytest.raises(AssertionError, match="same seed"):
        lesson05.check_left_half_completion(lambda c, caption, seed=0: right(c, caption, seed=int(torch.randint(9**9, ()))),
                                            _TinyPipeline())
