"""`lamina-node plan`: parse options, run the planner, print a table or JSON.

Kept thin: every number comes from `cost.py`; this file only turns options into objects
and results into text. Bad input is one line `Error: ...` that says what was wrong, exit code 2.
"""

from __future__ import annotations

import json

import click

from .cost import CostModel, Estimate, Workload
from .geometry import GeometryError, resolve_model
from .hardware import (Catalog, DevicePool, HardwareError, load_catalog, parse_device_spec, parse_duration,
                       parse_rate)
from .planner import Plan, plan_one, search
from .profile import ProfileError, load_profile

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
        result, cm = _run(model, compute, attention, context, output, network, rtt, m, do_search, budget,
                          profile_path, hardware)
    except _ERRORS as e:
        from lamina_p2p.model_command import ModelOptionError

        raise ModelOptionError(str(e)) from None  # one line, exit status 2
    if as_json:
        click.echo(json.dumps(to_json(result, cm), indent=2))
    else:
        click.echo(format_table(result, cm))


def _run(model, compute, attention, context, output, network, rtt, m, do_search, budget, profile_path,
         hardware):
    cat: Catalog = load_catalog(list(hardware))
    prof = load_profile(profile_path) if profile_path else None
    if prof is not None and prof.devices:
        cat.add_dict({"device": prof.devices}, prof.path)
    geo = resolve_model(model)
    cm = CostModel(geo, Workload(context, output), cat.assumptions, prof)
    net = parse_rate(network) if network else None
    rtt_s = parse_duration(rtt) if rtt else None
    comp = [parse_device_spec(s) for s in compute.split(",")]
    att = [parse_device_spec(s) for s in attention.split(",")]
    for key, _ in comp + att:
        cat.get(key)  # unknown names fail here, before any work
    if do_search:
        return search(cm, cat, comp, att, budget, m, net, rtt_s), cm
    if len(comp) > 1 or len(att) > 1:
        raise HardwareError("several devices per role need --search")
    (ck, cn), (ak, an) = comp[0], att[0]
    return plan_one(cm, DevicePool(cat.get(ck), cn or 1), DevicePool(cat.get(ak), an or 1), m, net, rtt_s), cm


def to_json(p: Plan, cm: CostModel) -> dict:
    d = p.best.to_dict()
    d["baseline"] = p.baseline.to_dict()
    d["gain_tokens_per_s"] = _gain(p.best.tokens_per_s, p.baseline.tokens_per_s)
    d["gain_tokens_per_s_per_dollar"] = _gain(p.best.tokens_per_s_per_dollar, p.baseline.tokens_per_s_per_dollar)
    d["model"] = {"name": cm.g.name, "params": cm.g.num_params(), "weight_bytes": cm.g.weight_bytes(),
                  "kv_bytes_per_token": cm.g.kv_bytes_per_token(),
                  "wire_bytes_per_token_layer": cm.g.wire_bytes_per_token_layer()}
    d["workload"] = {"prompt": cm.w.prompt_len, "output": cm.w.output_len, "prefill": cm.a.prefill}
    d["source"] = f"profile {cm.p.path}" if cm.p is not None else "roofline"
    if len(p.alternatives) > 1:
        d["alternatives"] = [e.to_dict() for e in p.alternatives[1:]]
    return d


def _gain(a: float, b: float) -> float | None:
    return round(a / b - 1, 4) if b else None


def _row(e: Estimate) -> list[str]:
    if not e.feasible:
        return [e.config, "-", "-", "-", "-", f"${e.cost_per_hour:.2f}", "-", "-", f"infeasible: {e.error}"]
    return [e.config, str(e.micro_batches) if e.kind == "lamina" else "-", str(e.batch),
            f"{e.step_s * 1e3:.1f}", f"{e.tokens_per_s:,.0f}", f"${e.cost_per_hour:.2f}",
            f"{e.tokens_per_s_per_dollar:,.1f}", f"{e.required_gbps:,.1f} / {e.nic_gbps:,.0f}",
            f"{e.bound}; batch: {e.batch_limit}"]


def format_table(p: Plan, cm: CostModel) -> str:
    g, w = cm.g, cm.w
    lines = [
        f"model {g.name}: {g.num_params() / 1e9:.1f} B params, {g.weight_bytes() / 1e9:.1f} GB weights, "
        f"KV {g.kv_bytes_per_token() / 1024:.1f} KiB/token, wire {g.wire_bytes_per_token_layer():,} B/token/layer",
        f"workload: prompt {w.prompt_len:g}, output {w.output_len:g} tokens (mean decode context "
        f"{w.mean_context:g}); prefill {cm.a.prefill}; timings: "
        + (f"profile {cm.p.path}" if cm.p is not None else "roofline"),
        "",
    ]
    head = ["", "config", "M", "batch", "step ms", "tokens/s", "$/h", "tok/s per $/h", "Gbps need / NIC",
            "bound by"]
    rows = [["offloaded"] + _row(p.best), ["baseline"] + _row(p.baseline)]
    for i, e in enumerate(p.alternatives[1:], 2):
        rows.append([f"#{i}"] + _row(e))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())
    if p.best.feasible and p.baseline.feasible:
        lines += ["", f"offloaded vs baseline: tokens/s {_pct(p.best.tokens_per_s, p.baseline.tokens_per_s)}, "
                  f"tokens/s per $/h {_pct(p.best.tokens_per_s_per_dollar, p.baseline.tokens_per_s_per_dollar)}"]
    return "\n".join(lines)


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f} %"
