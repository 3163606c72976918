"""Smoke tests of the benchmark tools: each runs in its quickest mode on the tiny preset and
prints the JSON shape the issue asks for. No timing is asserted here except one behaviour of the
relay: it holds every chunk for at least the configured delay (a lower bound)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))


def run_tool(*args: str, timeout: float = 600) -> dict:  # a bound for a stuck tool, not a speed check
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_e2e_json_shape(tiny, tmp_path):
    # --llama-cpp pointing at a directory without the binary: the column is skipped, not an error.
    res = run_tool(str(TOOLS / "bench_e2e.py"), "--model", tiny, "--contexts", "16", "--batch", "1", "2",
                   "--steps", "1", "--rounds", "1", "--warmup", "1", "--stream-bytes", str(16 << 20),
                   "--systems", "llama.cpp", "transformers", "single", "cluster1_mb1", "cluster1_mb2", "cluster1_mb3",
                   "cluster2_mb2", "--llama-cpp", str(tmp_path), "--gguf", str(tmp_path / "none.gguf"),
                   "--trace-steps", "2", "--json", "--plot", str(tmp_path))
    assert res["stream_read_gbps"] > 0
    assert "llama-batched-bench" in res["llama_cpp"]["skipped"]
    systems = {"transformers", "single", "cluster1_mb1", "cluster1_mb2", "cluster1_mb3", "cluster2_mb2"}
    for batch in ("1", "2"):
        entry = res["batches"][batch]["contexts"]["16"]
        assert set(entry["tokens_per_s"]) == systems
        assert set(entry["roofline_fraction"]) == systems
        assert all(v > 0 for v in entry["tokens_per_s"].values())
        assert all(0 < v for v in entry["roofline_fraction"].values())
        # Every lamina system was traced: per-layer dense, wait, kernel and messaging medians, and the head.
        traces = entry["trace_per_layer"]
        assert set(traces) == systems - {"transformers"}
        for t in traces.values():
            assert all(t[k] > 0 for k in ("dense_ms", "attention_wait_ms", "kernel_ms", "lm_head_and_sample_ms"))
            assert t["messaging_ms"] is not None
        assert (tmp_path / f"e2e_tokens_vs_context_b{batch}.png").stat().st_size > 0
        assert (tmp_path / f"e2e_tokens_vs_microbatches_b{batch}.png").stat().st_size > 0


def test_trace_medians_pair_each_wait_with_the_kernels_inside_it():
    from bench_e2e import trace_medians

    spans = [("compute", "micro-batch 0", "dense L0/L1", 0.0, 0.002, None),
             ("compute", "micro-batch 0", "attention L1", 0.002, 0.0050, {"exposed_ms": 2.5}),
             ("peer-a", "kernel", "L1", 0.0025, 0.0045, None),
             ("peer-a", "kernel", "L2", 0.0060, 0.0070, None),  # another layer: not inside L1's wait
             ("compute", "step", "logits+sample", 0.008, 0.009, None)]
    t = trace_medians(spans)
    assert t["dense_ms"] == pytest.approx(2.0)
    assert t["attention_wait_ms"] == pytest.approx(3.0)
    assert t["messaging_ms"] == pytest.approx(1.0)
    assert t["exposed_wait_ms"] == pytest.approx(2.5)
    assert t["kernel_ms"] == pytest.approx(1.5)
    assert t["lm_head_and_sample_ms"] == pytest.approx(1.0)
    assert t["step_budget_ms"] is None  # one logits span: no whole step


def test_step_budget_adds_up_to_the_step():
    from bench_e2e import trace_medians

    # Two steps of 10 ms, each: a dense span of 5, an attention wait of 2 whose last 1.5 the thread sat
    # idle, a logits span of 2; 1.5 ms of neither (sends and receives).
    spans = [("compute", "step", "logits+sample", 0.000, 0.001, None)]
    for k in range(2):
        t = 0.001 + 0.010 * k
        spans += [("compute", "micro-batch 0", "dense L0/L1", t + 0.001, t + 0.006, None),
                  ("compute", "micro-batch 0", "attention L1", t + 0.006, t + 0.008, {"exposed_ms": 1.5}),
                  ("compute", "step", "logits+sample", t + 0.008, t + 0.010, None)]
    b = trace_medians(spans)["step_budget_ms"]
    assert b == pytest.approx({"step": 10.0, "dense": 5.0, "exposed_wait": 1.5, "lm_head_and_sample": 2.0,
                               "other": 1.5})


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs to split")
def test_bench_e2e_split_cores(tiny):
    res = run_tool(str(TOOLS / "bench_e2e.py"), "--model", tiny, "--contexts", "16", "--batch", "2",
                   "--steps", "1", "--rounds", "1", "--warmup", "1", "--stream-bytes", str(16 << 20),
                   "--systems", "single", "cluster1_mb1", "--split-cores", "0:1", "--json")
    assert res["split_cores"] == {"compute_cpus": "0", "attention_cpus": "1"}
    assert all(v > 0 for v in res["batches"]["2"]["contexts"]["16"]["tokens_per_s"].values())


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs 2 CPUs")
def test_overlap_check_json_shape(tiny):
    res = run_tool(str(TOOLS / "overlap_check.py"), "--model", tiny, "--context", "32", "--batch", "4",
                   "--seconds", "0.2", "--steps", "2", "--json")
    assert res["processes"]["dense_slowdown"] > 0 and res["processes"]["kernel_slowdown"] > 0
    for key in ("cluster", "cluster_dense_thread_alone"):
        for m in ("mb1", "mb2"):
            r = res[key][m]
            assert r["step_ms"] > 0 and r["dense_span_ms"] > 0 and r["kernel_span_ms"] > 0
            assert r["dense_thread_cpu_ms"] >= 0 and r["kernel_thread_cpu_ms"] >= 0


def test_profile_peers_writes_a_profile_the_planner_reads(tmp_path):
    from lamina_p2p.plan.profile import load_profile

    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(TOOLS / "profile_peers.py"), "--preset", "tiny", "--batches", "1,2",
                           "--context", "32", "--predict-batch", "2", "--reps", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = load_profile(out)
    assert prof.engine_overhead_s_per_layer >= 0 and prof.attention_kv_bytes_per_s > 0
    assert "prediction, 1 compute + 1 attention, batch 2, context 32, M=1" in proc.stderr
    data = json.loads(out.read_text())
    assert data["engine_step_s"]["seconds"] > 0


def test_bench_wire_json_shape():
    res = run_tool(str(TOOLS / "bench_wire.py"), "--quick", "--json")
    sizes = [r["bytes"] for r in res["throughput"]]
    assert sizes[0] == 64 << 10 and 1 << 20 in sizes
    for r in res["throughput"]:
        assert r["raw_GBps"] > 0 and r["lamina_GBps"] > 0 and r["ratio"] > 0
    assert res["round_trips"]["raw_rtps"] > 0 and res["round_trips"]["lamina_rtps"] > 0


def test_netem_json_shape(tiny, tmp_path):
    res = run_tool(str(TOOLS / "netem.py"), "--model", tiny, "--context", "16", "--batch", "2", "--steps", "1",
                   "--rounds", "1", "--delays-ms", "0", "1", "--micro-batches", "1", "2", "--json",
                   "--plot", str(tmp_path))
    assert set(res["tokens_per_s"]) == {"0.0ms_mb1", "0.0ms_mb2", "1.0ms_mb1", "1.0ms_mb2"}
    assert res["vs_zero_delay"]["0.0ms_mb1"] == pytest.approx(1.0)
    assert [r["delay_ms"] for r in res["relay_check"]["rows"]] == [0.0, 1.0]
    # The decode relay's lateness is read back per pair: a chunk never leaves before it is due.
    assert set(res["relay_late_ms"]) == set(res["tokens_per_s"])
    assert all(v >= 0 for v in res["relay_late_ms"].values())
    assert (tmp_path / "netem_tokens_vs_delay.png").stat().st_size > 0


def _echo() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_relay_holds_each_round_trip_for_at_least_twice_the_delay():
    from relay import Relay

    delay = 0.005
    srv, port = _echo()
    relay = Relay(("127.0.0.1", port), delay_s=delay, rate_bps=1e9)
    try:
        s = socket.create_connection(("127.0.0.1", relay.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(range(256)) * 1024  # 256 KiB: several chunks, and the bytes must come back intact
        for _ in range(3):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += s.recv(1 << 20)
            rtt = time.perf_counter() - t0
            assert got == payload
            # Each direction holds every chunk for the delay and paces it at 1 Gbit/s: a lower bound.
            assert rtt >= 2 * delay + len(payload) * 8 / 1e9
        s.close()
        assert relay.late and min(relay.late) >= 0  # each chunk's lateness, recorded after its due time
    finally:
        relay.close()
        srv.close()


def test_bench_link_cpu_json_shape():
    res = run_tool(str(TOOLS / "bench_link_cpu.py"), "--batch", "2", "--reps", "5", "--layer-bytes", "65536", "--json")
    (row,) = res["rows"]
    assert row["batch"] == 2 and all(row[k]["median_us"] > 0 and row[k]["p10_us"] > 0 for k in ("send", "receive"))


def test_bench_layer_path_json_shape(tiny):
    res = run_tool(str(TOOLS / "bench_layer_path.py"), "--model", tiny, "--batch", "2", "--context", "16",
                   "--steps", "2", "--reps", "5", "--threads", "1", "--attention-threads", "1",
                   "--shard-prompt", "40", "--shard-decode", "2", "--shard-sizes", "4,32", "--json")
    local, wire, shards = res["local"], res["wire"], res["shards"]
    assert local["in_engine_attention_us"] > 0 and local["kernel_us"] > 0 and local["ratio_vs_kernel"] > 0
    assert wire["peer_kernel_us"] > 0 and wire["raw_pyzmq_round_trip_us"] > 0 and wire["endpoint"] == "ipc"
    assert wire["compute_wait_us"] >= wire["peer_kernel_us"]  # per layer the wait holds the kernel span
    for path in ("send_path_us", "receive_path_us"):
        assert all(wire[path][k] > 0 for k in ("warm_us", "after_1ms_idle_us", "after_layer_weights_us")), path
    assert shards["shard_4"]["prefill_s"] > 0 and shards["decode_ratio_small_vs_large"] > 0


def test_bench_gemv_json_shape():
    res = run_tool(str(TOOLS / "bench_gemv.py"), "--mb", "2", "--rows", "1,3", "--reps", "1", "--reuse-mb", "0.5",
                   "--json")
    assert [(r["rows"], r["layout"]) for r in res["results"]] == [(1, "pairs"), (1, "widened"), (3, "pairs"),
                                                                  (3, "widened")]
    assert all(r["one_thread_gbps"] > 0 and r["two_threads_gbps"] > 0 for r in res["results"])
    assert res["stream_read_gbps"] > 0
    assert [r["rows"] for r in res["reuse"]] == [1, 3]
    assert all(0.4 < r["slice_mb"] <= 0.5 and r["first_us"] > 0 and r["second_us"] > 0 for r in res["reuse"])


def test_bench_unix_send_json_shape():
    res = run_tool(str(TOOLS / "bench_unix_send.py"), "--pieces", "65536,16384", "--messages", "40", "--rounds", "2",
                   "--flush-mb", "0.1", "--json")
    assert [r["piece_bytes"] for r in res["rows"]] == [65536, 16384]
    for r in res["rows"]:
        for k in ("compute_write_us", "peer_write_us", "round_trip_us"):
            assert 0 < r[k]["median"] <= r[k]["p90"]
    assert all(r["round_trip_us"]["median"] > r["compute_write_us"]["median"] for r in res["rows"])


def test_bench_tile_overlap_json_shape(tmp_path):
    res = run_tool(str(TOOLS / "bench_tile_overlap.py"), "--dram-mb", "4", "--l2-kb", "512", "--reps", "1",
                   "--kernel-context", "128", "--json", "--plot", str(tmp_path))
    assert (tmp_path / "tile_overlap.png").stat().st_size > 0
    loops = [(r["loop"], r["prefetch"]) for r in res["rows"]]
    assert loops == [(loop, pf) for loop in ("read", "latency", "tile") for pf in ("none", "l2", "nta")] + \
        [("kernel", "l2")]
    assert all(r["dram_ns_per_key"] > 0 and r["l2_ns_per_key"] > 0 for r in res["rows"])
    assert all(r["overlap"] >= 0 for r in res["rows"] if r["loop"] != "read")
    assert res["read_dram_gbps"] > 0 and res["bytes_per_key"] == 1024


def test_bench_kernels_per_call_sweep_over_layers_and_on_the_spin_pool(tmp_path):
    """--spin-pool --layers: each variant's per-call times, the pool's in a round of their own with the
    inline call; the layers' pools called in turn (no flush), and nonsense layer counts refused."""
    out = tmp_path / "per_call.json"
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--spin-pool", "--layers", "3",
                           "--sweep-calls", "20", "--geometry", "4/2/64", "--contexts", "128", "--batch", "1",
                           "--dtypes", "bfloat16", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["layers"] == 3 and row["flush_mb"] == 0 and row["worker_units"] >= 0
    from lamina_kernels import pooled

    assert list(row["median_us"]) == ["inline", "threads", "now", "inline (pool round)",
                                      f"pool {pooled.MIN_SPLIT}/{pooled.ALIGN}"]
    assert all(v > 0 for v in row["median_us"].values())
    assert all(row["best_us"][n] <= row["median_us"][n] for n in row["median_us"])
    bad = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--spin-pool", "--layers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--layers must be at least 1" in bad.stderr


def test_bench_kernels_times_every_block_order_in_one_round_robin(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--geometry", "4/2/64", "--contexts", "128",
                           "--batch", "2", "--modes", "decode", "--dtypes", "float32,bfloat16", "--blocks",
                           "runs,grown,scattered", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["blocks"]) for r in rows] == [(dtype, blocks) for dtype in ("float32", "bfloat16")
                                                         for blocks in ("runs", "grown", "scattered")]
    assert all(r["us"] > 0 and r["max_abs_err"] < 1e-3 for r in rows)
    f32 = {r["blocks"]: r["us"] for r in rows if r["dtype"] == "float32"}
    for r in rows:  # each order against float32 of the same order
        assert r["tok_per_s_vs_f32"] == pytest.approx(f32[r["blocks"]] / r["us"])
    bad = subprocess.run([sys.executable, str(TOOLS / "bench_kernels.py"), "--blocks", "sorted"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected runs, grown, scattered" in bad.stderr
