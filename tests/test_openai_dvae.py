"""load_openai_dvae against OpenAI's own ``dall_e`` package (PyPI ``dall-e==0.1``).

The reference package is not a dependency of the course, only of the ``test`` extra
(``pip install -e ".[test]"`` brings it). For another environment, either
``pip install dall-e==0.1`` or put it on a path of its own:

    pip install --no-deps --target /tmp/dall_e_ref dall-e==0.1
    DALL_E_PATH=/tmp/dall_e_ref pytest tests/test_openai_dvae.py
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

from dalle_lesson.dvae import DVAEConfig
from dalle_lesson.openai_dvae import load_openai_dvae

if os.environ.get("DALL_E_PATH"):
    sys.path.insert(0, os.environ["DALL_E_PATH"])
try:
    import dall_e
except ImportError:
    dall_e = None

needs_dall_e = pytest.mark.skipif(
    dall_e is None,
    reason="OpenAI's dall_e package is not importable: `pip install --no-deps --target DIR dall-e==0.1` "
    "and set DALL_E_PATH=DIR (see this file's docstring)",
)


def reference_pair(seed: int, n_hid: int, vocab_size: int, n_blk_per_group: int, n_init: int):
    """Random-weight dall_e Encoder/Decoder; biases made non-zero so they are tested too."""
    torch.manual_seed(seed)
    encoder = dall_e.Encoder(n_hid=n_hid, vocab_size=vocab_size, n_blk_per_group=n_blk_per_group)
    decoder = dall_e.Decoder(n_hid=n_hid, vocab_size=vocab_size, n_blk_per_group=n_blk_per_group, n_init=n_init)
    with torch.no_grad():
        for module in (encoder, decoder):
            for name, parameter in module.named_parameters():
                if name.endswith(".b"):
                    parameter.normal_(std=0.1)
    return encoder.eval(), decoder.eval()


def compare(model, encoder, decoder, image_size: int, vocab_size: int, seed: int = 1) -> None:
    torch.manual_seed(seed)
    images = torch.rand(2, 3, image_size, image_size)
    with torch.no_grad():
        reference_logits = encoder(dall_e.map_pixels(images))
        ours_logits = model.logits(images)
        assert ours_logits.shape == reference_logits.shape
        torch.testing.assert_close(ours_logits, reference_logits, atol=1e-5, rtol=1e-5)

        codes = reference_logits.argmax(1)
        assert torch.equal(model.encode(images), codes)
        one_hot = F.one_hot(codes, vocab_size).permute(0, 3, 1, 2).float()
        reference_stats = decoder(one_hot)
        torch.testing.assert_close(model.decoder(one_hot), reference_stats, atol=1e-5, rtol=1e-5)
        reference_pixels = dall_e.unmap_pixels(torch.sigmoid(reference_stats[:, :3]))
        torch.testing.assert_close(model.decode(codes), reference_pixels, atol=1e-5, rtol=1e-5)
        # The pixels must actually vary, or the comparison above would prove little.
        assert reference_pixels.std() > 0.01


@needs_dall_e
@pytest.mark.parametrize("form", ["state_dict", "pickled_module"])
def test_same_logits_and_pixels_as_dall_e(tmp_path, form):
    encoder, decoder = reference_pair(seed=0, n_hid=64, vocab_size=512, n_blk_per_group=1, n_init=32)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        torch.save(module.state_dict() if form == "state_dict" else module, tmp_path / f"{name}.pkl")
    model = load_openai_dvae(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", image_size=32)
    assert (model.config.n_hid, model.config.vocab_size, model.config.group_count) == (64, 512, 4)
    assert (model.config.n_blk_per_group, model.config.n_init) == (1, 32)
    compare(model, encoder, decoder, image_size=32, vocab_size=512)


@needs_dall_e
def test_two_blocks_per_group_pickled(tmp_path):
    encoder, decoder = reference_pair(seed=3, n_hid=64, vocab_size=512, n_blk_per_group=2, n_init=128)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    model = load_openai_dvae(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", image_size=16)
    compare(model, encoder, decoder, image_size=16, vocab_size=512)


@needs_dall_e
def test_full_paper_size_has_the_released_shapes():
    """The default dall_e Encoder/Decoder (the released sizes) map onto the paper preset, name for name.

    Built on the meta device: shapes only, no memory, instant.
    """
    from dalle_lesson.dvae import DiscreteVAE

    meta = torch.device("meta")
    encoder, decoder = dall_e.Encoder(device=meta), dall_e.Decoder(device=meta)
    with meta:
        ours = DiscreteVAE(DVAEConfig.paper()).state_dict()
    rename = {"w": "weight", "b": "bias"}
    theirs = {}
    for part, module in (("encoder", encoder), ("decoder", decoder)):
        for name, tensor in module.state_dict().items():
            stem, _, leaf = name.rpartition(".")
            theirs[f"{part}.{stem}.{rename[leaf]}"] = tuple(tensor.shape)
    assert {name: tuple(t.shape) for name, t in ours.items()} == theirs
    assert theirs["encoder.blocks.output.conv.weight"] == (8192, 2048, 1, 1)
    assert theirs["decoder.blocks.input.weight"] == (128, 8192, 1, 1)


class RunsShellCommand:
    """An object whose unpickling would run os.system: the classic malicious pickle."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dalle_lesson_pwned",))


class StrangeClass:
    pass


def test_malicious_pickle_is_refused(tmp_path):
    marker = "/tmp/dalle_lesson_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": torch.zeros(1), "payload": RunsShellCommand()}, bad)
    with pytest.raises(ValueError, match="refusing to load.*Nothing from it was run"):
        load_openai_dvae(bad, bad)
    assert not os.path.exists(marker)
    # A raw pickle (not even a torch file) is refused too.
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(RunsShellCommand()))
    with pytest.raises(ValueError, match="refusing to load"):
        load_openai_dvae(raw, raw)
    assert not os.path.exists(marker)


def test_unknown_class_is_refused(tmp_path):
    bad = tmp_path / "encoder.pkl"
    torch.save(StrangeClass(), bad)
    with pytest.raises(ValueError, match="refusing to load"):
        load_openai_dvae(bad, bad)


def test_wrong_files_give_clear_errors(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is it a dall_e encoder"):
        load_openai_dvae(path, path)
