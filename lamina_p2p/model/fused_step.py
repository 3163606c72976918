"""A single process's step in one compiled call: each layer's pre, attention and post on the spin pool.

Why: with attention in this process, a layer's Python between its three compiled calls (the fused pre,
the attention call, the fused post) was ~15 Python calls, three Numba dispatches of 12 to 21 arguments,
a dozen small allocations and tensor views: ~35 us a layer in a loop, and more in a real step, where
each layer's weights have just streamed through the caches the interpreter's state lives in. At batch 1
that is ~10 % of a step of SmolLM2 (a layer's dense work and attention take ~0.25 ms there).

What: `decode_layers` runs the layers of one micro-batch (decode rows, and prefill chunks up to the spin
pool's 64 rows) on the spin pool: spin_pool.pool_pre, the
attention call's body (pool_attention.attend_body: the same checks, plan, append, items and merge as
LocalTransport's call), the output's rounding to bfloat16 (fused._round_bf16, as fused.post rounds a
float32 attention output) and spin_pool.pool_post: the per-layer path's compiled functions, on the same
arrays' values, in the same order, so the result is bit-identical to it. It returns early when an op
found a parked worker: the caller sets its Event (Python) and calls again from the next layer.

`FusedLayers` holds what the calls need (the layers' weights as typed lists, per-row-count scratch) and
is what the engine runs for a step of one micro-batch whose attention is in this process
(compute/engine.py: `Engine.fused_layers`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from numba.typed import List

import lamina_kernels as lk
from lamina_kernels import pooled as KP

from lamina_p2p.trace import EMBED, LAST, LAYER, now

from .atomics import cycles
from .fused import _as_bf16, _bits, _round_bf16
from .gemv import _JIT
from .pool_attention import attend_body
from .spin_pool import _cycles_per_s, _now_cycles, current, pool_post, pool_pre

# stamps' columns: the cycle counter when a layer's attention started and ended.
ATTEND_START, ATTEND_END = range(2)


@njit(**_JIT)
def decode_layers(ctl, start, x, x1, act, x2, qkv, q, k, v, out, lse, attn, stamps,
                  norms0, qkv_wbs, qkv_biases, o_wbs, norms1, gate_ups, down_wbs, zero, eps, cos, sin, nq, nk,
                  n_o, n_gate_up, fn, align, read_ahead, n_threads, min_split,
                  k_pool, v_pool, block_table, table_rows, q_start, kv_start, context_lens, scale, bf16):
    """Layers start.. of one micro-batch of T rows: x [T, hidden] (bfloat16 bits, int16) in, the last
    layer's output in x on return. x1, act, x2, qkv: the fused layer's scratch; q, k, v int16 [T, H, D];
    out float32 [T, Hq, D], lse float32 [T, Hq], attn int16 [T, Hq * D]: the attention's; stamps int64
    [n_layers, 2] (cycles(): ATTEND_START, ATTEND_END). The lists: every layer's norms, packed
    weights and QKV bias (FusedDense.layers); n_o, n_gate_up: pool_pre's read-ahead; fn ... min_split as
    pool_attention.attend passes them; k_pool ... scale: the call's, as LocalTransport's kernel_args
    gives them (bf16: the storage is bfloat16). Returns (next layer, error, wake mask): next layer <
    n_layers after an op found a parked worker (wake it, call again from there) or an attention error
    (error != 0, as drivers.append_attend's: nothing was written for that layer)."""
    n_layers = len(qkv_wbs)
    qr, kr, vr = KP._readonly(q.view(np.uint16)), KP._readonly(k.view(np.uint16)), KP._readonly(v.view(np.uint16))
    table, rows = KP._readonly(block_table), KP._readonly(table_rows)
    qs, kvs, ctx = KP._readonly(q_start), KP._readonly(kv_start), KP._readonly(context_lens)
    out_flat, attn_flat = out.reshape(-1), attn.reshape(-1)
    wake = 0
    for layer in range(start, n_layers):
        wake |= pool_pre(ctl, x, norms0[layer], eps, qkv_wbs[layer], qkv_biases[layer], qkv, cos, sin, nq, nk,
                         q, k, v, o_wbs[layer], n_o, gate_ups[layer], n_gate_up)
        stamps[layer, ATTEND_START] = cycles()
        err, _, w = attend_body(ctl, fn, align, read_ahead, qr, kr, vr, k_pool, v_pool, table, rows, qs, kvs, ctx,
                                layer, scale, bf16, n_threads, min_split, out, lse)
        stamps[layer, ATTEND_END] = cycles()
        if err != 0:
            return layer, err, wake
        wake |= w
        _round_bf16(out_flat, attn_flat)
        wake |= pool_post(ctl, attn, o_wbs[layer], zero, x, x1, norms1[layer], eps, gate_ups[layer], act,
                          down_wbs[layer], x2)
        x[:] = x2
        if wake != 0:
            return layer + 1, 0, wake
    return n_layers, 0, wake


class FusedLayers:
    """decode_layers for one FusedDense (its weights in typed lists, made once) and the spin pool.

    `run` takes a step's embedded rows and the attention call's arguments and returns the last layer's
    output; `cycles_to_s` turns its stamps into seconds of the same clock as trace.now (for observers).
    """

    def __init__(self, model):
        self.model = model
        self.fused = fused = model._fused  # a Transformer with the fused layer (Transformer.fused_layers)
        self.embed_bits = _bits(model.embed_weight)  # [vocab, hidden]: a step's rows are gathered from it
        self._rope = (None, None, None)  # (the model's cos table, its bits, sin's bits): see _rope_bits
        layers = fused.layers
        self.lists = (List([L[0] for L in layers]), List([L[1].wb for L in layers]),
                      List([L[1].bias for L in layers]), List([L[2].wb for L in layers]),
                      List([L[3] for L in layers]), List([L[4] for L in layers]), List([L[5].wb for L in layers]))
        self.n_layers = len(layers)
        self._scratch: dict[int, tuple[np.ndarray, ...]] = {}
        self.cycles_per_s = _cycles_per_s()
        self.stamps = np.zeros((self.n_layers, 2), np.int64)

    def pool(self, t: int):
        """The shared spin pool, held (release its lock), for a step of t rows, or None: the per-layer path
        (one compute thread, more rows than the pool takes, or another caller holds it)."""
        pool = self.fused._pool(t)
        if pool is None:
            return None
        if pool is not current() or pool is self.fused._solo:
            pool.lock.release()
            return None
        return pool

    def qkv_buffers(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q [t, Hq, D], k, v [t, Hkv, D] as uint16 (the wire's bfloat16 bits) that `run` writes every layer:
        the attention request of the step is made on them (its shapes and dtypes are what is checked)."""
        s = self._buffers(t)
        return s[1].view(np.uint16), s[2].view(np.uint16), s[3].view(np.uint16)

    def _buffers(self, t: int) -> tuple[np.ndarray, ...]:
        bufs = self._scratch.get(t)
        if bufs is None:
            f = self.fused
            _, qkv, _, _, _, down = f.layers[0]
            hidden = down.out_features
            bufs = (np.empty((t, qkv.out_features), np.int16),  # qkv
                    np.empty((t, f.nq, f.d), np.int16), np.empty((t, f.nk, f.d), np.int16),
                    np.empty((t, f.nk, f.d), np.int16),  # q, k, v
                    np.empty((t, f.nq, f.d), np.float32), np.empty((t, f.nq), np.float32),  # out, lse
                    np.empty((t, f.nq * f.d), np.int16),  # attn (bfloat16 bits)
                    np.empty((t, hidden), np.int16), np.empty((t, down.in_features), np.int16),
                    np.empty((t, hidden), np.int16))  # x1, act, x2
            self._scratch = {**self._scratch, t: bufs}
        return bufs

    def run(self, pool, tokens: np.ndarray, positions: np.ndarray, kernel_args: tuple) -> torch.Tensor:
        """Every layer of one micro-batch: its token ids and positions (int64 [T]), kernel_args:
        LocalTransport.kernel_args of the step's request (made on qkv_buffers(T)). pool: from `pool(T)`, held.
        Returns the last layer's output [T, hidden] bfloat16 (a new tensor); `stamps` holds each layer's cycle
        stamps. For a call the attention cannot take, raises what lamina_kernels.append_attend raises for it (as
        the per-layer path's call does).

        The embedding and the rotary rows are gathered from their tables' bits here (the same bits as
        Transformer.embed and .rope give): one numpy index each, where the torch calls and views cost ~0.1 ms a
        step on the cold caches a pass over the weights leaves (tools/PERFORMANCE_LOG.md, stop 39)."""
        f = self.fused
        t = len(tokens)
        qkv, q, k, v, out, lse, attn, x1, act, x2 = self._buffers(t)
        xb = self.embed_bits[tokens]  # a new array each step: the returned tensor is its memory
        cos_bits, sin_bits = self._rope_bits(int(positions.max()))
        cb, sb = cos_bits[positions], sin_bits[positions]
        _, _, _, k_pool, v_pool, block_table, table_rows, q_start, kv_start, context_lens, _, scale, storage = \
            kernel_args
        _, _, o, _, gate_up, _ = f.layers[0]
        n_o, n_gate_up = f._prefetch_counts(o.wb, gate_up)
        layer, err = 0, 0
        while layer < self.n_layers:
            layer, err, wake = decode_layers(
                pool.ctl, layer, xb, x1, act, x2, qkv, q, k, v, out, lse, attn, self.stamps, *self.lists, f._zero,
                f.eps, cb, sb, f.nq, f.nk, n_o, n_gate_up, KP.item_fn(), KP.ALIGN,
                pool.attend_read_ahead, pool.workers + 1, KP.MIN_SPLIT, k_pool, v_pool, block_table, table_rows,
                q_start, kv_start, context_lens, float(scale), storage == "bfloat16")
            if wake:
                pool.wake(wake)
            if err:
                break
        pool._kept = None  # nothing left open: every layer's post closed the read-ahead
        if err:
            # The kernel's own driver raises its one-line error for this call (nothing written yet).
            qu, ku, vu = self.qkv_buffers(t)
            lk.append_attend(qu, ku, vu, k_pool, v_pool, block_table, table_rows, q_start, kv_start, context_lens,
                             layer, scale, storage)
            raise RuntimeError(f"attention at layer {layer} failed (error {err}) but the kernel accepted the call")
        return _as_bf16(xb)

    def _rope_bits(self, top: int) -> tuple[np.ndarray, np.ndarray]:
        """The model's rotary tables as bits [n, D], covering position `top` (the table grows as the model's)."""
        cos, sin = self.model.rope_table(top)
        if self._rope[0] is not cos:
            self._rope = (cos, _bits(cos), _bits(sin))
        return self._rope[1], self._rope[2]

    @staticmethod
    def anchor() -> tuple[float, int]:
        """(trace.now(), the cycle counter) read together before `run`: what cycles_to_s converts its stamps by."""
        return now(), _now_cycles()

    def cycles_to_s(self, c: int, anchor: tuple[float, int]) -> float:
        """A stamp as trace.now() seconds, given the anchor read before the call."""
        return anchor[0] + (int(c) - anchor[1]) / self.cycles_per_s

    def report(self, observers, tracer, tokens: int, stamps: np.ndarray, anchor: tuple[float, int], t0: float,
               t_end: float) -> None:
        """A step's pieces, as the engine's per-layer path gives its observers (trace.StepObserver) and its
        in-process tracer: EMBED from t0 (before the embedding) to layer 0's attention, each layer's attention
        (sent and done at once: it ran on this thread), each layer's post and the next pre (LAYER), the last
        post up to t_end (LAST); the kernel spans on `tracer` (None: none). stamps: a copy of `stamps` after
        the call (`run`), anchor: `anchor()` before it."""
        at = [(self.cycles_to_s(a, anchor), self.cycles_to_s(b, anchor))
              for a, b in stamps[:, [ATTEND_START, ATTEND_END]].tolist()]
        last = len(at) - 1
        for o in observers:
            o.on_dense(EMBED, 0, 0, tokens, t0, at[0][0])
            for layer, (a0, a1) in enumerate(at):
                o.on_attention(layer, 0, tokens, 1, a0, a1, a1)
                o.on_dense(LAYER if layer < last else LAST, layer, 0, tokens, a1,
                           at[layer + 1][0] if layer < last else t_end)
        if tracer is not None:
            for layer, (a0, a1) in enumerate(at):
                tracer.add("attention (in process)", "kernel", f"L{layer}", a0, a1, {"tokens": tokens})

    def warm_up(self, pool) -> None:
        """Compile (or load) decode_layers for a step's argument types, running no layer."""
        t = 1
        qkv, q, k, v, out, lse, attn, x1, act, x2 = self._buffers(t)
        f = self.fused
        kv = np.zeros((1, 1, 16, f.d), np.uint16)
        i32 = np.zeros(2, np.int32)
        decode_layers(pool.ctl, self.n_layers, x1.copy(), x1, act, x2, qkv, q, k, v, out, lse, attn, self.stamps,
                      *self.lists, f._zero, f.eps, x1[:, : f.d].copy(), x1[:, : f.d].copy(), f.nq, f.nk,
                      0, 0, KP.item_fn(), KP.ALIGN, pool.attend_read_ahead, pool.workers + 1, KP.MIN_SPLIT,
                      kv, kv.copy(), np.zeros((1, 1, 1), np.int32), i32[:1].copy(), i32.copy(), i32.copy(),
                      i32[:1].copy(), 1.0, True)
