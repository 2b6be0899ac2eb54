"""The serving layer: turns validated OpenAI requests into engine requests and engine output into OpenAI
responses (whole or streamed as server-sent events). Routes stay thin; the engine knows nothing of HTTP.

`n` choices and multiple prompts fan out into one engine request each (the engine batches them together);
their outputs are merged back by choice index. A client that disconnects cancels every engine request it
caused, whether it was streaming or waiting for a whole response.

Chat requests with `tools` are rendered with them by the chat template; the answer is parsed back into
`tool_calls` in the template's format (tunelab.server.tools). `tool_choice` "required" or a named function,
and `response_format` json_object/json_schema, are enforced by the engine's constrained decoding. A streamed
answer that may be a tool call is held back until it is known; a call is then sent as OpenAI's tool-call
deltas (id, name, then the arguments).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunelab.engine.types import (
    EngineError,
    GenerationEvent,
    GenerationRequest,
    GenerationStream,
    InferenceEngine,
    SamplingParams,
)
from tunelab.server.errors import APIError
from tunelab.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    _GenerationFields,
)
from tunelab.server.settings import ServerSettings
from tunelab.server.tools import (
    ParsedCall,
    ToolPlan,
    check_tools,
    may_be_call,
    parse_tool_calls,
    plan_tools,
    response_constraint,
)

T = TypeVar("T")
_DONE = object()


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client goes away first; then cancel it and return None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    return None


async def _merge(streams: list[GenerationStream]) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    """Interleave several streams' events as they come, tagged with the stream's index."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(i: int, s: GenerationStream) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except BaseException as e:  # handed to the consumer, who re-raises it
            await queue.put(e)
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for s in streams:
            s.cancel()
        for t in tasks:
            t.cancel()


@dataclass
class _ToolParsing:
    """Per choice, the tool format to parse its answer with (None: plain text), and the declared names."""

    formats: list[Any]
    names: set[str]

    def start(self) -> list[str | None]:
        """Held-back text per choice: "" while the answer may still be a tool call, None once it is text."""
        return ["" if f is not None else None for f in self.formats]


def _call_deltas(index: int, call: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's streamed shape of one tool call: id, type and name first, then the arguments."""
    fn = call["function"]
    return [
        {"role": "assistant", "tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                              "function": {"name": fn["name"], "arguments": ""}}]} if index == 0
        else {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                              "function": {"name": fn["name"], "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]},
    ]


def _template_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    """An assistant message's tool call as templates want it: arguments as an object; 400 when malformed."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, f"{param}.function must be an object with a name", param=f"{param}.function",
                       code="invalid_value")
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        args = None
    if not isinstance(args, dict):
        raise APIError(400, f"{param}.function.arguments must be a string holding a JSON object",
                       param=f"{param}.function.arguments", code="invalid_value")
    return {"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIServing:
    """Owns the request -> engine -> response conversions for chat and text completions."""

    def __init__(self, engine: InferenceEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings

    # ------------------------------------------------------------------ models
    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=m.id, created=m.created, owned_by=m.owned_by, parent=m.parent, max_model_len=m.max_model_len)
                for m in self.engine.list_models()
            ]
        )

    # ------------------------------------------------------------------ shared checks
    def _sampling(self, req: _GenerationFields, max_tokens: int | None) -> SamplingParams:
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"{bad} is not supported by this server", param=bad, code="unsupported_parameter")
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {limit}",
                           param="max_tokens", code="invalid_value")
        if req.n > self.settings.max_n:
            raise APIError(400, f"n is {req.n}, above this server's limit of {self.settings.max_n}",
                           param="n", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens or min(self.settings.default_max_tokens, limit),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_list(),
            fit_to_context=max_tokens is None,
        )

    async def _submit(self, requests: list[GenerationRequest]) -> list[GenerationStream]:
        streams: list[GenerationStream] = []
        try:
            for r in requests:
                streams.append(await self.engine.submit(r))
        except EngineError as e:
            for s in streams:
                s.cancel()
            raise APIError.from_engine(e) from e
        return streams

    @staticmethod
    def _seeded(sp: SamplingParams, i: int) -> SamplingParams:
        # Choices of one request must differ when sampling, yet repeat for a repeated seed.
        if sp.seed is None or i == 0:
            return sp
        return dataclasses.replace(sp, seed=sp.seed + i)

    # ------------------------------------------------------------------ chat
    @staticmethod
    def _tool_plan(req: ChatCompletionRequest) -> ToolPlan:
        legacy = req.functions is not None and req.tools is None
        tools = check_tools(req.tools, req.functions) if req.tools is not None or req.functions is not None else []
        if legacy:
            return plan_tools(tools, req.function_call, req.parallel_tool_calls, "function_call")
        return plan_tools(tools, req.tool_choice, req.parallel_tool_calls)

    @staticmethod
    def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
        """The request's messages as a chat template reads them (tool-call arguments as objects)."""
        out: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                d["tool_calls"] = [_template_call(c, f"messages[{i}].tool_calls[{j}]")
                                   for j, c in enumerate(m.tool_calls)]
            out.append(d)
        return out

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        sp = self._sampling(req, req.max_completion_tokens or req.max_tokens)
        plan = self._tool_plan(req)
        fmt_constraint = response_constraint(req.response_format)
        if fmt_constraint is not None and plan.constraint is not None:
            raise APIError(400, "response_format cannot be combined with a forced tool call (tool_choice "
                           "required or a named function)", param="response_format", code="invalid_value")
        constraint = plan.constraint or fmt_constraint
        if constraint is not None:
            sp = dataclasses.replace(sp, constraint=constraint)
        messages = self._template_messages(req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gens = [GenerationRequest(req.model, self._seeded(sp, i), messages=messages, request_id=f"{rid}-{i}",
                                  tools=plan.tools)
                for i in range(req.n)]
        streams = await self._submit(gens)
        prompt_tokens = streams[0].prompt_tokens
        names = {t["function"]["name"] for t in plan.tools or []}
        parse = [s.tool_format if plan.parse and names else None for s in streams]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, streams, rid, req.model, "chat", prompt_tokens, include_usage,
                                      _ToolParsing(parse, names))
        choices = await self._collect(request, streams)
        if choices is None:
            return Response(status_code=499)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(c.tokens for c in choices),
                      total_tokens=prompt_tokens + sum(c.tokens for c in choices))
        out: list[ChatChoice] = []
        for i, c in enumerate(choices):
            content: str | None = "".join(c.text)
            fmt = parse[i]
            calls: list[ParsedCall] = []
            if fmt is not None and content:
                content, calls = parse_tool_calls(content, fmt, names)
            message = AssistantMessage(content=content, tool_calls=[k.to_json() for k in calls] or None)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            out.append(ChatChoice(index=i, message=message, finish_reason=finish))
        body = ChatCompletionResponse(id=rid, model=req.model, usage=usage, choices=out)
        return JSONResponse(body.model_dump(mode="json"))

    # ------------------------------------------------------------------ completions
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        sp = self._sampling(req, req.max_tokens)
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if len(prompts) > self.settings.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts, above this server's limit of {self.settings.max_prompts}",
                           param="prompt", code="invalid_value")
        rid = f"cmpl-{uuid.uuid4().hex}"
        # OpenAI's numbering: choice index = prompt index * n + choice number.
        gens = [GenerationRequest(req.model, self._seeded(sp, j), prompt=p, request_id=f"{rid}-{i * req.n + j}")
                for i, p in enumerate(prompts) for j in range(req.n)]
        streams = await self._submit(gens)
        prompt_tokens = sum(streams[i * req.n].prompt_tokens for i in range(len(prompts)))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, streams, rid, req.model, "text", prompt_tokens, include_usage)
        choices = await self._collect(request, streams)
        if choices is None:
            return Response(status_code=499)
        completion_tokens = sum(c.tokens for c in choices)
        body = CompletionResponse(
            id=rid, model=req.model,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
            choices=[CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason)
                     for i, c in enumerate(choices)],
        )
        return JSONResponse(body.model_dump(mode="json"))

    # ------------------------------------------------------------------ whole responses
    async def _collect(self, request: Request, streams: list[GenerationStream]) -> list[_Choice] | None:
        choices = [_Choice() for _ in streams]

        async def run() -> list[_Choice]:
            async for i, ev in _merge(streams):
                choices[i].text.append(ev.text)
                choices[i].tokens = ev.completion_tokens
                if ev.finish_reason:
                    choices[i].finish_reason = ev.finish_reason
            return choices

        try:
            return await _until_disconnect(request, run())
        except EngineError as e:
            raise APIError.from_engine(e) from e

    # ------------------------------------------------------------------ streaming
    async def _stream(
        self, request: Request, streams: list[GenerationStream], rid: str, model: str, kind: str,
        prompt_tokens: int, include_usage: bool, tools: _ToolParsing | None = None,
    ) -> Response:
        created = int(time.time())
        merged = _merge(streams)
        # Wait for the first piece before sending headers, so an adapter that fails to load still gets a
        # proper HTTP error status instead of an error inside a 200 stream.
        try:
            first = await _until_disconnect(request, merged.__anext__())
        except StopAsyncIteration:
            first = None
        except EngineError as e:
            await merged.aclose()
            raise APIError.from_engine(e) from e
        if first is None and await request.is_disconnected():
            await merged.aclose()
            return Response(status_code=499)

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            data: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage.model_dump() if usage else None
            return _sse(data)

        def piece(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "text":
                return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}

        async def events() -> AsyncIterator[str]:
            tokens = [0] * len(streams)
            try:
                if kind == "chat":
                    for i in range(len(streams)):
                        yield chunk([piece(i, "", None, role=True)])
                pending = [first] if first is not None else []
                async def items() -> AsyncIterator[tuple[int, GenerationEvent]]:
                    for it in pending:
                        yield it
                    async for it in merged:
                        yield it
                held = tools.start() if tools is not None else None
                async for i, ev in items():
                    tokens[i] = ev.completion_tokens
                    text = ev.text
                    finish: str | None = ev.finish_reason
                    if held is not None and tools is not None and held[i] is not None:
                        held[i] = (held[i] or "") + text
                        fmt = tools.formats[i]
                        assert fmt is not None
                        if finish:
                            content, calls = parse_tool_calls(held[i] or "", fmt, tools.names)
                            for k, call in enumerate(calls):
                                for delta in _call_deltas(k, call.to_json()):
                                    yield chunk([{"index": i, "delta": delta, "finish_reason": None, "logprobs": None}])
                            text = content or ""
                            finish = "tool_calls" if calls and finish == "stop" else finish
                        elif may_be_call(held[i] or "", fmt):
                            continue
                        else:
                            text = held[i] or ""
                        held[i] = None
                    if text:
                        yield chunk([piece(i, text, None)])
                    if finish:
                        yield chunk([piece(i, None if kind == "chat" else "", finish)])
                if include_usage:
                    done = sum(tokens)
                    yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                          total_tokens=prompt_tokens + done))
            except EngineError as e:
                yield _sse(APIError.from_engine(e).body())
            finally:
                await merged.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

