"""`lamina-node plan`: size an offloaded cluster before building it.

Kept thin: it parses the options, runs the planner and prints its table or JSON through
`plan/report.py`; every number comes from `plan/cost.py`. Bad input is one line `Error: ...` that says
what was wrong, exit code 2.
"""

from __future__ import annotations

import json

import click

from lamina_p2p.cli.options import ModelOptionError
from lamina_p2p.plan.geometry import GeometryError
from lamina_p2p.plan.hardware import HardwareError
from lamina_p2p.plan.profile import ProfileError
from lamina_p2p.plan.report import format_table, run_plan, to_json

_ERRORS = (HardwareError, GeometryError, ProfileError)


def _micro_batches(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        m = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an integer nor 'auto'", param_hint="--micro-batches")
    if m < 1:
        raise click.BadParameter("must be at least 1", param_hint="--micro-batches")
    return m


@click.command("plan")
@click.option("--model", "model", required=True, metavar="DIR|FILE.gguf|ORG/NAME|PRESET",
              help="A model (directory with config.json, .gguf file, or org/name in the local Hugging Face cache), "
                   "or a preset: llama3-70b, llama3-8b, llama-65b, llama-33b.")
@click.option("--compute", required=True, metavar="DEVICE[:N]",
              help="Compute peers' device and count (with --search: comma list, N = most to try).")
@click.option("--attention", required=True, metavar="DEVICE[:N]",
              help="Attention peers' device and count (with --search: comma list, N = most to try).")
@click.option("--context", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Mean prompt length in tokens.")
@click.option("--output", type=click.IntRange(min=1), default=256, show_default=True,
              help="Mean output length in tokens.")
@click.option("--network", default=None, metavar="RATE",
              help="Per-peer network rate (e.g. 400Gbps, 25GB/s); default: each device's NIC.")
@click.option("--rtt", default=None, metavar="TIME", help="Per-layer round-trip latency (e.g. 30us); "
              "default: the catalog's rtt_s, or the profile's measurement.")
@click.option("--micro-batches", "micro_batches", default="auto", show_default=True, metavar="M|auto",
              help="Micro-batches in flight per compute peer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--search", "do_search", is_flag=True,
              help="Sweep device kinds, counts and M; keep the highest tokens/s within --budget.")
@click.option("--budget", type=float, default=None, metavar="$/H", help="Hourly budget for --search.")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Measured timings (tools/profile_peers.py) instead of roofline estimates.")
@click.option("--hardware", "hardware", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Extra device catalog (TOML, same layout as configs/hardware.toml); repeatable.")
def plan_command(model, compute, attention, context, output, network, rtt, micro_batches, as_json,
                 do_search, budget, profile_path, hardware):
    """Size an offloaded cluster and compare it with a homogeneous one of about equal cost."""
    m = _micro_batches(micro_batches)
    if do_search and budget is None:
        raise click.UsageError("--search needs --budget ($/h)")
    if budget is not None and not do_search:
        raise click.UsageError("--budget only applies with --search")
    try:
        result, cm = run_plan(model, compute, attention, context, output, network, rtt, m, do_search, budget,
                              profile_path, hardware)
    except _ERRORS as e:
        raise ModelOptionError(str(e)) from None  # one line, exit status 2
    if as_json:
        click.echo(json.dumps(to_json(result, cm), indent=2))
    else:
        click.echo(format_table(result, cm))
