"""The planner: catalog and geometry figures from the paper, the cost model, the command.

Pure Python and fast: no model weights, no kernels.
"""

import json
import math
from dataclasses import replace

import pytest
from click.testing import CliRunner

from lamina_p2p.cli.plan import plan_command
from lamina_p2p.plan.cost import CostModel, Workload, estimate_lamina
from lamina_p2p.plan.geometry import PRESETS, Geometry, GeometryError, resolve_model
from lamina_p2p.plan.hardware import DevicePool, HardwareError, load_catalog, parse_rate
from lamina_p2p.plan.planner import equal_cost_count, plan_one
from lamina_p2p.plan.profile import Curve, ProfileError, parse_profile

CAT = load_catalog()
TRACES = {"Azure-Conv": (1155, 211), "Azure-Code": (2048, 28), "Kimi-Conv": (12035, 343), "Kimi-TA": (8560, 182)}
# The paper's pairs: (compute H100s, attention H20s) for each model; baseline is all-H100.
PAPER = {"llama-33b": (1, 2), "llama-65b": (2, 4), "llama3-70b": (2, 4)}


def run(*args):
    return CliRunner().invoke(plan_command, list(args))


# -- figures from the paper --------------------------------------------------------------


def test_equal_cost_table():
    h100, h20 = CAT.get("h100"), CAT.get("h20")
    assert DevicePool(h100, 1).price_per_hour + DevicePool(h20, 2).price_per_hour == pytest.approx(20.32)
    assert DevicePool(h100, 2).price_per_hour == pytest.approx(22.12)
    assert DevicePool(h100, 2).price_per_hour + DevicePool(h20, 4).price_per_hour == pytest.approx(40.64)
    assert DevicePool(h100, 4).price_per_hour == pytest.approx(44.24)
    # and the planner's equal-cost rule picks those baselines
    cm = CostModel(PRESETS["llama3-70b"], Workload(1155, 211), CAT.assumptions)
    assert equal_cost_count(cm, h100, 20.32) == 2
    assert equal_cost_count(cm, h100, 40.64) == 4


def test_wire_and_kv_volume_llama3_70b():
    g = PRESETS["llama3-70b"]
    assert g.wire_bytes_per_token_layer() == 36_864
    assert g.wire_bytes_per_token_layer() == (2 + 2 / g.group_size) * g.hidden_size * 2
    assert g.kv_bytes_per_token() == 320 * 1024


def test_preset_parameter_counts():
    # published sizes: 70.6 B, 65.2 B, 32.5 B, 8.0 B
    expect = {"llama3-70b": 70.55, "llama-65b": 65.29, "llama-33b": 32.53, "llama3-8b": 8.03}
    for name, billions in expect.items():
        assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, abs=0.02), name


def test_geometry_from_model_config_matches_preset():
    cfg = pytest.importorskip("lamina_p2p.model.config")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
          "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
          "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    mc = cfg.ModelConfig.from_hf(hf)
    g = Geometry.from_model_config(mc, name="llama3-70b")
    assert g == PRESETS["llama3-70b"]
    assert g.num_params() == mc.num_params()
    assert g.kv_bytes_per_token() == mc.kv_bytes_per_token(2)


# -- the cost model ----------------------------------------------------------------------


def _plan(model, trace, prefill):
    a = replace(CAT.assumptions, prefill=prefill)
    cm = CostModel(PRESETS[model], Workload(*TRACES[trace]), a)
    nc, na = PAPER[model]
    return plan_one(cm, DevicePool(CAT.get("h100"), nc), DevicePool(CAT.get("h20"), na), None)


def paper_table(prefill):
    out = {}
    for model in PAPER:
        for trace in TRACES:
            p = _plan(model, trace, prefill)
            out[model, trace] = p.best.tokens_per_s / p.baseline.tokens_per_s - 1
    return out


def test_paper_configs_decode_only_gains():
    """The paper measures decoding with prefill elsewhere, so compare with prefill excluded.

    Every cell lands in the paper's +16 % .. +90 % except LLaMA3-70B on Azure-Conv: with GQA
    its KV is small, so four H100s already hold a batch of ~350, past the roofline ridge,
    and the baseline's dense part runs at the assumed 60 % of peak FLOP/s; two H100s cannot
    beat that on tokens/s. The paper's baseline evidently did not reach that efficiency.
    """
    gains = paper_table("excluded")
    outside = {k for k, v in gains.items() if not 0.16 <= v <= 0.90}
    assert outside == {("llama3-70b", "Azure-Conv")}, gains
    assert -0.15 < gains["llama3-70b", "Azure-Conv"] < 0.0


def test_paper_configs_prefill_amortised_is_worse_for_offloading():
    # Prompt work is compute-bound and the offloaded cluster has half the H100s of its
    # baseline, so counting prefill can only lower the gain; most on the short-output trace.
    dec, amo = paper_table("excluded"), paper_table("amortised")
    for k in dec:
        assert amo[k] < dec[k], k
    assert min(amo, key=amo.get)[1] == "Azure-Code"


def test_micro_batches_hide_the_chain():
    cm = CostModel(PRESETS["llama-65b"], Workload(1155, 211), replace(CAT.assumptions, prefill="excluded"))
    comp, att = DevicePool(CAT.get("h100"), 2), DevicePool(CAT.get("h20"), 4)
    one = estimate_lamina(cm, comp, att, 1)
    two = estimate_lamina(cm, comp, att, 2)
    auto = estimate_lamina(cm, comp, att, None)
    assert one.bound == "latency chain"
    assert two.tokens_per_s > one.tokens_per_s
    assert auto.tokens_per_s >= max(one.tokens_per_s, two.tokens_per_s)
    # M = 1 is fully serial: the cycle is the sum of the terms
    t = one.terms
    assert t["cycle"] == pytest.approx(t["dense"] + t["attention"] + t["wire"] + t["rtt"])


def test_slow_network_binds():
    cm = CostModel(PRESETS["llama3-70b"], Workload(1155, 211), CAT.assumptions)
    comp, att = DevicePool(CAT.get("h100"), 2), DevicePool(CAT.get("h20"), 4)
    est = estimate_lamina(cm, comp, att, 4, network_bw=parse_rate("10Gbps"))
    assert est.bound == "wire"
    assert est.required_gbps > est.nic_gbps


def test_weights_that_do_not_fit_are_infeasible():
    cm = CostModel(PRESETS["llama3-70b"], Workload(1000, 100), CAT.assumptions)
    est = estimate_lamina(cm, DevicePool(CAT.get("rtx4090"), 1), DevicePool(CAT.get("epyc-9654"), 1), 2)
    assert not est.feasible and "do not fit" in est.error


def test_latency_slo_caps_batch():
    a = replace(CAT.assumptions, tpot_slo_s=0.05)
    cm = CostModel(PRESETS["llama3-8b"], Workload(2048, 256), a)
    est = estimate_lamina(cm, DevicePool(CAT.get("rtx4090"), 1), DevicePool(CAT.get("epyc-9654"), 2), None)
    assert est.batch_limit == "latency slo" and est.step_s <= 0.05


def test_profile_curve_interpolates_and_extrapolates():
    c = Curve.make([1, 4, 8], [1.0, 1.0, 2.0], "t")
    assert c(0.5) == 1.0 and c(6) == pytest.approx(1.5) and c(16) == pytest.approx(4.0)
    prof = parse_profile({"version": 1, "dense": {"batch": [1, 16], "seconds_per_layer": [1e-3, 2e-3]},
                          "attention": {"kv_bytes_per_s": 1e10}, "round_trip_s": 1e-4})
    cm = CostModel(PRESETS["llama3-8b"], Workload(2048, 256), replace(CAT.assumptions, prefill="excluded"),
                   prof)
    assert cm.dense(DevicePool(CAT.get("h100"), 1), 16) == pytest.approx(2e-3)


def test_profile_engine_overhead_adds_to_every_layer():
    base = {"version": 1, "dense": {"batch": [1, 16], "seconds_per_layer": [1e-3, 2e-3], "head_seconds": [1e-3, 3e-3]},
            "attention": {"kv_bytes_per_s": 1e10}, "round_trip_s": 1e-4}
    geo = PRESETS["llama3-8b"]
    work, a = Workload(2048, 0), replace(CAT.assumptions, prefill="excluded")
    pool = DevicePool(CAT.get("h100"), 1)
    plain = estimate_lamina(CostModel(geo, work, a, parse_profile(base)), pool, pool, 1, batch=16)
    busy = estimate_lamina(CostModel(geo, work, a, parse_profile({**base, "engine_overhead_s_per_layer": 5e-4})),
                           pool, pool, 1, batch=16)
    # M = 1 is a serial chain: the overhead adds once per layer; the LM head once per step
    assert busy.step_s - plain.step_s == pytest.approx(geo.num_layers * 5e-4)
    assert plain.terms["head"] == pytest.approx(3e-3)
    two = estimate_lamina(CostModel(geo, work, a, parse_profile(base)), pool, pool, 2, batch=16)
    assert two.terms["head"] == pytest.approx(3e-3)  # one LM head over the batch, not one per micro-batch
    for bad in (-1, "x", 2.0):
        with pytest.raises(ProfileError):
            parse_profile({**base, "engine_overhead_s_per_layer": bad})


# -- the command -------------------------------------------------------------------------

KEYS = {"config", "batch", "tokens_per_s", "cost_per_hour", "tokens_per_s_per_dollar", "required_gbps",
        "nic_gbps"}


def test_json_keys():
    r = run("--model", "llama3-70b", "--compute", "h100:2", "--attention", "h20:4", "--context", "1155",
            "--output", "211", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert KEYS <= set(d) and KEYS <= set(d["baseline"])
    assert d["config"] == "2x h100 + 4x h20" and d["baseline"]["config"] == "4x h100"
    assert d["cost_per_hour"] == pytest.approx(40.64) and d["baseline"]["cost_per_hour"] == pytest.approx(44.24)


def test_table_output():
    r = run("--model", "llama-33b", "--compute", "h100", "--attention", "h20:2", "--micro-batches", "2",
            "--network", "400Gbps", "--rtt", "30us")
    assert r.exit_code == 0, r.output
    assert "1x h100 + 2x h20" in r.output and "2x h100" in r.output and "$20.32" in r.output


def test_search_respects_budget():
    r = run("--model", "llama3-8b", "--compute", "rtx4090:4,l40s:2", "--attention", "ryzen-7950x:8,epyc-9654:2",
            "--search", "--budget", "2.5", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    for e in [d] + d.get("alternatives", []):
        assert e["cost_per_hour"] <= 2.5 + 1e-9
    assert d["tokens_per_s"] >= max(e["tokens_per_s"] for e in d.get("alternatives", [d]))


def test_search_needs_budget():
    r = run("--model", "llama3-8b", "--compute", "rtx4090", "--attention", "ryzen-7950x", "--search")
    assert r.exit_code == 2 and "--budget" in r.output


@pytest.mark.parametrize("args, words", [
    (("--model", "llama3-70b", "--compute", "h999", "--attention", "h20"), "unknown device 'h999'"),
    (("--model", "gpt-9", "--compute", "h100", "--attention", "h20"), "unknown model 'gpt-9'"),
    (("--model", "llama3-70b", "--compute", "h100:zero", "--attention", "h20"), "not an integer"),
    (("--model", "llama3-70b", "--compute", "h100", "--attention", "h20", "--network", "fast"), "bad network rate"),
    (("--model", "llama3-70b", "--compute", "h100", "--attention", "h20", "--micro-batches", "x"), "auto"),
])
def test_bad_input_is_a_usage_error(args, words):
    r = run(*args)
    assert r.exit_code == 2
    assert words in r.output


def test_bad_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = run("--model", str(tmp_path), "--compute", "h100", "--attention", "h20")
    assert r.exit_code == 2 and "cannot read model directory" in r.output


def test_user_catalog_adds_device_and_assumptions(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[assumptions]\nprefill = "excluded"\n[device.mybox]\ntflops = 1\nmem_bw_gbs = 100\n'
                 'mem_gb = 256\nnic_gbps = 10\nprice_per_hour = 0.1\n')
    r = run("--model", "llama3-8b", "--compute", "rtx4090", "--attention", "mybox:2", "--hardware", str(f),
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["workload"]["prefill"] == "excluded" and "mybox" in d["config"]
    with pytest.raises(HardwareError):
        load_catalog([f]).get("nothing")


def test_resolve_model_errors():
    with pytest.raises(GeometryError):
        resolve_model("/no/such/dir")
    assert math.isclose(resolve_model("LLaMA3-70B").num_params(), PRESETS["llama3-70b"].num_params())


def test_baseline_never_gets_slower_with_more_money():
    # Two 4090s doing TP over a 10 GbE NIC are slower than one: the baseline keeps one.
    cm = CostModel(PRESETS["llama3-8b"], Workload(1155, 211), CAT.assumptions)
    p = plan_one(cm, DevicePool(CAT.get("rtx4090"), 1), DevicePool(CAT.get("ryzen-7950x"), 4), None)
    assert p.baseline.compute.count == 1


def test_plan_with_profile_file(tmp_path):
    prof = {"version": 1, "dense": {"batch": [1, 64], "seconds_per_layer": [1e-3, 4e-3],
                                    "head_seconds": [1e-3, 2e-3]},
            "attention": {"kv_bytes_per_s": 5e9}, "round_trip_s": 3e-4, "wire_bytes_per_s": 2e9,
            "devices": {"local": {"tflops": 0.1, "mem_bw_gbs": 20, "mem_gb": 64, "nic_gbps": 16,
                                  "price_per_hour": 0.05}}}
    f = tmp_path / "p.json"
    f.write_text(json.dumps(prof))
    r = run("--model", "llama3-8b", "--compute", "local", "--attention", "local", "--profile", str(f), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["source"].startswith("profile") and d["terms_us_per_layer"]["rtt"] == pytest.approx(300)
    f.write_text("{}")
    r = run("--model", "llama3-8b", "--compute", "local", "--attention", "local", "--profile", str(f))
    assert r.exit_code == 2 and "version-1" in r.output
