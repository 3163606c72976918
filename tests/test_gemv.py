"""The gemv kernel (model/gemv.py) and the fused bfloat16 layer (model/fused.py).

The kernel against a float64 matmul over shapes that are not multiples of its 16-row
blocks or of any unrolling (out, in and rows of 1, odd and past 16), for every weight
storage, with and without bias, on the calling thread and split over threads, and a prefill
chunk (WIDE_MIN_ROWS rows and more: the weights widened for torch's matmul). The fused
layer against the same model computed with torch ops (layout f32: float32 weights,
outputs rounded to bfloat16), call by call, and the LM head.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lamina_p2p.model.bench_dense import random_model
import numpy as np

from lamina_p2p.model import fused as fused_mod
from lamina_p2p.model.gemv import BLOCK, PANEL, WIDE_MIN_ROWS, Gemv, pack, to_panels

SHAPES = [(1, 1), (15, 7), (17, 77), (33, 130), (100, 64)]
# 29: a full panel and one of 13 (8 + 4 + 1 rows); 64: four full panels. The last: a prefill chunk, widened weights
ROWS = [1, 2, 3, 5, 8, 9, 16, 17, 29, 33, 64, WIDE_MIN_ROWS + 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [False, True])
@torch.inference_mode()
def test_gemv_matches_a_float64_matmul(dtype, bias, split):
    g = torch.Generator().manual_seed(1)
    for n_out, k_in in SHAPES:
        w = (torch.randn(n_out, k_in, generator=g) / k_in ** 0.5).to(dtype)
        b = torch.randn(n_out, generator=g).to(dtype) if bias else None
        lin = Gemv(w, b)
        lin.split = split
        for rows in ROWS:
            x = torch.randn(rows, k_in, generator=g)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            y = lin(x)
            assert y.dtype == torch.float32 and y.shape == (rows, n_out)
            # float32 accumulation of exact products of float32 inputs and 16-bit weights
            assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5), (n_out, k_in, rows)


def test_pack_lays_out_16_row_blocks_k_major_and_pads_with_zeros():
    w = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3).to(torch.bfloat16)
    wb = pack(w)
    assert wb.shape == (2, 3, BLOCK) and wb.dtype.name == "int16"
    back = torch.from_numpy(wb.copy()).view(torch.bfloat16)
    assert torch.equal(back[0, 2], w[:16, 2])  # block 0, input 2: rows 0..15
    assert torch.equal(back[1, 0, :4], w[16:, 0])
    assert not back[1, :, 4:].float().any()  # padding rows
    with pytest.raises(ValueError, match="2-d float32, bfloat16 or float16"):
        pack(torch.ones(2, 2, dtype=torch.float64))


def test_activations_are_laid_out_in_k_major_panels_of_16_rows():
    rows, k_in = 20, 3  # a full panel, then one of 4 rows
    x = np.arange(rows * k_in, dtype=np.float32).reshape(rows, k_in)
    xs = np.empty_like(x)
    to_panels(x, xs)
    flat = xs.reshape(-1)
    assert np.array_equal(flat[: PANEL * k_in].reshape(k_in, PANEL), x[:PANEL].T)  # [k, row]: one line a k
    assert np.array_equal(flat[PANEL * k_in:].reshape(k_in, rows - PANEL), x[PANEL:].T)
    one = np.empty((1, k_in), np.float32)
    to_panels(x[:1], one)
    assert np.array_equal(one, x[:1])  # one row: the row-major layout itself


@pytest.mark.parametrize("rows", [1, 16, 21])
def test_head_into_float32_logits_equals_the_scratch_path(rows):
    g = torch.Generator().manual_seed(rows)
    n_out, k_in = 100, 40  # 100 outputs: a partial last block
    lin = Gemv((torch.randn(n_out, k_in, generator=g) / k_in ** 0.5).to(torch.bfloat16), None)
    x = torch.randn(rows, k_in, generator=g).to(torch.bfloat16).view(torch.int16).numpy()
    norm = torch.randn(k_in, generator=g).to(torch.bfloat16).view(torch.int16).numpy()
    want = np.empty((rows, n_out), np.float32)
    fused_mod.norm_linear(x, norm, 1e-5, True, lin.wb, lin.bias, want, False, False)
    for split in (False, True):
        got = np.full((rows, n_out), np.nan, np.float32)
        fused_mod.norm_linear_f32(x, norm, 1e-5, lin.wb, lin.bias, got, split)
        assert np.array_equal(got, want)


# Awkward sizes for the fused layer: hidden and head count not multiples of 16 (the
# intermediate size must be: the gate/up blocks are interleaved), GQA, a 100-token vocabulary.
GEOMETRY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 40,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1,
            "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "dtype": "bfloat16"}


def _close_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    # The same ops and roundings; the GEMVs sum in another order, so a float32 sum may fall on
    # the other side of a bfloat16 rounding boundary now and then: one bfloat16 step at most.
    a, b = a.float(), b.float()
    assert torch.allclose(a, b, rtol=2 ** -7, atol=1e-3), (a - b).abs().max()
    assert (a == b).float().mean() > 0.9


@pytest.mark.parametrize("pairs", [False, True])  # gemv_pairs' layout (vdpbf16ps, or emulated)
@pytest.mark.parametrize("split", [False, True])
@torch.inference_mode()
def test_fused_layer_matches_the_torch_ops(split, pairs, monkeypatch):
    monkeypatch.setattr(fused_mod, "USE_PAIRS", pairs)
    base = random_model("bfloat16", seed=3, geometry=GEOMETRY)
    fused, plain = copy.deepcopy(base).prepare("gemv"), copy.deepcopy(base).prepare("f32")
    assert fused._fused is not None and plain._fused is None
    monkeypatch.setattr(fused._fused, "min_bytes", 0 if split else 1 << 62)
    g = torch.Generator().manual_seed(4)
    c = base.config
    for rows in (1, 3, 17, 29, WIDE_MIN_ROWS + 5):  # the last: a prefill chunk, the torch ops over widened weights
        x = torch.randn(rows, c.hidden_size, generator=g).to(torch.bfloat16)
        positions = torch.randint(0, 200, (rows,), generator=g)
        attn = torch.randn(rows, c.num_heads, c.head_dim, generator=g).to(torch.bfloat16)
        for layer in range(c.num_layers):
            for a, b in zip(fused.pre(layer, x, positions), plain.pre(layer, x, positions)):
                assert a.dtype == torch.bfloat16 and a.shape == b.shape and a.is_contiguous()
                _close_bf16(a, b)
            y = fused.post(layer, x, attn)
            assert y.dtype == torch.bfloat16
            _close_bf16(y, plain.post(layer, x, attn))
        logits = fused.logits(x)
        assert logits.dtype == torch.float32 and logits.shape == (rows, c.vocab_size)
        assert torch.allclose(logits, plain.logits(x), rtol=1e-4, atol=1e-4)


def test_fused_path_only_where_it_applies():
    bf16 = random_model("bfloat16", geometry=GEOMETRY).prepare("gemv")
    assert bf16._fused is not None and bf16.layers[0].wqkv is None  # plain weights dropped
    odd = random_model("bfloat16", geometry={**GEOMETRY, "intermediate_size": 40}).prepare("gemv")
    assert odd._fused is None and odd._linears[0][0].layout == "gemv"  # per-GEMV kernel instead
    f32 = random_model("float32", geometry=GEOMETRY).prepare("gemv")
    assert f32._fused is None


@pytest.mark.parametrize("pairs", [False, True])  # gemv_pairs' layout (vdpbf16ps, or emulated)
@torch.inference_mode()
def test_one_thread_runs_a_layer_in_one_call_with_the_same_bits(pairs, monkeypatch):
    """With one compute thread pre and post go through a pool of no worker (one compiled call each, kept
    scratch): the same bits as the separate serial calls, chained as the engine calls them."""
    monkeypatch.setattr(fused_mod, "USE_PAIRS", pairs)
    base = random_model("bfloat16", seed=7, geometry=GEOMETRY)
    solo, serial = copy.deepcopy(base).prepare("gemv"), copy.deepcopy(base).prepare("gemv")
    serial._fused._solo_max_rows = 0
    serial._fused.pool_max_rows = solo._fused.pool_max_rows = 0  # as a cluster's compute side sets it
    g = torch.Generator().manual_seed(8)
    c = base.config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in (1, 3, 17, 29):
            x = torch.randn(rows, c.hidden_size, generator=g).to(torch.bfloat16)
            positions = torch.randint(0, 200, (rows,), generator=g)
            attn = torch.randn(rows, c.num_heads, c.head_dim, generator=g).to(torch.bfloat16)
            xa = xb = x
            for layer in range(c.num_layers):
                for a, b in zip(solo.pre(layer, xa, positions), serial.pre(layer, xb, positions)):
                    assert torch.equal(a, b)
                xa, xb = solo.post(layer, xa, attn), serial.post(layer, xb, attn)
                assert torch.equal(xa, xb)
            assert torch.equal(solo.logits(xa), serial.logits(xb))
        assert solo._fused._solo is not None and serial._fused._solo is None
        assert not solo._fused._solo.lock.locked()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
@torch.inference_mode()
def test_prefill_matmuls_unpack_either_layout(native, pairs, monkeypatch):
    """A prefill chunk's matmuls (FusedDense.prefill_linears) from the packed weights: widened to float32
    for sgemm, or unpacked to bfloat16 for torch's bf16 GEMM where the CPU has native bf16 (forced here
    both ways: torch's bf16 GEMM is slow but right without it), gate and up put back in order."""
    monkeypatch.setattr(fused_mod, "USE_PAIRS", pairs)
    monkeypatch.setattr(fused_mod, "_native_bf16", lambda: native)
    model = random_model("bfloat16", seed=11, geometry=GEOMETRY).prepare("gemv")
    plain = random_model("bfloat16", seed=11, geometry=GEOMETRY).prepare("f32")
    g = torch.Generator().manual_seed(12)
    c = model.config
    x = torch.randn(WIDE_MIN_ROWS + 5, c.hidden_size, generator=g).to(torch.bfloat16)
    h = torch.randn(WIDE_MIN_ROWS + 5, c.intermediate_size, generator=g).to(torch.bfloat16)
    for layer in range(c.num_layers):
        qkv, o, gate_up, down = model._fused.prefill_linears[layer]
        want = plain._linears[layer]
        for got, ref in ((qkv(x), want[0](x)), (o(x), want[1](x)), (gate_up(x), want[2](x)), (down(h), want[3](h))):
            assert got.dtype == torch.bfloat16 and got.shape == ref.shape
            _close_bf16(got, ref)


def test_a_float32_attention_output_is_rounded_to_bf16_as_torch_does():
    """fused._bits rounds a float32 numpy array (the attention output handed to post as it came)
    exactly as torch's .to(torch.bfloat16): ties to even, carries into the exponent, infinities,
    subnormals, signed zeros."""
    from lamina_p2p.model.fused import _bits

    g = torch.Generator().manual_seed(7)
    values = torch.cat([torch.randn(4096, generator=g) * 10.0 ** torch.randint(-40, 38, (4096,), generator=g),
                        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38,
                                      1.00390625, 1.01171875, 1.0029296875, 65504.0, 0.33333334])])
    # exact ties: a bf16 value plus half its last place, both parities of the kept bit
    ties = (torch.arange(1, 257, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    f32 = torch.cat([values.float(), ties])
    f32 = f32[: len(f32) // 8 * 8].reshape(-1, 4, 2)  # [T, Hq, D] like an attention output
    got = _bits(f32.numpy())
    want = f32.to(torch.bfloat16).view(torch.int16).numpy()
    assert got.dtype == np.int16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
