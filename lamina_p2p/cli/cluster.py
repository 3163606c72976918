"""`lamina-node status` and `lamina-node cluster up`: look at a cluster; run a scripted local one.

`status` asks any peer for the cluster as it sees it (`cluster.query_status`) and prints the table or
JSON; a peer that does not answer is one line with the key hint. `cluster up` reads a TOML config
(`config.load_cluster`) and hands it to `cluster.run_cluster`, which starts every peer as a local process,
prints the table once all are alive and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import sys

import click

from lamina_p2p.cli.options import load_cli_security, security_options
from lamina_p2p.config import ConfigError, check_address


@click.command()
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
        raise click.ClickException(f"cannot get status from {join}: {e}{hint}") from None
    click.echo(json.dumps(table, indent=2) if as_json else format_table(table))


@click.group()
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
        raise click.ClickException(str(e)) from None
    sys.exit(run_cluster(spec))
