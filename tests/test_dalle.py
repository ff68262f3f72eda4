"""The DALL·E model: KV cache == full forward, sparse == dense, loss, sizes, bad input."""

import pytest
import torch
import torch.nn.functional as F

from dalle_lesson.dalle import DALLE, DALLEConfig, load_dalle, save_dalle


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_config(**overrides) -> DALLEConfig:
    # 6 text tokens (vocab 20 + 6 padding ids) and a 4x4 grid of 10 codes; a 3x3 conv
    # kernel so that conv differs from causal on this small grid.
    values = dict(d_model=32, n_layers=2, n_heads=4, text_seq_len=6, text_vocab_size=20, image_size=4,
                  image_vocab_size=10, conv_kernel=3)
    return DALLEConfig(**{**values, **overrides})


def random_batch(config: DALLEConfig, batch_size: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_vocab_total, (batch_size, config.text_seq_len), generator=g)
    codes = torch.randint(0, config.image_vocab_size, (batch_size, config.image_size, config.image_size), generator=g)
    return text, codes


@pytest.mark.parametrize("masks", ["causal", "row", "column", "conv", "paper"])
def test_cached_step_by_step_logits_equal_the_full_forward(masks):
    torch.manual_seed(0)
    config = small_config(masks=masks, n_layers=4 if masks == "paper" else 2)
    model = DALLE(config).eval()
    text, codes = random_batch(config)
    stream = torch.cat([text, codes.flatten(1)], dim=1)
    with torch.no_grad():
        full = model(text, codes)
        cache = model.new_cache(batch_size=3)
        # prefill part of the text, then a chunk straddling text and image, then one token at a time
        pieces = [model.forward_tokens(stream[:, :4], 0, cache), model.forward_tokens(stream[:, 4:9], 4, cache)]
        pieces += [model.forward_tokens(stream[:, t : t + 1], t, cache) for t in range(9, config.seq_len)]
    stepped = torch.cat(pieces, dim=1)
    assert stepped.shape == full.shape == (3, config.seq_len, config.vocab_total)
    assert torch.equal(torch.isinf(stepped), torch.isinf(full))
    finite = torch.isfinite(full)
    torch.testing.assert_close(stepped[finite], full[finite], atol=1e-5, rtol=0)
    assert cache.length == config.seq_len


def test_cache_can_rewind_and_a_wrong_cache_sees_the_difference():
    torch.manual_seed(0)
    config = small_config(masks="causal")
    model = DALLE(config).eval()
    text, codes = random_batch(config)
    stream = torch.cat([text, codes.flatten(1)], dim=1)
    with torch.no_grad():
        full = model(text, codes)
        cache = model.new_cache(3)
        model.forward_tokens(stream[:, :10], 0, cache)
        other = (stream[:, 10:11] + 1) % config.image_vocab_size
        changed = model.forward_tokens(other, 10, cache)  # a different token at position 10 ...
        image = slice(config.text_vocab_total, None)  # the finite half of the logits here
        assert (changed[:, 0, image] - full[:, 10, image]).abs().max() > 1e-3
        again = model.forward_tokens(stream[:, 10:11], 10, cache)  # ... rewound and replaced
    torch.testing.assert_close(again[:, 0, image], full[:, 10, image], atol=1e-5, rtol=0)


@pytest.mark.parametrize("masks", ["row", "column", "paper"])
def test_sparse_model_equals_dense_model_forward_and_backward(masks):
    torch.manual_seed(0)
    dense = DALLE(small_config(masks=masks, n_layers=4, attention="dense"))
    sparse = DALLE(small_config(masks=masks, n_layers=4, attention="sparse"))
    sparse.load_state_dict(dense.state_dict())
    text, codes = random_batch(dense.config)
    dense_loss, sparse_loss = dense.loss(text, codes)["loss"], sparse.loss(text, codes)["loss"]
    torch.testing.assert_close(sparse_loss, dense_loss, atol=1e-5, rtol=0)
    dense_loss.backward()
    sparse_loss.backward()
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(p_sparse.grad, p_dense.grad, atol=1e-5, rtol=0, msg=name)


def test_loss_is_one_eighth_text_seven_eighths_image_of_shifted_next_token():
    torch.manual_seed(0)
    config = small_config()
    model = DALLE(config)
    text, codes = random_batch(config)
    losses = model.loss(text, codes)
    logits = model(text, codes)
    # recompute position by position: output t predicts stream token t + 1 from its own half
    stream = torch.cat([text, codes.flatten(1)], dim=1)
    T, Vt = config.text_seq_len, config.text_vocab_total
    text_terms, image_terms = [], []
    for t in range(config.seq_len - 1):
        target = stream[:, t + 1]
        if t + 1 < T:
            assert torch.isinf(logits[:, t, Vt:]).all() and torch.isfinite(logits[:, t, :Vt]).all()
            text_terms.append(-torch.log_softmax(logits[:, t, :Vt], -1).gather(1, target[:, None]))
        else:
            assert torch.isinf(logits[:, t, :Vt]).all() and torch.isfinite(logits[:, t, Vt:]).all()
            image_terms.append(-torch.log_softmax(logits[:, t, Vt:], -1).gather(1, target[:, None]))
    assert len(text_terms) == T - 1 and len(image_terms) == config.image_seq_len
    text_loss, image_loss = torch.cat(text_terms).mean(), torch.cat(image_terms).mean()
    torch.testing.assert_close(losses["text_loss"], text_loss)
    torch.testing.assert_close(losses["image_loss"], image_loss)
    torch.testing.assert_close(losses["loss"], text_loss / 8 + image_loss * 7 / 8)


def test_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    config = small_config(n_layers=4)  # the paper schedule: row, column, row, conv
    model = DALLE(config).eval()
    text, codes = random_batch(config)
    changed = codes.clone()
    changed[:, 2, 1] = (changed[:, 2, 1] + 1) % config.image_vocab_size  # image token 9 = stream position 15
    with torch.no_grad():
        before, after = model(text, codes), model(text, changed)
    position = config.text_seq_len + 2 * 4 + 1
    assert torch.equal(before[:, :position], after[:, :position])
    assert not torch.equal(before[:, position:], after[:, position:])


def test_presets():
    tiny = DALLEConfig.tiny()
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.head_dim) == (256, 4, 8, 32)
    assert (tiny.text_seq_len, tiny.text_vocab_total, tiny.image_size, tiny.image_vocab_size) == (32, 1056, 8, 512)
    assert tiny.layer_kinds() == ["row", "column", "row", "conv"]
    paper = DALLEConfig.paper()
    assert (paper.d_model, paper.n_layers, paper.n_heads, paper.head_dim) == (3968, 64, 62, 64)
    assert (paper.text_seq_len, paper.text_vocab_size, paper.seq_len, paper.image_vocab_size) == (256, 16384, 1280, 8192)


def test_paper_model_on_meta_has_about_12_billion_parameters():
    with torch.device("meta"):
        model = DALLE(DALLEConfig.paper())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 11.6e9 <= model.num_parameters() <= 12.4e9


def test_logits_are_fp32_under_autocast():
    torch.manual_seed(0)
    model = DALLE(small_config())
    text, codes = random_batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(text, codes)
        loss = model.loss(text, codes)["loss"]
    assert logits.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_input_names_shapes_and_ranges():
    config = small_config()
    model = DALLE(config)
    text, codes = random_batch(config)
    with pytest.raises(ValueError, match=r"LongTensor\[batch, 6\]"):
        model(text[:, :5], codes)
    with pytest.raises(ValueError, match=r"0\.\.25"):
        model(text.clone().fill_(26), codes)
    with pytest.raises(ValueError, match=r"LongTensor\[batch, 4, 4\]"):
        model(text, codes[:, :3, :3])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        model(text, codes + 10)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        model(text, codes - 11)
    with pytest.raises(TypeError, match="integer"):
        model(text.float(), codes)
    with pytest.raises(ValueError, match="batch size"):
        model(text, codes[:2])
    with pytest.raises(ValueError, match="KV cache"):
        model.forward_tokens(codes.flatten(1)[:, :1], 7)
    cache = model.new_cache(3)
    with pytest.raises(ValueError, match="gap"):
        model.forward_tokens(codes.flatten(1)[:, :1], 8, cache)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DALLE(small_config(masks="row", attention="sparse"))
    path = tmp_path / "model.safetensors"
    save_dalle(model, path)
    loaded = load_dalle(path)
    assert loaded.config == model.config and not loaded.training
    text, codes = random_batch(model.config)
    with torch.no_grad():
        expected, got = model.eval()(text, codes), loaded(text, codes)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], atol=2e-3, rtol=0)  # fp16 weights
    assert not list(tmp_path.glob("*.tmp"))


def test_a_meta_model_materializes_with_masks_and_weights():
    config = small_config(n_layers=4)
    with torch.device("meta"):
        model = DALLE(config)
    model.materialize("cpu")
    reference = DALLE(config)
    for kind in ("row", "column", "conv"):
        assert torch.equal(model.mask(kind), reference.mask(kind))
    assert torch.equal(model.predicts_image, reference.predicts_image)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    text, codes = random_batch(config)
    assert torch.isfinite(model.loss(text, codes)["loss"])
