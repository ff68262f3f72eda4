"""One checkpoint format: atomic writes, the right kind, sizes checked before memory."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_lesson import checkpoint
from dalle_lesson.dalle import DALLE, DALLEConfig, load_dalle
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, load_dvae, save_dvae
from dalle_lesson.vae import VAE, Autoencoder, VAEConfig, load_vae
from dalle_lesson.vqvae import VQVAE, load_vqvae


def tiny_dvae(seed: int) -> DiscreteVAE:
    torch.manual_seed(seed)
    return DiscreteVAE(DVAEConfig(image_size=16, vocab_size=16, n_hid=8, n_init=8, group_count=2, n_blk_per_group=1))


def test_every_model_round_trips_with_its_kind(tmp_path):
    models = [VAE(VAEConfig(width=8, latent_dim=2)), Autoencoder(VAEConfig(width=8, latent_dim=2)), tiny_dvae(0),
              VQVAE(tiny_dvae(0).config, embedding_dim=4),
              DALLE(DALLEConfig(d_model=16, n_layers=2, n_heads=2, text_seq_len=4, text_vocab_size=8, image_size=4,
                                image_vocab_size=6, conv_kernel=3))]
    loaders = {"vae": load_vae, "autoencoder": load_vae, "dvae": load_dvae, "vqvae": load_vqvae, "dalle": load_dalle}
    for model in models:
        path = checkpoint.save(model, tmp_path / f"{model.kind}.safetensors", step=3)
        loaded = loaders[model.kind](path)
        assert type(loaded) is type(model) and loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        metadata = checkpoint.read_metadata(path)
        assert metadata["kind"] == model.kind and metadata["step"] == 3


def test_the_wrong_kind_is_named_in_one_line(tmp_path):
    path = save_dvae(tiny_dvae(0), tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match=r"d.safetensors is a dVAE checkpoint; this wants a DALL·E one$"):
        load_dalle(path)
    with pytest.raises(ValueError, match="this wants a VAE or autoencoder one"):
        load_vae(path)


def test_a_small_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path):
    path = tmp_path / "liar.safetensors"
    config = {**DALLEConfig.tiny().__dict__, "d_model": 2**20, "n_heads": 2**10}
    header = {"format": checkpoint.FORMAT, "kind": "dalle", "config": config}
    save_file({"head.weight": torch.zeros(2, 2)}, str(path), metadata={k: json.dumps(v) for k, v in header.items()})
    assert path.stat().st_size < 2000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="do not match the config"):
        load_dalle(path)
    assert time.perf_counter() - start < 10  # it built nothing real (terabytes would take forever or fail)


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        load_dvae(garbage)
    bad_config = tmp_path / "bad_config.safetensors"
    header = {"format": checkpoint.FORMAT, "kind": "dvae", "config": {"no_such_field": 1}}
    save_file({"x": torch.zeros(1)}, str(bad_config), metadata={k: json.dumps(v) for k, v in header.items()})
    with pytest.raises(ValueError, match="does not describe a valid dVAE"):
        load_dvae(bad_config)
    with pytest.raises(FileNotFoundError, match="no dVAE checkpoint at"):
        load_dvae(tmp_path / "missing.safetensors")


def test_a_write_killed_before_the_rename_leaves_the_old_checkpoint(tmp_path):
    path = save_dvae(tiny_dvae(0), tmp_path / "d.safetensors")
    before = path.read_bytes()
    # A child process writes a new checkpoint but is killed (SIGKILL: no clean-up) just before the rename.
    script = f"""
import os, signal, torch
from dalle_lesson import checkpoint
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
torch.manual_seed(1)
save_dvae(DiscreteVAE(DVAEConfig(image_size=16, vocab_size=16, n_hid=8, n_init=8, group_count=2, n_blk_per_group=1)),
          {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    assert load_dvae(path).config == tiny_dvae(0).config
    assert list(tmp_path.glob(".d.safetensors.*.tmp")), "the killed writer's temporary file is left beside it"


def test_concurrent_writers_never_mix(tmp_path):
    """Two processes save different models to one path over and over; every read is one of them, whole."""
    path = tmp_path / "shared.safetensors"
    script = """
import sys, torch
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, save_dvae
torch.manual_seed(int(sys.argv[1]))
model = DiscreteVAE(DVAEConfig(image_size=16, vocab_size=16, n_hid=8, n_init=8, group_count=2, n_blk_per_group=1))
for _ in range(40):
    save_dvae(model, sys.argv[2], dtype=torch.float32)
"""
    writers = [subprocess.Popen([sys.executable, "-c", script, str(seed), str(path)]) for seed in (1, 2)]
    expected = [{k: v for k, v in tiny_dvae(seed).state_dict().items()} for seed in (1, 2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            state = load_file(str(path))
            assert any(all(torch.equal(state[k], e[k]) for k in e) for e in expected), "a mixed checkpoint"
            reads += 1
    assert all(w.returncode == 0 for w in writers)
    state = load_file(str(path))
    assert any(all(torch.equal(state[k], e[k]) for k in e) for e in expected)
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_state_loads_without_running_code(tmp_path):
    import pickle

    path = tmp_path / "m.safetensors"

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    checkpoint.resume_path(path).write_bytes(pickle.dumps({"step": 1, "evil": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_resume_state(path)
