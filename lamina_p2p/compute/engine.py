"""The compute peer's engine: one decode step over the running sequences, in pipelined micro-batches.

A step is one job on the dense thread, an explicit software pipeline (DESIGN.md section 7):
    for each micro-batch i:  x_i = embed; send(pre 0 of x_i)
    for each layer l, for each micro-batch i:
        partials = receive(i, l)                # the wire, or the kernel in this thread
        x_i = merge, post l, pre l+1; send(i, l+1)
then one LM head and sampling over every micro-batch's last rows. While micro-batch
i's attention is in flight, micro-batch i+1's dense work runs. The transport's data
path (send/receive) belongs to the dense thread; the event loop only plans steps,
recovers from failures and frees KV, and never runs a torch op or a kernel.
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

import torch

from lamina_p2p.compute.errors import AttentionPeerError, NoPeers
from lamina_p2p.compute.fanout import MicroBatch, build_requests, merge_results, plan_micro_batch
from lamina_p2p.compute.placement import Placer
from lamina_p2p.compute.sampling import sample
from lamina_p2p.compute.sequence import SamplingParams, Sequence
from lamina_p2p.compute.transport import Transport
from lamina_p2p.runtime import pin_this_thread
from lamina_p2p.trace import now

log = logging.getLogger("lamina.compute")


class Engine:
    def __init__(self, model, transport: Transport, *, placement: str = "request", micro_batches: int = 1,
                 shard_tokens: int | None = None, max_step_tokens: int = 4096, owner: str | None = None,
                 kv_replicas: int = 1, peer_wait_timeout: float = 60.0, max_recoveries: int = 16,
                 dense_cpus: set[int] | None = None):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.model = model
        self.cfg = model.config
        self.transport = transport
        self.owner = owner or transport.owner_id or uuid.uuid4().hex
        self.micro_batches = micro_batches
        self.max_step_tokens = max_step_tokens
        self.group_size = self.cfg.num_heads // self.cfg.num_kv_heads
        self.placer = Placer(placement, self.cfg.num_kv_heads,
                             shard_tokens or max(16, self.cfg.max_position_embeddings // 4), replicas=kv_replicas)
        self.peer_wait_timeout = peer_wait_timeout  # how long requests wait when no attention peer is left
        self.max_recoveries = max_recoveries  # per step: failures in a row before the step gives up
        self.recomputed = 0  # sequences whose KV was rebuilt after a peer failed
        self.promoted = 0  # shards that failed over to a replica without recompute
        self.dense = ThreadPoolExecutor(1, thread_name_prefix="dense")
        # The dense thread on cores of its own: sharing one with the event loop, it waits on the GIL
        # while the loop handles other micro-batches' messages (tools/overlap_check.py measures it).
        self.dense_cpus = set(dense_cpus) if dense_cpus else None
        self._pinned = threading.local()
        self.storage = str(model.dtype).removeprefix("torch.")
        transport.bind(self.owner, self.geometry())
        self._ids = itertools.count(1)
        self.eos = set(self.cfg.eos_token_ids)
        self.logits_sink = None  # tests: called with (sequences, logits) for every sampled row
        self.tracer = None  # a lamina_p2p.trace.Tracer records per-layer spans when set
        self.steps = 0
        self._failed_replicas: list[str] = []  # replicas that failed in the step being run
        # Per-layer timings for metrics: called on the dense thread with ("dense" | "attention", label,
        # seconds); dense labels are "embed", the layer number, "last" and "sample".
        self.on_layer = None

    @property
    def max_context(self) -> int:
        # Sliding-window attention (Mistral) is not implemented: stay inside the window, where it is exact.
        window = getattr(self.cfg, "sliding_window", None)
        return min(self.cfg.max_position_embeddings, window or self.cfg.max_position_embeddings)

    def geometry(self) -> dict:
        """What an attention peer needs to hold this model's KV."""
        c = self.cfg
        return {"num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim, "storage": self.storage, "max_positions": c.max_position_embeddings}

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
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
        """Advance every running sequence by one chunk; returns those that finished.

        When an attention peer fails, its sequences are re-placed on the peers left and
        their KV rebuilt (or served by a replica), and the step runs again: a retried step
        appends the same K/V at the same positions, so the others are unaffected. KV full
        is not a failure: it goes to the caller (the scheduler preempts).
        """
        for attempt in itertools.count():
            try:
                await self._move_off_leaving_peers(running)
                await self._wait_for_peers()
                return await self._step_once(running)
            except AttentionPeerError as e:
                if e.kv_full or attempt >= self.max_recoveries:
                    raise
                if e.kind == "busy":  # overloaded, not broken: its KV is intact, try again shortly
                    await asyncio.sleep(0.01 * 2 ** min(attempt, 6))
                    continue
                log.warning("step failed on %s (%s): recovering", e.peer, e.kind)
                await self.recover(running, e)

    async def _move_off_leaving_peers(self, running: list[Sequence]) -> None:
        for peer in self.transport.leaving():
            if any(peer in (sh.peer, *sh.replicas) for seq in running for sh in seq.shards):
                await self.recover(running, AttentionPeerError(peer, "leaving the cluster", "leaving"))

    async def _wait_for_peers(self) -> None:
        if self.transport.peers():
            return
        try:
            await self.transport.wait_for_peers(1, self.peer_wait_timeout)
        except TimeoutError:
            raise NoPeers(f"no attention peer joined within {self.peer_wait_timeout:g} s") from None

    async def recover(self, running: list[Sequence], err: AttentionPeerError) -> None:
        """Take the failed peer out of use; fail its shards over to replicas, or recompute."""
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

    async def _step_once(self, running: list[Sequence]) -> list[Sequence]:
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
        try:
            tokens, logprobs = await asyncio.get_running_loop().run_in_executor(self.dense, self._run_step, batches)
        finally:
            failed, self._failed_replicas = self._failed_replicas, []
            for peer in failed:
                self.transport.mark_failed(peer)
        for mb in batches:
            for seq, n in zip(mb.seqs, mb.n):
                seq.cached += n
        self.steps += 1
        finished = []
        for seq, tok, lp in zip(sample_seqs, tokens, logprobs):
            seq.output.append(tok)
            seq.logprobs.append(lp)
            if self._check_stop(seq, tok):
                finished.append(seq)
        if finished:
            await self.release(finished)
        return finished

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        p = seq.params
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens:
            seq.finish_reason = "length"
        return seq.finished

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
    def _run_step(self, batches: list[MicroBatch]):
        """Every layer of every micro-batch, then the LM head and sampling: one job on the dense thread.

        The paper's rotation as an explicit software pipeline: micro-batch i's attention
        for layer l is in flight (sent) while micro-batch i+1's dense work runs; then i's
        result is received, its post and next pre run, and its next layer is sent.
        """
        self._pin_dense_thread()
        last = self.cfg.num_layers - 1
        outstanding: list[dict] = [{} for _ in batches]  # per micro-batch: group index -> ticket in flight
        hidden = [None] * len(batches)
        try:
            timed = self._timed if self.on_layer is not None else lambda label, fn, *a: fn(*a)
            with torch.inference_mode():
                xs = []
                for i, mb in enumerate(batches):
                    mb.index = i
                    x, reqs = timed("embed", self._first, mb)
                    xs.append(x)
                    self._send(mb, 0, reqs, outstanding[i])
                for layer in range(last + 1):
                    for i, mb in enumerate(batches):
                        results = self._receive(mb, layer, outstanding[i])
                        if layer < last:
                            xs[i], reqs = timed(layer, self._next, mb, layer, xs[i], results)
                            self._send(mb, layer + 1, reqs, outstanding[i])
                        else:
                            hidden[i] = timed("last", self._last, mb, layer, xs[i], results)
        except BaseException:
            # Let every request in flight end before raising: one left running after a failure
            # (KV full) would write KV for sequences the caller is about to free and requeue.
            for tickets in outstanding:
                for ticket in tickets.values():
                    with contextlib.suppress(Exception):
                        self.transport.receive(ticket)
            raise
        sample_seqs = [seq for mb in batches for seq in mb.sample_seqs]
        return timed("sample", self._sample, sample_seqs, hidden)

    def _timed(self, label, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.on_layer("dense", str(label), time.perf_counter() - t0)

    def _send(self, mb: MicroBatch, layer: int, reqs, tickets: dict) -> None:
        mb.sent_at = now()
        for j, (g, r) in enumerate(zip(mb.groups, reqs)):
            tickets[j] = self.transport.send(g.peer, r)

    def _receive(self, mb: MicroBatch, layer: int, tickets: dict) -> list:
        """One layer's primaries' results; a replica that fails is dropped, the primary is fine."""
        waited = time.perf_counter()
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
        if self.on_layer is not None:
            self.on_layer("attention", str(layer), time.perf_counter() - waited)
        if self.tracer is not None:
            self.tracer.add("compute", f"micro-batch {mb.index}", f"attention L{layer}", mb.sent_at, now(),
                            {"tokens": mb.num_tokens, "requests": len(mb.groups)})
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
    @contextlib.contextmanager
    def _dense_span(self, mb: MicroBatch, name: str):
        if self.tracer is None:
            yield
            return
        with self.tracer.span("compute", f"micro-batch {mb.index}", name, {"tokens": mb.num_tokens}):
            yield

    def _pin_dense_thread(self) -> None:
        # Here, not in an executor initializer: the executor may be replaced (serve times its jobs).
        if self.dense_cpus and getattr(self._pinned, "cpus", None) != self.dense_cpus:
            pin_this_thread(self.dense_cpus)
            self._pinned.cpus = self.dense_cpus

    def _first(self, mb: MicroBatch):
        with self._dense_span(mb, "dense embed+L0"):
            x = self.model.embed(mb.tokens)
            q, k, v = self.model.pre(0, x, mb.positions)
            return x, build_requests(self.owner, 0, mb, q, k, v, self.group_size, self.tracer is not None)

    def _post(self, mb: MicroBatch, layer: int, x, results):
        attn = merge_results(mb, results, self.cfg.num_heads, self.cfg.head_dim, self.group_size)
        return self.model.post(layer, x, attn.to(x.dtype))

    def _next(self, mb: MicroBatch, layer: int, x, results):
        with self._dense_span(mb, f"dense L{layer}/L{layer + 1}"):
            x = self._post(mb, layer, x, results)
            q, k, v = self.model.pre(layer + 1, x, mb.positions)
            return x, build_requests(self.owner, layer + 1, mb, q, k, v, self.group_size, self.tracer is not None)

    def _last(self, mb: MicroBatch, layer: int, x, results):
        """The last layer's post; returns the hidden rows to sample (the LM head runs once per step)."""
        with self._dense_span(mb, f"dense L{layer}"):
            return self._post(mb, layer, x, results).index_select(0, mb.sample_rows)

    def _sample(self, seqs: list[Sequence], hidden: list[torch.Tensor]):
        # One LM head over every micro-batch's rows: at decode batch sizes it is weight-read bound,
        # so M micro-batches would otherwise read the vocabulary matrix M times a step.
        if not seqs:
            return [], []
        span = self.tracer.span("compute", "step", "logits+sample", {"rows": len(seqs)}) if self.tracer else None
        with torch.inference_mode(), span or contextlib.nullcontext():
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
        """Run prompts to completion as one batch (the `generate` command's path)."""
        seqs = [self.new_sequence(p, SamplingParams(**vars(params))) for p in prompts]
        t0 = time.perf_counter()
        first_token_at = None
        running = list(seqs)
        while running:
            await self.step(running)
            if first_token_at is None and all(s.output for s in seqs):
                first_token_at = time.perf_counter()
            running = [s for s in running if not s.finished]
        t1 = time.perf_counter()
        decoded = sum(len(s.output) - 1 for s in seqs)
        decode_time = t1 - (first_token_at or t1)
        stats = {
            "prefill_s": (first_token_at or t1) - t0,
            "decode_s": decode_time,
            "tokens_per_s": decoded / decode_time if decode_time > 0 else 0.0,
            "steps": self.steps,
        }
        return seqs, stats

    def close(self) -> None:
        self.dense.shutdown(wait=False, cancel_futures=True)
