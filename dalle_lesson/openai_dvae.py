"""OpenAI's released dVAE weights (the ``dall_e`` package), read without running its code.

OpenAI published the paper's dVAE as two pickled PyTorch modules, ``encoder.pkl`` and
``decoder.pkl``. Unpickling a file can run any code it names, so this module never
unpickles freely: :func:`read_dall_e_weights` lets ``torch.load(weights_only=True)``
accept only the handful of classes those two files name, each replaced by an inert
stand-in that just stores attributes, and collects the tensors. Then
:func:`load_openai_dvae` reads the sizes off the tensor shapes and fills a
:class:`dalle_lesson.dvae.DiscreteVAE`, whose module names follow the released ones.
Lesson 07 uses it; the ``dall_e`` package itself is needed only by the test that checks
this loader against it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_lesson.dvae import DiscreteVAE, DVAEConfig


# Every global a pickled ``dall_e`` Encoder or Decoder may name. Each is replaced by an inert
# stand-in class that only stores the pickled attributes, so nothing from the file runs:
# torch.load(weights_only=True) refuses any other global (os.system, eval, ...).
_DALL_E_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample",
)


class _PickledModule:
    """Inert stand-in for a pickled ``nn.Module``: it only keeps the pickled ``__dict__``."""


def _stand_ins() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (_PickledModule,), {"pickled_name": name}), name) for name in _DALL_E_CLASSES]


def _parameters_of(module: _PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk a stand-in module tree and collect its parameters under their dotted names."""
    found = {}
    for name, tensor in (module.__dict__.get("_parameters") or {}).items():
        if tensor is not None:
            found[prefix + name] = tensor
    for name, tensor in (module.__dict__.get("_buffers") or {}).items():
        if tensor is not None:
            found[prefix + name] = tensor
    for name, child in (module.__dict__.get("_modules") or {}).items():
        if child is not None:
            found.update(_parameters_of(child, f"{prefix}{name}."))
    return found


def read_dall_e_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``dall_e`` state dict in ``path``: a saved state dict, or a whole pickled module.

    Uses ``torch.load(weights_only=True)``: a file that names any global outside the
    ``dall_e`` encoder/decoder classes (for example one that would call ``os.system``) is
    refused before anything from it runs.
    """
    import pickle

    with torch.serialization.safe_globals(_stand_ins()):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"refusing to load {path}: it is not a plain dall_e encoder/decoder file (state dict or "
                f"pickled module). Nothing from it was run. The unpickler said: {error}"
            ) from None
    if isinstance(loaded, _PickledModule):
        loaded = _parameters_of(loaded)
    if not isinstance(loaded, dict) or not all(torch.is_tensor(t) for t in loaded.values()):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dall_e state dict or module")
    return {name: tensor.detach().float() for name, tensor in loaded.items()}


def _count(state: dict, pattern: str) -> int:
    """How many of ``pattern.format(1), pattern.format(2), ...`` prefix some key of ``state``."""
    n = 0
    while any(key.startswith(pattern.format(n + 1)) for key in state):
        n += 1
    return n


def load_openai_dvae(encoder_path: str | Path, decoder_path: str | Path, image_size: int = 256) -> DiscreteVAE:
    """A :class:`DiscreteVAE` with the weights of OpenAI's released ``dall_e`` Encoder and Decoder.

    Each path may hold a state dict (``torch.save(encoder.state_dict())``) or the original
    pickled module (``encoder.pkl``, ``torch.save(encoder)``). The sizes (width, vocabulary,
    groups, blocks) are read from the tensor shapes; the ``dall_e`` package is not needed
    and no code from the files is executed. ``model.logits(x)`` equals
    ``dall_e_encoder(map_pixels(x))`` and ``model.decode(z)`` equals
    ``unmap_pixels(sigmoid(dall_e_decoder(one_hot(z))[:, :3]))``.
    """
    encoder, decoder = read_dall_e_weights(encoder_path), read_dall_e_weights(decoder_path)
    for name, state, key in (("encoder", encoder, "blocks.input.w"), ("decoder", decoder, "blocks.output.conv.w")):
        if key not in state:
            raise ValueError(f"the {name} file has no {key!r}: is it a dall_e {name}? keys: {sorted(state)[:5]}...")
    n_hid, channels = encoder["blocks.input.w"].shape[:2]
    config = DVAEConfig(
        image_size=image_size, channels=channels, vocab_size=encoder["blocks.output.conv.w"].shape[0], n_hid=n_hid,
        n_init=decoder["blocks.input.w"].shape[0], group_count=_count(encoder, "blocks.group_{}."),
        n_blk_per_group=_count(encoder, "blocks.group_1.block_{}."), likelihood="logit_laplace",
    )
    if decoder["blocks.output.conv.w"].shape[:2] != (2 * channels, n_hid) or decoder["blocks.input.w"].shape[1] != config.vocab_size:
        raise ValueError("the encoder and decoder files do not belong together (widths or vocabulary differ)")
    rename = {"w": "weight", "b": "bias"}
    state = {}
    for part, weights in (("encoder", encoder), ("decoder", decoder)):
        for name, tensor in weights.items():
            stem, _, leaf = name.rpartition(".")
            state[f"{part}.{stem}.{rename.get(leaf, leaf)}"] = tensor
    model = DiscreteVAE(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"these files do not match the dall_e layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()

