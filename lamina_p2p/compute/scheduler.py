"""Continuous batching over Engine.step, and the owner of every sequence's lifecycle.

The scheduler decides everything about a sequence's life; the engine only runs
steps. `Scheduler.step` runs one engine step, retries it after an attention
peer failed (once the engine has re-placed the shards) and decides which
sequences it finished (stop token, max_tokens), freeing their KV. `Scheduler.run`
(serve) adds requests joining and leaving at step boundaries: admission,
preemption, aborts, and what a failure that is not a peer's costs the requests;
`generate` (the `generate` command) runs one batch to completion with the same
`step`. One task (`Scheduler.run`) owns the running batch and the waiting queue;
HTTP handlers only `submit`, read their request's queue, and `abort`. Nothing
else touches a Sequence while the loop runs, so there are no locks.

Admission is by KV capacity. Each running sequence is promised the KV it can
grow to (prompt + max_tokens, rounded up to whole blocks per kv head), so in
the default `reserve="full"` mode a batch never runs out of KV in decode. A
request that does not fit waits in FIFO order: the head of the queue is never
overtaken, so a long prompt cannot starve behind a stream of short ones.

If KV runs out anyway (other compute peers share the attention peers, or
`reserve="prompt"` admits optimistically), the newest running sequences are
preempted: their KV is freed and they go back to the front of the queue with
their tokens kept. When readmitted, their first step prefills prompt + output
so far, which rebuilds the KV, and decoding continues where it stopped; the
client only sees a pause.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field

from lamina_p2p.attention.kv_pool import KVFull
from lamina_p2p.compute.errors import AttentionPeerError, NoPeers
from lamina_p2p.compute.sequence import SamplingParams, Sequence

log = logging.getLogger("lamina.scheduler")


@dataclass
class Delta:
    """New tokens of one request (and, when finish_reason is set, the last event it gets)."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A sequence plus the queue its consumer reads. Subclass `on_tokens` to post-process."""

    seq: Sequence
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    sent: int = 0  # output tokens already delivered
    aborted: bool = False
    preemptions: int = 0
    done: bool = False

    def on_tokens(self, tokens: list[int], logprobs: list[float]) -> bool:
        """Called in the step loop with this step's new tokens; return True to stop here (stop string)."""
        self.queue.put_nowait(Delta(tokens, logprobs))
        return False

    def on_finish(self, reason: str, error: str | None = None) -> None:
        self.queue.put_nowait(Delta([], [], reason, error))

    async def stream(self):
        """Yield Deltas until the finishing one (inclusive)."""
        while True:
            d = await self.queue.get()
            yield d
            if d.finish_reason is not None:
                return


class ShuttingDown(Exception):
    """The server is draining before it exits: new requests are refused (HTTP 503)."""


def is_infrastructure(exc: BaseException) -> bool:
    """A failure of the cluster (a peer died, timed out, is busy, none is left), not of a request."""
    if isinstance(exc, AttentionPeerError):
        return exc.kind != "error"  # "error": the peer refused this batch's request, perhaps one sequence's
    return isinstance(exc, (NoPeers, TimeoutError, ConnectionError, OSError))


def is_kv_full(exc: BaseException) -> bool:
    """Out of KV: in process (KVFull) or on an attention peer."""
    return isinstance(exc, KVFull) or (isinstance(exc, AttentionPeerError) and exc.kv_full)


class Scheduler:
    """The lifecycle of the engine's sequences, and continuous batching of requests over it.

    `max_batch`: most sequences in a step. `reserve`: "full" admits a request when the KV of
    prompt + max_tokens is free, "prompt" when its prompt's is (preempting if decode runs out).
    `max_recoveries`: peer failures (or busy replies) in a row one step survives before it fails.
    `peer_wait_timeout_s`: how long a step waits for an attention peer when none is usable.
    `max_consecutive_errors`: failed steps in a row before the running requests end with an error;
    `retry_delay_s`: the pause before the step after a failed one.
    """

    def __init__(self, engine, *, max_batch: int = 64, reserve: str = "full", metrics=None,
                 max_consecutive_errors: int = 3, retry_delay_s: float = 0.5, max_recoveries: int = 16,
                 peer_wait_timeout_s: float = 60.0):
        if reserve not in ("full", "prompt"):
            raise ValueError("reserve must be 'full' or 'prompt'")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.transport = engine.transport
        self.max_batch = max_batch
        self.reserve = reserve
        self.metrics = metrics
        self.max_consecutive_errors = max_consecutive_errors
        self.retry_delay_s = retry_delay_s
        self.max_recoveries = max_recoveries
        self.peer_wait_timeout_s = peer_wait_timeout_s
        self.eos = set(engine.cfg.eos_token_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._wake = asyncio.Event()
        self._idle_now = asyncio.Event()  # set whenever nothing is running or waiting
        self.draining = False
        self.preempted_total = 0
        self.steps = 0
        self.bpt = float(self.transport.block_bytes_per_token())

    # -- the API handlers use ---------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, request: type[Request] | None = None,
               **kwargs) -> Request:
        """Queue a request (ValueError if it can never run); its tokens arrive on `req.queue`."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        seq = self.engine.new_sequence(prompt, params)
        need = self._bytes(len(prompt) + params.max_tokens, full=True)
        cap = self.transport.kv_capacity()
        total = sum(t for t, _ in cap.values())
        if self.engine.placer.policy == "request" and cap:
            total = max(t for t, _ in cap.values())  # the whole sequence lives on one peer
        if cap and need > total:
            raise ValueError(f"prompt + max_tokens need {need} bytes of KV, more than the attention "
                             f"peers hold ({total} bytes)")
        req = (request or Request)(seq, **kwargs)
        self.waiting.append(req)
        self._idle_now.clear()
        self._wake.set()
        return req

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and let the running and queued ones finish (True if all did within `timeout_s`)."""
        self.draining = True
        if not self.running and not self.waiting:
            return True
        try:
            await asyncio.wait_for(self._idle_now.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def abort(self, req: Request) -> None:
        """Stop a request (client gone); its KV is freed at the next step boundary."""
        if not req.done:
            req.aborted = True
            self._wake.set()

    # -- KV accounting ----------------------------------------------------------
    def _bytes(self, tokens: int, full: bool) -> int:
        """KV bytes `tokens` tokens take: whole blocks per kv head (+ one spare block per shard
        under sequence placement, where every shard rounds up on its own)."""
        block = self.transport.block_size()  # from the peers' register replies: they may join later
        blocks = -(-tokens // block)
        placer = self.engine.placer
        if placer.policy == "sequence":
            blocks += -(-tokens // placer.shard_tokens)
        return int(blocks * block * self.bpt)

    def _promise(self, seq: Sequence) -> int:
        if self.reserve == "full":
            return self._bytes(len(seq.prompt) + seq.params.max_tokens, True)
        return self._bytes(seq.length + 1, False)

    def _allocated(self, seq: Sequence) -> int:
        return self._bytes(seq.cached, False) if seq.cached else 0

    def available(self) -> int:
        """KV bytes not used by other owners nor promised to our running sequences."""
        cap = self.transport.kv_capacity()
        total = sum(t for t, _ in cap.values())
        used = sum(t - f for t, f in cap.values())
        ours = sum(self._allocated(r.seq) for r in self.running)
        # Reported usage beyond what we hold is other compute peers' (or stale gossip: conservative).
        others = max(0, used - ours)
        return total - others - sum(self._promise(r.seq) for r in self.running)

    # -- one step: retries after peer failures, then who finished ---------------
    async def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Run one engine step over `seqs`; returns those it finished, their KV freed.

        A step that an attention peer fails is run again, after the engine has re-placed
        that peer's shards on the peers left (a replica, or recompute); a busy peer gets an
        exponential pause (10 ms doubling up to 0.64 s) instead. `max_recoveries` such failures in a row
        and the error goes up. KV full goes up at once (the caller preempts), as does
        NoPeers when no peer is usable within `peer_wait_timeout_s`, and any other error.
        A finished sequence has `finish_reason` "stop" (an EOS or stop token) or "length"
        (max_tokens reached).
        """
        for attempt in itertools.count():
            try:
                await self.engine.move_off_leaving_peers(seqs)
                await self._wait_for_peers()
                sampled = await self.engine.step(seqs)
                break
            except AttentionPeerError as e:
                if e.kv_full or attempt >= self.max_recoveries:
                    raise
                if e.kind == "busy":  # overloaded, not broken: its KV is intact, try again shortly
                    await asyncio.sleep(0.01 * 2 ** min(attempt, 6))
                    continue
                log.warning("step failed on %s (%s): recovering", e.peer, e.kind)
                await self.engine.recover(seqs, e)
        finished = [seq for seq in sampled if self._stops(seq)]
        if finished:
            await self.engine.release(finished)
        return finished

    async def _wait_for_peers(self) -> None:
        if self.transport.peers():
            return
        try:
            await self.transport.wait_for_peers(1, self.peer_wait_timeout_s)
        except TimeoutError:
            raise NoPeers(f"no attention peer joined within {self.peer_wait_timeout_s:g} s") from None

    def _stops(self, seq: Sequence) -> bool:
        """Whether the token just sampled ends the sequence; sets its finish_reason if so."""
        p, tok = seq.params, seq.output[-1]
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens:
            seq.finish_reason = "length"
        return seq.finished

    # -- the loop ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: admit, step, deliver tokens, free KV; then abort the rest.

        Each iteration: requests aborted by their client are dropped, waiting ones admitted
        while their KV fits (FIFO), one `step` runs over the running batch and its new
        tokens go to each request's queue (Deltas: token ids and logprobs, natural log).
        A failed step costs the requests according to its cause: out of KV, the newest
        is preempted (requeued, recomputed later); a failure that may be one request's, each
        request is stepped alone to find it (it ends with "error"); a cluster failure
        (`is_infrastructure`), everyone is requeued after `retry_delay_s`, and after
        `max_consecutive_errors` in a row the running requests end with "error". Never
        raises for a step's failure; on exit every request left ends with "abort".
        """
        errors = 0
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                await self._reap_aborted()
                self._admit()
                self._report()
                if not self.running:
                    if not self.waiting:
                        self._idle_now.set()
                    await self._idle(stopper)
                    continue
                try:
                    finished = await self.step([r.seq for r in self.running])
                except Exception as e:  # noqa: BLE001 - every failure is handled or reported below
                    if is_kv_full(e):
                        await self._preempt()
                        continue
                    if not is_infrastructure(e):
                        # Perhaps one request's fault: find it rather than retry or fail everyone.
                        await self._isolate(e)
                        continue
                    errors += 1
                    await self._recover(e, give_up=errors >= self.max_consecutive_errors)
                    if errors >= self.max_consecutive_errors:
                        errors = 0
                    else:
                        await asyncio.wait([stopper], timeout=self.retry_delay_s)
                    continue
                errors = 0
                self.steps += 1
                await self._deliver(set(finished))
        finally:
            stopper.cancel()
            await self._shutdown()

    async def _idle(self, stopper) -> None:
        self._wake.clear()
        waker = asyncio.ensure_future(self._wake.wait())
        # Queued requests with nothing running wait for capacity other owners hold: poll it.
        timeout = 0.05 if self.waiting else None
        await asyncio.wait([waker, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if req.aborted:
                self.waiting.popleft()
                self._close(req, "abort")
                continue
            if self._promise(req.seq) > self.available():
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(req)

    async def _deliver(self, finished: set) -> None:
        now = time.perf_counter()
        keep, stopped = [], []
        for req in self.running:
            seq = req.seq
            if seq.error is not None:
                # Sampling failed for this sequence alone: its last token is a placeholder, never sent.
                del seq.output[req.sent:], seq.logprobs[req.sent:]
                seq.finish_reason = "error"
                if seq in finished:
                    finished.discard(seq)
                else:
                    stopped.append(seq)
                self._close(req, "error", seq.error)
                continue
            new = seq.output[req.sent:]
            if new:
                lps = seq.logprobs[req.sent:]
                req.sent = len(seq.output)
                if req.first_token_at is None:
                    req.first_token_at = now
                    if self.metrics:
                        self.metrics.first_token(req, now)
                elif self.metrics:
                    self.metrics.next_tokens(req, len(new), now)
                req.last_token_at = now
                if self.metrics:
                    self.metrics.tokens(len(new))
                if req.on_tokens(new, lps):
                    # A stop string, even one completed by the last token max_tokens allowed ("length").
                    if not seq.finished:
                        stopped.append(seq)
                    seq.finish_reason = "stop"
            if seq.finished:
                self._close(req, seq.finish_reason)
            else:
                keep.append(req)
        self.running = keep
        if stopped:  # step freed those it finished; stop strings and sampling errors are freed here
            await self.engine.release(stopped)

    async def _isolate(self, exc: Exception) -> None:
        """A step failed with an error that may belong to one request: run each running request's
        step alone; only those that fail alone end (with the error), the others go on."""
        log.warning("step failed (%s: %s); stepping each request alone to find the one at fault",
                    type(exc).__name__, exc)
        reqs, ok, finished = self.running, [], set()
        self.running = []
        for r in reqs:
            if r.aborted:
                ok.append(r)  # reaped at the next iteration
                continue
            try:
                finished.update(await self.step([r.seq]))
                ok.append(r)
            except Exception as e:  # noqa: BLE001 - classified below
                if is_kv_full(e) or is_infrastructure(e):
                    await self._requeue([r])
                    continue
                log.warning("request %d fails alone (%s: %s): ending it", r.seq.seq_id, type(e).__name__, e)
                r.seq.finish_reason = "error"
                await self.engine.release([r.seq])
                self._close(r, "error", f"{type(e).__name__}: {e}")
        self.running = ok
        await self._deliver(finished)

    async def _reap_aborted(self) -> None:
        gone = [r for r in self.running if r.aborted]
        if gone:
            self.running = [r for r in self.running if not r.aborted]
            for r in gone:
                r.seq.finish_reason = "abort"
            await self.engine.release([r.seq for r in gone])
            for r in gone:
                self._close(r, "abort")
        if any(r.aborted for r in self.waiting):
            for r in [r for r in self.waiting if r.aborted]:
                self.waiting.remove(r)
                self._close(r, "abort")

    async def _preempt(self) -> None:
        """KV ran out mid-step: free the newest sequence and queue it (first) for recompute."""
        if len(self.running) == 1:
            # Nothing else to free: we cannot make room ourselves (another owner holds the KV).
            req = self.running.pop()
            await self._requeue([req])
            log.warning("KV full with one sequence running; it waits for capacity")
            return
        victim = self.running.pop()  # admitted last
        await self._requeue([victim])

    async def _requeue(self, reqs: list[Request]) -> None:
        await self.engine.release([r.seq for r in reqs])
        for r in reversed(reqs):
            r.seq.cached = 0  # prefill prompt + output so far again; tokens are kept
            r.preemptions += 1
            self.preempted_total += 1
            self.waiting.appendleft(r)

    async def _recover(self, exc: Exception, give_up: bool) -> None:
        """A step failed (an attention peer died or timed out): recompute everyone elsewhere, or
        after repeated failures end the running requests with an error."""
        log.warning("step failed (%s: %s)%s", type(exc).__name__, exc, "; giving up" if give_up else "; retrying")
        reqs, self.running = self.running, []
        if give_up:
            for r in reqs:
                r.seq.finish_reason = "error"
            await self.engine.release([r.seq for r in reqs])
            for r in reqs:
                self._close(r, "error", f"{type(exc).__name__}: {exc}")
        else:
            await self._requeue(reqs)

    def _close(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        if req.seq.finish_reason is None:
            req.seq.finish_reason = reason
        if self.metrics:
            self.metrics.finished(req, reason, time.perf_counter())
        req.on_finish(reason, error)

    def _report(self) -> None:
        if self.metrics:
            self.metrics.queue(len(self.running), len(self.waiting))

    async def _shutdown(self) -> None:
        reqs = self.running + list(self.waiting)
        self.running, self.waiting = [], collections.deque()
        try:
            await self.engine.release([r.seq for r in reqs])
        finally:
            for r in reqs:
                self._close(r, "abort", "server shutting down")


async def generate(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Sequence], dict]:
    """Run prompts (token ids) to completion as one batch, all at once (the `generate` command's path).

    Returns the sequences (output token ids, logprobs) in prompt order and stats: prefill_s
    (until every sequence has its first token), decode_s, tokens_per_s (decode tokens per
    second of decode_s) and steps (the engine's steps so far). Raises what a step raises
    (`Scheduler.step`): ValueError for a prompt that can never run, KV full, NoPeers.
    """
    scheduler = Scheduler(engine, max_batch=max(1, len(prompts)))
    seqs = [engine.new_sequence(p, SamplingParams(**vars(params))) for p in prompts]
    t0 = time.perf_counter()
    first_token_at = None
    running = list(seqs)
    while running:
        await scheduler.step(running)
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
        "steps": engine.steps,
    }
    return seqs, stats
