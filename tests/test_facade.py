"""The Python façade (`lamina_p2p.LLM`): the same greedy tokens as `generate`'s path, and a cheap import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hf_models import build_hf_model

import lamina_p2p
from lamina_p2p.offline import GenerateOptions, run_generate

PROMPTS = [[1, 5, 9, 22, 7], [3, 4, 8, 10, 11, 12, 13], [17, 200]]


@pytest.fixture(scope="module")
def model_dir():
    return str(build_hf_model("llama"))


def test_import_loads_neither_torch_nor_the_kernels():
    code = ("import sys, lamina_p2p; "
            "print('torch' in sys.modules, 'numba' in sys.modules, 'lamina_kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_llm_greedy_tokens_equal_run_generate(model_dir):
    expected = run_generate(GenerateOptions(model_dir=model_dir, prompt_ids=PROMPTS, max_tokens=8, ignore_eos=True,
                                            kv_bytes=16 << 20))["token_ids"]
    llm = lamina_p2p.LLM(model_dir, kv_bytes=16 << 20)
    params = lamina_p2p.SamplingParams(max_tokens=8, ignore_eos=True)
    out = llm.generate(PROMPTS, params)
    assert [o["token_ids"] for o in out] == expected
    assert [o["finish_reason"] for o in out] == ["length"] * len(PROMPTS)
    # A second call on the same loaded model: attention is opened afresh, the tokens are the same.
    assert [o["token_ids"] for o in llm.generate(PROMPTS[:1], params)] == expected[:1]


def test_llm_text_prompt_as_the_command_encodes_it(tiny):
    path = str(tiny)
    expected = run_generate(GenerateOptions(model_dir=path, prompts=["Hello there"], max_tokens=6, ignore_eos=True,
                                            kv_bytes=16 << 20))
    out = lamina_p2p.LLM(path, kv_bytes=16 << 20).generate(["Hello there"],
                                                           lamina_p2p.SamplingParams(max_tokens=6, ignore_eos=True))
    assert out[0]["token_ids"] == expected["token_ids"][0]
    assert out[0]["text"] == expected["text"][0]


def test_llm_unknown_option_is_a_type_error(model_dir):
    with pytest.raises(TypeError, match="no_such_option"):
        lamina_p2p.LLM(model_dir, no_such_option=1)


@pytest.mark.cluster
def test_llm_on_local_attention_peers(model_dir):
    expected = run_generate(GenerateOptions(model_dir=model_dir, prompt_ids=PROMPTS, max_tokens=8, ignore_eos=True,
                                            kv_bytes=16 << 20))["token_ids"]
    llm = lamina_p2p.LLM(model_dir, attention_peers=1, attention_threads=1, kv_bytes=16 << 20, placement="head")
    out = llm.generate(PROMPTS, lamina_p2p.SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o["token_ids"] for o in out] == expected
