"""`lamina-node serve`: one command from a model directory to an OpenAI-compatible endpoint."""

from __future__ import annotations

import os

import click

from lamina_p2p.config import ConfigError, check_address, parse_bytes
from lamina_p2p.cpus_command import apply_cpu_options, cpu_options
from lamina_p2p.model_command import check_join, model_option, one_line_errors
from lamina_p2p.security_command import load_cli_security, security_options


@click.command("serve")
@model_option()
@click.option("--attention-peers", default=0, show_default=True, type=click.IntRange(0),
              help="0: attention in this process; K: start K local attention peer processes.")
@click.option("--join", multiple=True, help="Use this cluster's attention peers (any peer's address) instead.")
@click.option("--http", default="127.0.0.1:8000", show_default=True, help="HOST:PORT to serve on (port 0: any).")
@click.option("--placement", type=click.Choice(["request", "head", "sequence"]), default="request", show_default=True)
@click.option("--shard-tokens", type=click.IntRange(1), default=None, help="Sequence placement: tokens per shard.")
@click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(1))
@click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1),
              help="Copies of every KV shard on distinct attention peers: a failure then costs no recompute.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM: seconds to let running requests finish before failing them.")
@click.option("--peer-wait-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds requests wait for an attention peer when none is left.")
@click.option("--kv-memory", default="2GiB", show_default=True,
              help="KV budget (in process, or of each attention peer started here).")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1),
              help="Most sequences in one step.")
@click.option("--reserve", type=click.Choice(["full", "prompt"]), default="full", show_default=True,
              help="Admission: promise each request KV for prompt + max_tokens (full), or only what it "
                   "holds now and preempt when KV runs out (prompt).")
@click.option("--api-key", default=lambda: os.environ.get("LAMINA_API_KEY"),
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: $LAMINA_API_KEY, else none).")
@click.option("--served-model-name", default=None, help="Model id clients use (default: the directory or file name, "
              "or the repo id).")
@click.option("--allow-special-tokens-in-content", is_flag=True,
              help="Chat: special-token strings in message content become those tokens (default: encoded as text, "
                   "so a user cannot close their turn or forge a system one).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--threads", type=click.IntRange(1), default=None, help="Torch threads of the compute side.")
@click.option("--attention-threads", type=click.IntRange(1), default=None, help="Threads of each attention peer.")
@cpu_options(starts_peers=True)
@click.option("--cluster", default="lamina", show_default=True)
@security_options
def serve_command(model_dir, attention_peers, join, http, placement, shard_tokens, micro_batches, kv_replicas,
                  peer_wait_timeout, drain_timeout, kv_memory,
                  max_batch, reserve, api_key, served_model_name, allow_special_tokens_in_content, dtype, threads, attention_threads, cpus,
                  dense_cpus, attention_cpus, cluster, secret, peer_key, allow_dir):
    """Serve a model over HTTP (OpenAI API), starting attention peers locally or joining a cluster."""
    from lamina_p2p.node import run_compute
    from lamina_p2p.runtime import run_async
    from lamina_p2p.serve.server import ComputeOptions, parse_http

    if join and attention_peers:
        raise click.UsageError("give --attention-peers or --join, not both")
    try:
        kv_bytes = parse_bytes(kv_memory)
        for addr in join:
            check_address(addr)
        parse_http(http)
    except (ConfigError, ValueError) as e:
        raise click.BadParameter(str(e)) from None
    threads, dense = apply_cpu_options(cpus, dense_cpus, threads, attention_cpus)
    security = load_cli_security(secret, peer_key, allow_dir)
    check_join(join, security, bool(secret))
    opts = ComputeOptions(model_dir=model_dir, join=list(join), cluster=cluster, dtype=dtype, placement=placement,
                          shard_tokens=shard_tokens, micro_batches=micro_batches, http=http, threads=threads,
                          kv_replicas=kv_replicas, peer_wait_timeout=peer_wait_timeout, drain_timeout=drain_timeout,
                          max_batch=max_batch, attention_peers=attention_peers, kv_bytes=kv_bytes,
                          attention_threads=attention_threads, attention_cpus=list(attention_cpus),
                          dense_cpus=dense, api_key=api_key or None,
                          model_name=served_model_name, reserve=reserve, announce_http=True,
                          security=security, allow_special_in_content=allow_special_tokens_in_content)
    with one_line_errors():
        run_async(run_compute(opts))
