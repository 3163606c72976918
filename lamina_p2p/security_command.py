"""`lamina-node keygen`, and the key options every command that talks to peers shares."""

from __future__ import annotations

import os

import click


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
