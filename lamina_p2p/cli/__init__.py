"""`lamina-node`: every command of the command line, and nothing else.

Each module holds the commands of one subject and stays thin: parse and check the options (a mistake is
one line `Error: ...` on stderr, exit status 2), fill an options object and call into the package, where
the work is. `options` holds the option groups several commands share (`--model`, the engine's options,
where attention runs, CPU pinning, keys), each defined once; `generate` holds `init-model` and
`generate` (offline inference, `offline.run_generate`); `peer` holds `start` (one peer process,
`node.py`); `cluster` holds `status` and `cluster up` (`cluster.py`); `serve` holds `serve`
(`serve/server.py`); `plan` holds `plan` (`plan/`); `keygen` holds `keygen` (`net/security.py`). Nothing
outside this package imports click.
"""

from __future__ import annotations

import os
import sys

import click

from lamina_p2p.cli.cluster import cluster, status
from lamina_p2p.cli.generate import generate, init_model
from lamina_p2p.cli.keygen import keygen_command
from lamina_p2p.cli.peer import start
from lamina_p2p.cli.plan import plan_command
from lamina_p2p.cli.serve import serve_command


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


for _command in (init_model, generate, start, status, cluster, serve_command, plan_command, keygen_command):
    main.add_command(_command)
