"""`lamina-node serve`: one command from a model to an OpenAI-compatible endpoint.

The engine's options and where attention runs (in process, K local attention peer processes started
here, or a joined cluster's peers) come from the shared groups (cli/options.py), as for `generate`; the
HTTP options (address, API key, served model name, admission, batch limit, drain) are serve's own. They
fill `options.ComputeOptions`, and `node.run_compute` runs the compute peer (`serve/server.py`) until
SIGTERM, printing `READY <http url> <id>` once it answers.
"""

from __future__ import annotations

import os

import click

from lamina_p2p.cli.options import (attention_options, engine_fields, engine_options, model_option, one_line_errors,
                                    security_field)


@click.command("serve")
@model_option()
@click.option("--http", default="127.0.0.1:8000", show_default=True, help="HOST:PORT to serve on (port 0: any).")
@engine_options
@click.option("--drain-timeout", "drain_timeout_s", default=30.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM: seconds to let running requests finish before failing them.")
@click.option("--peer-wait-timeout", "peer_wait_timeout_s", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds requests wait for an attention peer when none is left.")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1),
              help="Most sequences in one step.")
@click.option("--reserve", type=click.Choice(["full", "prompt"]), default="full", show_default=True,
              help="Admission: promise each request KV for prompt + max_tokens (full), or only what it "
                   "holds now and preempt when KV runs out (prompt).")
@click.option("--api-key", default=lambda: os.environ.get("LAMINA_API_KEY"),
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: $LAMINA_API_KEY, else none).")
@click.option("--served-model-name", "model_name", default=None,
              help="Model id clients use (default: the directory or file name, or the repo id).")
@click.option("--allow-special-tokens-in-content", "allow_special_in_content", is_flag=True,
              help="Chat: special-token strings in message content become those tokens (default: encoded as text, "
                   "so a user cannot close their turn or forge a system one).")
@attention_options
def serve_command(http, api_key, **kw):
    """Serve a model over HTTP (OpenAI API), starting attention peers locally or joining a cluster."""
    from lamina_p2p.node import run_compute
    from lamina_p2p.options import ComputeOptions
    from lamina_p2p.runtime import run_async
    from lamina_p2p.serve.server import parse_http

    if kw["join"] and kw["attention_peers"]:
        raise click.UsageError("give --attention-peers or --join, not both")
    try:
        parse_http(http)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    engine = engine_fields(kw)
    security = security_field(kw, engine["join"])
    opts = ComputeOptions(**engine, security=security, http=http, api_key=api_key or None, announce_http=True, **kw)
    with one_line_errors():
        run_async(run_compute(opts))
