"""Weights in huge-page memory (model/hugepages.py): same values, one advised mapping, same results."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from lamina_p2p.model import hugepages
from lamina_p2p.model.bench_dense import random_model

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_possible() -> bool:
    return sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()


def test_copies_keep_values_shapes_and_dtypes_in_one_aligned_mapping():
    # The first array spans a whole aligned 2 MiB range, so the mapping can hold a huge page.
    arrays = [np.arange(3 * 2**16 * 16, dtype=np.int16).reshape(3, 2**16, 16), np.linspace(0, 1, 7, dtype=np.float32),
              np.full((2, 3), 65529, np.uint16)]
    copies = hugepages.huge_copies(arrays)
    for a, c in zip(arrays, copies):
        assert c.dtype == a.dtype and c.shape == a.shape and np.array_equal(a, c)
        assert c.flags.c_contiguous and c.flags.writeable and c.ctypes.data % hugepages.ALIGN == 0
        assert not np.shares_memory(a, c)
    if hugepages._mapping(1) is not None:  # one mapping, in order
        assert copies[0].ctypes.data < copies[1].ctypes.data < copies[2].ctypes.data
        assert copies[0].base is copies[1].base
    if _thp_possible():
        assert hugepages.mapping_info(copies[0]).get("THPeligible") == 1


def test_switched_off_the_arrays_come_back_as_they_are(monkeypatch):
    arrays = [np.ones(4, np.int16)]
    monkeypatch.setattr(hugepages, "ENABLED", False)
    assert hugepages.huge_copies(arrays)[0] is arrays[0]
    assert hugepages.huge_copies([]) == []


@torch.inference_mode()
def test_a_model_on_huge_pages_gives_the_same_bits(monkeypatch):
    geometry = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 40,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1,
                "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": True, "dtype": "bfloat16"}
    base = random_model("bfloat16", seed=3, geometry=geometry)
    huge = copy.deepcopy(base).prepare("gemv")
    monkeypatch.setattr(hugepages, "ENABLED", False)
    plain = copy.deepcopy(base).prepare("gemv")
    f = huge._fused
    if hugepages._mapping(1) is not None:  # every packed weight in one mapping, the head last
        assert all(w.base is f.head.wb.base for L in f.layers for w in (L[1].wb, L[2].wb, L[4], L[5].wb))
    assert plain._fused.head.wb.base is not f.head.wb.base
    g = torch.Generator().manual_seed(4)
    for rows in (1, 5):
        x = torch.randn(rows, 40, generator=g).to(torch.bfloat16)
        positions = torch.randint(0, 200, (rows,), generator=g)
        attn = torch.randn(rows, 5, 8, generator=g).to(torch.bfloat16)
        for layer in range(2):
            for a, b in zip(huge.pre(layer, x, positions), plain.pre(layer, x, positions)):
                assert torch.equal(a, b)
            assert torch.equal(huge.post(layer, x, attn), plain.post(layer, x, attn))
        assert torch.equal(huge.logits(x), plain.logits(x))
    # Prefill's widened path reads the same (moved) blocks.
    x = torch.randn(600, 40, generator=g).to(torch.bfloat16)
    assert torch.equal(huge._fused.prefill_linears[0][0](x), plain._fused.prefill_linears[0][0](x))

