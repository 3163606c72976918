"""The numba.cuda kernel against the torch reference: under the CUDA simulator by
default (tests/conftest.py), on a real GPU with NUMBA_ENABLE_CUDASIM=0
(tools/gpu_check.sh). Small shapes: the simulator runs every thread in Python."""

import math

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba.cuda (numba-cuda) is not installed")

from kernel_calls import Call, assert_matches  # noqa: E402  (tests/ is on sys.path)

from lamina_kernels import STORAGES, merge  # noqa: E402
from lamina_kernels.reference import append_attend_ref  # noqa: E402

if not cuda.is_available():
    pytest.skip("no CUDA device and the simulator is off", allow_module_level=True)

from lamina_kernels.cuda import append_attend_cuda  # noqa: E402

D = 8


def run_cuda(*args):
    out, lse = append_attend_cuda(*args)  # host pools: copied over and back
    return out.copy_to_host(), lse.copy_to_host()


SMALL = [
    (5, 1, True),    # decode
    (3, 4, True),    # causal chunk
    (0, 3, True),    # prefill from nothing
    (7, 2, False),   # attend-only
    (0, 1, False),   # sees nothing: lse -inf, out 0
]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("g", [1, 4])
def test_matches_reference(storage, g):
    rng = np.random.default_rng(g)
    call = Call(rng, storage, g, 8, SMALL, num_kv_heads=2, d=D)
    assert_matches(call.run(run_cuda), call.run(append_attend_ref))


@pytest.mark.parametrize("g,d", [(1, 128), (3, 64), (4, 128), (7, 128), (8, 64)])
def test_real_geometries_match_reference(g, d):
    """The CPU suite's geometries (GQA groups 1, 3, 4, 7, 8; head_dim 64 and 128) with
    one kv head and short contexts: the simulator runs every thread in Python."""
    rng = np.random.default_rng(g * 1000 + d)
    storage = STORAGES[(g + d) % 3]
    call = Call(rng, storage, g, 8, [(9, 1, True), (3, 2, True), (0, 1, False)], num_kv_heads=1, d=d)
    assert_matches(call.run(run_cuda), call.run(append_attend_ref))


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_long_context_is_split_and_merged(storage):
    # 300 keys with the simulator's 16 workers -> several items and the merge launch.
    rng = np.random.default_rng(5)
    call = Call(rng, storage, 2, 16, [(300, 1, True), (290, 2, True)], num_kv_heads=1, d=D)
    assert_matches(call.run(run_cuda), call.run(append_attend_ref))


def test_device_arrays_and_pool_stays_on_device():
    rng = np.random.default_rng(6)
    call = Call(rng, "float16", 2, 8, [(9, 2, True)], num_kv_heads=2, d=D)
    kd, vd = cuda.to_device(call.k_pool), cuda.to_device(call.v_pool)
    out, lse = append_attend_cuda(
        cuda.to_device(call.q), cuda.to_device(call.k_new), cuda.to_device(call.v_new), kd, vd,
        cuda.to_device(call.block_table), call.table_rows, call.q_start, call.kv_start,
        call.context_lens, 1, call.scale, "float16")
    rout, rlse, rkp, rvp = call.run(append_attend_ref)
    np.testing.assert_allclose(out.copy_to_host(), rout, atol=2e-5)
    np.testing.assert_allclose(lse.copy_to_host(), rlse, atol=2e-5)
    np.testing.assert_array_equal(kd.copy_to_host(), rkp)
    np.testing.assert_array_equal(vd.copy_to_host(), rvp)


def test_two_shards_merge_to_whole():
    rng = np.random.default_rng(8)
    g, bs = 2, 8
    whole = Call(rng, "bfloat16", g, bs, [(12, 1, True)], num_kv_heads=1, d=D)
    want, want_lse, _, _ = whole.run(append_attend_ref)
    head = Call(rng, "bfloat16", g, bs, [(5, 1, False)], num_kv_heads=1, d=D)
    tail = Call(rng, "bfloat16", g, bs, [(7, 1, True)], num_kv_heads=1, d=D)
    for shard, lo in ((head, 0), (tail, 5)):
        shard.q = whole.q
        for p in range(shard.context_lens[0]):
            src = 1, whole.block_table[1, 0, (lo + p) // bs], (lo + p) % bs
            dst = 1, shard.block_table[1, 0, p // bs], p % bs
            shard.k_pool[dst] = whole.k_pool[src]
            shard.v_pool[dst] = whole.v_pool[src]
    tail.k_new, tail.v_new = whole.k_new, whole.v_new
    head.k_new = head.v_new = whole.k_new[:0]
    head.kv_start = np.zeros(2, np.int32)
    parts = [shard.run(run_cuda)[:2] for shard in (head, tail)]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5)
    assert math.isfinite(float(lse.max()))


def test_block_table_wider_than_local_heads():
    rng = np.random.default_rng(13)
    call = Call(rng, "float32", 2, 8, [(6, 2, True)], num_kv_heads=1, d=D)
    extra = np.full(call.block_table.shape[:1] + (2,) + call.block_table.shape[2:], -1, np.int32)
    call.block_table = np.ascontiguousarray(np.concatenate([call.block_table, extra], axis=1))
    assert_matches(call.run(run_cuda), call.run(append_attend_ref))
