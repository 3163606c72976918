"""Load a checkpoint into a `Transformer`: an HF directory, a GGUF file, or an HF cache repo id.

From a directory: `config.json` and safetensors weights, single-file (`model.safetensors`)
or sharded (`model.safetensors.index.json` + shards). Never unpickles anything. A .gguf
file goes through gguf.py (dequantized at load); `source.resolve` says which is which.

Every expected tensor is checked for presence and shape before any copying, so
a broken directory fails fast with one line naming the file and the tensor,
instead of a stack trace from deep inside a matmul later.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, ModelError, read_json
from .transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_model(path, dtype: str | None = None, device="cpu", layout: str | None = "auto") -> Transformer:
    """Build the model that `path` names (see source.resolve) in `dtype` (default: the checkpoint's) on `device`.

    The matmul weights are laid out once, here, for `layout` (linear.LAYOUTS; "auto" picks the
    fastest for this machine, "eager" keeps plain tensors; None leaves it to the first forward, for
    callers that still change weights), see Transformer.prepare.
    Errors: ModelError, one line naming the file; ValueError for a layout this machine cannot run.
    """
    from .source import resolve

    path = resolve(path)
    if path.is_file():
        from .gguf import gguf_config, load_gguf_weights, open_gguf

        reader = open_gguf(path)
        model = Transformer(gguf_config(path, reader), dtype=dtype, device=device)
        load_gguf_weights(path, model, reader)
    else:
        model = Transformer(ModelConfig.from_dir(path), dtype=dtype, device=device)
        expected = model.hf_tensors()
        by_file = _locate(path, expected)
        with torch.inference_mode():
            for file, names in by_file.items():
                _copy_file(file, names, expected)
    return model if layout is None else model.prepare(layout)


def _locate(path: Path, expected: dict) -> dict[Path, list[str]]:
    """Group the expected tensor names by the safetensors file that should hold them."""
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index}: missing key 'weight_map'")
        by_file: dict[Path, list[str]] = {}
        for name in expected:
            if name not in weight_map:
                raise ModelError(f"{index}: missing tensor {name!r}")
            shard = path / weight_map[name]
            if not shard.is_file():
                raise ModelError(f"{shard}: file not found (shard listed in {INDEX_FILE} for tensor {name!r})")
            by_file.setdefault(shard, []).append(name)
        return by_file
    if single.is_file():
        return {single: list(expected)}
    hint = " (pickled pytorch_model.bin is not supported)" if (path / "pytorch_model.bin").exists() else ""
    raise ModelError(f"{single}: file not found, and no {INDEX_FILE} either{hint}")


def _copy_file(file: Path, names: list[str], expected: dict) -> None:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            present = set(f.keys())
            # Check the whole file before copying any of it.
            for name in names:
                if name not in present:
                    raise ModelError(f"{file}: missing tensor {name!r}")
                shape = tuple(f.get_slice(name).get_shape())
                want = expected[name][0]
                if shape != want:
                    raise ModelError(f"{file}: tensor {name!r} has shape {list(shape)}, expected {list(want)}")
            for name in names:
                # copy_ converts the dtype, moves to the device and, for the
                # Qwen3 q/k norms, broadcasts one vector over the heads.
                expected[name][1].copy_(f.get_tensor(name))
    except SafetensorError as e:
        raise ModelError(f"{file}: cannot read safetensors ({str(e).splitlines()[0]})") from None
