"""Pure-torch reference of append_attend and of the LSE merge; the oracle for every kernel.

Deliberately simple and independent of the kernels: 16-bit storage is decoded with
torch's own float16/bfloat16 types (not the kernels' bit decoders), every
(sequence, kv head) is gathered and attended separately in float64, and masks are
built explicitly.
"""

import numpy as np
import torch

_TORCH_16 = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_f64(a, storage):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if storage == "float32":
        return t.to(torch.float64)
    return t.view(torch.int16).view(_TORCH_16[storage]).to(torch.float64)


def append_attend_ref(q, k_new, v_new, k_pool, v_pool, block_table, table_rows, q_start, kv_start,
                      context_lens, layer, scale, storage):
    """Same contract as lamina_kernels.cpu.append_attend; mutates k_pool/v_pool in place."""
    q64 = _as_f64(q, storage)
    t_all, n_q_heads, d = q64.shape
    num_kv_heads = k_new.shape[1]  # local kv heads; the block table may have more rows
    g = n_q_heads // num_kv_heads
    bs = k_pool.shape[2]
    kp = torch.from_numpy(k_pool)  # shares memory: appends land in the caller's arrays
    vp = torch.from_numpy(v_pool)
    kn = torch.from_numpy(np.ascontiguousarray(k_new))
    vn = torch.from_numpy(np.ascontiguousarray(v_new))
    out = torch.zeros((t_all, n_q_heads, d), dtype=torch.float64)
    lse = torch.full((t_all, n_q_heads), float("-inf"), dtype=torch.float64)
    for i in range(len(table_rows)):
        row, context_len = int(table_rows[i]), int(context_lens[i])
        q0, q1 = int(q_start[i]), int(q_start[i + 1])
        k0, k1 = int(kv_start[i]), int(kv_start[i + 1])
        n, nk = q1 - q0, k1 - k0
        for h in range(num_kv_heads):
            for t in range(nk):
                pos = context_len + t
                blk = int(block_table[row, h, pos // bs])
                kp[layer, blk, pos % bs] = kn[k0 + t, h]
                vp[layer, blk, pos % bs] = vn[k0 + t, h]
            total = context_len + nk
            blocks = [int(block_table[row, h, p // bs]) for p in range(total)]
            offs = [p % bs for p in range(total)]
            keys = _as_f64(k_pool[layer, blocks, offs], storage).reshape(total, d)
            vals = _as_f64(v_pool[layer, blocks, offs], storage).reshape(total, d)
            for j in range(n):
                visible = context_len + (j + 1 if nk else 0)
                if visible == 0:
                    continue
                qh = q64[q0 + j, h * g:(h + 1) * g]  # [g, d]
                scores = (qh @ keys[:visible].T) * scale  # [g, visible]
                lse[q0 + j, h * g:(h + 1) * g] = torch.logsumexp(scores, dim=-1)
                out[q0 + j, h * g:(h + 1) * g] = torch.softmax(scores, dim=-1) @ vals[:visible]
    return out.to(torch.float32).numpy(), lse.to(torch.float32).numpy()


def merge_ref(outs, lses):
    """Exact LSE merge (DESIGN.md s4) in float64; raises ValueError if a row has no shard."""
    o = torch.stack([torch.from_numpy(np.asarray(x)).to(torch.float64) for x in outs])
    s = torch.stack([torch.from_numpy(np.asarray(x)).to(torch.float64) for x in lses])
    if bool(torch.isneginf(s).all(dim=0).any()):
        raise ValueError("a row has lse = -inf in every shard")
    total = torch.logsumexp(s, dim=0)  # -inf shards get exactly weight 0
    w = torch.exp(s - total)
    out = (w.unsqueeze(-1) * o).sum(dim=0)
    return out.to(torch.float32).numpy(), total.to(torch.float32).numpy()
