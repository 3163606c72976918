"""Weight layouts (model/linear.py): every layout this machine runs computes the same model.

Each layout against F.linear in float64 on the same weights, then whole models of every
architecture (Qwen2's QKV bias, Qwen3's q/k norms, tied and untied heads) against the
plain-tensor layout, and the LM head's float32 output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_models import ARCHITECTURES, build_hf_model
from lamina_p2p.model.linear import LAYOUTS, Linear, choose_layout
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.torch_attention import generate_greedy

CPU = torch.device("cpu")


def runnable(dtype: torch.dtype) -> list[str]:
    out = []
    for layout in LAYOUTS[1:]:
        try:
            choose_layout(layout, dtype, CPU)
        except ValueError:
            continue
        if not (dtype == torch.float32 and layout == "fp16"):  # lossy for float32 weights: never chosen
            out.append(layout)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_each_layout_matches_a_float64_matmul(dtype, bias):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 80, generator=g) / 9).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    # Rows 1, 5 and 16: decode batch sizes the layouts are packed for and others.
    for rows in (1, 5, 16):
        x = torch.randn(rows, 80, generator=g).to(dtype)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        for layout in runnable(dtype):
            y = Linear(w, b, layout)(x)
            assert y.dtype == dtype and y.shape == (rows, 96), layout
            # bf16 output is rounded once (2^-8 relative); float32 differs by summation order only.
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            assert torch.allclose(y.double(), ref, rtol=tol, atol=tol), layout
            head = Linear(w, b, layout if layout != "onednn" else "f32", out_dtype=torch.float32)(x)
            assert head.dtype == torch.float32
            assert torch.allclose(head.double(), ref, rtol=1e-5, atol=1e-5), layout


def test_auto_follows_the_machine():
    bf16 = choose_layout("auto", torch.bfloat16, CPU)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX")
    if x86 and not torch.cpu._is_amx_tile_supported():
        # also with AVX512-BF16 (the fused Numba path beat oneDNN's bf16 GEMM there) and on AVX2 only (it beat
        # FBGEMM's fp16 GEMM at batch 1)
        assert bf16 == "gemv"
    elif native and torch.backends.mkldnn.is_available():
        assert bf16 == "onednn"
    elif x86:
        assert bf16 == "gemv"
    else:
        assert bf16 == "f32"
    assert choose_layout("auto", torch.float32, CPU) in ("onednn", "eager")
    assert choose_layout("auto", torch.bfloat16, torch.device("meta")) == "eager"


def test_bad_layouts_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="unknown weight layout 'fast'"):
        choose_layout("fast", torch.float32, CPU)
    with pytest.raises(ValueError, match="is for CPUs"):
        choose_layout("onednn", torch.float32, torch.device("meta"))
    for dtype in (torch.bfloat16, torch.float16):
        # oneDNN's 16-bit paths need AVX512 BW/VL/DQ, AVX512-FP16 or AVX-NE-CONVERT (an AVX2-only Zen 3 has none):
        # where torch refuses them, the choice is refused up front, naming why, not at the first matmul.
        try:
            Linear(torch.ones(16, 16, dtype=dtype), None, "onednn")(torch.ones(2, 16, dtype=dtype))
        except RuntimeError as e:
            with pytest.raises(ValueError, match=f"cannot run {str(dtype)[6:]} on this CPU .*needs the cpu support"):
                choose_layout("onednn", dtype, CPU)
            assert "needs the cpu support" in str(e)
        else:
            assert choose_layout("onednn", dtype, CPU) == "onednn"
    if "fp16" in runnable(torch.bfloat16):
        w = torch.ones(4, 4, dtype=torch.bfloat16) * 1e6
        with pytest.raises(ValueError, match="do not fit float16"):
            Linear(w, None, "fp16")
        bad = load_model(build_hf_model("llama"), dtype="bfloat16", layout=None)
        with torch.inference_mode(), pytest.raises(ValueError, match="do not fit float16"):
            bad.layers[0].w_down[0, 0] = 1e6  # a checkpoint with a weight float16 cannot hold
            bad.prepare("fp16")  # asked for explicitly: refused, not silently changed (auto never picks fp16)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_every_layout_runs_every_architecture_alike(arch, dtype):
    base = load_model(build_hf_model(arch), dtype=dtype, layout=None)
    prompts = [[1, 17, 33, 99, 100, 7], [1, 200], [1, 5, 6]]
    ref_tokens, ref_logits = generate_greedy(copy.deepcopy(base).prepare("eager"), prompts, 8)
    for layout in runnable(base.dtype):
        model = copy.deepcopy(base).prepare(layout)
        assert model.layout == layout
        tokens, logits = generate_greedy(model, prompts, 8)
        # bf16: summation order may flip a rounding of the residual stream (none did when written).
        tol = 1e-4 if dtype == "float32" else 2e-2
        for a, b in zip(logits, ref_logits):
            assert a.dtype == torch.float32
            assert (a - b).abs().max().item() < tol, (layout, (a - b).abs().max().item())
        assert tokens == ref_tokens, layout


@torch.inference_mode()
def test_bf16_head_accumulates_and_returns_float32():
    model = load_model(build_hf_model("qwen2"), dtype="bfloat16")  # tied head
    x = torch.randn(4, model.config.hidden_size).to(torch.bfloat16)
    logits = model.logits(x)
    assert logits.dtype == torch.float32
    # Not bf16 values widened: a bf16 head's output would survive a round trip through bf16.
    assert not torch.equal(logits, logits.bfloat16().float())
    from lamina_p2p.model.transformer import rms_norm

    normed = rms_norm(x, model.final_norm, model.config.rms_norm_eps)
    ref = normed.double() @ model.embed_weight.double().T
    assert torch.allclose(logits.double(), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_prepare_lays_out_once_and_drops_the_plain_copies():
    model = load_model(build_hf_model("llama"), dtype="bfloat16", layout=None)
    assert not model.onednn
    model.prepare()
    linears = model._linears
    assert model.prepare()._linears is linears  # idempotent
    if model.layout != "eager":
        assert model.onednn
        assert all(L.wqkv is None and L.w_gate_up is None for L in model.layers)
    with pytest.raises(RuntimeError, match="before prepare"):
        model.hf_tensors()


@torch.inference_mode()
def test_fp16_gemm_gives_the_same_bits_on_one_thread_and_on_several():
    # One thread: FBGEMM's ATen entry point; several: the torchbind op that splits the output
    # columns over threads. The weights are packed again when the count changes; a column
    # split keeps each output's summation order, so the bits must not move.
    if "fp16" not in runnable(torch.bfloat16):
        pytest.skip("no FBGEMM fp16 on this machine")
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(200, 72, generator=g) / 9).to(torch.bfloat16)
    b = torch.randn(200, generator=g).to(torch.bfloat16)
    x = torch.randn(16, 72, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lin = Linear(w, b, "fp16", out_dtype=torch.float32)
        several = lin(x)
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        again = lin(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(several, one) and torch.equal(several, again)
    ref = F.linear(x.double(), w.double(), b.double())
    assert torch.allclose(several.double(), ref, rtol=1e-5, atol=1e-5)
