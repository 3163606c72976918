"""Options and checks that every command taking a model or joining a cluster shares (generate, serve, start).

- `--model`: a checkpoint directory, a .gguf file or an `org/name` repo in the local
  Hugging Face cache, checked when the options are parsed so a bad one is a one-line
  usage error (exit status 2), not a traceback after the peers have started.
- `check_join`: before a command that joins a cluster loads anything, ask the seed for its
  status as `lamina-node status` does (5 s); nobody answering -- nothing listening, or a
  peer that wants a --secret we lack or have wrong -- is one line with the key hint.
- `one_line_errors`: what a command raises for a reason the user can fix (a model,
  chat template or config error, a timeout waiting for peers) becomes `error: ...`
  on stderr and exit status 1, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os

import click

MODEL_HELP = "A checkpoint directory (HF format), a .gguf file, or org/name in the local Hugging Face cache."


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
