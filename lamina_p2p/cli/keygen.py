"""`lamina-node keygen`: write the cluster's CURVE keys.

A cluster secret (one key pair every peer shares through `--secret`) and, with `--peer NAME`, a key pair
per peer plus the allow-list directory of their public keys (`--peer-key`, `--allow`); the keys are made
by `net/security.py`. The key options every command that talks to peers takes are in cli/options.py.
"""

from __future__ import annotations

import os

import click


@click.command("keygen")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the keys (created; an existing cluster key is kept).")
@click.option("--peer", "peers", multiple=True,
              help="Also write a key pair for this peer name, and its public key into OUT/allow (repeatable).")
def keygen_command(out, peers):
    """Write a cluster secret (CURVE key pair) and optional per-peer keys for an allow-list.

    \b
    OUT/cluster.key_secret     give every peer: --secret OUT/cluster.key_secret
    OUT/peers/NAME.key_secret  with --peer NAME: that peer's --peer-key
    OUT/allow/NAME.key         the allow-list: --allow OUT/allow on every peer
    """
    from lamina_p2p.net.security import SecurityError, generate_keys

    try:
        written = generate_keys(out, list(peers))
    except SecurityError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"cluster secret: {written['cluster']}  (every peer: --secret {written['cluster']})")
    for name, path in written["peers"].items():
        click.echo(f"peer {name}: {path}  (--peer-key {path} --allow {os.path.join(out, 'allow')})")
