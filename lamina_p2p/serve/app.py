"""The OpenAI-compatible HTTP API (aiohttp), running in the compute peer's event loop.

Handlers parse and validate, submit to the scheduler and relay its deltas;
they never compute. A handler that ends early for any reason (the client
disconnected and aiohttp cancelled it, a write failed) aborts its requests,
which frees their KV at the next step boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from aiohttp import web

from lamina_p2p.compute.constrain import Grammar, GrammarError, TokenSpace
from lamina_p2p.compute.scheduler import ShuttingDown

from lamina_p2p.serve.api import (APIError, bad, chat_logprobs, completion_logprobs, new_id, now, parse_common,
                                  parse_prompts, usage)
from lamina_p2p.serve.chat import ChatTemplateError, encode_chat, normalise_messages, template_for
from lamina_p2p.serve.text import TextRequest
from lamina_p2p.serve.tools import parse_tools

log = logging.getLogger("lamina.serve")

# Largest request body read (aiohttp answers 413 above it): room for a long context as token ids.
MAX_BODY_BYTES = 8 << 20


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str):
    # Python's json accepts NaN and Infinity, which are not JSON and would reach the sampler.
    return json.loads(text, parse_constant=_no_constants)


class ServeApp:
    def __init__(self, scheduler, tokenizer, model_name: str, context: int, metrics, api_key: str | None = None,
                 allow_special_in_content: bool = False):
        self.scheduler = scheduler
        self.allow_special_in_content = allow_special_in_content
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = context
        self.metrics = metrics
        self.api_key = api_key
        self.template = template_for(tokenizer)
        self.vocab_size = scheduler.engine.cfg.vocab_size
        self._space: TokenSpace | None = None
        self._space_failed = False
        self.app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([
            web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat), web.get("/health", self.health),
            web.get("/metrics", self.metrics_page)])

    # -- plumbing ---------------------------------------------------------------
    @web.middleware
    async def _errors(self, request, handler):
        try:
            if self.api_key and request.path.startswith("/v1/"):
                given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
                # Constant-time comparison: the time taken must not tell how much of a guess was right.
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                                   code="invalid_api_key")
            return await handler(request)
        except APIError as e:
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            if e.status >= 400:  # unknown route, wrong method, body too large: still OpenAI's error shape
                return web.json_response(APIError(e.status, e.reason).body(), status=e.status)
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: nobody to answer
        except Exception:  # a bug: still an answer in OpenAI's shape, never aiohttp's plain-text 500
            log.exception("unhandled error in %s %s", request.method, request.path)
            return web.json_response(APIError(500, "internal server error", type="server_error").body(), status=500)

    async def _body(self, request) -> dict:
        raw = await request.read()
        charset = request.charset or "utf-8"
        try:
            text = raw.decode(charset)
        except LookupError:  # unknown, or not a text encoding (base64, rot13)
            raise APIError(415, f"unsupported charset {charset!r} in Content-Type (send UTF-8 JSON)") from None
        except (UnicodeError, ValueError) as e:
            raise bad(f"the request body is not valid {charset}: {e}") from None
        try:
            body = _loads(text)
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad("the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{self.model_name}').",
                           "model", "model_not_found")
        return body

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise bad("this model has no tokenizer: send the prompt as token ids", "prompt")
        return self.tokenizer.encode(prompt)  # exactly as the checkpoint's tokenizer: its own BOS or none

    def _submit(self, prompts: list[list[int]], parsed, param: str) -> tuple[list[TextRequest], asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i, ids in enumerate(prompts):
                reqs.append(self.scheduler.submit(ids, _copy(parsed.params), TextRequest, queue=queue,
                                                  tokenizer=self.tokenizer, stops=parsed.stop, index=i))
        except ShuttingDown as e:
            for r in reqs:
                self.scheduler.abort(r)
            raise APIError(503, str(e), code="shutting_down", type="server_error") from None
        except ValueError as e:
            for r in reqs:
                self.scheduler.abort(r)
            msg = str(e)
            if "context" in msg:
                raise bad(msg, "max_tokens" if parsed.max_tokens_given else param, "context_length_exceeded") \
                    from None
            raise bad(msg, param) from None
        return reqs, queue

    # -- endpoints --------------------------------------------------------------
    async def models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "lamina-p2p",
             "max_model_len": self.context}]})

    async def health(self, request):
        peers = self.scheduler.transport.peers()
        ok = bool(peers)
        return web.json_response({"status": "ok" if ok else "no attention peer", "attention_peers": len(peers)},
                                 status=200 if ok else 503)

    async def metrics_page(self, request):
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def completions(self, request):
        body = await self._body(request)
        parsed = parse_common(body, chat=False, vocab_size=self.vocab_size)
        prompts = [self._encode(p) for p in parse_prompts(body)]
        reqs, queue = self._submit(prompts, parsed, "prompt")
        return await self._respond(request, reqs, queue, parsed, chat=False)

    async def chat(self, request):
        body = await self._body(request)
        parsed = parse_common(body, chat=True, vocab_size=self.vocab_size)
        parsed.tools = tools = parse_tools(body)
        constraint, param = parsed.response_format, "response_format"
        if tools is not None and tools.schema is not None:
            if constraint is not None:
                raise bad("'response_format' cannot be combined with a tool_choice that forces a call",
                          "response_format", "invalid_value")
            constraint, param = {"type": "json_schema", "schema": tools.schema}, "tools"
        if constraint is not None:
            # Compiling a schema can take long for a large one: off the event loop.
            parsed.params.grammar = await asyncio.get_running_loop().run_in_executor(
                None, self._grammar, constraint, param)
        try:
            messages = normalise_messages(body.get("messages"))
        except ValueError as e:
            raise bad(str(e), "messages", "invalid_type") from None
        if self.template is None:
            raise bad(f"model '{self.model_name}' has no chat template (tokenizer_config.json has no "
                      "'chat_template'): use /v1/completions", "messages", "no_chat_template")
        try:  # content is text, markers special; no BOS beyond the template's, as in HF
            ids = encode_chat(self.tokenizer, self.template, messages, self.allow_special_in_content,
                              **({"tools": tools.tools} if tools is not None else {}))
        except ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        if not parsed.max_tokens_given:
            parsed.params.max_tokens = max(1, self.context - len(ids))
        reqs, queue = self._submit([ids], parsed, "messages")
        return await self._respond(request, reqs, queue, parsed, chat=True)

    def space(self) -> TokenSpace | None:
        """The tokenizer as the grammar library sees it (built once; None if it cannot read it)."""
        if self._space is None and not self._space_failed and self.tokenizer is not None:
            try:
                self._space = TokenSpace(self.tokenizer.tokenizer.to_str(), self.vocab_size,
                                         list(self.tokenizer.eos_token_ids))
            except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read costs structured output only
                self._space_failed = True
                log.warning("structured output unavailable: llguidance cannot read this tokenizer (%s)", e)
        return self._space

    def _grammar(self, rf: dict, param: str) -> Grammar:
        space = self.space()
        if space is None:
            raise bad("structured output is not available for this model's tokenizer", param,
                      "unsupported_parameter")
        try:
            if rf["type"] == "json_object":
                return Grammar.json_object(space)
            return Grammar.json_schema(space, rf["schema"])
        except GrammarError as e:
            raise bad(f"'{param}': {e}", param, "invalid_value") from None

    def _token_text(self, token: int) -> str:
        """The token as text; one that is not whole UTF-8 (part of a character) is written as OpenAI
        writes it, "bytes:\\xc3", so that distinct partial tokens stay distinct."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" in text:
            raw = self._token_bytes(token)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def _token_bytes(self, token: int) -> bytes:
        # The token's own bytes: for a token holding part of a UTF-8 character, decoding it alone
        # gives U+FFFD, whose bytes are not the token's.
        space = self.space()
        if space is None:  # no byte-level view: the text's bytes (wrong only for partial characters)
            return self.tokenizer.decode([token], skip_special_tokens=False).encode()
        return space.token_bytes(token)

    def _logprobs(self, req, tokens: list[int], lps: list[float], start: int, offset: int, parsed, chat: bool):
        """The logprobs object of `tokens`, which are req's output tokens from position `start`."""
        n = parsed.logprobs
        texts = [self._token_text(t) for t in tokens]
        tops = req.seq.top_logprobs[start:start + len(tokens)] if n else [[] for _ in tokens]
        if chat:
            return chat_logprobs(texts, [self._token_bytes(t) for t in tokens], lps,
                                 [[(self._token_text(a), self._token_bytes(a), lp) for a, lp in alts]
                                  for alts in tops])
        widths = [len(self.tokenizer.decode([t])) for t in tokens]  # as in the text: specials skipped
        return completion_logprobs(texts, lps, [[(self._token_text(a), lp) for a, lp in alts] for alts in tops],
                                   offset, n, widths)

    @staticmethod
    def _tool_calls(parsed, text: str, finish: str | None) -> list[dict] | None:
        """The tool calls a forced tool_choice produced (None when none was asked or the output was cut)."""
        tools = parsed.tools
        if tools is None or tools.schema is None or finish != "stop":
            return None
        return tools.calls(text)

    # -- responses --------------------------------------------------------------
    async def _respond(self, request, reqs, queue, parsed, chat: bool):
        try:
            if parsed.stream:
                return await self._stream(request, reqs, queue, parsed, chat)
            return await self._collect(reqs, queue, parsed, chat)
        finally:
            for r in reqs:  # no-op for finished ones; frees KV of the rest (client gone, error)
                self.scheduler.abort(r)

    async def _collect(self, reqs, queue, parsed, chat):
        texts = [""] * len(reqs)
        toks = [[] for _ in reqs]
        lps = [[] for _ in reqs]
        finish = [None] * len(reqs)
        remaining = len(reqs)
        while remaining:
            d = _final_reason(reqs, await queue.get())
            texts[d.index] += d.text
            lps[d.index] += d.logprobs
            toks[d.index] += d.tokens
            if d.finish_reason:
                remaining -= 1
                finish[d.index] = d.finish_reason
                if d.finish_reason in ("error", "abort"):
                    raise APIError(503 if d.finish_reason == "abort" else 500, d.error or "request failed",
                                   type="server_error")
        prompt_n = sum(len(r.seq.prompt) for r in reqs)
        out_n = sum(len(r.seq.output) for r in reqs)
        choices = []
        for i in range(len(reqs)):
            if chat:
                c = {"index": i, "message": {"role": "assistant", "content": texts[i]}}
                calls = self._tool_calls(parsed, texts[i], finish[i])
                if calls:
                    c["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                    finish[i] = "tool_calls"
            else:
                c = {"index": i, "text": texts[i]}
            c["logprobs"] = (self._logprobs(reqs[i], toks[i], lps[i], 0, 0, parsed, chat)
                             if parsed.logprobs is not None else None)
            c["finish_reason"] = finish[i]
            choices.append(c)
        return web.json_response({"id": new_id("chatcmpl" if chat else "cmpl"),
                                  "object": "chat.completion" if chat else "text_completion", "created": now(),
                                  "model": self.model_name, "choices": choices, "usage": usage(prompt_n, out_n)})

    async def _stream(self, request, reqs, queue, parsed, chat):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * len(reqs)
        positions = [0] * len(reqs)  # output tokens of each request already sent
        # A forced tool call is sent whole at the end (as tool_calls), not as content deltas.
        held = [""] * len(reqs) if chat and parsed.tools and parsed.tools.schema else None

        async def send(choices, **extra):
            chunk = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if parsed.include_usage:
                chunk["usage"] = None  # on every chunk but the last, as the API reference says
            chunk.update(extra)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            if chat:
                for i in range(len(reqs)):
                    await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
            remaining = len(reqs)
            while remaining:
                d = _final_reason(reqs, await queue.get())
                if d.finish_reason in ("error", "abort"):
                    err = APIError(500 if d.finish_reason == "error" else 503, d.error or "request failed",
                                   type="server_error")
                    await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                    break
                if d.finish_reason:
                    remaining -= 1
                if not (d.text or d.finish_reason or (d.tokens and parsed.logprobs is not None)):
                    continue
                lp = None
                if parsed.logprobs is not None:
                    lp = self._logprobs(reqs[d.index], d.tokens, d.logprobs, positions[d.index], offsets[d.index],
                                        parsed, chat)
                positions[d.index] += len(d.tokens)
                offsets[d.index] += len(d.text)
                if chat and held is not None:
                    held[d.index] += d.text
                    delta, finish = {}, d.finish_reason
                    if d.finish_reason:
                        calls = self._tool_calls(parsed, held[d.index], d.finish_reason)
                        if calls:
                            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                            finish = "tool_calls"
                        else:  # cut short (length): what was generated, as text
                            delta = {"content": held[d.index]}
                    await send([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": finish}])
                elif chat:
                    delta = {"content": d.text} if d.text or not d.finish_reason else {}
                    await send([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}])
                else:
                    await send([{"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}])
            if parsed.include_usage:
                await send([], usage=usage(sum(len(r.seq.prompt) for r in reqs),
                                           sum(len(r.seq.output) for r in reqs)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, OSError):
            log.info("client went away mid-stream; aborting %d request(s)", len(reqs))
        return resp


def _final_reason(reqs, d):
    """A stop string can be completed by text held back until the end (the last token finished
    a character): the scheduler saw "length", but the text stopped at a stop string."""
    if d.finish_reason == "length" and reqs[d.index].stopper.stopped:
        d.finish_reason = "stop"
    return d


def _copy(params):
    from dataclasses import replace

    return replace(params)
