"""OpenAI request bodies -> prompts + SamplingParams, and the response objects.

Validation is strict about types (a string where a number belongs is a 400
naming the parameter, as OpenAI does) and lenient about parameters OpenAI has
that change nothing here (`user`, `stream_options` beyond include_usage).
Extensions clients send to vLLM-style servers are accepted too: top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos.
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


@dataclass
class Parsed:
    prompts: list  # list[str | list[int]] for completions; [] for chat (prompt_text set)
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # completions: number asked; chat: 0 when logprobs=true
    max_tokens_given: bool = True


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
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {type(v).__name__}", name, "invalid_type")
    return v


def parse_common(body: dict, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
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
        logprobs = 0 if _bool(body, "logprobs") else None
        _number(body, "top_logprobs", 0, 0, 20, integer=True)
    else:
        logprobs = _number(body, "logprobs", None, 0, 5, integer=True)
        if _bool(body, "echo"):
            raise bad("'echo' is not supported", "echo", "unsupported_parameter")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 16,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_k=max(0, top_k),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9,
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 10)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        seed=_number(body, "seed", None, *INT64, integer=True),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs is not None,
    )
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return Parsed([], params, stop, _bool(body, "stream"), bool(opts.get("include_usage")), logprobs,
                  max_tokens is not None)


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


def completion_logprobs(token_texts: list[str], lps: list[float], offset: int, top: int) -> dict:
    """Completions-style logprobs of the chosen tokens (alternatives are not computed: top_logprobs
    lists only the chosen token)."""
    offsets, pos = [], offset
    for t in token_texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": token_texts, "token_logprobs": lps,
            "top_logprobs": [{t: lp} for t, lp in zip(token_texts, lps)] if top else None,
            "text_offset": offsets}


def chat_logprobs(token_texts: list[str], lps: list[float]) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(token_texts, lps)]}


def now() -> int:
    return int(time.time())
