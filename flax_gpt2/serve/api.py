"""The HTTP layer (Starlette): `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus, `serve.metrics`; like /health, it needs no API key).

Handlers validate, tokenize (in a worker thread) and queue the request on the engine, then wait on an
asyncio queue that the engine thread fills: nothing here waits for the device. Errors are OpenAI-shaped
JSON (`protocol.APIError`); a full queue is a 503 with `Retry-After`; a client that goes away (a closed
stream, or a dropped connection while waiting) cancels its request, whose slots the engine frees at the
next step. A body that is not UTF-8 JSON, nested too deeply, or holds a string that is not Unicode text
(a lone surrogate escape) is a 400; one that does not arrive in time a 408.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flax_gpt2.serve import protocol
from flax_gpt2.serve.engine import Engine
from flax_gpt2.serve.metrics import CONTENT_TYPE, CountResponses, RequestClock, ServerMetrics
from flax_gpt2.serve.protocol import APIError, bad_request, check_api_key
from flax_gpt2.serve.requests import Completion, Event, QueueFull, TokenLogprob

log = logging.getLogger("flax_gpt2.serve")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int, timeout_s: float = 30.0) -> Any:
    """The request body as JSON: 413 over `max_bytes`, 408 when it has not all arrived within `timeout_s`
    (a client that trickles its body must not hold the connection), 400 for bytes that are not UTF-8 JSON,
    for JSON nested too deeply to parse, and for strings that are not Unicode text."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body ({declared} bytes) exceeds this server's limit of {max_bytes} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"the request body exceeds this server's limit of {max_bytes} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (this server's "
                            f"--body_timeout); send it at once", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection before sending its whole body",
                       code="client_closed_request") from None
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                          code="invalid_encoding") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
        # Every string must be encodable: JSON's "\ud800" escape decodes to a lone UTF-16 surrogate, which
        # neither the tokenizer nor a response can encode. (One C-speed pass; it also bounds the nesting.)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply; a completions request nests at most 3 levels",
                          code="invalid_json") from None
    except UnicodeEncodeError as e:
        raise bad_request(f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}) in a "
                          f"string; strings must be valid Unicode (escape both halves of a surrogate pair, or "
                          f"send the text as UTF-8)", code="invalid_encoding") from None
    except ValueError as e:
        raise bad_request(f"We could not parse the JSON body of your request. ({e})", code="invalid_json") from None
    return body


class _Choices:
    """Collects the events of a non-streaming request into its choices."""

    def __init__(self, count: int):
        self.text = [[] for _ in range(count)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.tokens = [0] * count

    def add(self, event: Event) -> None:
        for c in event.choices:
            self.text[c].append(event.text)
            self.logprobs[c].extend(event.logprobs)
            if event.finish_reason is not None:
                self.finish[c] = event.finish_reason
                self.tokens[c] = event.completion_tokens

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)


def logprobs_object(records: list[TokenLogprob]) -> dict:
    return {"tokens": [r.token for r in records], "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [r.top for r in records], "text_offset": [r.offset for r in records]}


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               body_timeout_s: float = 30.0, retry_after_s: int = 1,
               draining: Callable[[], bool] = lambda: False) -> Starlette:
    """The ASGI app serving `engine` (already warmed up and started) as the model `model_name`.

    `api_key` (printable ASCII, see `check_api_key`) is compared in constant time; a request body must
    arrive within `body_timeout_s` seconds. While `draining()` (a shutdown in progress), new completions
    get 503 `shutting_down` and /health answers 503 `{"status": "draining"}`, so a load balancer moves
    on, while running requests finish. The engine's LoRA adapters are served beside the model under their
    names (`/v1/models` lists them with `"parent": model_name`); a request's `model` picks one."""
    if api_key is not None:
        check_api_key(api_key)
    names = (model_name, *engine.adapter_names)
    if len(set(names)) < len(names):
        raise ValueError(f"the model and its adapters need distinct names, got {list(names)}")
    created = int(time.time())
    metrics = ServerMetrics(lambda: engine.stats)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    async def health(request: Request) -> Response:
        stats = engine.stats
        if draining():
            return JSONResponse({"status": "draining", "model": model_name, **vars(stats)}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name, "adapters": list(engine.adapter_names),
                             "max_batch": engine.max_batch,
                             "context_length": engine.context_length,
                             "prompt_buckets": engine.buckets, **vars(stats)})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse(protocol.model_list(names, created))

    async def model(request: Request) -> Response:
        check_key(request)
        name = request.path_params["name"]
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return JSONResponse(protocol.model_list(names, created)["data"][names.index(name)])

    def prepare(req: protocol.CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompt_ids = [engine.encode(p) for p in req.prompts]
        for i, ids in enumerate(prompt_ids):
            if len(ids) + req.max_tokens > engine.context_length:
                raise protocol.context_error(len(ids), req.max_tokens, engine.context_length,
                                             i if len(prompt_ids) > 1 else None)
        echo = [p if isinstance(p, str) else engine.decode(ids) for p, ids in zip(req.prompts, prompt_ids)] \
            if req.echo else [""] * len(prompt_ids)
        return prompt_ids, echo

    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        check_key(request)
        if draining():
            raise APIError(503, "the server is shutting down; send new requests to another replica",
                           code="shutting_down", headers={"Connection": "close"})
        body = await read_json(request, max_body_bytes, body_timeout_s)
        # Prompt token ids must be ids the tokenizer can decode (not a padded model vocabulary's extra ones).
        req = protocol.parse_completion_request(body, vocab_size=engine.vocab_limit, model_names=names)
        prompt_ids, echo = await run_in_threadpool(prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

        completion = Completion(req, prompt_ids, echo, deliver, adapter=names.index(req.model))
        try:
            engine.submit(completion)
        except QueueFull:
            raise APIError(503, "The server is overloaded (its queue is full); retry after a moment.",
                           code="overloaded", headers={"Retry-After": str(retry_after_s)}) from None
        id_ = protocol.completion_id()
        now = int(time.time())
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        metrics.prompt_tokens.inc(prompt_tokens)
        clock = RequestClock(metrics, arrived)
        count = len(prompt_ids) * req.n
        if req.stream:
            return StreamingResponse(_stream(completion, events, id_, now, count, prompt_tokens, clock),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = _Choices(count)
        try:
            while not choices.done:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        completion.cancel()
                        return Response(status_code=499)
                    continue
                if event.error is not None:
                    raise event.error
                clock.delivered()
                choices.add(event)
        finally:
            if not choices.done:
                completion.cancel()
        out = [{"text": "".join(choices.text[c]), "index": c,
                "logprobs": logprobs_object(choices.logprobs[c]) if req.logprobs is not None else None,
                "finish_reason": choices.finish[c]} for c in range(count)]
        return JSONResponse(protocol.completion_object(id_, req.model, now, out,
                                                       protocol.usage(prompt_tokens, sum(choices.tokens))))

    async def _stream(completion: Completion, events: asyncio.Queue, id_: str, created: int, count: int,
                      prompt_tokens: int, clock: RequestClock):
        req = completion.request
        finished, completion_tokens = 0, 0
        extra = {"usage": None} if req.include_usage else {}
        try:
            while finished < count:
                event = await events.get()
                if event.error is not None:
                    yield f"data: {json.dumps(event.error.body())}\n\n"
                    break
                clock.delivered()
                for c in event.choices:
                    choice = {"text": event.text, "index": c,
                              "logprobs": logprobs_object(event.logprobs) if req.logprobs is not None else None,
                              "finish_reason": event.finish_reason}
                    chunk = protocol.completion_object(id_, req.model, created, [choice], None)
                    yield f"data: {json.dumps({**chunk, **extra}, ensure_ascii=False)}\n\n"
                    if event.finish_reason is not None:
                        finished += 1
                        completion_tokens += event.completion_tokens
            else:
                if req.include_usage:
                    chunk = protocol.completion_object(id_, req.model, created, [],
                                                       protocol.usage(prompt_tokens, completion_tokens))
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if finished < count:
                completion.cancel()  # the client went away (or an error): free the slots

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"Unknown request URL: {request.method} {request.url.path}.",
                   405: f"Method {request.method} is not allowed for {request.url.path}."}.get(exc.status_code,
                                                                                             str(exc.detail))
        return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                        Exception: on_error},
                     middleware=[Middleware(CountResponses, metrics=metrics)])
