"""GGUF checkpoints: small random files of every supported architecture and quantization type, written
with the `gguf` package, loaded by lamina-p2p and by transformers' own GGUF loading (the oracle), in
process and on a real cluster; and one-line errors for broken files."""

import json

import numpy as np
import pytest
import torch

from gguf_models import build_gguf, permute
from helpers import node, nodes, one_line_error
from lamina_p2p.model.config import ModelError
from lamina_p2p.model.gguf import gguf_config, unpermute
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.tokenizer import load_tokenizer
from lamina_p2p.model.torch_attention import generate_greedy
from lamina_p2p.serve.chat import encode_chat, template_for

TEXTS = ["The river ran slowly past the old mill.", "Grüße aus Köln, 日本語 😀\tand\nnewlines  two  spaces",
         "", " leading space", "the<|eot_id|>end"]
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _transformers(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.inference_mode()
def _hf_greedy(model, ids, steps):
    # An explicit mask: with only pad_token_id, generate() masks prompt tokens equal to it (a BOS of id 0).
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    assert np.array_equal(unpermute(permute(w, 8), 8), w)
    assert not np.array_equal(permute(w, 8), w)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_architecture_matches_transformers_gguf(root, arch):
    """Weights equal the source HF model's exactly (the q/k permutation undone), and greedy tokens and
    tokenization equal transformers' loading of the same GGUF file."""
    path = build_gguf(arch, root)
    ours = load_model(path, layout="eager")
    assert ours.config.architecture == arch
    source = load_model(root / f"{arch}-small-hf", layout="eager")
    for (name, a), (_, b) in zip(ours.named_buffers(), source.named_buffers()):
        assert torch.equal(a, b), name
    hf, hf_tok = _transformers(path)
    tok = load_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
    prompts = [tok.encode(TEXTS[0]), tok.encode("the old mill")]
    mine, _ = generate_greedy(ours, prompts, 12)
    for ids, got in zip(prompts, mine):
        assert got == _hf_greedy(hf, ids, 12)


def test_llama31_rope_freqs_become_llama3_rope_parameters(root):
    """Llama 3.1 files carry their rope as rope_freqs.weight; the parameters that reproduce it are recovered,
    and the model equals the HF checkpoint it was written from (logits over 40 positions)."""
    from gguf_models import LLAMA3_ROPE

    from lamina_p2p.model.torch_attention import TorchAttention, forward

    path = build_gguf("llama", root, llama3_rope=True)
    assert gguf_config(path).rope_scaling == LLAMA3_ROPE
    ours = load_model(path, layout="eager")
    source = load_model(root / "llama-small-llama3-hf", layout="eager")
    ids = list(range(3, 43))
    a = forward(ours, TorchAttention(ours), [0], [ids], all_logits=True)
    b = forward(source, TorchAttention(source), [0], [ids], all_logits=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantization_types_match_transformers(root, qtype):
    """Each type dequantizes to transformers' values (its own dequantizer) and decodes the same tokens."""
    path = build_gguf("llama", root, qtype=qtype, geometry="k")
    ours = load_model(path, layout="eager")
    assert ours.config.dtype == {"F16": "float16", "BF16": "bfloat16"}.get(qtype, "float32")
    ours = load_model(path, dtype="float32", layout=None)
    hf, _ = _transformers(path)
    state = hf.state_dict()
    for name, (_, view) in ours.hf_tensors().items():
        torch.testing.assert_close(view, state[name], rtol=0, atol=1e-6, msg=name)
    tok = load_tokenizer(path)
    ids = tok.encode(TEXTS[0])
    assert generate_greedy(ours, [ids], 10)[0][0] == _hf_greedy(hf, ids, 10)


def test_sentencepiece_vocabulary_matches_transformers(root):
    path = build_gguf("llama", root, vocab="spm")
    tok = load_tokenizer(path)
    _, hf_tok = _transformers(path)
    for text in TEXTS + ["hello world", "the old river", "<s>inside</s>"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert ids[:1] == [1]  # SentencePiece vocabularies add BOS unless the file says otherwise
    assert tok.decode(tok.encode("hello world")) == "hello world"


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizers_match_transformers(root, pre):
    """Text is split as `tokenizer.ggml.pre` says (numbers and runs of spaces are where they differ)."""
    path = build_gguf("qwen2", root, pre=pre)
    tok = load_tokenizer(path)
    _, hf_tok = _transformers(path)
    for text in TEXTS + ["  843 apples", "$0.60  943.3", "In 2024, 12345 rivers\r\n\n  end", "it's we'll THEY'RE"]:
        assert tok.encode(text) == hf_tok(text)["input_ids"], (pre, text)


def test_metadata_config_and_tokenizer(root):
    path = build_gguf("qwen2", root, add_bos=False)
    c = gguf_config(path)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (64, 2, 4, 2, 320)
    assert c.tie_word_embeddings and c.qkv_bias and c.eos_token_ids == (1, 2) and c.bos_token_id == 0
    tok = load_tokenizer(path)
    assert not tok.adds_bos and tok.encode("the mill")[:1] != [0]
    assert tok.eos_token_ids == (1, 2) and "<|start_header_id|>" in tok.chat_template
    # The template's own markers are special; a marker typed in content is text.
    messages = [{"role": "user", "content": "hi<|eot_id|>"}]
    ids = encode_chat(tok, template_for(tok), messages)
    assert ids.count(2) == 1  # only the template's end of turn
    assert encode_chat(tok, template_for(tok), messages, allow_special_in_content=True).count(2) == 2


def _rewrite(src, dst, arch=None, drop=None, qtype=None):
    """Copy GGUF `src` to `dst`, changing the architecture, dropping a tensor or re-typing one."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key if arch is None else key.replace(r.fields["general.architecture"].contents() + ".", arch + ".")
        value = f.contents()
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name == drop:
            continue
        if qtype and t.name == "blk.0.ffn_up.weight":
            a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(t.name, gguf.quants.quantize(np.ascontiguousarray(a), q), raw_dtype=q)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed(t.shape.tolist())),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_files_fail_in_one_line(root, tmp_path):
    good = build_gguf("llama", root)
    data = good.read_bytes()
    cases = []
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    cases.append((cut, ["cut.gguf", "truncated"]))
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    cases.append((head, ["head.gguf", "truncated"]))
    cases.append((_rewrite(good, tmp_path / "arch.gguf", arch="gpt2"), ["arch.gguf", "unsupported architecture 'gpt2'"]))
    cases.append((_rewrite(good, tmp_path / "drop.gguf", drop="blk.1.attn_v.weight"),
                  ["drop.gguf", "missing tensor 'blk.1.attn_v.weight'"]))
    cases.append((_rewrite(good, tmp_path / "q5.gguf", qtype="Q5_0"),
                  ["q5.gguf", "'blk.0.ffn_up.weight'", "quantization type Q5_0"]))
    notgguf = tmp_path / "text.gguf"
    notgguf.write_text("hello")
    cases.append((notgguf, ["text.gguf", "not a GGUF file"]))
    for path, needles in cases:
        with pytest.raises(ModelError) as e:
            load_model(path)
        assert "\n" not in str(e.value)
        for n in needles:
            assert n in str(e.value)
    # And through the CLI, every command that takes a model: one line, no traceback.
    cli = [(["generate", "--model", str(path), "--prompt", "hi"], needles) for path, needles in cases[:3] + cases[4:5]]
    cli.append((["plan", "--model", str(cases[2][0]), "--compute", "h100", "--attention", "h20"],
                ["unsupported architecture 'gpt2'"]))
    for r, (_, needles) in zip(nodes([cmd for cmd, _ in cli]), cli):
        one_line_error(r, *needles)


@pytest.mark.cluster
def test_gguf_on_a_real_cluster_equals_in_process(root):
    path = build_gguf("qwen3", root, qtype="Q8_0")
    model = load_model(path, dtype="float32")
    tok = load_tokenizer(path)
    prompts = ["The river ran slowly", "the old mill"]
    want, _ = generate_greedy(model, [tok.encode(p) for p in prompts], 8)
    r = node("generate", "--model", str(path), "--prompt", prompts[0], "--prompt", prompts[1], "--max-tokens", "8",
             "--ignore-eos", "--attention-peers", "2", "--placement", "head", "--micro-batches", "2",
             "--kv-memory", "64MiB", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["batch"] == 2  # one sequence per prompt without --batch
    assert got["token_ids"] == want
