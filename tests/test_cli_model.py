"""The commands that take a model, as a user runs them: --model DIR | FILE.gguf | org/name (the local
Hugging Face cache), generate --chat/--system and its batch default, and one-line errors: a bad
model, and --join where no peer answers (nothing listening, or a secret missing or wrong)."""

import json
import shutil

import pytest
from helpers import free_port, node, nodes, one_line_error

from lamina_p2p.model.config import ModelError
from lamina_p2p.model.loader import load_model
from lamina_p2p.model.source import display_name, resolve
from lamina_p2p.model.tokenizer import load_tokenizer
from lamina_p2p.model.torch_attention import generate_greedy
from lamina_p2p.serve.chat import encode_chat, template_for

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root, repo: str, files_from) -> None:
    """The Hugging Face cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>}."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files_from, entry / "snapshots" / COMMIT)


def test_hf_cache_repo_resolves_offline(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hf_cache(hub, "acme/tiny", tiny)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("acme/tiny") == hub / "models--acme--tiny" / "snapshots" / COMMIT
    assert display_name("acme/tiny") == "acme/tiny"
    ids = load_tokenizer("acme/tiny").encode("The river")
    assert generate_greedy(load_model("acme/tiny"), [ids], 4)[0] == generate_greedy(load_model(tiny), [ids], 4)[0]
    with pytest.raises(ModelError, match="acme/absent: not in the local Hugging Face cache"):
        resolve("acme/absent")


def test_hf_cache_repo_of_one_gguf(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from gguf_models import build_gguf

    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "build").mkdir()
    gguf_file = build_gguf("qwen2", tmp_path / "build")
    shutil.copy(gguf_file, src / "model-Q8_0.gguf")
    hub = tmp_path / "hub"
    hf_cache(hub, "acme/tiny-GGUF", src)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert resolve("acme/tiny-GGUF").name == "model-Q8_0.gguf"
    shutil.copy(gguf_file, hub / "models--acme--tiny-GGUF" / "snapshots" / COMMIT / "other.gguf")
    with pytest.raises(ModelError, match="several .gguf files"):
        resolve("acme/tiny-GGUF")


def test_generate_from_the_hf_cache_and_chat(tiny, tmp_path):
    hub = tmp_path / "hub"
    hf_cache(hub, "acme/tiny", tiny)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    r = node("generate", "--model", "acme/tiny", "--chat", "Hello there", "--chat", "Second one", "--system", "Be brief.",
            "--prompt", "The river", "--max-tokens", "4", "--ignore-eos", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["batch"] == 3  # one sequence per prompt and conversation, without --batch
    tok = load_tokenizer(tiny)
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": m}]
             for m in ("Hello there", "Second one")]
    prompts = [tok.encode("The river")] + [encode_chat(tok, template_for(tok), c) for c in chats]
    assert out["prompt_tokens"] == [len(p) for p in prompts]
    want, _ = generate_greedy(load_model(tiny), prompts, 4)
    assert out["token_ids"] == want
    one_line_error(node("generate", "--model", "acme/absent", "--prompt", "x", env=env),
                   "acme/absent", "not in the local Hugging Face cache")


def test_bad_models_and_options_are_one_line(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = shutil.copytree(tiny, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    nochat = shutil.copytree(tiny, tmp_path / "nochat")
    tc = json.loads((nochat / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (nochat / "tokenizer_config.json").write_text(json.dumps(tc))
    cases = [(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"], ["nowhere"])]
    for cmd in (["generate", "--prompt", "x"], ["serve"], ["start", "--role", "compute", "--join", "tcp://127.0.0.1:1"],
                ["plan", "--compute", "h100", "--attention", "h20"]):
        cases.append(([*cmd, "--model", str(empty)], ["empty", "config.json not found"]))
    cases += [(["generate", "--model", str(broken), "--prompt", "x"], ["model.safetensors", "cannot read"]),
              (["generate", "--model", str(tiny), "--system", "s", "--prompt", "x"], ["--system goes with --chat"]),
              (["generate", "--model", str(nochat), "--chat", "hi"], ["no chat template"])]
    for r, (_, needles) in zip(nodes([cmd for cmd, _ in cases]), cases):
        one_line_error(r, *needles)


@pytest.mark.cluster
def test_join_with_no_answering_peer_fails_fast(tiny, tmp_path, launch_peer):
    """Nothing listening, a peer that needs a secret we lack, and one whose secret differs from ours:
    each command fails in about status's 5 s, in one line with the key hint."""
    from lamina_p2p.net.security import generate_keys

    good, other = generate_keys(tmp_path / "good")["cluster"], generate_keys(tmp_path / "other")["cluster"]
    nobody = f"tcp://127.0.0.1:{free_port()}"
    peer = launch_peer(["start", "--role", "attention", "--listen", "tcp://127.0.0.1:0", "--kv-memory", "64MiB",
                        "--secret", str(good)])
    cases = [(nobody, []), (peer.address, []), (peer.address, ["--secret", str(other)])]
    commands = [[*cmd, *extra]
                for addr, extra in cases
                for cmd in (["generate", "--model", str(tiny), "--prompt", "x", "--join", addr],
                            ["serve", "--model", str(tiny), "--http", "127.0.0.1:0", "--join", addr],
                            ["start", "--role", "compute", "--model", str(tiny), "--join", addr])]
    for r, cmd in zip(nodes(commands, timeout=120), commands):
        # The status probe's answer (5 s), not the 60 s wait for peers that used to end in a traceback;
        # no wall-clock assertion (shared machine), the message says which path was taken.
        one_line_error(r, "no peer answered", cmd[cmd.index("--join") + 1], "within 5 s", "--secret")
