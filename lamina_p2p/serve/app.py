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

from lamina_p2p.compute.scheduler import ShuttingDown

from lamina_p2p.serve.api import (APIError, bad, chat_logprobs, completion_logprobs, new_id, now, parse_common,
                                  parse_prompts, usage)
from lamina_p2p.serve.chat import ChatTemplateError, encode_chat, normalise_messages, template_for
from lamina_p2p.serve.text import TextRequest

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
            if e.status >= 400:  # unknown route, wrong method: still OpenAI's error shape
                return web.json_response(APIError(e.status, e.reason).body(), status=e.status)
            raise

    async def _body(self, request) -> dict:
        try:
            body = await request.json(loads=_loads)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
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
                                                  tokenizer=self.tokenizer, stops=parsed.stop, index=i,
                                                  want_logprobs=parsed.logprobs is not None))
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
        parsed = parse_common(body, chat=False)
        prompts = [self._encode(p) for p in parse_prompts(body)]
        reqs, queue = self._submit(prompts, parsed, "prompt")
        return await self._respond(request, reqs, queue, parsed, chat=False)

    async def chat(self, request):
        body = await self._body(request)
        parsed = parse_common(body, chat=True)
        try:
            messages = normalise_messages(body.get("messages"))
        except ValueError as e:
            raise bad(str(e), "messages", "invalid_type") from None
        if self.template is None:
            raise bad(f"model '{self.model_name}' has no chat template (tokenizer_config.json has no "
                      "'chat_template'): use /v1/completions", "messages", "no_chat_template")
        try:  # content is text, markers special; no BOS beyond the template's, as in HF
            ids = encode_chat(self.tokenizer, self.template, messages, self.allow_special_in_content)
        except ChatTemplateError as e:
            raise bad(str(e), "messages") from None
        if not parsed.max_tokens_given:
            parsed.params.max_tokens = max(1, self.context - len(ids))
        reqs, queue = self._submit([ids], parsed, "messages")
        return await self._respond(request, reqs, queue, parsed, chat=True)

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
            d = await queue.get()
            texts[d.index] += d.text
            lps[d.index] += d.logprobs
            if d.token_texts:
                toks[d.index] += d.token_texts
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
                c = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                     "logprobs": chat_logprobs(toks[i], lps[i]) if parsed.logprobs is not None else None}
            else:
                c = {"index": i, "text": texts[i],
                     "logprobs": completion_logprobs(toks[i], lps[i], 0, parsed.logprobs) if parsed.logprobs
                     is not None else None}
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

        async def send(choices, **extra):
            chunk = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": choices,
                     **extra}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            if chat:
                for i in range(len(reqs)):
                    await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
            remaining = len(reqs)
            while remaining:
                d = await queue.get()
                if d.finish_reason in ("error", "abort"):
                    err = APIError(500 if d.finish_reason == "error" else 503, d.error or "request failed",
                                   type="server_error")
                    await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                    break
                if d.finish_reason:
                    remaining -= 1
                if not (d.text or d.finish_reason or (d.token_texts and parsed.logprobs is not None)):
                    continue
                lp = None
                if parsed.logprobs is not None:
                    lp = (chat_logprobs(d.token_texts or [], d.logprobs) if chat else
                          completion_logprobs(d.token_texts or [], d.logprobs, offsets[d.index], parsed.logprobs))
                offsets[d.index] += len(d.text)
                if chat:
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


def _copy(params):
    from dataclasses import replace

    return replace(params)
