"""A compute peer: model + transport + engine + scheduler, and the HTTP API when asked.

`serve_compute` is what `lamina-node start --role compute` and `lamina-node serve`
run. Everything lives on one event loop: gossip and attend replies (cluster
transport), the scheduler's step loop, and aiohttp. Dense work and kernels run on
executor threads, so the loop stays free to answer heartbeats and HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from lamina_p2p.launch import STARTUP_SETTLE_S, open_compute_transport
from lamina_p2p.options import ComputeOptions

log = logging.getLogger("lamina.serve")


def parse_http(http: str) -> tuple[str, int]:
    host, sep, port = http.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--http expects HOST:PORT, got {http!r}")
    return host.strip("[]"), int(port)


async def serve_compute(opts: ComputeOptions, stop: asyncio.Event, on_ready) -> None:
    from lamina_p2p.compute.engine import Engine
    from lamina_p2p.compute.scheduler import Scheduler
    from lamina_p2p.model.loader import load_model
    from lamina_p2p.model.source import display_name
    from lamina_p2p.model.tokenizer import load_tokenizer
    from lamina_p2p.runtime import set_threads
    from lamina_p2p.serve.app import ServeApp
    from lamina_p2p.serve.metrics import ServeMetrics

    if opts.http:
        host, port = parse_http(opts.http)
    set_threads(opts.threads)
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(None, lambda: load_model(opts.model_dir, dtype=opts.dtype))
    tokenizer = load_tokenizer(opts.model_dir)
    async with contextlib.AsyncExitStack() as stack:
        transport = await stack.enter_async_context(open_compute_transport(opts))
        metrics = ServeMetrics(transport)
        engine = Engine(model, transport, **opts.engine_kwargs())
        metrics.watch_engine(engine)
        engine.observers.append(metrics)  # per-layer dense and attention-wait times
        stack.callback(engine.close)
        # Before any request: the first would otherwise wait for Numba's compiles (engine.warm_up).
        log.info("dense and attention code ready in %.1f s", await engine.warm_up())
        # Registration happens on bind: wait until it is done.
        await transport.wait_for_peers(transport.expected_peers, timeout=60.0, settle_s=STARTUP_SETTLE_S)
        scheduler = Scheduler(engine, max_batch=opts.max_batch, reserve=opts.reserve, metrics=metrics,
                              peer_wait_timeout_s=opts.peer_wait_timeout_s)
        sched_stop = asyncio.Event()
        sched_task = asyncio.create_task(scheduler.run(sched_stop))
        # A scheduler that dies would leave every request hanging: take the whole peer down instead.
        sched_task.add_done_callback(lambda t: stop.set())

        async def _stop_scheduler():
            sched_stop.set()
            with contextlib.suppress(Exception):
                await sched_task

        stack.push_async_callback(_stop_scheduler)
        peer_id = transport.owner_id or engine.owner
        address = transport.address()
        if opts.http:
            name = opts.model_name or display_name(opts.model_dir)
            api = ServeApp(scheduler, tokenizer, name, model.config.max_position_embeddings, metrics, opts.api_key,
                           allow_special_in_content=opts.allow_special_in_content)
            if tokenizer is not None:  # the grammar library's view of the vocabulary: ~1 s for 50k tokens, once
                await loop.run_in_executor(None, api.space)
            # handler_cancellation: a client that disconnects cancels its handler, which aborts its requests.
            runner = web.AppRunner(api.app, handler_cancellation=True, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_port = runner.addresses[0][1]  # the real port when asked for port 0
            url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}"
            print(f"HTTP {url}", flush=True)
            log.info("serving %s on %s", name, url)
            if opts.announce_http or address is None:
                address = url
        on_ready(address or "inprocess", peer_id)
        await stop.wait()
        # Graceful: refuse new requests (503), let the running ones finish, then fail what is left
        # (the scheduler's shutdown), drop our KV on the attention peers and leave the cluster.
        if not sched_task.done() and not await scheduler.drain(opts.drain_timeout_s):
            log.warning("drain timed out after %g s: failing the requests still running", opts.drain_timeout_s)
        if sched_task.done() and not sched_task.cancelled() and sched_task.exception():
            log.error("scheduler failed: %r", sched_task.exception())
