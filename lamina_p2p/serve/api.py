"""OpenAI request bodies -> prompts + SamplingParams, and the response objects.

Validation is strict about types (a string where a number belongs is a 400
naming the parameter, as OpenAI does) and about names: nothing a client sends is
silently ignored. An unknown parameter is a 400 naming it (as OpenAI answers), a
known one this server cannot honour (tool_choice "auto", audio, ...) is a 400
naming it, and the ones that change no output (user, metadata, store,
service_tier) are only type-checked. Extensions clients send to vLLM-style
servers are accepted too: top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from lamina_p2p.compute.sequence import SamplingParams

# Caps on what one request may ask for (hostile input): each bounds work or memory per request.
MAX_PROMPTS = 256  # prompts in one completions request
MAX_STOP = 16  # stop strings (OpenAI allows 4)
MAX_STOP_LEN = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
INT64 = (-(2**63), 2**63 - 1)


class APIError(Exception):
    """Becomes OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# What each endpoint takes. A parameter outside these is refused with a 400 naming it (as OpenAI
# does), so nothing a client sends is silently ignored.
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user",
          # vLLM-style extensions
          "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos"}
COMPLETIONS = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                 "parallel_tool_calls", "metadata", "store", "service_tier", "modalities", "audio", "prediction",
                 "reasoning_effort", "functions", "function_call", "web_search_options"}
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per position
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
LOGIT_BIAS_RANGE = (-100, 100)


@dataclass
class Parsed:
    prompts: list  # list[str | list[int]] for completions; [] for chat (prompt_text set)
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives asked per position; None: no logprobs at all
    max_tokens_given: bool = True
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    tools: object = None  # serve.tools.Tools (chat)


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}", name,
                  "invalid_type")
    if not integer and not math.isfinite(v):
        raise bad(f"'{name}' must be a finite number, got {v}", name, "invalid_value")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            rule = f"at least {lo}"
        elif lo is None:
            rule = f"at most {hi}"
        else:
            rule = f"between {lo} and {hi}"
        raise bad(f"'{name}' must be {rule}, got {v}", name, "invalid_value")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {type(v).__name__}", name, "invalid_type")
    return v


def _typed(body: dict, name: str, kind, what: str):
    v = body.get(name)
    if v is not None and (not isinstance(v, kind) or isinstance(v, bool) and kind is not bool):
        raise bad(f"'{name}' must be {what}, got {type(v).__name__}", name, "invalid_type")
    return v


def _unsupported(name: str, why: str) -> APIError:
    return bad(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")


def check_parameters(body: dict, chat: bool) -> None:
    """Unknown parameters and known ones this server cannot honour: a 400 naming the parameter."""
    known = CHAT if chat else COMPLETIONS
    for name in body:
        if name not in known:
            raise bad(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")
    # No-ops by definition (they change nothing in the output): checked for type only.
    _typed(body, "user", str, "a string")
    _typed(body, "metadata", dict, "an object")
    _typed(body, "service_tier", str, "a string")
    _bool(body, "store")
    _bool(body, "parallel_tool_calls")
    # tools and tool_choice: serve/tools.py
    for name, why in (("functions", "function calling is not implemented"),
                      ("function_call", "function calling is not implemented"),
                      ("audio", "this model produces text only"),
                      ("prediction", "predicted outputs are not implemented"),
                      ("web_search_options", "this server cannot search the web"),
                      ("reasoning_effort", "this model does not reason in a separate channel"),
                      ("suffix", "insertion (text after the completion) is not implemented")):
        if body.get(name) not in (None, ""):
            raise _unsupported(name, why)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "this model produces text only (modalities: [\"text\"])")
    if _number(body, "best_of", 1, 1, None, integer=True) != 1:
        raise _unsupported("best_of", "only best_of 1 is implemented")


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} -> {id: bias}."""
    lb = body.get("logit_bias")
    if lb is None:
        return None
    if not isinstance(lb, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    if len(lb) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries", "logit_bias", "invalid_value")
    out = {}
    lo, hi = LOGIT_BIAS_RANGE
    for key, value in lb.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias", "invalid_value") from None
        if not 0 <= tid < vocab_size:
            raise bad(f"'logit_bias': token id {tid} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias",
                      "invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"'logit_bias' values must be numbers, got {value!r} for {key}", "logit_bias", "invalid_type")
        if not lo <= value <= hi:
            raise bad(f"'logit_bias' values must be between {lo} and {hi}, got {value} for {key}", "logit_bias",
                      "invalid_value")
        out[tid] = float(value)
    return out or None


def parse_response_format(body: dict) -> dict | None:
    """None for plain text; else {"type": "json_object"} or {"type": "json_schema", "schema": {...}}."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad("'response_format' must be an object with a string 'type'", "response_format", "invalid_type")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise bad("'response_format.json_schema' must be an object with a string 'name'", "response_format",
                      "invalid_type")
        schema = js.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("'response_format.json_schema.schema' must be an object", "response_format", "invalid_type")
        if js.get("strict") is not None and not isinstance(js["strict"], bool):
            raise bad("'response_format.json_schema.strict' must be a boolean", "response_format", "invalid_type")
        return {"type": "json_schema", "schema": schema}
    raise bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
              "response_format", "invalid_value")


def parse_common(body: dict, chat: bool, vocab_size: int = 2**31) -> Parsed:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_parameters(body, chat)
    n = _number(body, "n", 1, 1, 1, integer=True)  # several choices per prompt: not supported
    del n
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_name, None, 1, None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in stop):
        raise bad(f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_LEN} characters", "stop",
                  "invalid_value")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise bad("'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type")
    if len(stop_ids) > MAX_STOP_TOKEN_IDS or any(not 0 <= t < 2**31 for t in stop_ids):
        raise bad(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} token ids in 0..2**31-1", "stop_token_ids",
                  "invalid_value")
    top_k = _number(body, "top_k", 0, -1, None, integer=True)
    if chat:
        wants = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not wants:
            raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if wants else None
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if _bool(body, "echo"):
            raise _unsupported("echo", "the prompt is not returned with the completion")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_k=max(0, top_k),
        # top_p 0 is the limit of keeping less and less mass: the single most likely token.
        top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9,
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 10)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        seed=_number(body, "seed", None, *INT64, integer=True),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
        logit_bias=parse_logit_bias(body, vocab_size),
    )
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
        for key in opts:
            if key != "include_usage":
                raise bad(f"Unrecognized argument in 'stream_options': {key}", "stream_options",
                          "unrecognized_argument")
    include_usage = _bool(opts or {}, "include_usage")
    response_format = parse_response_format(body) if chat else None
    return Parsed([], params, stop, stream, include_usage, logprobs, max_tokens is not None, response_format)


def parse_prompts(body: dict) -> list:
    """A completions prompt: a string, an array of strings, token ids, or an array of token-id arrays."""
    p = body.get("prompt")

    def ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str):
        return [p]
    if ids(p):
        return [p]
    if isinstance(p, list) and len(p) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(p)} prompts; at most {MAX_PROMPTS} per request", "prompt", "invalid_value")
    if isinstance(p, list) and p and all(isinstance(x, str) or ids(x) for x in p):
        return list(p)
    raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of those",
              "prompt", "invalid_type")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(token_texts: list[str], lps: list[float], tops: list[list[tuple[str, float]]],
                       offset: int, n: int, widths: list[int] | None = None) -> dict:
    """Completions-style logprobs. top_logprobs[i] maps the n likeliest tokens' texts (and the chosen
    token's, which OpenAI always adds) to their log-probabilities. widths: characters each token adds
    to the text (default: its label's length; a "bytes:\\xc3" label is longer than its text)."""
    offsets, pos = [], offset
    for w in widths if widths is not None else [len(t) for t in token_texts]:
        offsets.append(pos)
        pos += w
    top = None
    if n:
        top = []
        for t, lp, alts in zip(token_texts, lps, tops):
            entry = dict(alts[:n])
            entry.setdefault(t, lp)
            top.append(entry)
    return {"tokens": token_texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_texts: list[str], token_bytes: list[bytes], lps: list[float],
                  tops: list[list[tuple[str, bytes, float]]]) -> dict:
    """Chat-style logprobs: per token its text, log-probability, own bytes and the alternatives."""
    return {"content": [
        {"token": t, "logprob": lp, "bytes": list(b),
         "top_logprobs": [{"token": at, "logprob": alp, "bytes": list(ab)} for at, ab, alp in alts]}
        for t, b, lp, alts in zip(token_texts, token_bytes, lps, tops)]}


def now() -> int:
    return int(time.time())
