"""What `lamina-node plan` computes and prints: run the planner on parsed options, then the result as a
table or JSON. Every number comes from `cost.py`; this module only turns names into objects and results
into text (the command itself, with its options, is lamina_p2p/cli/plan.py).
"""

from __future__ import annotations

from .cost import CostModel, Estimate, Workload
from .geometry import resolve_model
from .hardware import Catalog, DevicePool, HardwareError, load_catalog, parse_device_spec, parse_duration, parse_rate
from .planner import Plan, plan_one, search
from .profile import load_profile


def run_plan(model, compute, attention, context, output, network, rtt, m, do_search, budget, profile_path,
             hardware) -> tuple[Plan, CostModel]:
    """The plan for parsed `plan` options (m None: try every micro-batch count) and its cost model.

    Raises HardwareError, GeometryError or ProfileError (one line each) on bad input."""
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
