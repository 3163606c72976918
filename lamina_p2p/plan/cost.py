"""Cost model of one decode iteration, offloaded (Lamina) and homogeneous (baseline).

Every figure is per decode *step*: each running sequence emits one token. Throughput is
output tokens/s = batch / step time. All knobs that are judgement rather than datasheet
live in `Assumptions` (catalog `[assumptions]`, per-device overrides) — nothing below is a
hidden constant.

Terms (per layer unless said otherwise; e = bytes per element):

* **dense** on N compute devices with tensor parallelism:
  max(2·P_layer·tokens / (N·FLOP/s·flops_eff), (P_layer·e + act·tokens) / (N·BW·mem_eff))
  plus, for N > 1, two ring all-reduces of tokens·hidden·e bytes over the devices' link
  (NVLink; the NIC when the catalog gives none): 2(N-1)/N·bytes/(link·link_eff) + latency.
  The embedding/LM head is the same roofline once per step over the whole batch (the engine
  joins the micro-batches' last rows for it). With a profile, a measured per-layer engine
  overhead (host work: cutting q/k/v, merging partials, thread hops) adds to dense.
* **attention** on a pool of N devices: KV bytes read / (N·BW·attention_eff), or the FLOP
  bound 4·context_len·heads·head_dim per token if that is larger (CPUs with little FLOP/s).
  The decode context a step reads is the mean over a sequence's life, prompt + output/2.
* **wire** (offloaded only): (2·heads·head_dim + 2·kv_heads·head_dim)·e bytes per token,
  which is the paper's (2 + 2/G)·d·e, both directions counted, over the narrower side's
  aggregate NIC rate × nic_eff; plus `rtt_s` of fixed per-layer latency.
* **prefill** (`prefill = "amortised"`): each request's prompt of length P is processed
  once per O output tokens, so a step carries B·P/O prompt tokens besides its B decode
  tokens: they add to the dense FLOPs (weights are read once, as in chunked prefill), to
  the wire volume, and causal attention of P²/2 score pairs per prompt, FLOP-bound. Prompt
  work done on other machines (prefill/decode disaggregation) is `prefill = "excluded"`.
* **batch**: the largest that fits — the KV of B sequences at their mean length on the
  attention side (offloaded: all attention memory; baseline: HBM left after the weights),
  weights plus activations on the compute side — then capped by `max_batch` and by the
  step-time SLO `tpot_slo_s` if set.
* **micro-batches** (offloaded): the batch splits into M equal micro-batches that rotate
  through dense → wire → attention → wire. Each resource serves every micro-batch once
  per layer and one micro-batch's chain must finish before its next layer can start, so
      layer cycle = max(M·dense(B/M), M·attention(B/M), M·wire(B/M),
                        dense(B/M) + attention(B/M) + wire(B/M) + rtt).
  M = 1 is fully serial; larger M hides the chain but re-reads the weights M times (dense
  at B/M is closer to memory-bound), so `auto` tries 1..max_micro_batches.
* **baseline**: dense and attention on the same N devices with tensor parallelism, in
  series every layer: layer time = dense(B) + attention(B), no wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .geometry import Geometry
from .hardware import Assumptions, Device, DevicePool
from .profile import Profile


@dataclass(frozen=True)
class Workload:
    prompt_len: float
    output_len: float

    @property
    def mean_context(self) -> float:
        """KV tokens a sequence holds (and a decode step reads), averaged over its life."""
        return self.prompt_len + self.output_len / 2


@dataclass
class Estimate:
    kind: str  # "lamina" or "baseline"
    compute: DevicePool
    attention: DevicePool | None
    micro_batches: int
    batch: int = 0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    required_gbps: float = 0.0
    nic_gbps: float = 0.0
    bound: str = ""  # which term sets the layer time
    batch_limit: str = ""  # what stopped the batch from growing
    terms: dict = field(default_factory=dict)  # per-layer seconds of each term, at the chosen M
    error: str = ""

    @property
    def feasible(self) -> bool:
        return not self.error

    @property
    def cost_per_hour(self) -> float:
        return self.compute.price_per_hour + (self.attention.price_per_hour if self.attention else 0)

    @property
    def tokens_per_s_per_dollar(self) -> float:
        c = self.cost_per_hour
        return self.tokens_per_s / c if c else float("inf")

    @property
    def config(self) -> str:
        return f"{self.compute} + {self.attention}" if self.attention else str(self.compute)

    def to_dict(self) -> dict:
        d = {
            "config": self.config,
            "batch": self.batch,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "cost_per_hour": round(self.cost_per_hour, 4),
            "tokens_per_s_per_dollar": round(self.tokens_per_s_per_dollar, 4),
            "required_gbps": round(self.required_gbps, 3),
            "nic_gbps": round(self.nic_gbps, 3),
            "micro_batches": self.micro_batches,
            "step_ms": round(self.step_s * 1e3, 4),
            "bound": self.bound,
            "batch_limit": self.batch_limit,
            "terms_us_per_layer": {k: round(v * 1e6, 3) for k, v in self.terms.items()},
        }
        if self.error:
            d["error"] = self.error
        return d


class CostModel:
    """The terms above for one model, workload and set of assumptions."""

    def __init__(self, geo: Geometry, work: Workload, a: Assumptions, profile: Profile | None = None):
        self.g, self.w, self.a, self.p = geo, work, a, profile
        amortised = a.prefill == "amortised" and work.output_len > 0
        # prompt tokens carried per decode token, and prompts started per decode token
        self.prefill_ratio = work.prompt_len / work.output_len if amortised else 0.0
        self.prompts_per_token = 1 / work.output_len if amortised else 0.0

    # -- efficiencies -------------------------------------------------------------------
    def _eff(self, d: Device, name: str) -> float:
        v = getattr(d, name)
        return v if v is not None else getattr(self.a, name)

    # -- terms --------------------------------------------------------------------------
    def allreduce(self, pool: DevicePool, tokens: float, network_bw: float | None = None) -> float:
        n = pool.count
        if n == 1:
            return 0.0
        link = pool.device.link_bw or network_bw or pool.device.nic_bw
        eff = self.a.link_efficiency if pool.device.link_bw else self.a.nic_efficiency
        nbytes = tokens * self.g.hidden_size * self.g.bytes_per_element
        one = 2 * (n - 1) / n * nbytes / (link * eff) + self.a.collective_latency_s
        return 2 * one  # after attention's O projection and after the MLP

    def dense(self, pool: DevicePool, seqs: float, network_bw: float | None = None) -> float:
        tokens = seqs * (1 + self.prefill_ratio)
        if self.p is not None:
            t = self.p.dense_layer(tokens) / pool.count
        else:
            d, n = pool.device, pool.count
            pl = self.g.params_per_layer()
            flops = 2 * pl * tokens
            nbytes = pl * self.g.bytes_per_element + self.g.activation_bytes_per_token_layer() * tokens
            t = max(flops / (n * d.flops * self._eff(d, "flops_efficiency")),
                    nbytes / (n * d.mem_bw * self._eff(d, "mem_efficiency")))
        return t + self.allreduce(pool, tokens, network_bw)

    def head(self, pool: DevicePool, seqs: float) -> float:
        """Embedding, final norm and LM head: once per step, not per layer."""
        if self.p is not None and self.p.head is not None:
            return self.p.head(seqs) / pool.count
        d, n = pool.device, pool.count
        rows = seqs * (1 + self.prompts_per_token)  # prompts need logits of their last token only
        vh = self.g.vocab_size * self.g.hidden_size
        return max(2 * vh * rows / (n * d.flops * self._eff(d, "flops_efficiency")),
                   vh * self.g.bytes_per_element / (n * d.mem_bw * self._eff(d, "mem_efficiency")))

    def attention(self, pool: DevicePool, seqs: float, kv_rate: float | None = None) -> float:
        g, w = self.g, self.w
        kvl = g.kv_bytes_per_token_layer()
        per_pair = 4 * g.num_heads * g.head_dim  # QK^T and PV, 2 FLOP per multiply-add
        prompts = seqs * self.prompts_per_token
        nbytes = seqs * w.mean_context * kvl + prompts * w.prompt_len * kvl
        flops = per_pair * (seqs * w.mean_context + prompts * w.prompt_len ** 2 / 2)
        d, n = pool.device, pool.count
        t_flops = flops / (n * d.flops * self._eff(d, "flops_efficiency"))
        if kv_rate is not None:
            return max(nbytes / (n * kv_rate), t_flops)
        return max(nbytes / (n * d.mem_bw * self._eff(d, "attention_efficiency")), t_flops)

    def wire_bytes(self, seqs: float) -> float:
        return seqs * (1 + self.prefill_ratio) * self.g.wire_bytes_per_token_layer()

    # -- capacities ---------------------------------------------------------------------
    def seq_kv_bytes(self) -> float:
        return self.g.kv_bytes_per_token() * self.w.mean_context

    def seq_workspace_bytes(self) -> float:
        """Compute-side memory per running sequence: one layer's activations and fp32 logits."""
        tokens = 1 + self.prefill_ratio
        return tokens * self.g.activation_bytes_per_token_layer() + 4 * self.g.vocab_size

    def usable(self, pool: DevicePool) -> float:
        return pool.count * pool.device.mem_bytes * self.a.mem_usable


def _argmax(terms: dict[str, float]) -> str:
    return max(terms, key=terms.get)


def _cap_batch(cap: float, a: Assumptions) -> tuple[int, str]:
    b, why = int(cap), "kv capacity"
    if a.max_batch and a.max_batch < b:
        b, why = a.max_batch, "max_batch"
    return b, why


def estimate_lamina(cm: CostModel, comp: DevicePool, att: DevicePool, micro_batches: int | None,
                    network_bw: float | None = None, rtt_s: float | None = None,
                    batch: int | None = None) -> Estimate:
    """Offloaded plan. micro_batches None = try 1..max_micro_batches and keep the best.

    `batch` fixes the batch (to predict a measured run) instead of the largest that fits.
    """
    g, a = cm.g, cm.a
    est = Estimate("lamina", comp, att, micro_batches or 1)
    spare = cm.usable(comp) - g.weight_bytes()
    if spare <= 0:
        est.error = (f"weights ({g.weight_bytes() / 1e9:.1f} GB) do not fit on {comp} "
                     f"({cm.usable(comp) / 1e9:.1f} GB usable)")
        return est
    kv_cap = cm.usable(att) / cm.seq_kv_bytes()
    ws_cap = spare / cm.seq_workspace_bytes()
    fixed = batch
    batch, why = _cap_batch(kv_cap, a)
    if ws_cap < batch:
        batch, why = int(ws_cap), "compute memory"
    if fixed is not None:
        batch, why = fixed, "given"
    if batch < 1:
        est.error = f"not one sequence of {cm.w.mean_context:.0f} tokens fits in the KV memory of {att}"
        return est

    nic = min(comp.count * (network_bw or comp.device.nic_bw), att.count * (network_bw or att.device.nic_bw))
    wire_rate = nic * a.nic_efficiency
    if cm.p is not None and cm.p.wire_bytes_per_s and network_bw is None:
        # a measured message rate already includes the overheads nic_efficiency stands for
        wire_rate = min(nic, cm.p.wire_bytes_per_s)
    if rtt_s is not None:
        rtt = rtt_s
    else:
        rtt = cm.p.round_trip_s if cm.p is not None else a.rtt_s
    kv_rate = cm.p.attention_kv_bytes_per_s if cm.p is not None else None

    overhead = cm.p.engine_overhead_s_per_layer if cm.p is not None else 0.0

    def step(b: int, m: int) -> tuple[float, dict]:
        s = b / m
        # The engine's host work per layer and micro-batch runs on the compute peer's dense thread.
        t = {"dense": cm.dense(comp, s) + overhead, "attention": cm.attention(att, s, kv_rate),
             "wire": cm.wire_bytes(s) / wire_rate}
        chain = t["dense"] + t["attention"] + t["wire"] + rtt
        occupancy = {"dense": m * t["dense"], "attention": m * t["attention"], "wire": m * t["wire"],
                     "latency chain": chain}
        cycle = max(occupancy.values())
        # One LM head per step over the whole batch (the engine joins the micro-batches for it).
        t.update(rtt=rtt, cycle=cycle, head=cm.head(comp, b), overhead=overhead)
        t["bound"] = _argmax(occupancy)
        return g.num_layers * cycle + t["head"], t

    ms = [micro_batches] if micro_batches else range(1, a.max_micro_batches + 1)
    best = None
    for m in ms:
        b, lim = batch, why
        if b < m:
            continue
        if a.tpot_slo_s and fixed is None:
            b, lim = _slo_batch(lambda x: step(x, m)[0], m, b, a.tpot_slo_s, lim)
            if b < m:
                continue
        sec, terms = step(b, m)
        if best is None or b / sec > best[1] / best[2]:
            best = (m, b, sec, terms, lim)
    if best is None:
        est.error = "no batch meets the constraints (micro-batches, latency SLO)"
        return est
    m, b, sec, terms, lim = best
    est.micro_batches, est.batch, est.step_s, est.batch_limit = m, b, sec, lim
    est.tokens_per_s = b / sec
    est.bound = terms.pop("bound")
    est.terms = terms
    # the rate at which moving a layer's traffic takes as long as the busier side's work
    busy = max(m * terms["dense"], m * terms["attention"])
    est.required_gbps = 8 * cm.wire_bytes(b) / busy / 1e9
    est.nic_gbps = 8 * nic / 1e9
    return est


def estimate_baseline(cm: CostModel, pool: DevicePool, network_bw: float | None = None) -> Estimate:
    """Homogeneous plan: dense and attention on the same tensor-parallel devices, serial every layer.

    `network_bw` is the per-device rate TP uses when the devices have no NVLink-class link.
    """
    g, a = cm.g, cm.a
    est = Estimate("baseline", pool, None, 1)
    spare = cm.usable(pool) - g.weight_bytes()
    per_seq = cm.seq_kv_bytes() + cm.seq_workspace_bytes()
    if spare < per_seq:
        est.error = (f"weights ({g.weight_bytes() / 1e9:.1f} GB) leave no room for one sequence's KV "
                     f"on {pool} ({cm.usable(pool) / 1e9:.1f} GB usable)")
        return est
    batch, why = _cap_batch(spare / per_seq, a)
    kv_rate = cm.p.baseline_kv_bytes_per_s if cm.p is not None else None

    overhead = cm.p.engine_overhead_s_per_layer if cm.p is not None else 0.0

    def step(b: int) -> tuple[float, dict]:
        t = {"dense": cm.dense(pool, b, network_bw) + overhead, "attention": cm.attention(pool, b, kv_rate)}
        t["cycle"] = t["dense"] + t["attention"]
        t["head"] = cm.head(pool, b)
        return g.num_layers * t["cycle"] + t["head"], t

    if a.tpot_slo_s:
        batch, why = _slo_batch(lambda x: step(x)[0], 1, batch, a.tpot_slo_s, why)
        if batch < 1:
            est.error = "no batch meets the latency SLO"
            return est
    sec, terms = step(batch)
    est.batch, est.step_s, est.batch_limit, est.terms = batch, sec, why, terms
    est.tokens_per_s = batch / sec
    est.bound = "dense" if terms["dense"] >= terms["attention"] else "attention"
    if pool.count > 1:
        tokens = batch * (1 + cm.prefill_ratio)
        per_dev = 2 * 2 * (pool.count - 1) / pool.count * tokens * g.hidden_size * g.bytes_per_element
        est.required_gbps = 8 * per_dev * g.num_layers / sec / 1e9
    link = pool.device.link_bw or network_bw or pool.device.nic_bw
    est.nic_gbps = 8 * link / 1e9
    return est


def _slo_batch(step_of, lo: int, hi: int, slo: float, why: str) -> tuple[int, str]:
    """Largest batch in [lo, hi] whose step time is within the SLO (step time grows with batch)."""
    if step_of(hi) <= slo:
        return hi, why
    if step_of(lo) > slo:
        return lo - 1, "latency slo"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if step_of(mid) <= slo else (lo, mid)
    return lo, "latency slo"
