"""The HTTP surface: an ASGI app (Starlette) over the Engine, OpenAI's routes and error shapes.

    GET  /health                 {"status": "ok", slots, running, waiting, ...}; no API key needed
    GET  /v1/models              the one model served
    POST /v1/completions         prompt -> text; "stream": true sends server-sent events
    POST /v1/chat/completions    messages -> reply (the transcript template in protocol.py)

Every refusal is an OpenAI-style JSON error with its status: 400 bad request (bad JSON, wrong
types, unknown fields, prompt too long, max_tokens over the limit), 401 missing or wrong API key,
404 unknown route or model, 405 wrong method, 413 body over the size limit, 429 queue full,
500 internal error. A client that disconnects (streaming or not) cancels its job, which frees
its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from perseus_edge.errors import PerseusError
from perseus_edge.sampling import Sampler
from perseus_edge.serve import Limits
from perseus_edge.serve import protocol as p
from perseus_edge.serve.engine import Done, Engine, Failed, Job, Piece, QueueFull


class App:
    """Routes and request handling; `app.asgi` is what uvicorn serves."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None,
                 limits: Limits | None = None):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits or Limits()
        self.created = p.timestamp()
        ctx = engine.max_context
        self.max_prompt = min(self.limits.max_prompt_tokens or ctx - 1, ctx - 1)
        self.max_tokens = min(self.limits.max_tokens or ctx - 1, ctx - 1)
        self.tokenizer = engine.folder.tokenizer
        self.vocab = engine.folder.config.vocab_size
        self.asgi = Starlette(
            routes=[Route("/health", self.health, methods=["GET"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/v1/models/{name:path}", self.model, methods=["GET"]),
                    Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat, methods=["POST"])],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    # ------------------------------------------------------------------ errors, auth, body
    @staticmethod
    def error(e: p.APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
        return self.error(p.APIError(exc.status_code, msg, kind))

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        return self.error(p.APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise p.APIError(401, "Incorrect API key provided" if auth else
                             "You didn't provide an API key (Authorization: Bearer KEY)",
                             "invalid_request_error", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (never read whole first)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise p.APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                             code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise p.APIError(413, f"request body exceeds the limit of {limit} bytes",
                                 code="request_too_large")
        return bytes(body)

    # ------------------------------------------------------------------ simple routes
    async def health(self, request: Request) -> Response:
        stats = self.engine.stats()
        ok = stats["alive"]
        return JSONResponse({"status": "ok" if ok else "error", "model": self.model_name, **stats},
                            status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except p.APIError as e:
            return self.error(e)
        return JSONResponse({"object": "list", "data": [p.model_card(self.model_name, self.created)]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["name"])
        except p.APIError as e:
            return self.error(e)
        return JSONResponse(p.model_card(self.model_name, self.created))

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise p.APIError(404, f"The model '{name}' does not exist (this server serves "
                             f"'{self.model_name}')", "invalid_request_error", "model", "model_not_found")

    # ------------------------------------------------------------------ generation routes
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            self._authorize(request)
            req = p.parse(p.ChatRequest if chat else p.CompletionRequest, await self._body(request))
            self._check_model(req.model)
            job, prompt_text = self._job(req, chat)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            job.on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            try:
                self.engine.submit(job)
            except QueueFull as e:
                raise p.APIError(429, str(e), "server_error", code="queue_full") from None
            except PerseusError as e:
                raise p.APIError(503, str(e), "server_error") from None
        except p.APIError as e:
            return self.error(e)
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(self._sse(job, events, rid, chat, req.include_usage(), prompt_text),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, rid, chat, prompt_text)

    def _job(self, req, chat: bool) -> tuple[Job, str]:
        """Tokenize, check the limits, build the sampler: a Job ready to submit (+ echo text)."""
        stops = req.stop_list()
        if chat:
            text = p.chat_prompt(req.messages)
            stops.append(p.CHAT_STOP)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            asked = req.max_completion_tokens or req.max_tokens
        else:
            text = req.prompt if isinstance(req.prompt, str) else None
            if text is not None:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            else:
                ids = list(req.prompt)
                bad = [i for i in ids if not 0 <= i < self.vocab]
                if bad:
                    raise p.APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                                     param="prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            asked = req.max_tokens
        if not ids:
            raise p.APIError(400, "the prompt encodes to no tokens", param="prompt")
        ctx = self.engine.max_context
        if len(ids) > self.max_prompt:
            raise p.APIError(400, f"This model's maximum context length is {ctx} tokens and this server "
                             f"accepts prompts of at most {self.max_prompt} tokens. However, your prompt "
                             f"has {len(ids)} tokens.", param="messages" if chat else "prompt",
                             code="context_length_exceeded")
        if asked is not None and asked > self.max_tokens:
            raise p.APIError(400, f"max_tokens is too large: {asked}. This server allows at most "
                             f"{self.max_tokens}.", param="max_tokens")
        wanted = asked if asked is not None else min(self.limits.default_max_tokens, self.max_tokens)
        budget = min(wanted, ctx - len(ids))  # the rest of the context: finish_reason "length"
        try:
            sampler = Sampler.with_defaults(self.engine.folder.generation, req.temperature, req.top_k,
                                            req.top_p, req.repetition_penalty, req.seed)
        except PerseusError as e:
            raise p.APIError(400, str(e)) from None
        job = Job(ids, budget, sampler, on_event=lambda ev: None, stops=stops, ignore_eos=req.ignore_eos)
        echo = text if (not chat and req.echo) else ""
        return job, echo

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, rid: str, chat: bool,
                     echo: str) -> Response:
        """Wait for the whole answer; cancel the job if the client goes away meanwhile."""

        async def collect():
            pieces = []
            while True:
                ev = await events.get()
                if isinstance(ev, Piece):
                    pieces.append(ev.text)
                else:
                    return "".join(pieces), ev

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        answer, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                self.engine.cancel(job)
        if not answer.done() or answer.cancelled():
            return Response(status_code=499)  # nobody is listening
        text, ev = answer.result()
        if isinstance(ev, Failed):
            return self.error(p.APIError(500, ev.message, "server_error"))
        use = p.usage(ev.prompt_tokens, ev.completion_tokens)
        created = p.timestamp()
        if chat:
            return JSONResponse(p.chat(rid, self.model_name, created, text.lstrip(" "), ev.finish_reason, use))
        return JSONResponse(p.completion(rid, self.model_name, created, echo + text, ev.finish_reason, use))

    async def _sse(self, job: Job, events: asyncio.Queue, rid: str, chat: bool, include_usage: bool,
                   echo: str) -> AsyncIterator[str]:
        """Server-sent events; a disconnect cancels this generator, and with it the job."""
        name, created = self.model_name, p.timestamp()

        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        strip = chat  # the reply after "Assistant:" starts with a space
        try:
            if chat:
                yield sse(p.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, None))
            elif echo:
                yield sse(p.completion(rid, name, created, echo, None, chunk=True))
            while True:
                ev = await events.get()
                if isinstance(ev, Piece):
                    text = ev.text.lstrip(" ") if strip else ev.text
                    if not text:
                        continue
                    strip = False
                    yield sse(p.chat_chunk(rid, name, created, {"content": text}, None) if chat
                              else p.completion(rid, name, created, text, None, chunk=True))
                elif isinstance(ev, Done):
                    yield sse(p.chat_chunk(rid, name, created, {}, ev.finish_reason) if chat
                              else p.completion(rid, name, created, "", ev.finish_reason, chunk=True))
                    if include_usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield sse(p.usage_chunk(rid, name, created, obj,
                                                p.usage(ev.prompt_tokens, ev.completion_tokens)))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield sse(p.APIError(500, ev.message, "server_error").body())
                    return
        finally:
            if not job.cancelled:
                self.engine.cancel(job)  # a no-op for a finished job; frees the slot of a live one
