"""lamina-p2p: attention offloading for LLM decode, from Python.

    import lamina_p2p
    llm = lamina_p2p.LLM("models/tiny")                      # attention in this process
    llm = lamina_p2p.LLM("models/tiny", attention_peers=2)   # or on 2 local attention peer processes
    out = llm.generate(["Hello"], lamina_p2p.SamplingParams(max_tokens=16))
    out[0]["text"], out[0]["token_ids"]

Names resolve on first use, so `import lamina_p2p` loads neither torch nor the kernels.
"""

from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "EngineOptions"]

_LAZY = {
    "LLM": "lamina_p2p.offline",
    "SamplingParams": "lamina_p2p.compute.sequence",
    "EngineOptions": "lamina_p2p.options",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lamina_p2p' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
