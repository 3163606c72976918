"""The option groups commands share, defined once, and the checks that turn them into options objects.

Groups (each a decorator that adds its options to a click command): `model_option` (`--model`, checked
when parsed so a bad one is a one-line usage error, exit status 2, not a traceback after peers have
started); `engine_options` (`--dtype --placement --shard-tokens --micro-batches --kv-replicas`: generate,
serve, start); `attention_options` (where attention runs for a command that runs the engine itself:
`--attention-peers --join --cluster --kv-memory --threads --attention-threads`, the CPU pinning options
and the key options: generate, serve); `cpu_options`, `security_options`, `insecure_listen_option`.
`engine_fields` checks an `attention_options` command's values and returns `options.EngineOptions`
fields. `check_join` asks a join address for its status as `lamina-node status` does (5 s) before
anything loads, so nobody answering (nothing listening, a wrong or missing --secret) is one line with
the key hint; `one_line_errors` turns what a user can fix (a model, chat template or config error, a
timeout waiting for peers) into `Error: ...` and exit status 1.
"""

from __future__ import annotations

import contextlib
import os

import click

from lamina_kernels import STORAGES

from lamina_p2p.config import ConfigError, check_address, parse_bytes
from lamina_p2p.runtime import parse_cpus, pin_cpus

MODEL_HELP = "A checkpoint directory (HF format), a .gguf file, or org/name in the local Hugging Face cache."
DTYPES = list(STORAGES)


def _apply(f, options):
    """Add click options to f so that --help lists them in the order given."""
    for option in reversed(options):
        f = option(f)
    return f


# -- --model --------------------------------------------------------------------------------------

class ModelOptionError(click.ClickException):
    """A --model that names nothing loadable: `Error: <one line>`, exit status 2 like other bad options
    (click's BadParameter would print the usage text around it)."""

    exit_code = 2


def _check_model(ctx, param, value):
    if value is None:
        return None
    from lamina_p2p.model.config import ModelError
    from lamina_p2p.model.source import resolve

    try:
        resolve(value)
    except ModelError as e:
        raise ModelOptionError(f"--model: {e}") from None
    return value


def model_option(required: bool = True):
    return click.option("--model", "model_dir", required=required, metavar="DIR|FILE.gguf|ORG/NAME",
                        callback=_check_model, help=MODEL_HELP)


# -- the engine -----------------------------------------------------------------------------------

def engine_options(f):
    """--dtype --placement --shard-tokens --micro-batches --kv-replicas (options.EngineOptions' fields)."""
    return _apply(f, [
        click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Override the checkpoint's dtype."),
        click.option("--placement", type=click.Choice(["request", "head", "sequence"]), default="request",
                     show_default=True),
        click.option("--shard-tokens", type=click.IntRange(1), default=None,
                     help="Sequence placement: tokens per shard."),
        click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(1)),
        click.option("--kv-replicas", default=1, show_default=True, type=click.IntRange(1),
                     help="Copies of every KV shard on distinct attention peers: a failure then costs no "
                          "recompute."),
        click.option("--busy-poll-us", type=click.IntRange(0), default=0, show_default=True,
                     help="Microseconds a data-path thread polls its stream socket before sleeping, both sides of "
                          "a local cluster (0: never). Only where the cores are the process's own (--cpus): on a "
                          "shared core it makes replies slower."),
    ])


def attention_options(f):
    """Where attention runs for a command that runs the engine in its own process (generate, serve)."""
    f = security_options(f)
    f = cpu_options(starts_peers=True)(f)
    return _apply(f, [
        click.option("--attention-peers", default=0, show_default=True, type=click.IntRange(0),
                     help="0: attention in this process; K: start K local attention peer processes."),
        click.option("--join", multiple=True,
                     help="Use this cluster's attention peers (any peer's address) instead (repeatable)."),
        click.option("--cluster", default="lamina", show_default=True,
                     help="Cluster name (of the peers started or joined)."),
        click.option("--kv-memory", default="2GiB", show_default=True,
                     help="KV budget (in process, or of each attention peer started here)."),
        click.option("--threads", type=click.IntRange(1), default=None, help="Torch threads of the compute side."),
        click.option("--attention-threads", type=click.IntRange(1), default=None,
                     help="Threads of each attention peer."),
    ])


def engine_fields(kw: dict) -> dict:
    """Check and take an engine_options + attention_options command's values out of `kw` (the rest stay);
    returns options.EngineOptions fields, without `security` (see `security_field`). Pins this process
    for --cpus. Raises click.BadParameter naming the option on a bad size, address or CPU list."""
    try:
        kv_bytes = parse_bytes(kw.pop("kv_memory"))
        for addr in kw["join"]:
            check_address(addr)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    attention_cpus = kw.pop("attention_cpus")
    threads, dense = apply_cpu_options(kw.pop("cpus"), kw.pop("dense_cpus"), kw.pop("threads"), attention_cpus)
    return dict(model_dir=kw.pop("model_dir"), dtype=kw.pop("dtype"), placement=kw.pop("placement"),
                shard_tokens=kw.pop("shard_tokens"), micro_batches=kw.pop("micro_batches"),
                kv_replicas=kw.pop("kv_replicas"), threads=threads, dense_cpus=dense, join=list(kw.pop("join")),
                cluster=kw.pop("cluster"), attention_peers=kw.pop("attention_peers"), kv_bytes=kv_bytes,
                attention_threads=kw.pop("attention_threads"), attention_cpus=list(attention_cpus),
                busy_poll_us=kw.pop("busy_poll_us"))


def security_field(kw: dict, join: list[str]):
    """Take the key options out of `kw`, load the keys and check that `join` answers; the Security or None."""
    secret = kw.pop("secret")
    security = load_cli_security(secret, kw.pop("peer_key"), kw.pop("allow_dir"))
    check_join(join, security, bool(secret))
    return security


# -- CPU pinning ----------------------------------------------------------------------------------

def cpu_options(starts_peers: bool):
    """--cpus and --dense-cpus on a click command; with starts_peers, --attention-cpus too."""

    def decorate(f):
        if starts_peers:
            f = click.option("--attention-cpus", multiple=True,
                             help="CPUs of the attention peers started here, one list per peer (repeatable, "
                                  "reused in turn); without it they inherit this process's CPUs.")(f)
        f = click.option("--dense-cpus", default=None,
                         help="Compute: run the dense layers (one thread and its torch pool) on these CPUs only, "
                              "away from the event loop: 1-3 (Linux).")(f)
        return click.option("--cpus", default=None,
                            help="Pin this process to these CPUs, like taskset: 0-3,6 (Linux). Threads default "
                                 "to their count.")(f)

    return decorate


def apply_cpu_options(cpus: str | None, dense_cpus: str | None, threads: int | None,
                      attention_cpus: tuple[str, ...] = ()) -> tuple[int | None, set[int] | None]:
    """Check the lists, pin this process (--cpus); returns (threads, dense CPUs). Threads default to
    one per CPU the dense pool runs on, so a pool fits its cores."""
    for spec in attention_cpus:
        try:
            parse_cpus(spec)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--attention-cpus'") from None
    dense = None
    if dense_cpus:
        try:
            dense = parse_cpus(dense_cpus)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--dense-cpus'") from None
        if max(dense) >= (os.cpu_count() or 1):
            raise click.BadParameter(f"CPU {max(dense)} does not exist (this machine has {os.cpu_count()} CPUs)",
                                     param_hint="'--dense-cpus'")
        threads = threads or len(dense)
    if cpus:
        try:
            pinned = pin_cpus(cpus)  # always: `--threads N --cpus L` must pin too, not only size the pools
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--cpus'") from None
        threads = threads or len(pinned)
    return threads, dense


# -- keys -----------------------------------------------------------------------------------------

def security_options(f):
    """--secret / --peer-key / --allow (and their $LAMINA_SECRET default) on a click command."""
    f = click.option("--allow", "allow_dir", type=click.Path(file_okay=False), default=None,
                     help="Allow-list directory of peers' public *.key files (with --peer-key): servers accept "
                          "only these client keys.")(f)
    f = click.option("--peer-key", type=click.Path(dir_okay=False), default=None,
                     help="This peer's own key pair (keygen --peer NAME writes peers/NAME.key_secret).")(f)
    f = click.option("--secret", type=click.Path(dir_okay=False),
                     default=lambda: os.environ.get("LAMINA_SECRET") or None,
                     help="Cluster secret (keygen's cluster.key_secret): CURVE-encrypt and authenticate every "
                          "ZeroMQ connection. Default: $LAMINA_SECRET; none: plain text, loopback only.")(f)
    return f


def load_cli_security(secret, peer_key, allow_dir):
    """Security from the options, or None; a click error naming the problem on bad key files."""
    from lamina_p2p.net.security import SecurityError, load_security

    try:
        return load_security(secret, peer_key, allow_dir)
    except SecurityError as e:
        raise click.BadParameter(str(e)) from None


def insecure_listen_option(f):
    return click.option("--insecure-listen", is_flag=True,
                        help="Allow a plain-text (no --secret) --listen address beyond loopback. Anyone who "
                             "can reach it can join and send work.")(f)


# -- checks before anything loads -----------------------------------------------------------------

def check_join(join, security, secret_given: bool, timeout: float = 5.0) -> None:
    """Raise click.ClickException unless at least one of the `join` addresses answers a status request."""
    if not join:
        return
    from lamina_p2p.cluster import query_status
    from lamina_p2p.runtime import run_async

    errors = []
    for addr in join:
        try:
            run_async(query_status(addr, timeout, security))
            return
        except Exception as e:  # noqa: BLE001 -- unreachable, timed out, refused: all one line
            errors.append(f"{addr}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    hint = (" (is --secret this cluster's key?)" if secret_given or os.environ.get("LAMINA_SECRET") else
            " (a cluster started with --secret answers only clients with the key)")
    raise click.ClickException(f"no peer answered at {', '.join(join)} within {timeout:g} s: "
                               f"{'; '.join(errors)}{hint}")


@contextlib.contextmanager
def one_line_errors():
    """Turn the errors a user can fix into `error: message` and exit status 1."""
    from lamina_p2p.config import ConfigError
    from lamina_p2p.model.config import ModelError

    try:
        from lamina_p2p.serve.chat import ChatTemplateError
    except ImportError:  # serving extras missing
        ChatTemplateError = ModelError  # noqa: N806
    try:
        yield
    except (ModelError, ChatTemplateError, ConfigError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except TimeoutError as e:
        raise click.ClickException(f"timed out: {e or 'waiting for the cluster'}") from None
