"""The HTTP face of `adactl serve`: an OpenAI-compatible subset on FastAPI.

    POST /v1/chat/completions   chat messages -> text, streamed (server-sent events) or not
    POST /v1/completions        a prompt (text or token ids) -> text, streamed or not
    GET  /v1/models             the one model served
    GET  /health                200 while the engine loop runs
    GET  /metrics               Prometheus text format (adactl.server.metrics)

adactl's extras are optional request fields: `ttft_slo_ms` and `tpot_slo_ms` (service goals,
`SLO`), `consumption_rate` and `unit` (how the client reads the stream, `Stream`: units per
second, "token" | "word" | "sentence"; the first unit is due `ttft_slo_ms` after arrival, 1 s
if not given), and vLLM's `ignore_eos` and `priority` (lower first, for a priority policy such
as `vllm-v1-priority`; carried in `SLO.priority`). Responses carry an `adactl` object with the
request's stream units and misses as the server accounted them.

Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input (what was wrong, for that request alone), 429 with `Retry-After` when the queue is full,
503 when the server is not serving. Headers go out with the first token, so a request that
cannot start is told so with a status code, never left hanging.

Non-goals: several models, `n` > 1, log-probabilities, tools, images.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from adactl.runtime.models import chat_ids
from adactl.runtime.stream import Stream
from adactl.runtime.types import SLO, RequestResult, SamplingParams

from .service import Client, EngineService
from .text import TextStream

Number = StrictFloat | StrictInt
FINISH_REASONS = {"eos": "stop", "length": "length", "context": "length", "cancelled": "abort"}


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
            self.status, "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Generation(BaseModel):
    """Fields both endpoints take (OpenAI's, then adactl's)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(gt=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    logprobs: Literal[False, None] = None
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] = 0
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] = 0
    ignore_eos: StrictBool = False
    priority: StrictInt = 0
    ttft_slo_ms: Annotated[Number, Field(gt=0)] | None = None
    tpot_slo_ms: Annotated[Number, Field(gt=0)] | None = None
    consumption_rate: Annotated[Number, Field(gt=0, allow_inf_nan=False)] | None = None
    unit: Literal["token", "word", "sentence"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(gt=0)] | None = None


class CompletionRequest(_Generation):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)]
    echo: Literal[False] = False


# ------------------------------------------------------------------- the app
class OpenAIServer:
    """Routes requests to one `EngineService`; builds the FastAPI app (`self.app`)."""

    def __init__(self, service: EngineService, tokenizer: Any, model_name: str, max_context: int) -> None:
        if tokenizer is None:
            raise ValueError("adactl serve needs the model's tokenizer (text in, text out)")
        self.service, self.tokenizer = service, tokenizer
        self.model_name, self.max_context = model_name, max_context
        self.created = int(time.time())
        self.app = self._build()

    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.service.start()
            yield
            self.service.stop()

        app = FastAPI(title="adactl serve", lifespan=lifespan)
        app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(ApiError, lambda request, e: e.response())  # type: ignore[arg-type, return-value]
        app.post("/v1/chat/completions", response_model=None)(self.chat)
        app.post("/v1/completions", response_model=None)(self.completions)
        app.get("/v1/models")(self.models)
        app.get("/health", response_model=None)(self.health)
        app.get("/metrics")(self.metrics)
        return app

    async def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "adactl",
            "max_model_len": self.max_context,
        }
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        if self.service.alive:
            return JSONResponse({"status": "ok"})
        return ApiError(503, "the engine loop is not running").response()

    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = chat_ids(self.tokenizer, messages)
        except ValueError as e:  # no chat template, or one that refuses these messages
            raise ApiError(400, f"the chat template cannot format these messages: {e}", "messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._generate(body, request, prompt, max_tokens, arrival, chat=True)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        self._check_model(body.model)
        prompt = list(self.tokenizer(body.prompt)["input_ids"]) if isinstance(body.prompt, str) else body.prompt
        return await self._generate(body, request, prompt, body.max_tokens, arrival, chat=False)

    # --------------------------------------------------------------- helpers
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}", "model")

    def _params(self, body: _Generation, prompt_len: int, max_tokens: int | None) -> tuple[SamplingParams, Any, Any]:
        room = self.max_context - prompt_len
        if room <= 0:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens but the model's context holds "
                f"{self.max_context}: shorten the prompt",
                "messages",
            )
        if max_tokens is not None and max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens = {max_tokens} is beyond the context: the model holds {self.max_context} "
                f"tokens and the prompt has {prompt_len}, so at most {room} can be generated",
                "max_tokens",
            )
        if body.unit is not None and body.consumption_rate is None:
            raise ApiError(400, "unit needs consumption_rate (units per second the client reads)", "unit")
        sampling = SamplingParams(
            max_tokens if max_tokens is not None else room,
            float(body.temperature),
            float(body.top_p),
            not body.ignore_eos,
            body.seed,
        )
        ttft_s = body.ttft_slo_ms / 1000 if body.ttft_slo_ms is not None else None
        tpot_s = body.tpot_slo_ms / 1000 if body.tpot_slo_ms is not None else None
        goals = ttft_s is not None or tpot_s is not None or body.priority != 0
        slo = SLO(ttft_s, tpot_s, body.priority) if goals else None
        stream = None
        if body.consumption_rate is not None:
            stream = Stream(float(body.consumption_rate), body.unit or "token", ttft_s if ttft_s is not None else 1.0)
        return sampling, slo, stream  # the engine validates them when it adds the request (a 400 if not)

    async def _generate(
        self, body: _Generation, request: Request, prompt: list[int], max_tokens: int | None, arrival: float, chat: bool
    ) -> Response:
        sampling, slo, stream = self._params(body, len(prompt), max_tokens)
        if self.service.overloaded():
            self.service.metrics.rejected("overloaded")
            retry = self.service.retry_after()
            raise ApiError(429, f"the server's queue is full; retry in {retry} s", headers={"Retry-After": str(retry)})
        if not self.service.alive:
            raise ApiError(503, "the engine loop is not running")
        client = Client(asyncio.get_running_loop())
        rid = self.service.submit(client, prompt, sampling, slo, stream, arrival)
        call = _Call(self, client, rid, body, len(prompt), chat)
        try:
            first = await call.first_event(request)
        except BaseException:
            self.service.cancel(rid)
            raise
        if first is None:  # the client left before anything was sent
            self.service.cancel(rid)
            return Response(status_code=499)
        if body.stream:
            return StreamingResponse(
                call.sse(first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await call.whole(first, request)


class _Call:
    """One request's events turned into OpenAI responses."""

    def __init__(self, server: OpenAIServer, client: Client, rid: str, body: _Generation, prompt_len: int, chat: bool):
        self.server, self.client, self.rid, self.body, self.chat = server, client, rid, body, chat
        self.prompt_len = prompt_len
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.text = TextStream(server.tokenizer, stop)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.result: RequestResult | None = None

    async def next_event(self, request: Request | None) -> tuple[Any, ...] | None:
        """The next event; None if `request`'s client disconnected while waiting."""
        while True:
            try:
                return await asyncio.wait_for(self.client.events.get(), 0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None

    async def first_event(self, request: Request) -> tuple[Any, ...] | None:
        """The first event worth answering with (tokens or the end), or raise the refusal."""
        while True:
            event = await self.next_event(request)
            if event is None or event[0] in ("tokens", "done"):
                return event
            if event[0] == "error":
                raise ApiError(400, event[1])
            if event[0] == "rejected":
                raise ApiError(
                    429,
                    f"the request waited {self.server.service.config.max_queue_wait_s:g} s without "
                    f"starting; retry in {event[1]} s",
                    headers={"Retry-After": str(event[1])},
                )

    def apply(self, event: tuple[Any, ...]) -> tuple[str, str | None]:
        """(text to send, finish reason or None) for one event; a stop string cancels the request."""
        if event[0] == "tokens":
            delta = self.text.add(event[1])
            if self.text.stopped:
                self.server.service.cancel(self.rid)
                return delta, "stop"
            return delta, None
        if event[0] == "done":
            self.result = event[1]
            return self.text.finish(), FINISH_REASONS.get(event[1].finish_reason, event[1].finish_reason)
        raise ApiError(500 if event[0] == "error" else 429, str(event[1]))

    def usage(self) -> dict[str, int]:
        n = len(self.text.ids)
        return {"prompt_tokens": self.prompt_len, "completion_tokens": n, "total_tokens": self.prompt_len + n}

    def extras(self) -> dict[str, Any]:
        r = self.result
        if r is None:
            return {}
        ttft = r.first_token_time - r.arrival_time if r.first_token_time is not None else None
        return {
            "adactl": {
                "request_id": self.rid,
                "ttft_s": ttft,
                "stream_units": r.stream_units,
                "stream_misses": r.stream_misses,
            }
        }

    async def whole(self, first: tuple[Any, ...], request: Request) -> Response:
        text, finish = self.apply(first)
        while finish is None:
            event = await self.next_event(request)
            if event is None:
                self.server.service.cancel(self.rid)
                return Response(status_code=499)
            delta, finish = self.apply(event)
            text += delta
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish
        obj = "chat.completion" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.server.model_name,
            "choices": [choice],
            "usage": self.usage(),
            **self.extras(),
        }
        return JSONResponse(body)

    def chunk(self, text: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        data: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.server.model_name,
            "choices": [choice],
        }
        if finish is not None:
            data.update(self.extras())
        return f"data: {json.dumps(data)}\n\n"

    async def sse(self, first: tuple[Any, ...]) -> AsyncIterator[str]:
        finished = False
        try:
            if self.chat:
                yield self.chunk(None, None, role=True)
            event: tuple[Any, ...] | None = first
            while event is not None:
                try:
                    text, finish = self.apply(event)
                except ApiError as e:  # the engine failed mid-stream: say so, then end the stream
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
                    break
                if text or finish is not None:
                    yield self.chunk(text, finish)
                if finish is not None:
                    break
                event = await self.client.events.get()
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                usage: dict[str, Any] = {
                    "id": self.id,
                    "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created,
                    "model": self.server.model_name,
                    "choices": [],
                    "usage": self.usage(),
                }
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished or self.result is None:  # the client left, or a stop string ended it
                self.server.service.cancel(self.rid)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body it cannot parse, as OpenAI's 400 saying what was wrong."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
            continue
        where = ".".join(loc) or "body"
        if where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
            continue
        param = param or where
        parts.append(f"{where}: {err.get('msg')}")
        if len(parts) == 4:
            break
    return ApiError(400, "; ".join(parts) or "invalid request", param).response()
