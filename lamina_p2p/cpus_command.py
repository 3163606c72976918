"""The CPU-pinning options commands share: where a process, its dense thread and the peers it starts run."""

from __future__ import annotations

import os

import click

from lamina_p2p.runtime import parse_cpus, pin_cpus


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
            threads = threads or len(pin_cpus(cpus))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--cpus'") from None
    return threads, dense
