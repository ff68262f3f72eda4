"""The lesson-07 planner: parameter counts equal the model's, the activation estimate equals
what autograd really saves, the arithmetic adds up, and the CLI prints a table and refuses nonsense."""

import contextlib
import doctest

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dalle_lesson import plan
from dalle_lesson.attention import attention_mask
from dalle_lesson.cli import main
from dalle_lesson.dalle import DALLE, DALLEConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------------------
# Parameters: the count read off DALLE.__init__ equals the built model's, layer by layer
# --------------------------------------------------------------------------------------


PRESETS = {
    "tiny": DALLEConfig.tiny(),
    "paper": DALLEConfig.paper(),
    "paper, smaller": DALLEConfig.paper(d_model=1024, n_layers=8, n_heads=16),
    "tiny, causal": DALLEConfig.tiny(masks="causal"),
    "tiny, conv, sparse": DALLEConfig.tiny(masks="conv", attention="sparse"),
    "tiny, vocabularies": DALLEConfig.tiny(text_vocab_size=777, text_seq_len=20, image_vocab_size=300, image_size=5),
    "tiny, mlp x3": DALLEConfig.tiny(mlp_ratio=3, n_layers=3),
}


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_equals_the_model_built_on_meta(name):
    config = PRESETS[name]
    with torch.device("meta"):  # no memory: the paper's 12 B parameters cost nothing
        model = DALLE(config)
    counts = plan.parameter_count(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    block = model.blocks[0]
    assert counts["block"] == numel(block)
    assert counts["blocks"] == numel(model.blocks)
    assert counts["block.qkv"] == numel(block.attention.qkv)
    assert counts["block.proj"] == numel(block.attention.proj)
    assert counts["block.mlp_in"] + counts["block.mlp_out"] == numel(block.mlp)
    assert counts["block.ln_attention"] + counts["block.ln_mlp"] == numel(block.ln_attention) + numel(block.ln_mlp)
    assert counts["text_embedding"] == numel(model.text_embedding)  # with the per-position padding ids
    assert counts["head"] == numel(model.head)


def test_the_paper_model_has_about_twelve_billion_parameters():
    total = plan.parameter_count(DALLEConfig.paper())["total"]
    assert 11.8e9 < total < 12.5e9, total  # the paper: "12 billion"; exactly 12,293,824,256


# --------------------------------------------------------------------------------------
# Activations: the estimate against an independent measurement
# --------------------------------------------------------------------------------------
#
# How we measure: torch.autograd.graph.saved_tensors_hooks sees every tensor autograd keeps
# for backward (including the block inputs that non-reentrant checkpointing keeps), during
# one model.loss(...) forward in train mode. We add up the *storages* they live in, each
# once by data_ptr: that is the memory really held (a saved view keeps its whole storage
# alive, and many saved tensors share one). Model state is left out: parameters and
# buffers (and views of them, such as the head's halves), and autocast's bf16 copies of
# the weights (the planner counts those separately). We chose this over the profiler's
# memory events because it is exactly the quantity the planner models, "what is held for
# backward", independent of allocator caching and of short-lived buffers, and it is
# deterministic on CPU.

_VIEW_OR_CAST = {"TBackward0", "ToCopyBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0"}


def _is_copy_of_parameter(tensor: torch.Tensor) -> bool:
    """True for autocast's cast of a weight: views/casts all the way back to a leaf."""
    fn = tensor.grad_fn
    while fn is not None and type(fn).__name__ in _VIEW_OR_CAST:
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def measure_saved_bytes(config: DALLEConfig, batch: int, bf16: bool = False, math_kernel: bool = False):
    """(activation bytes, bf16 weight-copy bytes) autograd holds after one loss forward."""
    torch.manual_seed(0)
    model = DALLE(config).train()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.text_vocab_total, (batch, config.text_seq_len), generator=g)
    codes = torch.randint(0, config.image_vocab_size, (batch, config.image_size, config.image_size), generator=g)
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    activations, weight_copies = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            (weight_copies if _is_copy_of_parameter(tensor) else activations)[storage.data_ptr()] = storage.nbytes()
        return tensor

    kernel = lambda: sdpa_kernel(SDPBackend.MATH) if math_kernel else contextlib.nullcontext()  # noqa: E731
    with kernel(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses = model.loss(text, codes)
    with kernel():  # the saved tensors were alive until here; backward must still run (recompute too)
        losses["loss"].backward()
    return sum(activations.values()), sum(weight_copies.values())


def small_config(**overrides) -> DALLEConfig:
    # d 64, 4 layers of the paper's schedule (row, column, row, conv), 16 text tokens and a
    # 16x16 grid: n = 272, so the attention terms are not lost next to the MLP's.
    values = dict(d_model=64, n_layers=4, n_heads=4, text_seq_len=16, text_vocab_size=64, image_size=16,
                  image_vocab_size=64)
    return DALLEConfig(**{**values, **overrides})


CASES = {  # name: (config overrides, batch, bf16 autocast, SDPA's math kernel)
    "dense": (dict(), 2, False, False),
    "dense, checkpointed": (dict(activation_checkpointing=True), 2, False, False),
    "dense, math kernel (n x n per head)": (dict(), 2, False, True),
    "sparse": (dict(attention="sparse"), 2, False, False),
    "sparse, checkpointed": (dict(attention="sparse", activation_checkpointing=True), 2, False, False),
    "sparse, batch 1": (dict(attention="sparse"), 1, False, False),
    "sparse, column layers, batch 4": (dict(attention="sparse", masks="column", image_size=8), 4, False, False),
    "dense, bf16 autocast": (dict(), 2, True, False),
    "sparse, bf16 autocast": (dict(attention="sparse"), 2, True, False),
    "dense, dropout": (dict(dropout=0.1, image_size=8), 2, False, False),
}


def estimate(overrides, batch, bf16, math_kernel, **change) -> int:
    config = small_config(**overrides)
    return plan.activation_memory(config, batch, precision="bf16" if bf16 else "fp32", device="cpu",
                                  attention_kernel="math" if math_kernel else "fused", **change).saved_bytes


@pytest.mark.parametrize("name", CASES)
def test_activation_estimate_matches_what_autograd_saves(name):
    overrides, batch, bf16, math_kernel = CASES[name]
    measured, _ = measure_saved_bytes(small_config(**overrides), batch, bf16, math_kernel)
    estimated = estimate(overrides, batch, bf16, math_kernel)
    ratio = estimated / measured
    assert abs(ratio - 1) <= 0.2, f"{name}: estimated {estimated} B, measured {measured} B ({ratio:.3f})"
    # The planner models every saved tensor, so it is byte-exact on the PyTorch it was written
    # for (2.14); 20 % would let a whole term (e.g. half the MLP) go missing unnoticed. If a
    # PyTorch release changes what its kernels save, this line says so: update the planner.
    assert abs(ratio - 1) <= 0.02, f"{name}: estimated {estimated} B, measured {measured} B ({ratio:.3f})"


def test_the_20_percent_check_tells_the_models_apart():
    """The bound is not vacuous: the wrong model of the same run lies outside it."""
    checkpointed, _ = measure_saved_bytes(small_config(activation_checkpointing=True), 2)
    assert estimate({}, 2, False, False, checkpointing=False) > 1.2 * checkpointed  # forgot the recompute
    fused, _ = measure_saved_bytes(small_config(), 2)
    assert estimate({}, 2, False, True) > 1.2 * fused  # assumed the textbook n x n probabilities
    sparse, _ = measure_saved_bytes(small_config(attention="sparse", masks="row"), 2)
    assert estimate(dict(masks="row"), 2, False, False) < 0.8 * sparse  # ignored what block-sparse saves


def test_bf16_weight_copies_are_what_autocast_keeps():
    config = small_config()
    _, copies = measure_saved_bytes(config, 2, bf16=True)
    planned = plan.memory_per_gpu(config, gpus=1).forward_backward["bf16_weight_copies"]
    # the plan also counts the biases' copies (autocast caches them; backward saves only weights)
    biases = config.n_layers * (3 + 1 + config.mlp_ratio + 1) * config.d_model  # qkv, proj, the MLP's two
    assert copies == planned - 2 * biases, (copies, planned)


def test_checkpointing_keeps_one_fp32_block_input_per_layer():
    config = DALLEConfig.paper()
    with_it = plan.activation_memory(config, batch=1, checkpointing=True)
    without = plan.activation_memory(config, batch=1, checkpointing=False)
    assert with_it.saved["block_inputs"] == 64 * 1280 * 3968 * 4
    assert with_it.peak_bytes < without.saved_bytes / 10  # what makes the paper's model trainable


def test_fused_dense_attention_saves_no_n_by_n_matrix_and_math_does():
    config = small_config(n_layers=1, masks="causal")
    fused = plan.block_activation_bytes(config, "causal", batch=3, precision="fp32")
    math = plan.block_activation_bytes(config, "causal", batch=3, precision="fp32", attention_kernel="math")
    assert "attention_probabilities" not in fused
    assert math["attention_probabilities"] == 3 * 4 * 272 * 272 * 4  # B x h x n x n fp32


# --------------------------------------------------------------------------------------
# Memory, FLOPs and time: the arithmetic adds up
# --------------------------------------------------------------------------------------


def test_ddp_keeps_16_bytes_per_parameter_on_every_gpu_and_fsdp_divides_them():
    config = DALLEConfig.paper()
    P = plan.parameter_count(config)["total"]
    ddp = plan.memory_per_gpu(config, gpus=64)
    fsdp = plan.memory_per_gpu(config, gpus=64, shard=True)
    assert ddp.mode == "DDP" and fsdp.mode == "FSDP"
    assert ddp.state["weights"] + ddp.state["gradients"] + ddp.state["adamw_moments"] == 16 * P
    assert fsdp.state_bytes == pytest.approx(16 * P / 64, abs=3)
    assert fsdp.total < 16 * plan.GiB < ddp.total
    assert plan.memory_per_gpu(config, gpus=1, shard=True).mode == "single"  # as train.fit: one process, no wrapper


def test_memory_grows_with_the_micro_batch_by_its_activations():
    config = DALLEConfig.tiny()
    one, four = (plan.memory_per_gpu(config, gpus=8, batch=b, shard=True) for b in (1, 4))
    assert four.state == one.state
    assert four.forward_backward["activations_saved"] > 3.5 * one.forward_backward["activations_saved"]


def test_flops_six_per_weight_per_token_plus_attention_and_recompute():
    config = DALLEConfig.paper()
    off = plan.flops_per_image(config, checkpointing=False)
    on = plan.flops_per_image(config, checkpointing=True)
    d, n = config.d_model, config.seq_len
    assert off["block_matmuls"] == 6 * n * 64 * 12 * d * d
    assert off["recompute"] == 0 and on["recompute"] == (off["block_matmuls"] + off["attention"]) / 3
    assert on["total"] == pytest.approx(off["total"] + on["recompute"])
    assert 0.9 < off["total"] / off["rule_of_thumb_6PN"] < 1.1  # the usual 6 x parameters x tokens


def test_attention_pairs_cover_the_mask_and_sparse_computes_fewer():
    config = small_config(attention="sparse", conv_kernel=5)
    for kind in ("row", "column", "conv"):
        allowed = int(attention_mask(kind, config.text_seq_len, config.image_size, 5).sum())
        assert allowed <= plan.attention_pairs(config, kind) <= config.seq_len**2
    assert plan.attention_pairs(config, "row") < config.seq_len**2 / 2


def test_step_time_is_flops_over_sustained_throughput():
    config = DALLEConfig.paper()
    t = plan.step_time(config, gpus=1024, batch=2, flops_per_gpu=100e12, mfu=0.5)
    assert t["seconds_per_step"] == pytest.approx(2 * t["flops_per_image"] / 50e12)
    assert t["images_per_second"] == pytest.approx(2048 / t["seconds_per_step"])
    with pytest.raises(ValueError, match="mfu"):
        plan.step_time(config, mfu=0)
    with pytest.raises(ValueError, match="gpus"):
        plan.memory_per_gpu(config, gpus=0)


def test_the_plan_says_what_would_make_it_fit():
    rows = plan.plan_table(DALLEConfig.paper(), gpus=[8, 1024], shard=False)
    assert not any(row.fits[80] or row.fits[16] for row in rows)  # DDP: 190 GB of state on every GPU
    assert rows[1].remedies[16] == "fits with --shard"
    one = plan.plan_table(DALLEConfig.paper(), gpus=[1], gpu_memory_gb=[80])[0]
    assert one.remedies[80].startswith("fits with --gpus ") and "--shard" in one.remedies[80]


def test_the_docstring_examples_hold():
    results = doctest.testmod(plan)
    assert results.failed == 0 and results.attempted >= 15, results


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------


def test_cli_prints_the_parameters_the_table_flops_and_time(capsys):
    main(["plan", "--preset", "paper", "--gpus", "8", "1024", "--shard"])
    out = capsys.readouterr().out
    assert "12,293,824,256" in out
    header = next(line for line in out.splitlines() if line.startswith("GPUs"))
    assert "fits 80 GiB" in header and "fits 16 GiB" in header and "total/GPU" in header
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("1024 "))
    assert row[1] == "FSDP" and row[-4:-2] == ["yes", "yes"]
    assert "FLOPs per image" in out and "s per step" in out


def test_cli_says_what_flag_would_help(capsys):
    main(["plan", "--preset", "paper", "--gpus", "64", "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    assert "does not fit" in out and "fits with --shard" in out


def test_cli_tiny_with_overrides(capsys):
    main(["plan", "--preset", "tiny", "--gpus", "1", "--d-model", "128", "--layers", "2", "--heads", "4",
          "--no-checkpointing", "--batch", "8"])
    out = capsys.readouterr().out
    assert "2 layers, d_model 128, 4 heads of 32" in out
    assert f"{plan.parameter_count(DALLEConfig.tiny(d_model=128, n_layers=2, n_heads=4))['total']:,}" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "--gpus: must be at least 1, got 0"),
    (["--batch", "0"], "--batch: must be at least 1, got 0"),
])
def test_cli_refuses_zero_gpus_or_batch(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["plan", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mfu", "1.5"], "mfu"),
    (["--gpu-memory-gb", "0"], "gpu_memory_gb must be positive"),
    (["--heads", "7"], "divisible by n_heads"),
    (["--layers", "-2"], "--layers must be >= 1"),
])
def test_cli_refuses_nonsense_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["plan", *argv])


def test_the_engine_shards_by_itself_when_the_training_state_fills_half_a_gpu():
    gpu = 16 * plan.GiB
    at_half = gpu // 2 // 16  # 16 bytes of fp32 training state per parameter
    assert not plan.wants_sharding(at_half, gpu) and plan.wants_sharding(at_half + 1, gpu)
    assert plan.wants_sharding(plan.parameter_count(DALLEConfig.paper())["total"], 80 * plan.GiB)
    assert not plan.wants_sharding(plan.parameter_count(DALLEConfig.tiny())["total"], 16 * plan.GiB)
