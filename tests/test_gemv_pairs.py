"""The gemv kernel's vdpbf16ps layout (model/gemv_pairs.py).

Its layout against its definition; every fused op (norm_linear, its float32 head, linear_add,
norm_swiglu) with pair-packed weights against the same op on gemv.pack's blocks, over row counts
that take every pass (16-row panels, 8, 4, 1) and input widths of odd and even pair counts, on
the calling thread and split. Where Numba's target lacks AVX512-BF16 the pair kernel compiles to
widen-then-FMA (lamina_kernels.simd.vdpbf16, tested in test_kernels.py), so these run everywhere;
the fused layer with pairs against torch's ops is in test_gemv.py and test_spin_pool.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamina_p2p.model import fused, gemv_pairs
from lamina_p2p.model.gemv import BLOCK, Gemv

ROWS = [1, 3, 4, 8, 13, 16, 29, 35]


def _bf16(shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def test_pairs_put_an_input_pairs_two_weights_side_by_side():
    g = torch.Generator().manual_seed(0)
    w = _bf16((37, 10), g)  # a partial last block
    wb = Gemv(w, None).wb
    wp = gemv_pairs.pack_pairs(wb)
    assert wp.shape == (3, 5, 2 * BLOCK) and wp.dtype == np.int16
    bits = torch.zeros(48, 10, dtype=torch.bfloat16)
    bits[:37] = w
    bits = bits.view(torch.int16).numpy()
    for j, p, o, e in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 3, 7, 1), (2, 4, 4, 0), (2, 4, 15, 1)]:
        assert wp[j, p, 2 * o + e] == bits[16 * j + o, 2 * p + e]
    assert np.array_equal(gemv_pairs.unpack_pairs(wp), wb)
    with pytest.raises(ValueError, match="even in"):
        gemv_pairs.pack_pairs(Gemv(_bf16((16, 9), g), None).wb)
    with pytest.raises(ValueError, match="float32"):
        gemv_pairs.pack_pairs(Gemv(torch.randn(16, 8), None).wb)


def _close(got, want):
    # The same products (bfloat16 x bfloat16 is exact in float32), summed in another order.
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("k_in", [40, 42])  # 20 and 21 pairs: the 8/4-row passes' odd last pair
@pytest.mark.parametrize("split", [False, True])
def test_every_fused_op_with_pairs_matches_the_blocks(k_in, split):
    g = torch.Generator().manual_seed(k_in)
    n_out, inter = 50, 32
    lin = Gemv(_bf16((n_out, k_in), g, k_in ** -0.5), None)
    lin.bias[:n_out] = torch.randn(n_out, generator=g).numpy()
    o = Gemv(_bf16((k_in, k_in), g, k_in ** -0.5), None).wb
    gate_up = fused.pack_gate_up(Gemv(_bf16((2 * inter, k_in), g, k_in ** -0.5), None).wb)
    norm = _bf16((k_in,), g).view(torch.int16).numpy()
    pairs = {id(a): gemv_pairs.pack_pairs(a) for a in (lin.wb, o, gate_up)}
    for rows in ROWS:
        x = _bf16((rows, k_in), g).view(torch.int16).numpy()
        res = _bf16((rows, k_in), g).view(torch.int16).numpy()
        outs = []
        for packed in (lambda a: a, lambda a: pairs[id(a)]):
            logits = np.empty((rows, n_out), np.float32)
            fused.norm_linear_f32(x, norm, 1e-5, packed(lin.wb), lin.bias, logits, split)
            raw = np.empty((rows, n_out), np.float32)
            fused.norm_linear(x, norm, 1e-5, False, packed(lin.wb), lin.bias, raw, False, split)
            added = np.empty((rows, k_in), np.int16)
            fused.linear_add(x, packed(o), res, added, split)
            act = np.empty((rows, inter), np.int16)
            fused.norm_swiglu(x, norm, 1e-5, packed(gate_up), act, split)
            outs.append((logits, raw, added, act))
        (logits, raw, added, act), (logits_p, raw_p, added_p, act_p) = outs
        _close(logits_p, logits)
        _close(raw_p, raw)
        for a, b in ((added_p, added), (act_p, act)):  # bfloat16 outputs: a sum may round the other way
            fa, fb = (torch.from_numpy(t).view(torch.bfloat16).float() for t in (a, b))
            assert torch.allclose(fa, fb, rtol=2 ** -7, atol=1e-3) and (fa == fb).float().mean() > 0.9
