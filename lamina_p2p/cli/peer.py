"""`lamina-node start`: run one peer process, attention or compute, until SIGTERM or Ctrl-C.

An attention peer's options fill `attention.peer.AttentionPeerConfig`; a compute peer's fill
`options.ComputeOptions` (the engine's shared options plus its address, gossip timing and HTTP API).
Both then run in `node.py`, which prints the `READY <address> <id>` line launchers wait for. Addresses,
sizes and CPU lists are checked here, and a plain-text `--listen` beyond loopback is refused unless
`--insecure-listen`, so a mistake is one line before anything starts.
"""

from __future__ import annotations

import os

import click

from lamina_p2p.attention.kv_pool import DEFAULT_BLOCK_SIZE
from lamina_p2p.cli.options import (apply_cpu_options, check_join, cpu_options, engine_options, insecure_listen_option,
                                    load_cli_security, model_option, one_line_errors, security_options)
from lamina_p2p.config import ConfigError, check_address, parse_bytes


@click.command()
@click.option("--role", type=click.Choice(["attention", "compute"]), required=True)
@click.option("--listen", default="tcp://127.0.0.1:0", show_default=True,
              help="ZeroMQ endpoint to bind (port 0 picks a free port).")
@click.option("--join", multiple=True, help="Seed peer address (repeatable); none starts a new cluster.")
@click.option("--cluster", default="lamina", show_default=True, help="Cluster name: keeps clusters on one LAN apart.")
@click.option("--kv-memory", default="4GiB", show_default=True, help="Attention: KV cache budget.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Kernel (attention) or torch (compute) threads.")
@cpu_options(starts_peers=False)
@click.option("--block-size", type=click.IntRange(1, 1024), default=DEFAULT_BLOCK_SIZE, show_default=True,
              help="Attention: tokens per KV block.")
@click.option("--heartbeat", type=click.FloatRange(0.01), default=0.5, show_default=True, help="Seconds.")
@click.option("--dead-after", type=click.FloatRange(0.05), default=5.0, show_default=True,
              help="Seconds without a heartbeat before a peer is declared dead.")
@model_option(required=False)
@engine_options
@click.option("--peer-wait-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Compute: seconds requests wait for an attention peer when none is left.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM: seconds to let running requests finish (compute) or to let compute peers "
                   "move their shards elsewhere (attention) before exiting.")
@click.option("--owner-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Attention: free the KV of a compute peer this many seconds after it is declared dead.")
@click.option("--http", default=None, help="Compute: serve the OpenAI-compatible API on HOST:PORT.")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--advertise", default=None, help="Address other peers dial (default: the bound one; a wildcard "
              "host is replaced by this machine's LAN address).")
@click.option("--data-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Attention: TCP port of the per-layer data path (0: any free one; fix it to open it in a firewall).")
@click.option("--data-advertise", default=None,
              help="Attention: address compute peers dial for the data path (default: --advertise's host and "
                   "--data-port; given, no ipc:// shortcut is offered), e.g. behind NAT or a relay.")
@click.option("--data-stream-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Attention, plain text only: TCP port of the stream data path compute peers on other hosts use "
                   "(fewer thread hops than ZeroMQ; 0: any free one). Where it is unreachable they use --data-port.")
@click.option("--data-stream-advertise", default=None,
              help="Attention: address compute peers dial for the stream data path (default: --advertise's host "
                   "and --data-stream-port; with --data-advertise and not this, no stream is offered).")
@click.option("--discover", is_flag=True, help="Find peers of this cluster on the LAN with a UDP beacon.")
@click.option("--discover-port", type=click.IntRange(1, 65535), default=47474, show_default=True)
@click.option("--discover-broadcast", default="255.255.255.255", show_default=True)
@security_options
@insecure_listen_option
@click.option("--api-key", default=lambda: os.environ.get("LAMINA_API_KEY") or None,
              help="Compute with --http: require 'Authorization: Bearer KEY' on /v1/* (default: $LAMINA_API_KEY).")
def start(role, listen, join, cluster, kv_memory, device, threads, cpus, dense_cpus, block_size, heartbeat, dead_after,
          model_dir, dtype, placement, shard_tokens, micro_batches, kv_replicas, peer_wait_timeout, drain_timeout,
          owner_timeout, http, max_batch, advertise, data_port, data_advertise, data_stream_port,
          data_stream_advertise, discover, discover_port,
          discover_broadcast, secret, peer_key, allow_dir, insecure_listen, api_key, busy_poll_us):
    """Run one peer until SIGTERM or Ctrl-C."""
    from lamina_p2p.node import run_attention, run_compute
    from lamina_p2p.runtime import run_async

    try:
        check_address(listen)
        if advertise:
            check_address(advertise)
        for address in (data_advertise, data_stream_advertise):
            if address:
                check_address(address)
        for addr in join:
            check_address(addr)
        kv_bytes = parse_bytes(kv_memory)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    if dense_cpus and role != "compute":
        raise click.UsageError("--dense-cpus is for a compute peer")
    threads, dense = apply_cpu_options(cpus, dense_cpus, threads)
    security = load_cli_security(secret, peer_key, allow_dir)
    from lamina_p2p.net.security import SecurityError, check_listen

    try:
        check_listen(listen, security, insecure_listen)
    except SecurityError as e:
        raise click.BadParameter(str(e), param_hint="'--listen'") from None
    if role == "attention":
        from lamina_p2p.attention.peer import AttentionPeerConfig

        cfg = AttentionPeerConfig(listen=listen, join=tuple(join), kv_bytes=kv_bytes, device=device, threads=threads,
                                  cluster=cluster, block_size=block_size, heartbeat_interval=heartbeat,
                                  suspect_after=dead_after / 2, dead_after=dead_after, advertise=advertise,
                                  data_port=data_port, data_advertise=data_advertise, data_stream_port=data_stream_port,
                                  data_stream_advertise=data_stream_advertise, drain_timeout=drain_timeout,
                                  owner_timeout=owner_timeout, discover=discover, discover_port=discover_port,
                                  discover_broadcast=discover_broadcast, security=security,
                                  insecure_listen=insecure_listen, busy_poll_us=busy_poll_us)
        try:
            run_async(run_attention(cfg))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        return
    if not model_dir:
        raise click.UsageError("a compute peer needs --model")
    if not join and not discover:
        raise click.UsageError("a compute peer needs --join (an attention peer's address) or --discover")
    check_join(join, security, bool(secret))
    from lamina_p2p.options import ComputeOptions

    opts = ComputeOptions(model_dir=model_dir, listen=listen, join=list(join), cluster=cluster, dtype=dtype,
                          placement=placement, shard_tokens=shard_tokens, micro_batches=micro_batches, http=http,
                          kv_replicas=kv_replicas, peer_wait_timeout_s=peer_wait_timeout, drain_timeout_s=drain_timeout,
                          threads=threads, dense_cpus=dense, heartbeat_interval_s=heartbeat, dead_after_s=dead_after,
                          max_batch=max_batch, advertise=advertise, discover=discover, discover_port=discover_port,
                          discover_broadcast=discover_broadcast, security=security,
                          insecure_listen=insecure_listen, api_key=api_key, busy_poll_us=busy_poll_us)
    with one_line_errors():
        run_async(run_compute(opts))
