"""Engine.warm_up: every compiled path of a step runs once before the first request, and nothing else changes.

Numba compiles a function at its first call (or loads it from its cache); without the warm-up the fused
bfloat16 layer's calls compiled inside the first steps, a minute and a half of a first run's "decode" on
SmolLM2. The check runs in a fresh process, where nothing is compiled or loaded yet: each dispatcher a
step can call has no signature after the model loads and one after the warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys

from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.compute.sequence import SamplingParams
from lamina_p2p.model.loader import load_model
from lamina_p2p.runtime import run_async

# The dispatchers of the fused layer's two sets of calls (the spin pool's up to POOL_MAX_ROWS rows, Numba's
# threads past it), the rounding of a float32 attention output, the LM head past the pool and the greedy
# sampler's log-sum-exp.
_PROBE = """
import json, sys
from lamina_p2p.attention import shard_rows
from lamina_p2p.compute import argmax_lse
from lamina_p2p.compute.engine import Engine
from lamina_p2p.compute.local import LocalTransport
from lamina_p2p.model import fused, pool_attention, spin_pool
from lamina_p2p.model.loader import load_model
from lamina_p2p.runtime import run_async, set_threads

set_threads(2)
model = load_model(sys.argv[1])
names = ["norm_linear", "norm_linear_f32", "linear_add", "norm_swiglu", "rope_split", "_round_bf16"]
fns = {n: getattr(fused, n) for n in names}
fns.update(pool_pre=spin_pool.pool_pre, pool_post=spin_pool.pool_post,
           pool_norm_linear=spin_pool.pool_norm_linear, greedy_logprobs=argmax_lse.greedy_logprobs,
           check_known=shard_rows.check_known, extend_lengths=shard_rows.extend_lengths)
before = {n: len(f.signatures) for n, f in fns.items()}


async def go():
    transport = LocalTransport(8 << 20)
    engine = Engine(model, transport)
    try:
        seconds = await engine.warm_up()
        return seconds, engine.steps, transport.service.stats()
    finally:
        engine.close()
        transport.close()


seconds, steps, stats = run_async(go())
after = {n: len(f.signatures) for n, f in fns.items()}
print(json.dumps(dict(before=before, after=after, pool_attention=pool_attention._COMPILED is True,
                      fused=model._fused is not None, seconds=seconds, steps=steps, stats=stats)))
"""


def test_warm_up_compiles_each_path_a_step_can_take_in_a_fresh_process(tiny_preset):
    path = tiny_preset(seed=0, dtype="bfloat16")
    run = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["fused"], "the tiny bfloat16 preset should take the fused layer"
    assert all(n == 0 for n in got["before"].values()), got["before"]  # nothing compiled by loading
    missing = [n for n, k in got["after"].items() if k == 0]
    assert not missing, f"not compiled by the warm-up: {missing}"
    assert got["pool_attention"] and got["seconds"] > 0 and got["steps"] == 0
    assert got["stats"]["kv_used_bytes"] == 0 and got["stats"]["sequences"] == 0


def test_warm_up_holds_no_kv_and_changes_no_output(tiny_preset):
    """The same greedy tokens with and without a warm-up first, and no KV block held by it."""
    model = load_model(tiny_preset(seed=0, dtype="bfloat16"))
    prompts = [[0, 40, 41, 42, 300, 17], [0, 99]]

    async def go(warm: bool):
        transport = LocalTransport(8 << 20)
        engine = Engine(model, transport)
        try:
            fresh = transport.service.stats()
            if warm:
                await engine.warm_up()
                assert transport.service.stats() == fresh and engine.steps == 0
            seqs, _ = await engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
            return [s.output for s in seqs]
        finally:
            engine.close()
            transport.close()

    assert run_async(go(True)) == run_async(go(False))
