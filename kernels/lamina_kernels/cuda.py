"""append_attend with numba.cuda: one launch appends and attends for every
(sequence, kv head, query tile, key split); a second, small launch merges split groups.

Why two launches: the splits of one group run in different thread blocks, and CUDA
has no grid-wide barrier inside an ordinary launch, so their exact LSE merge must
wait for a launch boundary. It only runs when the plan split some group (long
contexts or few sequences); a decode batch that fills the GPU has no splits.

The append needs no barrier: new positions are always read from k_new/v_new (never
from the pool they are being written to), and each new row is written to the pool by
exactly one item, the one whose query tile owns that token.

Every storage travels as unsigned bits (float32 as uint32, the others as uint16)
and is decoded with a bit cast, so one kernel body serves all three; the storage
code is a runtime argument. A thread block keeps its query rows, a K or V tile, the
scores and the accumulator in shared memory; the per-(shape) kernel is specialised
on head_dim, rows and tile size so shared arrays have static sizes.

numba.cuda is imported only here, and this module is imported lazily by the package.
"""

import functools
import math

import numpy as np
from numba import cuda, float32, int32

from . import plan as P
from .storage import CODE, check_storage

THREADS = 128
_SHARED_LIMIT = 48 * 1024  # static shared memory per block without opt-in
_MIN_SPLIT = 128  # keys; smaller items cost more in scheduling than they win


def _simulating():
    import numba

    try:
        from numba.cuda.core import config as cuda_config  # numba-cuda >= 0.2x
        return bool(cuda_config.ENABLE_CUDASIM)
    except ImportError:
        return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


if _simulating():
    # The simulator runs kernels as Python, has no libdevice, and numpy can cast.
    @cuda.jit(device=True)
    def _as_f32(u):
        return float(np.array(u, dtype=np.uint32).view(np.float32)[()])
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _as_f32(u):
        return libdevice.int_as_float(int32(u))  # int32() wraps: it is a bit reinterpret


@cuda.jit(device=True)
def _decode(bits, code):
    """Storage bits (uint32 for float32, uint16 otherwise) to a float32 value."""
    u = np.uint32(bits)
    if code == 0:
        return _as_f32(u)
    if code == 2:
        return _as_f32(u << np.uint32(16))
    a = u & np.uint32(0x7FFF)  # IEEE half, same decode as the CPU kernel
    if a >= np.uint32(0x7C00):
        f = _as_f32((a << np.uint32(13)) | np.uint32(0x7F800000))
    elif a >= np.uint32(0x0400):
        f = _as_f32((a << np.uint32(13)) + np.uint32(0x38000000))
    else:
        f = float32(a) * float32(5.9604644775390625e-08)
    if (u & np.uint32(0x8000)) != 0:
        f = -f
    return f


_NEG_INF = np.float32(-np.inf)


def shared_bytes(d, rmax, tk):
    return 4 * (2 * rmax * d + tk * (d + 1) + rmax * tk + 4 * rmax)


@functools.lru_cache(maxsize=None)
def _kernels(d, rmax, tk):
    """Compile the attend and merge kernels for one (head_dim, rows, key tile)."""
    nth = THREADS
    dp = d + 1  # padded row: threads reading one column of the K tile hit distinct banks

    @cuda.jit
    def attend(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
               context_lens, layer, scale, code, groups, items, part_o, part_lse, out, lse):
        q_s = cuda.shared.array((rmax, d), float32)
        acc = cuda.shared.array((rmax, d), float32)
        kv_s = cuda.shared.array((tk, dp), float32)
        s_s = cuda.shared.array((rmax, tk), float32)
        m_s = cuda.shared.array(rmax, float32)
        l_s = cuda.shared.array(rmax, float32)
        a_s = cuda.shared.array(rmax, float32)
        lim_s = cuda.shared.array(rmax, int32)

        tid = cuda.threadIdx.x
        item = cuda.blockIdx.x
        g = items[item, 0]
        k0 = items[item, 1]
        k1 = items[item, 2]
        part = items[item, 3]
        i = groups[g, 0]
        h = groups[g, 1]
        j0 = groups[g, 2]
        nqt = groups[g, 3]
        num_kv_heads = k_new.shape[1]  # local kv heads; the block table may have more rows
        gsz = q.shape[1] // num_kv_heads
        n_rows = nqt * gsz
        bs = k_pool.shape[2]
        context_len = context_lens[i]
        table_row = table_rows[i]
        kv0 = kv_start[i]
        append = kv_start[i + 1] > kv0
        own0 = context_len + j0  # new positions from here on belong to this group's tile
        tok0 = q_start[i] + j0

        for idx in range(tid, n_rows * d, nth):
            r = idx // d
            x = idx - r * d
            qh = h * gsz + (r % gsz)
            q_s[r, x] = _decode(q[tok0 + r // gsz, qh, x], code) * scale
            acc[r, x] = 0.0
        for r in range(tid, n_rows, nth):
            m_s[r] = _NEG_INF
            l_s[r] = 0.0
            lim_s[r] = context_len + (j0 + r // gsz + 1 if append else 0)
        cuda.syncthreads()

        for kt in range(k0, k1, tk):
            nt = min(tk, k1 - kt)
            # K tile: cached positions from the pool, new ones from k_new (and the
            # owning item stores them into the pool on the way).
            for idx in range(tid, nt * d, nth):
                t = idx // d
                x = idx - t * d
                p = kt + t
                blk = block_table[table_row, h, p // bs]
                if p < context_len:
                    bits = k_pool[layer, blk, p % bs, x]
                else:
                    bits = k_new[kv0 + p - context_len, h, x]
                    if p >= own0:
                        k_pool[layer, blk, p % bs, x] = bits
                kv_s[t, x] = _decode(bits, code)
            cuda.syncthreads()
            for idx in range(tid, n_rows * tk, nth):
                r = idx // tk
                t = idx - r * tk
                sc = _NEG_INF  # float32 throughout: a float64 literal would make the dot fp64
                if t < nt and kt + t < lim_s[r]:
                    sc = float32(0.0)
                    for x in range(d):
                        sc += q_s[r, x] * kv_s[t, x]
                s_s[r, t] = sc
            cuda.syncthreads()
            # Online softmax per row; the V tile load below reuses kv_s, whose K
            # values nobody reads any more after the barrier above.
            for r in range(tid, n_rows, nth):
                mx = m_s[r]
                for t in range(nt):
                    mx = max(mx, s_s[r, t])
                if mx == _NEG_INF:  # row sees nothing yet: keep state, add zeros
                    a_s[r] = 1.0
                    for t in range(nt):
                        s_s[r, t] = 0.0
                else:
                    alpha = math.exp(m_s[r] - mx)
                    ps = float32(0.0)
                    for t in range(nt):
                        pv = math.exp(s_s[r, t] - mx)
                        s_s[r, t] = pv
                        ps += pv
                    l_s[r] = l_s[r] * alpha + ps
                    m_s[r] = mx
                    a_s[r] = alpha
            for idx in range(tid, nt * d, nth):
                t = idx // d
                x = idx - t * d
                p = kt + t
                blk = block_table[table_row, h, p // bs]
                if p < context_len:
                    bits = v_pool[layer, blk, p % bs, x]
                else:
                    bits = v_new[kv0 + p - context_len, h, x]
                    if p >= own0:
                        v_pool[layer, blk, p % bs, x] = bits
                kv_s[t, x] = _decode(bits, code)
            cuda.syncthreads()
            for idx in range(tid, n_rows * d, nth):
                r = idx // d
                x = idx - r * d
                a = acc[r, x] * a_s[r]
                for t in range(nt):
                    a += s_s[r, t] * kv_s[t, x]
                acc[r, x] = a
            cuda.syncthreads()

        for idx in range(tid, n_rows * d, nth):
            r = idx // d
            x = idx - r * d
            lr = l_s[r]
            o = acc[r, x] / lr if lr > 0.0 else float32(0.0)
            if part < 0:
                out[tok0 + r // gsz, h * gsz + (r % gsz), x] = o
            else:
                part_o[part, r, x] = o
        for r in range(tid, n_rows, nth):
            lr = l_s[r]
            v = m_s[r] + math.log(lr) if lr > 0.0 else -math.inf
            if part < 0:
                lse[tok0 + r // gsz, h * gsz + (r % gsz)] = v
            else:
                part_lse[part, r] = v

    @cuda.jit
    def merge_splits(q_start, groups, split_groups, gsz, part_o, part_lse, out, lse):
        g = split_groups[cuda.blockIdx.x]
        tid = cuda.threadIdx.x
        i = groups[g, 0]
        h = groups[g, 1]
        j0 = groups[g, 2]
        n_rows = groups[g, 3] * gsz
        n_split = groups[g, 6]
        p0 = groups[g, 7]
        tok0 = q_start[i] + j0
        for idx in range(tid, n_rows * (d + 1), nth):
            r = idx // (d + 1)
            x = idx - r * (d + 1)  # x == d: this thread writes the row's lse
            mx = -math.inf
            for sp in range(n_split):
                mx = max(mx, part_lse[p0 + sp, r])
            num = float32(0.0)
            den = float32(0.0)
            if mx != -math.inf:
                for sp in range(n_split):
                    v = part_lse[p0 + sp, r]
                    if v != -math.inf:
                        w = math.exp(v - mx)
                        den += w
                        if x < d:
                            num += w * part_o[p0 + sp, r, x]
            t = tok0 + r // gsz
            hq = h * gsz + (r % gsz)
            if x < d:
                out[t, hq, x] = num / den if den > 0.0 else float32(0.0)
            else:
                lse[t, hq] = mx + math.log(den) if den > 0.0 else -math.inf

    return attend, merge_splits


def _tiles(d, g, max_chunk):
    """(query positions per group, key tile) that fit the static shared-memory budget."""
    q_tile = max(1, min(max_chunk, 16 // g))
    for tk in (32, 16, 8):
        if shared_bytes(d, q_tile * g, tk) <= _SHARED_LIMIT:
            return q_tile, tk
    raise ValueError(f"head_dim {d} with GQA group {g} does not fit in {_SHARED_LIMIT} bytes of "
                     f"shared memory: the CUDA kernel supports smaller heads/groups (use --device cpu)")


def _device(a):
    """A numba device array for a host array, a device array or a __cuda_array_interface__."""
    if isinstance(a, np.ndarray):
        return cuda.to_device(a)
    if cuda.is_cuda_array(a) if hasattr(cuda, "is_cuda_array") else False:
        if not hasattr(a, "copy_to_host"):
            return cuda.as_cuda_array(a)
    return a


def _host(a, dtype):
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a, dtype=dtype)
    return np.ascontiguousarray(_device(a).copy_to_host(), dtype=dtype)


def _n_workers():
    try:
        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    except AttributeError:  # the simulator's device has no attributes
        sms = 4
    return 4 * sms  # a few resident blocks per SM hide memory latency


def append_attend_cuda(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                       context_lens, layer, scale, storage, stream=0):
    """The CUDA version of lamina_kernels.cpu.append_attend (same contract).

    Tensors may be numba device arrays, objects with __cuda_array_interface__ (torch
    CUDA tensors) or host numpy arrays (copied over). The four small index arrays
    (table_rows, q_start, kv_start, context_lens) are read on the host to plan the launch, so
    pass them as numpy arrays to avoid a device-to-host copy. Block indices are
    checked only when block_table is a host array. Returns device arrays (out, lse).
    """
    check_storage(storage)
    code = CODE[storage]
    table_rows_h, q_start_h, kv_start_h, context_lens_h = (_host(a, np.int32)
                                             for a in (table_rows, q_start, kv_start, context_lens))
    # Host pools are a convenience (tests): they are copied over and copied back.
    host_pools = [p if isinstance(p, np.ndarray) else None for p in (k_pool, v_pool)]
    q, k_new, v_new, k_pool, v_pool = (_device(a) for a in (q, k_new, v_new, k_pool, v_pool))
    dev_pools = (k_pool, v_pool)
    n_layers, n_blocks, bs, d = k_pool.shape
    if isinstance(block_table, np.ndarray):
        err, seq = P.validate(np.ascontiguousarray(block_table, np.int32), bs, n_blocks,
                              table_rows_h, q_start_h, kv_start_h, context_lens_h, k_new.shape[1])
        if err:
            raise ValueError(f"sequence {seq}: {P.ERRORS[err]}")
    bt = _device(block_table)
    num_kv_heads = k_new.shape[1]  # local kv heads; the block table may have more rows
    if bt.shape[1] < num_kv_heads:
        raise ValueError(f"block table has {bt.shape[1]} kv head rows, request has {num_kv_heads}")
    t_all, n_q_heads, _ = q.shape
    gsz = n_q_heads // num_kv_heads
    if gsz * num_kv_heads != n_q_heads or not 0 <= layer < n_layers:
        raise ValueError("query heads must be a multiple of kv heads and layer in range")
    # One kernel body for every storage: view everything as unsigned bits.
    bits = np.uint32 if code == 0 else np.uint16
    q, k_new, v_new, k_pool, v_pool = (a.view(bits) for a in (q, k_new, v_new, k_pool, v_pool))
    out = cuda.device_array((t_all, n_q_heads, d), np.float32, stream=stream)
    lse = cuda.device_array((t_all, n_q_heads), np.float32, stream=stream)
    if t_all == 0:
        return out, lse
    max_chunk = int(np.max(np.diff(q_start_h)))
    q_tile, tk = _tiles(d, gsz, max_chunk)
    groups, items, _, n_parts = P.make_plan(q_start_h, kv_start_h, context_lens_h, num_kv_heads, q_tile, bs,
                                            _n_workers(), _MIN_SPLIT)
    # Groups that see no key still own output rows: give each an empty item so the
    # kernel writes their out = 0, lse = -inf (nothing else touches those rows).
    empty = np.flatnonzero(groups[:, P.G_NITEMS] == 0)
    if len(empty):
        extra = np.zeros((len(empty), 4), np.int64)
        extra[:, P.I_GROUP] = empty
        extra[:, P.I_PART] = -1
        items = np.concatenate([items, extra])
    attend, merge_splits = _kernels(d, q_tile * gsz, tk)
    rmax = q_tile * gsz
    part_o = cuda.device_array((max(n_parts, 1), rmax, d), np.float32, stream=stream)
    part_lse = cuda.device_array((max(n_parts, 1), rmax), np.float32, stream=stream)
    groups_d = cuda.to_device(groups.astype(np.int32), stream=stream)
    items_d = cuda.to_device(items.astype(np.int32), stream=stream)
    idx = [cuda.to_device(a, stream=stream) for a in (table_rows_h, q_start_h, kv_start_h, context_lens_h)]
    attend[len(items), THREADS, stream](q, k_new, v_new, k_pool, v_pool, bt, *idx, int(layer),
                                        np.float32(scale), code, groups_d, items_d, part_o,
                                        part_lse, out, lse)
    split = np.flatnonzero(groups[:, P.G_NITEMS] > 1).astype(np.int32)
    if len(split):
        merge_splits[len(split), THREADS, stream](idx[1], groups_d, cuda.to_device(split, stream=stream),
                                                  gsz, part_o, part_lse, out, lse)
    for host, dev in zip(host_pools, dev_pools):
        if host is not None:
            dev.copy_to_host(host, stream=stream)
    return out, lse
