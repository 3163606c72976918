"""The exact LSE merge (DESIGN.md s4) and its edge cases, against the torch reference."""

import numpy as np
import pytest

from lamina_kernels import merge
from lamina_kernels.reference import merge_ref


def shards(rng, n, t=5, h=3, d=8):
    outs = [rng.standard_normal((t, h, d)).astype(np.float32) for _ in range(n)]
    lses = [(rng.standard_normal((t, h)) * 5).astype(np.float32) for _ in range(n)]
    return outs, lses


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_matches_reference(n):
    outs, lses = shards(np.random.default_rng(n), n)
    out, lse = merge(outs, lses)
    rout, rlse = merge_ref(outs, lses)
    np.testing.assert_allclose(out, rout, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, rlse, atol=1e-6, rtol=1e-6)
    assert out.dtype == np.float32 and lse.dtype == np.float32


def test_single_shard_is_identity():
    outs, lses = shards(np.random.default_rng(0), 1)
    out, lse = merge(outs, lses)
    np.testing.assert_allclose(out, outs[0], rtol=1e-6)
    np.testing.assert_array_equal(lse, lses[0])


def test_empty_shards_get_zero_weight_even_with_garbage_output():
    outs, lses = shards(np.random.default_rng(1), 3)
    lses[1][:] = -np.inf
    outs[1][:] = np.nan  # an empty shard's o must never leak into the result
    lses[2][0, 0] = -np.inf  # one row empty in another shard only
    out, lse = merge(outs, lses)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    rout, rlse = merge_ref([outs[0], outs[2]], [lses[0], lses[2]])
    np.testing.assert_allclose(out, rout, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, rlse, atol=1e-6)


def test_row_empty_in_every_shard_raises():
    outs, lses = shards(np.random.default_rng(2), 2)
    lses[0][3, 1] = -np.inf
    lses[1][3, 1] = -np.inf
    with pytest.raises(ValueError, match="token 3, head 1"):
        merge(outs, lses)
    with pytest.raises(ValueError):
        merge_ref(outs, lses)


def test_large_lse_gap_is_stable():
    # exp(lse) would overflow float32; the max-shift keeps it exact.
    outs = [np.ones((1, 1, 4), np.float32), np.full((1, 1, 4), 3, np.float32)]
    lses = [np.array([[1000.0]], np.float32), np.array([[1000.0]], np.float32)]
    out, lse = merge(outs, lses)
    np.testing.assert_allclose(out, 2.0)
    np.testing.assert_allclose(lse, 1000.0 + np.log(2.0), rtol=1e-7)


@pytest.mark.parametrize("bad", ["empty", "mismatch", "nan"])
def test_rejects_malformed(bad):
    outs, lses = shards(np.random.default_rng(3), 2)
    if bad == "empty":
        outs, lses = [], []
    elif bad == "mismatch":
        lses[1] = lses[1][:2]
    else:
        lses[0][0, 0] = np.nan
    with pytest.raises(ValueError):
        merge(outs, lses)


def test_partials_with_repeated_rows_and_head_ranges_match_the_reference():
    """merge_partials, the compute side's merge: a row may appear twice in one partial (two shards of a
    sequence answered in one request) and partials may cover different head ranges."""
    from lamina_kernels.merge import merge_partials

    rng = np.random.default_rng(5)
    T, H, D = 3, 4, 8
    outs, lses = shards(rng, 3, t=T, h=H, d=D)  # three shards over every (row, head)
    # partial A: shards 0 and 1 of heads [0, 2) in one request (rows repeated); B: shard 2 of heads [0, 2);
    # C: all three shards of heads [2, 4) as one partial with every row three times.
    parts = [(np.r_[0:T, 0:T], 0, 2, np.concatenate([outs[0][:, :2], outs[1][:, :2]]),
              np.concatenate([lses[0][:, :2], lses[1][:, :2]])),
             (None, 0, 2, outs[2][:, :2], lses[2][:, :2]),
             (np.r_[0:T, 0:T, 0:T], 2, 4, np.concatenate([o[:, 2:] for o in outs]),
              np.concatenate([s[:, 2:] for s in lses]))]
    out, lse = merge_partials(T, H, D, parts)
    rout, rlse = merge_ref(outs, lses)
    np.testing.assert_allclose(out, rout, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, rlse, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="token 0, head 2"):  # a (row, head) no partial covers
        merge_partials(T, H, D, parts[:2])
