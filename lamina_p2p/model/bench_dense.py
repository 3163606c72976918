"""Time the dense part of one decode step for every weight layout (and torch.compile), in one run.

    python -m lamina_p2p.model.bench_dense --model ~/.cache/lamina-dev/smollm2/hf \\
        --batch 1 16 --dtype bfloat16 float32 --threads 2 [--compile] [--json FILE]

Without --model the weights are random with SmolLM2-135M's geometry (hidden 576,
intermediate 1536, 30 layers, 9/3 heads, head_dim 64, vocab 49152, tied head).
A step is embed, pre/post of every layer and the LM head; attention is skipped
(its output is zeros), so the figure is what a compute peer spends per step
apart from waiting for attention. The LM head is also timed alone.

Every system (dtype x layout) is built once, then all are timed in interleaved
rounds so that noise from other work on the machine hits them alike; the table
gives the median and the 10th percentile over all timed steps (the quantile is
the closer figure to the uncontended cost on a shared machine), and the median
CPU time of this process per step (time.process_time, all its threads): with
OMP_WAIT_POLICY=PASSIVE idle workers sleep, so CPU time counts work done and
barely moves when other programs take the cores — the steadier figure to
compare layouts by on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .linear import LAYOUTS, choose_layout
from .transformer import Transformer

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True, "dtype": "bfloat16"}


# SmolLM2's 30 layers with matmuls too small to cost anything: what is left of a step is per-call overhead.
OVERHEAD = {**SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256}


def random_model(dtype: str, seed: int = 0, geometry: dict = SMOLLM2) -> Transformer:
    """SmolLM2-135M's geometry (or `geometry`) with Gaussian weights (std 1/sqrt(fan_in)), unprepared."""
    model = Transformer(ModelConfig.from_hf(geometry, "bench geometry"), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (shape, view) in model.hf_tensors().items():
            src = torch.randn(shape, generator=g) / (shape[-1] ** 0.5) if len(shape) > 1 else torch.ones(shape)
            view.copy_(src)
    return model


def dense_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = model.config
    x = model.embed(tokens)
    zeros = torch.zeros(tokens.shape[0], c.num_heads, c.head_dim, dtype=model.dtype)
    for layer in range(c.num_layers):
        model.pre(layer, x, positions)
        x = model.post(layer, x, zeros)
    return model.logits(x)


def _layer(x, attn, cos, sin, input_norm, wqkv, wo, post_norm, w_gate_up, w_down, eps: float, nq: int, nqk: int):
    """pre + post of one Llama layer as one function of its weights, for torch.compile."""
    from .transformer import rms_norm

    t = x.shape[0]
    qkv = F.linear(rms_norm(x, input_norm, eps), wqkv).view(t, wqkv.shape[0] // attn.shape[-1], -1)
    qk = qkv[:, :nqk]
    qk = qk * cos + qk.roll(qk.shape[-1] // 2, -1) * sin
    q, k, v = qk[:, :nq].contiguous(), qk[:, nq:].contiguous(), qkv[:, nqk:].contiguous()
    x = x + F.linear(attn.reshape(t, -1), wo)
    gate, up = F.linear(rms_norm(x, post_norm, eps), w_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w_down), q, k, v


def compiled_step(model: Transformer):
    """A step whose layers run one torch.compile'd function (weights as arguments, so one graph
    serves all layers); Llama layers only (no QKV bias, no q/k norm)."""
    c = model.config
    layer = torch.compile(_layer, dynamic=False)
    head = torch.compile(lambda x, norm, w, eps: F.linear(_norm(x, norm, eps).float(), w), dynamic=False)
    head_w = model.lm_head_weight.float()  # float32 logits, as the model's own head returns

    def step(m, tokens, positions):
        x = m.embed(tokens)
        zeros = torch.zeros(tokens.shape[0], c.num_heads, c.head_dim, dtype=m.dtype)
        cos, sin = m.rope(positions)
        for L in m._layers:
            x, *_ = layer(x, zeros, cos, sin, L.input_norm, L.wqkv, L.wo, L.post_norm, L.w_gate_up, L.w_down,
                          c.rms_norm_eps, c.num_heads, c.num_heads + c.num_kv_heads)
        return head(x, m.final_norm, head_w, c.rms_norm_eps)

    return step


def _norm(x, w, eps):
    from .transformer import rms_norm

    return rms_norm(x, w, eps)


def build_systems(plain: dict[str, Transformer], layouts: list[str], compile_: bool, log,
                  huge_pages: str = "on", pairs: str = "auto") -> dict:
    """name -> (model, step function) for every dtype x layout this machine runs. huge_pages "off" or "both"
    (also "<dtype>/gemv-4k"): the gemv layout's packed weights on plain 4 KiB pages (hugepages.ENABLED).
    pairs "both" where the fused layer packs pairs (vdpbf16ps, gemv_pairs.py): also "<dtype>/gemv-widen",
    the same layer on gemv.pack's blocks (widen and FMA)."""
    from . import fused, hugepages

    systems = {}
    for dtype, base in plain.items():
        for layout in layouts:
            try:
                resolved = choose_layout(layout, base.dtype, base.device)
            except ValueError as e:
                log(f"skip {dtype}/{layout}: {e}")
                continue
            if base.dtype == torch.float32 and resolved == "fp16":
                continue  # lossy for a float32 checkpoint: never chosen, not compared
            name = f"{dtype}/{layout}" + (f"={resolved}" if layout == "auto" else "")
            hugepages.ENABLED = huge_pages != "off"
            try:
                systems[name] = (copy.deepcopy(base).prepare(resolved), dense_step)
                if resolved == "gemv" and huge_pages == "both" and name == f"{dtype}/gemv":
                    hugepages.ENABLED = False
                    systems[f"{dtype}/gemv-4k"] = (copy.deepcopy(base).prepare(resolved), dense_step)
                if resolved == "gemv" and pairs == "both" and fused.USE_PAIRS and name == f"{dtype}/gemv":
                    fused.USE_PAIRS = False
                    try:
                        systems[f"{dtype}/gemv-widen"] = (copy.deepcopy(base).prepare(resolved), dense_step)
                    finally:
                        fused.USE_PAIRS = True
            finally:
                hugepages.ENABLED = True
        if compile_:
            m = copy.deepcopy(base).prepare("eager")
            # One graph per batch size (dynamic=False): decode batches are few and fixed.
            systems[f"{dtype}/compile"] = (m, compiled_step(m))
    return systems


@torch.inference_mode()
def run(systems: dict, batches: list[int], rounds: int, steps: int, vocab: int, log) -> dict:
    out: dict = {}
    for batch in batches:
        tokens = torch.randint(0, vocab, (batch,))
        positions = torch.randint(0, 2048, (batch,))
        step_t = {name: [] for name in systems}
        cpu_t = {name: [] for name in systems}
        head_t = {name: [] for name in systems if "compile" not in name}
        for name, (m, fn) in systems.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn(m, tokens, positions)
            log(f"batch {batch}: {name} warm ({time.perf_counter() - t0:.1f} s)")
        hidden = None
        for r in range(rounds):
            names = list(systems)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                m, fn = systems[name]
                for _ in range(steps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(m, tokens, positions)
                    step_t[name].append(time.perf_counter() - t0)
                    cpu_t[name].append(time.process_time() - c0)
                if name in head_t:
                    hidden = torch.randn(batch, m.config.hidden_size).to(m.dtype)
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        m.logits(hidden)
                        head_t[name].append(time.perf_counter() - t0)
        out[batch] = {name: {"step_ms": _stats(step_t[name]), "step_cpu_ms": _stats(cpu_t[name]),
                             "head_ms": _stats(head_t[name]) if name in head_t else None}
                      for name in systems}
    return out


def _huge_page_mb(model: Transformer) -> float | None:
    """MB of the fused path's packed weights on transparent huge pages (hugepages.py); None off that path."""
    if getattr(model, "_fused", None) is None:
        return None
    from .hugepages import mapping_info

    return mapping_info(model._fused.head.wb).get("AnonHugePages", 0) / 2**20


def _stats(ts: list[float]) -> dict:
    s = sorted(ts)
    return {"median": 1e3 * statistics.median(s), "p10": 1e3 * s[len(s) // 10], "n": len(s)}


def report(res: dict, file=sys.stdout) -> None:
    print(f"{'batch':>5} {'system':<24} {'step ms':>8} {'p10':>7} {'tok/s':>7} {'head ms':>8} {'p10':>7} "
          f"{'vs eager':>8} {'cpu ms':>8} {'cpu vs eager':>12}", file=file)
    for batch, rows in res["batches"].items():
        for name, r in rows.items():
            eager = rows.get(name.split("/")[0] + "/eager")
            rel = eager["step_ms"]["median"] / r["step_ms"]["median"] if eager else float("nan")
            h = r["head_ms"]
            hs = f"{h['median']:>8.2f} {h['p10']:>7.2f}" if h else f"{'-':>8} {'-':>7}"
            cpu_rel = eager["step_cpu_ms"]["median"] / r["step_cpu_ms"]["median"] if eager else float("nan")
            print(f"{batch:>5} {name:<24} {r['step_ms']['median']:>8.2f} {r['step_ms']['p10']:>7.2f} "
                  f"{int(batch) / r['step_ms']['median'] * 1e3:>7.0f} {hs} {rel:>7.2f}x "
                  f"{r['step_cpu_ms']['median']:>8.2f} {cpu_rel:>11.2f}x", file=file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (default: random weights, SmolLM2-135M geometry)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--layouts", nargs="+", default=[x for x in LAYOUTS], choices=list(LAYOUTS))
    ap.add_argument("--overhead", action="store_true",
                    help="random weights, SmolLM2's 30 layers at hidden 64: time per-call overhead, not matmuls")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the eager step (minutes to compile)")
    ap.add_argument("--pairs", choices=["auto", "both"], default="auto",
                    help="both: where the CPU has AVX512-BF16, also the fused layer without vdpbf16ps (gemv-widen)")
    ap.add_argument("--huge-pages", choices=["on", "off", "both"], default="on",
                    help="the gemv layout's weights on transparent huge pages; both: also a 4 KiB-page copy (gemv-4k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per system per round")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba

    # Numba's too: its OpenMP layer resets OpenMP's (so torch's) thread count to its own at each parallel region.
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    plain = {}
    for dtype in args.dtype:
        if args.model:
            from .loader import load_model

            plain[dtype] = load_model(args.model, dtype=dtype, layout=None)
        else:
            plain[dtype] = random_model(dtype, geometry=OVERHEAD if args.overhead else SMOLLM2)
    systems = build_systems(plain, args.layouts, args.compile, log, args.huge_pages, args.pairs)
    vocab = next(iter(plain.values())).config.vocab_size
    res = {"model": args.model or ("random, 30 layers at hidden 64 (overhead)" if args.overhead
                                   else "random, SmolLM2-135M geometry"), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
           "rounds": args.rounds, "steps_per_round": args.steps,
           "batches": run(systems, args.batch, args.rounds, args.steps, vocab, log)}
    res["huge_page_mb"] = {name: _huge_page_mb(m) for name, (m, _) in systems.items() if _huge_page_mb(m) is not None}
    print(f"model {res['model']}, threads {res['threads']}, torch {res['torch']}, {res['cpu_capability']}, "
          f"avx512_bf16 {res['avx512_bf16']}, amx {res['amx']}, weights on huge pages (MB): {res['huge_page_mb']}")
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
