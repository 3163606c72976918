"""Ready append_attend calls on random pools and how a result is compared with the reference's,
for the CPU kernel tests (test_kernels.py) and the CUDA ones (test_kernels_cuda.py).

    call = Call(rng, "bfloat16", g=4, bs=16, seqs=[(37, 1, True)])   # (context_len, n_query, append)
    assert_matches(call.run(append_attend), call.run(append_attend_ref))
"""

import math

import numpy as np

from lamina_kernels import to_storage

D = 32
NUM_KV_HEADS = 2
N_LAYERS = 2
LAYER = 1


def rand_enc(rng, shape, storage):
    return to_storage(rng.standard_normal(shape, dtype=np.float32), storage)


class Call:
    """A ready append_attend call. seqs: list of (context_len, n_query, append)."""

    def __init__(self, rng, storage, g, bs, seqs, num_kv_heads=NUM_KV_HEADS, d=D):
        self.storage = storage
        max_blocks = max((c + n) // bs + 1 for c, n, _ in seqs)
        n_blocks = len(seqs) * num_kv_heads * max_blocks + 3
        self.k_pool = rand_enc(rng, (N_LAYERS, n_blocks, bs, d), storage)
        self.v_pool = rand_enc(rng, (N_LAYERS, n_blocks, bs, d), storage)
        # Scattered, distinct blocks; unused tail entries stay -1.
        bt = np.full((len(seqs) + 1, num_kv_heads, max_blocks), -1, np.int32)
        free = list(rng.permutation(n_blocks))
        for i, (c, n, app) in enumerate(seqs):
            need = -(-(c + (n if app else 0)) // bs)
            for h in range(num_kv_heads):
                for b in range(need):
                    bt[i + 1, h, b] = free.pop()  # slot i+1: slot 0 stays unused
        self.block_table = bt
        self.table_rows = np.arange(1, len(seqs) + 1, dtype=np.int32)
        self.q_start = np.cumsum([0] + [n for _, n, _ in seqs]).astype(np.int32)
        self.kv_start = np.cumsum([0] + [n if a else 0 for _, n, a in seqs]).astype(np.int32)
        self.context_lens = np.array([c for c, _, _ in seqs], np.int32)
        self.q = rand_enc(rng, (self.q_start[-1], num_kv_heads * g, d), storage)
        self.k_new = rand_enc(rng, (self.kv_start[-1], num_kv_heads, d), storage)
        self.v_new = rand_enc(rng, (self.kv_start[-1], num_kv_heads, d), storage)
        self.scale = 1.0 / math.sqrt(d)

    def run(self, fn, layer=LAYER):
        """Run fn on private copies of the pools; returns (out, lse, k_pool, v_pool)."""
        kp, vp = self.k_pool.copy(), self.v_pool.copy()
        out, lse = fn(self.q, self.k_new, self.v_new, kp, vp, self.block_table, self.table_rows,
                      self.q_start, self.kv_start, self.context_lens, layer, self.scale,
                      self.storage)
        return out, lse, kp, vp


def assert_matches(got, want, atol=2e-5):
    out, lse, kp, vp = got
    rout, rlse, rkp, rvp = want
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse[fin], rlse[fin], atol=atol, rtol=1e-5)
    np.testing.assert_allclose(out, rout, atol=atol, rtol=1e-5)
    assert (out[np.isneginf(lse)] == 0).all()
    np.testing.assert_array_equal(kp, rkp)  # appended rows land bit-exactly
    np.testing.assert_array_equal(vp, rvp)


# The CPU kernels' storage paths: bfloat16 twice, the float32-widening tiles and the dot-product
# QK (lamina_kernels.simd.vdpbf16: vdpbf16ps where Numba's target has avx512_bf16, else the same
# arithmetic on float32 FMAs, so the tile logic is tested on every host).
CPU_PATHS = ("float32", "float16", "bfloat16", "bfloat16-dp")


def enter_path(name):
    """Set the process's dot-product flag for a CPU_PATHS name; returns (storage, previous flag)."""
    from lamina_kernels import simd

    return name.removesuffix("-dp"), simd.set_dpbf16(name.endswith("-dp"))
