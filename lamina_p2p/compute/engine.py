"""The compute peer's engine: one decode step over the running sequences, in pipelined micro-batches.

A step is one job on the dense thread, an explicit software pipeline (DESIGN.md section 7):
    for each micro-batch i:  x_i = embed; send(pre 0 of x_i)
    for each layer l, for each micro-batch i:
        partials = receive(i, l)                # the wire, or the kernel in this thread
        x_i = merge, post l, pre l+1; send(i, l+1)
then one LM head and sampling over every micro-batch's last rows. While micro-batch
i's attention is in flight, micro-batch i+1's dense work runs. The transport's data
path (send/receive) belongs to the dense thread; the event loop only plans steps,
re-places shards after a failure and frees KV. One exception: a small step (at most
INLINE_STEP_TOKENS tokens: decode at a small batch) with attention in this process and the
dense work unpinned runs on the event loop's own thread, after giving the loop's other tasks
their turn: the hop to the dense thread and back cost more than the step's Python work. And a
step of one micro-batch with attention in this process on the spin pool runs all its layers in
one compiled call (model/fused_step.py; `fused_layers`): no Python between a layer's pieces.

The engine runs steps and nothing else: it does not decide when a sequence is
finished, nor whether a failed step is retried. Both are the scheduler's
(`compute.scheduler`), which owns a sequence's lifecycle. Whoever watches a step
(the tracer, serve's metrics) is a `trace.StepObserver` the engine calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lamina_p2p.compute.errors import AttentionPeerError
from lamina_p2p.compute.fanout import MicroBatch, build_requests, merge_results, plan_micro_batch
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.placement import Placer
from lamina_p2p.compute.sampling import sample
from lamina_p2p.compute.sequence import SamplingParams, Sequence
from lamina_p2p.compute.transport import Transport
from lamina_p2p.runtime import compute_threads, pin_this_thread, use_compute_threads
from lamina_p2p.trace import EMBED, LAST, LAYER, SAMPLE, StepObserver, Tracer, now

log = logging.getLogger("lamina.compute")

# Steps of at most this many tokens run on the event loop's thread where attention is in process and the
# dense work is not pinned (see the module docstring). SmolLM2 bf16, context 512-1300, one engine switching
# between the two every 25 steps (16 rounds): batch 1 10.15 -> 9.52 and 10.19 -> 9.63 ms a step, batch 4
# 13.48 -> 12.27. Larger steps (prefill chunks, big batches) keep the loop free while they run.
INLINE_STEP_TOKENS = 8


class Engine:
    """One model on one transport: runs decode/prefill steps over the sequences it is given.

    `dense_cpus`: CPU ids the dense thread is pinned to (None: unpinned). `max_step_tokens`:
    the most tokens (decode + prefill chunks) one step processes. `shard_tokens`: tokens per
    shard under sequence placement (default a quarter of the context).
    """

    def __init__(self, model, transport: Transport, *, placement: str = "request", micro_batches: int = 1,
                 shard_tokens: int | None = None, max_step_tokens: int = 4096, owner: str | None = None,
                 kv_replicas: int = 1, dense_cpus: set[int] | None = None):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.model = model
        self.cfg = model.config
        self.transport = transport
        self.owner = owner or transport.owner_id or uuid.uuid4().hex
        self.micro_batches = micro_batches
        self.max_step_tokens = max_step_tokens
        self.group_size = self.cfg.group_size
        self.placer = Placer(placement, self.cfg.num_kv_heads,
                             shard_tokens or max(16, self.cfg.max_position_embeddings // 4), replicas=kv_replicas)
        self.recomputed = 0  # sequences whose KV was rebuilt after a peer failed
        self.promoted = 0  # shards that failed over to a replica without recompute
        # The dense thread on cores of its own: sharing one with the event loop, it waits on the GIL
        # while the loop handles other micro-batches' messages (tools/overlap_check.py measures it).
        self.dense_cpus = set(dense_cpus) if dense_cpus else None
        self.dense = ThreadPoolExecutor(1, thread_name_prefix="dense")
        self._dense_pinned = False  # pinned on its first step (an error then goes to that step's caller)
        self._thread_state = threading.local()  # .threads: the compute thread count this thread last applied
        self.storage = str(model.dtype).removeprefix("torch.")
        # The spinning dense pool (model/spin_pool.py) pays where the dense thread's waits are short:
        # attention in this process. Waiting on attention peers, it would spin through every round trip.
        # Set at every step, not once: engines may share one model (a benchmark's single process and
        # cluster), and the last engine built must not decide for the others.
        self.dense_pool = transport.address() is None
        transport.bind(self.owner, self.geometry())
        self._ids = itertools.count(1)
        self.logits_sink = None  # tests: called with (sequences, logits) for every sampled row
        # Who watches every step (trace.StepObserver), called on the dense thread. Empty: no timestamps taken.
        self.observers: list[StepObserver] = []
        self.steps = 0
        self._failed_replicas: list[str] = []  # replicas that failed in the step being run
        self._peer_times = False  # the step being run asks the peers for their queue and kernel times
        # A step of one micro-batch with attention in this process runs its layers in one compiled call where
        # the model and transport allow it (model/fused_step.py); False: always the per-layer path.
        self.fused_layers = True

    @property
    def tracer(self) -> Tracer | None:
        """The Tracer among the observers (None: not tracing); its presence also asks attention
        peers to report their queue and kernel times with every reply."""
        return next((o for o in self.observers if isinstance(o, Tracer)), None)

    @tracer.setter
    def tracer(self, tracer: Tracer | None) -> None:
        self.observers = [o for o in self.observers if not isinstance(o, Tracer)]
        if tracer is not None:
            self.observers.append(tracer)

    @property
    def max_context(self) -> int:
        # Sliding-window attention (Mistral) is not implemented: stay inside the window, where it is exact.
        return min(self.cfg.max_position_embeddings, self.cfg.sliding_window or self.cfg.max_position_embeddings)

    def geometry(self) -> dict:
        """What an attention peer needs to hold this model's KV (the register message's fields)."""
        return self.cfg.kv_geometry(self.storage)

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A sequence of `prompt` (token ids); ValueError if it can never run (empty, too long, bad ids)."""
        params.validate()
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_context}")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        return Sequence(next(self._ids), list(prompt), params)

    # -- one step ---------------------------------------------------------------
    async def step(self, running: list[Sequence]) -> list[Sequence]:
        """Advance the running sequences by one chunk each; returns those that got a token.

        Decode tokens go first, then prefill chunks, up to `max_step_tokens` tokens; a
        sequence left out (budget spent, or already finished) is untouched. For each
        sequence stepped, `cached` grows by its chunk; one that reached its last pending
        token gets the sampled token appended to `output` and its logprob (float, natural
        log) to `logprobs`: those are returned, in step order. Whether that ends the
        sequence is the caller's decision (the scheduler's), as is freeing its KV.

        Raises AttentionPeerError from an attention peer (kind failed / kv_full / lost /
        busy / error: see compute.errors); the step is then undone (no `cached` grew, no
        token appended) and may be run again once `recover` has re-placed the shards: a
        retried step appends the same K/V at the same positions.
        """
        self.placer.set_peers(self.transport.peers())
        chosen, counts, budget = [], [], self.max_step_tokens
        # Decode tokens first (they are cheap and latency-bound), then prefill chunks.
        for seq in sorted(running, key=lambda s: s.pending):
            if seq.finished or budget <= 0:
                continue
            if not seq.shards:
                seq.shards = self.placer.place(seq.length + seq.params.max_tokens)
            n = min(seq.pending, budget)
            self.placer.roll(seq.shards, seq.cached, seq.cached + n)  # a chunk may open several shards
            chosen.append(seq)
            counts.append(n)
            budget -= n
        if not chosen:
            return []
        batches = self._split(chosen, counts)
        sample_seqs = [seq for mb in batches for seq in mb.sample_seqs]
        inline = self.dense_pool and self.dense_cpus is None and sum(counts) <= INLINE_STEP_TOKENS
        if inline:
            await asyncio.sleep(0)  # the turn the other tasks would get while the dense thread ran
        try:
            if inline:
                tokens, logprobs = self._run_step(batches, compute_threads())
            else:
                tokens, logprobs = await asyncio.get_running_loop().run_in_executor(self.dense, self._run_step,
                                                                                     batches, compute_threads())
        finally:
            failed, self._failed_replicas = self._failed_replicas, []
            for peer in failed:
                self.transport.mark_failed(peer)
        for mb in batches:
            for seq, n in zip(mb.seqs, mb.n):
                seq.cached += n
        self.steps += 1
        for seq, tok, lp in zip(sample_seqs, tokens, logprobs):
            seq.output.append(tok)
            seq.logprobs.append(lp)
        return sample_seqs

    # -- placement after a failure (event loop) ------------------------------------
    async def move_off_leaving_peers(self, running: list[Sequence]) -> None:
        """Re-place the shards held by peers that announced they are leaving."""
        for peer in self.transport.leaving():
            if any(peer in (sh.peer, *sh.replicas) for seq in running for sh in seq.shards):
                await self.recover(running, AttentionPeerError(peer, "leaving the cluster", "leaving"))

    async def recover(self, running: list[Sequence], err: AttentionPeerError) -> None:
        """Take the failed peer out of use; fail its shards over to replicas, or recompute.

        A sequence whose every shard on the peer has a live replica keeps its KV (the
        replica is promoted); any other loses its shards and its `cached` goes to 0, so its
        next step prefills prompt + output again (tokens kept: the output continues unchanged).
        """
        gone = err.peer
        if err.kind == "failed":
            self.transport.mark_failed(gone)
        live = set(self.transport.peers()) - {gone}
        # A leaving peer is alive: everything of ours it holds must be freed there, or it waits for it.
        leftovers = [sh.key(seq.seq_id) for seq in running for sh in seq.shards
                     if gone in (sh.peer, *sh.replicas)] if err.kind == "leaving" else []
        rebuild = []
        for seq in running:
            for shard in seq.shards:
                if gone in shard.replicas:
                    shard.replicas.remove(gone)
            hit = [sh for sh in seq.shards if sh.peer == gone]
            if not hit:
                continue
            if err.kind in ("failed", "leaving") and all(any(r in live for r in sh.replicas) for sh in hit):
                for sh in hit:
                    sh.peer = next(r for r in sh.replicas if r in live)
                    sh.replicas.remove(sh.peer)
                    self.promoted += 1
            else:
                rebuild.append(seq)
        if rebuild:
            await self.release(rebuild)
            for seq in rebuild:
                seq.cached = 0  # prefill prompt + output again; the tokens are kept, so output continues unchanged
            self.recomputed += len(rebuild)
        if leftovers:
            with contextlib.suppress(Exception):
                await self.transport.free(gone, leftovers)

    def _split(self, seqs: list[Sequence], counts: list[int]) -> list[MicroBatch]:
        """Balance micro-batches by attention cost (context read + new tokens)."""
        m = min(self.micro_batches, len(seqs))
        bins = [([], [], 0) for _ in range(m)]
        order = sorted(range(len(seqs)), key=lambda i: -(seqs[i].cached + counts[i]))
        for i in order:
            j = min(range(m), key=lambda b: bins[b][2])
            s, c, cost = bins[j]
            bins[j] = (s + [seqs[i]], c + [counts[i]], cost + seqs[i].cached + counts[i])
        return [plan_micro_batch(s, c, self.cfg.num_kv_heads) for s, c, _ in bins if s]

    # -- the pipeline (on the dense thread) ---------------------------------------
    def _run_step(self, batches: list[MicroBatch], threads: int = 0) -> tuple[list[int], list[float]]:
        """Every layer of every micro-batch, then the LM head and sampling: one job on the dense thread.

        The paper's rotation as an explicit software pipeline: micro-batch i's attention
        for layer l is in flight (sent) while micro-batch i+1's dense work runs; then i's
        result is received, its post and next pre run, and its next layer is sent.
        Returns (token id, logprob) per sampled sequence, in the order of the batches' sample_seqs.
        """
        self._enter_dense(threads)
        watched = bool(self.observers)
        self._peer_times = self.tracer is not None  # ask the peers for their queue and kernel times
        fast = self._fused_layers(batches)
        if fast is not None:
            hidden = [self._run_fused_layers(*fast, batches[0], watched)]
        else:
            hidden = self._run_layers(batches, watched)
        sample_seqs = [seq for mb in batches for seq in mb.sample_seqs]
        if not watched:
            return self._sample(sample_seqs, hidden)
        t0 = now()
        try:
            return self._sample(sample_seqs, hidden)
        finally:
            t1 = now()
            for o in self.observers:
                o.on_dense(SAMPLE, -1, -1, len(sample_seqs), t0, t1)

    def _run_layers(self, batches: list[MicroBatch], watched: bool) -> list[torch.Tensor]:
        """The software pipeline over every layer of every micro-batch; each one's rows to sample."""
        last = self.cfg.num_layers - 1
        outstanding: list[dict] = [{} for _ in batches]  # per micro-batch: request index -> ticket in flight
        hidden = [None] * len(batches)
        dense = self._observed if watched else _call
        try:
            with torch.inference_mode():
                xs = []
                for i, mb in enumerate(batches):
                    mb.index = i
                    x, reqs = dense(EMBED, 0, mb, self._first, mb)
                    xs.append(x)
                    self._send(mb, reqs, outstanding[i], watched)
                for layer in range(last + 1):
                    for i, mb in enumerate(batches):
                        results = self._receive(mb, layer, outstanding[i], watched)
                        if layer < last:
                            xs[i], reqs = dense(LAYER, layer, mb, self._next, mb, layer, xs[i], results)
                            self._send(mb, reqs, outstanding[i], watched)
                        else:
                            hidden[i] = dense(LAST, layer, mb, self._last, mb, layer, xs[i], results)
        except BaseException:
            # Let every request in flight end before raising: one left running after a failure
            # (KV full) would write KV for sequences the caller is about to free and requeue.
            for tickets in outstanding:
                for ticket in tickets.values():
                    with contextlib.suppress(Exception):
                        self.transport.receive(ticket)
            raise
        return hidden

    def _fused_layers(self, batches: list[MicroBatch]):
        """(FusedLayers, the spin pool, held) when this step's layers can run in one compiled call
        (model/fused_step.py): one micro-batch whose one request holds every row and head, attention in this
        process on the spin pool, the fused bfloat16 layer; else None (the per-layer path)."""
        if not self.fused_layers or len(batches) != 1 or not isinstance(self.transport, LocalTransport):
            return None
        mb = batches[0]
        if not (mb.whole and len(mb.groups) == 1 and self.transport.pool_takes(mb.num_tokens)):
            return None
        runner = self.model.fused_layers()
        pool = runner.pool(mb.num_tokens) if runner is not None else None
        return None if pool is None else (runner, pool)

    def _run_fused_layers(self, runner, pool, mb: MicroBatch, watched: bool) -> torch.Tensor:
        """Every layer of the step's one micro-batch in one compiled call; its rows to sample. Observers get
        the pieces the per-layer path gives them, from the call's stamps."""
        mb.index = 0
        t0 = now()
        try:
            with torch.inference_mode():
                q, k, v = runner.qkv_buffers(mb.num_tokens)
                req = build_requests(self.owner, 0, mb, q, k, v, self.group_size)[0]
                args = self.transport.kernel_args(req)  # the step's shard bookkeeping; raises KVFull, ShardError
                anchor = runner.anchor()
                x = runner.run(pool, mb.tokens.numpy(), mb.positions.numpy(), args)
                stamps = runner.stamps.copy() if watched else None  # the runner's: another engine may run next
                hidden = _sampled_rows(x, mb)
        finally:
            pool.lock.release()
        if watched:
            runner.report(self.observers, self.transport.tracer if self._peer_times else None, mb.num_tokens, stamps,
                          anchor, t0, now())
        return hidden

    def _enter_dense(self, threads: int) -> None:
        """Set this thread up for dense work: pinned (dense_cpus, once), the compute thread count, the model's
        dense pool setting (this engine's: engines may share a model)."""
        if self.dense_cpus and not self._dense_pinned:
            pin_this_thread(self.dense_cpus)
            self._dense_pinned = True
        if threads and getattr(self._thread_state, "threads", 0) != threads:  # the process's count, on this thread
            use_compute_threads(threads)
            self._thread_state.threads = threads
        if self.model.dense_pool != self.dense_pool:
            self.model.dense_pool = self.dense_pool

    async def warm_up(self) -> float:
        """Run a step's compiled code once, before the first request; the seconds it took.

        Numba compiles a function at its first call (or loads it from its cache, next to the source): the
        fused dense layer's, the LM head's and the in-process attention's would otherwise compile inside the
        first steps (a fresh install, SmolLM2 bf16, 2 cores: 8 tokens took 80 s of "decode"), or inside the
        first request of a new length; here all of them compile at once (182 s there), or load from the cache
        in about half a second. Each dense call runs on
        zeros at one row and at one row more than the spin pool takes (the two sets of calls a step can
        make), on the dense thread as set up for steps, then the transport's own (Transport.warm_up) and the fused
        layers' call (model/fused_step.py) where a step may take it. No
        sequence, KV block or peer is touched; the step counter stays at 0."""
        return await asyncio.get_running_loop().run_in_executor(self.dense, self._warm_up, compute_threads())

    def _warm_up(self, threads: int) -> float:
        from lamina_p2p.model.spin_pool import POOL_MAX_ROWS

        t0 = time.perf_counter()
        self._enter_dense(threads)
        cfg, m = self.cfg, self.model
        greedy = SamplingParams(max_tokens=1)
        with torch.inference_mode():
            for rows in (1, POOL_MAX_ROWS + 1):
                x = m.embed(torch.zeros(rows, dtype=torch.long))
                m.pre(0, x, torch.arange(rows))  # (with wire=True the same calls, another return)
                # A float32 numpy output, as the kernel or the wire gives it: the model's compiled rounding too.
                x = m.post(0, x, np.zeros((rows, cfg.num_heads, cfg.head_dim), np.float32))
                sample(m.logits(x), [Sequence(0, [0], greedy)] * rows)
        self.transport.warm_up()
        runner = m.fused_layers() if self.fused_layers and isinstance(self.transport, LocalTransport) else None
        pool = runner.pool(1) if runner is not None else None
        if pool is not None:  # the fused layers' one compiled call (see _fused_layers)
            try:
                runner.warm_up(pool)
            finally:
                pool.lock.release()
        return time.perf_counter() - t0

    def _observed(self, piece: str, layer: int, mb: MicroBatch, fn, *args):
        t0 = now()
        try:
            return fn(*args)
        finally:
            t1 = now()
            for o in self.observers:
                o.on_dense(piece, layer, mb.index, mb.num_tokens, t0, t1)

    def _send(self, mb: MicroBatch, reqs, tickets: dict, watched: bool) -> None:
        """Send one layer's requests of a micro-batch (one per peer and head range)."""
        if watched:
            mb.sent_at = now()
        for j, (g, r) in enumerate(zip(mb.groups, reqs)):
            tickets[j] = self.transport.send(g.peer, r)

    def _receive(self, mb: MicroBatch, layer: int, tickets: dict, watched: bool) -> list:
        """One layer's primaries' results; a replica that fails is dropped, the primary is fine."""
        wait_from = now() if watched else 0.0
        results = []
        for j, g in enumerate(mb.groups):
            ticket = tickets.pop(j)
            if j < mb.num_primary:
                results.append(self.transport.receive(ticket))
                continue
            try:
                self.transport.receive(ticket)
            except Exception as e:
                self._drop_replica(mb, g.peer, e)
        if watched:
            t1 = now()
            for o in self.observers:
                o.on_attention(layer, mb.index, mb.num_tokens, len(mb.groups), mb.sent_at, wait_from, t1)
        return results

    def _drop_replica(self, mb: MicroBatch, peer: str, err: BaseException) -> None:
        log.warning("replica on %s failed (%s): dropped", peer, err)
        for seq in mb.seqs:
            for shard in seq.shards:
                if peer in shard.replicas:
                    shard.replicas.remove(peer)
        if isinstance(err, AttentionPeerError) and err.kind == "failed":
            self._failed_replicas.append(peer)  # marked failed on the event loop, after the step

    # -- dense work (on the dense thread) ---------------------------------------
    # x: [T, hidden] activations in the model's dtype, T = the micro-batch's tokens; q/k/v go
    # out as AttendRequests in the storage encoding (fanout.build_requests).
    def _first(self, mb: MicroBatch):
        """Embedding and layer 0's pre: (x [T, hidden], layer 0's requests)."""
        x = self.model.embed(mb.tokens)
        q, k, v = self.model.pre(0, x, mb.positions, wire=mb.whole)
        return x, build_requests(self.owner, 0, mb, q, k, v, self.group_size, self._peer_times)

    def _post(self, mb: MicroBatch, layer: int, x, results):
        attn = merge_results(mb, results, self.cfg.num_heads, self.cfg.head_dim, self.group_size)
        # A float32 numpy output (one group held every row and head) is rounded by the model itself.
        return self.model.post(layer, x, attn if isinstance(attn, np.ndarray) else attn.to(x.dtype))

    def _next(self, mb: MicroBatch, layer: int, x, results):
        """Merge layer `layer`'s partials, its post, the next layer's pre: (x, next layer's requests)."""
        x = self._post(mb, layer, x, results)
        q, k, v = self.model.pre(layer + 1, x, mb.positions, wire=mb.whole)
        return x, build_requests(self.owner, layer + 1, mb, q, k, v, self.group_size, self._peer_times)

    def _last(self, mb: MicroBatch, layer: int, x, results):
        """The last layer's post; returns the hidden rows to sample [S, hidden] (the LM head runs once per step)."""
        return _sampled_rows(self._post(mb, layer, x, results), mb)

    def _sample(self, seqs: list[Sequence], hidden: list[torch.Tensor]):
        # One LM head over every micro-batch's rows: at decode batch sizes it is weight-read bound,
        # so M micro-batches would otherwise read the vocabulary matrix M times a step.
        if not seqs:
            return [], []
        with torch.inference_mode():
            logits = self.model.logits(torch.cat(hidden) if len(hidden) > 1 else hidden[0])
            if self.logits_sink is not None:
                self.logits_sink(seqs, logits)
            return sample(logits, seqs)

    # -- lifecycle --------------------------------------------------------------
    async def release(self, seqs: list[Sequence]) -> None:
        """Free the sequences' KV on every peer that holds a shard of them."""
        by_peer: dict[str, list[int]] = {}
        for seq in seqs:
            for shard in seq.shards:
                for peer in (shard.peer, *shard.replicas):
                    by_peer.setdefault(peer, []).append(shard.key(seq.seq_id))
            self.placer.forget(seq.shards)
            seq.shards = []
        await asyncio.gather(*(self.transport.free(peer, ids) for peer, ids in by_peer.items()),
                             return_exceptions=True)

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Sequence], dict]:
        """Run prompts to completion as one batch (the `generate` command's path).

        The lifecycle (when a sequence ends, retries after a peer failure) is the
        scheduler's: this is `compute.scheduler.generate` on this engine.
        """
        from lamina_p2p.compute.scheduler import generate

        return await generate(self, prompts, params)

    def close(self) -> None:
        self.dense.shutdown(wait=False, cancel_futures=True)


def _sampled_rows(x: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """The rows of x [T, hidden] whose logits are sampled: x itself when every row is (a decode step: each
    sequence's one row, in order), else a copy of those rows."""
    return x if len(mb.sample_seqs) == mb.num_tokens else x.index_select(0, mb.sample_rows)


def _call(piece, layer, mb, fn, *args):
    """The unobserved dense piece: just the call."""
    return fn(*args)
