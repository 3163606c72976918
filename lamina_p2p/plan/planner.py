"""Turn the cost model into answers: one configuration, its equal-cost baseline, or a sweep.

The baseline for an offloaded configuration is the compute device alone, as many as cost
about the same per hour (nearest count; ties go to the larger, dearer baseline), and a
count that divides the model's heads so tensor parallelism is possible. The paper's pairs
come out of this rule: 1 H100 + 2 H20 ($20.32/h) against 2 H100 ($22.12/h). If fewer of
them are faster (TP over a slow NIC), the faster, cheaper pool is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cost import CostModel, Estimate, estimate_baseline, estimate_lamina
from .hardware import Catalog, Device, DevicePool, HardwareError


@dataclass
class Plan:
    best: Estimate
    baseline: Estimate
    alternatives: list[Estimate]  # from a search, best first (includes best)


def tp_ok(cm: CostModel, n: int) -> bool:
    return cm.g.num_heads % n == 0


def equal_cost_count(cm: CostModel, device: Device, cost: float) -> int:
    price = device.price_per_hour
    if price <= 0:
        return 1
    valid = [n for n in range(1, 129) if tp_ok(cm, n)]
    return min(valid, key=lambda n: (abs(n * price - cost), -n))


def baseline_for(cm: CostModel, est: Estimate, network_bw: float | None = None) -> Estimate:
    """The best homogeneous pool of the compute device costing at most the equal-cost count.

    Fewer devices can win when tensor parallelism has to cross a slow NIC (consumer GPUs),
    and a baseline that more money makes slower would flatter the offloaded plan.
    """
    n_eq = equal_cost_count(cm, est.compute.device, est.cost_per_hour)
    tries = [estimate_baseline(cm, DevicePool(est.compute.device, n), network_bw)
             for n in range(1, n_eq + 1) if tp_ok(cm, n)]
    ok = [e for e in tries if e.feasible]
    return max(ok, key=lambda e: e.tokens_per_s) if ok else tries[-1]


def plan_one(cm: CostModel, comp: DevicePool, att: DevicePool, micro_batches: int | None,
             network_bw: float | None = None, rtt_s: float | None = None) -> Plan:
    if not tp_ok(cm, comp.count):
        raise HardwareError(f"{comp.count} compute devices cannot split {cm.g.num_heads} heads "
                            "evenly for tensor parallelism")
    est = estimate_lamina(cm, comp, att, micro_batches, network_bw, rtt_s)
    return Plan(est, baseline_for(cm, est, network_bw), [est])


def search(cm: CostModel, cat: Catalog, compute: list[tuple[str, int | None]],
           attention: list[tuple[str, int | None]], budget: float, micro_batches: int | None,
           network_bw: float | None = None, rtt_s: float | None = None, max_count: int = 16,
           keep: int = 5) -> Plan:
    """Sweep device kinds, counts (1..N, or 1..max_count) and M; best tokens/s within budget.

    Ties (within 0.1 %) go to the higher tokens/s per $/h.
    """
    if budget <= 0:
        raise HardwareError("--search needs a positive --budget in $/h")
    found: list[Estimate] = []
    for ckey, cmax in compute:
        cdev = cat.get(ckey)
        for nc in range(1, (cmax or max_count) + 1):
            if not tp_ok(cm, nc) or nc * cdev.price_per_hour > budget:
                continue
            for akey, amax in attention:
                adev = cat.get(akey)
                for na in range(1, (amax or max_count) + 1):
                    if nc * cdev.price_per_hour + na * adev.price_per_hour > budget + 1e-9:
                        break
                    e = estimate_lamina(cm, DevicePool(cdev, nc), DevicePool(adev, na), micro_batches, network_bw, rtt_s)
                    if e.feasible:
                        found.append(e)
    if not found:
        raise HardwareError(f"no feasible configuration within ${budget:.2f}/h")
    top = max(e.tokens_per_s for e in found)
    near = [e for e in found if e.tokens_per_s >= top * 0.999]
    best = max(near, key=lambda e: e.tokens_per_s_per_dollar)
    # near-equal throughputs rank by cost efficiency, so the list shows real alternatives
    ranked = sorted(found, key=lambda e: (-round(e.tokens_per_s / top, 3), -e.tokens_per_s_per_dollar))
    alts = [best] + [e for e in ranked if e is not best][: keep - 1]
    return Plan(best, baseline_for(cm, best, network_bw), alts)
