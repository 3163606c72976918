"""What `--model` names: a checkpoint directory, a .gguf file, or a repo in the local Hugging Face cache.

`resolve` turns the argument into a directory holding config.json, or a .gguf
file. A directory without config.json but with exactly one .gguf file is that
file (what `init-model --preset smollm2-135m-instruct` writes). `org/name`
that is not a local path is looked up in the Hugging Face cache, offline:
nothing is downloaded, and a repo that is not there is a one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelConfig, ModelError
from .gguf import is_gguf

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec) -> Path:
    """The directory (with config.json) or .gguf file that `spec` names; ModelError otherwise."""
    path = Path(spec)
    if path.is_file():
        if is_gguf(path):
            return path
        raise ModelError(f"{path}: not a model (give a checkpoint directory or a .gguf file)")
    if path.is_dir():
        return _in_dir(path)
    text = str(spec)
    if _REPO_ID.match(text) and not text.startswith("."):
        return _in_dir(hf_cache_snapshot(text), repo=text)
    raise ModelError(f"{spec}: no such model directory or .gguf file, and not an org/name repo id")


def _in_dir(path: Path, repo: str | None = None) -> Path:
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    where = f"{repo} ({path})" if repo else str(path)
    if len(ggufs) > 1:
        raise ModelError(f"{where}: holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                         "give the path of one")
    raise ModelError(f"{where}: config.json not found (and no .gguf file): not a model directory")


def hf_cache_snapshot(repo: str) -> Path:
    """The cached snapshot directory of `repo` (huggingface_hub, local files only)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ModelError(f"{repo}: looking up the Hugging Face cache needs huggingface_hub ({e})") from None
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelError(f"{repo}: not in the local Hugging Face cache ({HF_HUB_CACHE}); fetch it first with "
                         f"`hf download {repo}`, or give a local directory or .gguf file") from None
    except Exception as e:  # a malformed repo id, a broken cache entry
        raise ModelError(f"{repo}: cannot use the Hugging Face cache ({str(e).splitlines()[0]})") from None


def model_config(spec) -> ModelConfig:
    """The model's geometry, from config.json or GGUF metadata."""
    path = resolve(spec)
    if path.is_file():
        from .gguf import gguf_config

        return gguf_config(path)
    return ModelConfig.from_dir(path)


def display_name(spec) -> str:
    """A short name for the model: the repo id, the directory's or the file's name (no .gguf)."""
    text = str(spec).rstrip("/")
    if not Path(text).exists() and _REPO_ID.match(text):
        return text
    path = Path(text).resolve()
    return path.stem if is_gguf(path) else path.name
