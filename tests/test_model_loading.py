"""Checkpoint loading: sharded safetensors, dtype conversion, and one-line errors for broken directories."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import build_hf_model
from lamina_p2p.model.config import ModelConfig, ModelError
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.torch_attention import generate_greedy


@pytest.fixture
def model_dir(tmp_path):
    """A private copy of the tiny llama checkpoint that a test may break."""
    return shutil.copytree(build_hf_model("llama"), tmp_path / "llama")


def shard(model_dir, n_shards=3):
    """Rewrite model.safetensors as n shards plus model.safetensors.index.json."""
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_shards]}
        save_file(part, model_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


@torch.inference_mode()
def test_sharded_checkpoint_loads_the_same_weights(model_dir):
    single = load_model(model_dir)
    shard(model_dir)
    sharded = load_model(model_dir)
    prompts = [[1, 2, 3, 4], [9, 8]]
    assert generate_greedy(single, prompts, 4)[0] == generate_greedy(sharded, prompts, 4)[0]
    # Every checkpoint tensor landed in its place in the fused layout.
    plain = load_model(model_dir, layout=None)
    reference = load_file(build_hf_model("llama") / "model.safetensors")
    views = plain.hf_tensors()
    assert set(views) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(views[name][1], tensor), name


@torch.inference_mode()
def test_onednn_packing_gives_the_same_logits(model_dir):
    packed, plain = load_model(model_dir), load_model(model_dir, layout="eager")
    assert packed.onednn and not plain.onednn
    prompts = [[1, 2, 3, 4], [9, 8]]
    a, b = generate_greedy(packed, prompts, 4), generate_greedy(plain, prompts, 4)
    assert a[0] == b[0]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a[1], b[1]))


@torch.inference_mode()
def test_dtype_conversion_on_load(model_dir):
    model = load_model(model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values())
    x = model.embed(torch.tensor([1, 2]))
    q, k, v = model.pre(0, x, torch.tensor([0, 1]))
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert model.logits(x).dtype == torch.float32


def test_config_reads_both_transformers_spellings():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling},
                              "torch_dtype": "bfloat16"})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling},
                              "dtype": "bfloat16"})
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3" and v4.dtype == "bfloat16"
    assert v4.head_dim == 4 and v4.group_size == 2
    assert v4.kv_bytes_per_token(2) == 2 * 1 * 1 * 4 * 2


def test_num_params_matches_the_checkpoint():
    for arch in ("llama", "qwen2", "qwen3"):
        path = build_hf_model(arch)
        tensors = load_file(path / "model.safetensors")
        assert ModelConfig.from_dir(path).num_params() == sum(t.numel() for t in tensors.values())


def one_line_error(path, *needles):
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    one_line_error(model_dir, "config.json", "not found")


def test_missing_tensor(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    one_line_error(model_dir, "model.safetensors", "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    one_line_error(model_dir, "model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[3, 64]", "[32, 64]")


def test_unsupported_architecture(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model_dir / "config.json").write_text(json.dumps(config))
    one_line_error(model_dir, "config.json", "gpt2", "unsupported architecture")


def test_unsupported_rope_type(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    one_line_error(model_dir, "config.json", "yarn")


def test_missing_shard_file(model_dir):
    weight_map = shard(model_dir)
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    lost = sorted(n for n, f in weight_map.items() if f == "model-00002-of-00003.safetensors")
    message = one_line_error(model_dir, "model-00002-of-00003.safetensors", "not found")
    assert any(name in message for name in lost)


def test_tensor_missing_from_index(model_dir):
    shard(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(model_dir, "model.safetensors.index.json", "model.norm.weight")


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    one_line_error(model_dir, "model.safetensors", "not found")


def test_corrupt_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    one_line_error(model_dir, "model.safetensors", "cannot read")
