"""`VllmEngine`: the `InferenceEngine` seam with vLLM doing the generation, for `tunelab serve --engine vllm`.

Our FastAPI app (auth, owners, the jobs API, adapter naming) stays in front; behind it, vLLM's own OpenAI
server runs in a child process (`tunelab.engine.vllm_process`) and is reached over 127.0.0.1 only. This module
keeps what makes the two engines answer alike: prompts are rendered and tokenized here, with the same chat
template and stop rule (`tunelab.engine.sync`) as our engine, and sent to vLLM as token ids with the stop token
ids spelled out, so a greedy request gets the same tokens from either engine. Adapters become vLLM
`LoRARequest`s through its runtime `/v1/load_lora_adapter` (under internal names, so any served name works
and re-registering a name loads fresh weights), when the CLI, `--adapters-dir` or a finished job adds them.
No torch here: the tokenizer is all this process loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tunelab.data.templates import ToolFormat
from tunelab.engine.adapters import (
    AdapterFolder,
    check_fits,
    read_adapter_folder,
    register_new_adapters,
    safetensors_shapes,
    with_run_system_prompt,
)
from tunelab.engine.sync import chat_prompt_ids, stop_rule, with_stop_rule
from tunelab.engine.types import (
    AdapterError,
    EngineError,
    EngineUnavailableError,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    ModelNotFoundError,
)
from tunelab.engine.vllm_process import VllmProcess, find_vllm_python
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

# Our dtype names -> vLLM's. `auto` is resolved like our engine resolves it, so both run the same precision.
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class _Adapter:
    name: str
    folder: AdapterFolder
    internal: str  # the LoRA's name inside vLLM
    created: int
    owned_by: str
    rank: int


class VllmStream:
    """One request's output, read from vLLM's server-sent events (one per generated token)."""

    def __init__(self, engine: VllmEngine, response: httpx.Response, request_id: str, prompt_tokens: int) -> None:
        self._engine = engine
        self._response = response
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.tool_format: ToolFormat | None = None  # tools are refused at submit (see below)
        self.logprobs: list[float] = []
        self._cancelled = False
        self._finished = False

    def cancel(self) -> None:
        """Stop generating: closing the connection makes vLLM abort the request."""
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        try:
            asyncio.get_running_loop().create_task(self._response.aclose())
        except RuntimeError:  # no loop here: the iterator's finally closes it
            pass

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        self._engine._running += 1
        tokens = 0
        try:
            async for line in self._response.aiter_lines():
                if self._cancelled:
                    return
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineError(f"vLLM: {_message(chunk)}")
                usage = chunk.get("usage") or {}
                for choice in chunk.get("choices") or []:
                    tokens = int(usage.get("completion_tokens") or tokens + 1)
                    lp = (choice.get("logprobs") or {}).get("token_logprobs")
                    if lp:
                        self.logprobs.extend(float(x) for x in lp if x is not None)
                    reason = choice.get("finish_reason")
                    text = choice.get("text") or ""
                    if reason:
                        self._finished = True
                        self._engine._tokens += tokens
                        yield GenerationEvent(text, tokens, _finish(reason))
                        return
                    if text:
                        yield GenerationEvent(text, tokens)
            if not self._cancelled:
                raise EngineUnavailableError("vLLM ended the stream before the sequence finished")
        except (httpx.HTTPError, httpx.StreamError) as e:  # StreamClosed: cancel() closed it under us
            if not self._cancelled:
                raise EngineUnavailableError(f"lost the connection to vLLM: {e}") from e
        finally:
            self._engine._running -= 1
            self._engine._tokens += 0 if self._finished else tokens
            await self._response.aclose()


class VllmEngine:
    """Serve `model` and LoRA adapters on it with vLLM in a child process. `close()` stops that process."""

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        python: str | Path | None = None,
        served_model_name: str | None = None,
        dtype: str = "auto",
        adapters: Mapping[str, str | Path] | None = None,
        adapters_dir: str | Path | None = None,
        max_loaded_adapters: int = 8,
        max_batch_size: int = 32,
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
        kv_cache_gib: float = 2.0,
        gpu_memory_utilization: float | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 900,
    ) -> None:
        from tunelab.model.loading import load_tokenizer, resolve_model

        if max_loaded_adapters < 1:
            raise TunelabError("max_loaded_adapters must be at least 1", 2)
        vllm_python = find_vllm_python(python)
        resolved = resolve_model(model)
        self._tok = load_tokenizer(resolved)
        self._name = served_model_name or model
        self._created = int(time.time())
        self._model_path = resolved.path
        config = _read_json(Path(resolved.path) / "config.json")
        self.max_model_len = max_model_len or int(config.get("max_position_embeddings") or 2048)
        self.max_lora_rank = max_lora_rank
        self.max_loaded_adapters = max_loaded_adapters
        self._stop = stop_rule(self._tok)
        self._vocab = len(self._tok)
        self._layer_shapes = _layer_shapes(Path(resolved.path))
        self._base_names = {self._name, model, resolved.path, str(config.get("_name_or_path", ""))}
        self._adapters: dict[str, _Adapter] = {}
        self._uids = 0
        self._lock = threading.RLock()
        self._adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.rejected: dict[str, str] = {}
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())
        self._closed = False
        self._running = 0
        self._requests = 0
        self._tokens = 0
        args = ["--model", resolved.path, "--served-model-name", self._name, "--dtype", self._vllm_dtype(dtype),
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(max_batch_size),
                "--enable-lora", "--max-loras", str(max_loaded_adapters), "--max-lora-rank", str(max_lora_rank),
                "--max-cpu-loras", str(max(max_loaded_adapters, 64)), "--generation-config", "vllm",
                "--disable-uvicorn-access-log"]
        if gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        log.info("starting vLLM (%s) on %s", vllm_python, resolved.path)
        self._proc = VllmProcess(vllm_python, [*args, *extra_args], env=env, startup_timeout=startup_timeout)
        self._http = httpx.Client(base_url=self._proc.url, headers=self._proc.headers, timeout=300)
        self.log_path = self._proc.log_path
        self.vllm_version = self._version()
        try:
            for name, path in (adapters or {}).items():
                self.register_adapter(name, path)
            self.refresh()
        except EngineError as e:
            self.close()
            raise TunelabError(e.message, 2) from e

    @staticmethod
    def _vllm_dtype(dtype: str) -> str:
        if dtype == "auto":
            from tunelab.model.loading import bf16_supported

            return "bfloat16" if bf16_supported() else "float32"
        if dtype not in _DTYPES:
            raise TunelabError(f"unknown dtype {dtype!r} (expected auto, bf16, fp16 or fp32)", 2)
        return _DTYPES[dtype]

    # ------------------------------------------------------------------ InferenceEngine
    @property
    def base_model_name(self) -> str:
        return self._name

    def list_models(self) -> list[ModelInfo]:
        self.refresh()
        with self._lock:
            adapters = [self._info(a) for a in self._adapters.values()]
        return [ModelInfo(self._name, self._created, "tunelab", None, self.max_model_len), *adapters]

    def register_adapter(self, name: str, path: str | Path, owned_by: str = "tunelab") -> ModelInfo:
        if not name or any(c.isspace() for c in name):
            raise AdapterError(f"adapter name {name!r} must be non-empty without spaces", param="name")
        if name == self._name:
            raise AdapterError(f"{name!r} is the base model's name", param="name")
        folder = read_adapter_folder(Path(path))
        if self._layer_shapes:
            check_fits(folder, name, self._layer_shapes, self._base_names, self._name)
        rank = _rank(folder)
        if rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r} ({folder.path}) has LoRA rank {rank}, above this server's "
                               f"--max-lora-rank {self.max_lora_rank}")
        with self._lock:
            existing = self._adapters.get(name)
            if existing is not None:
                if existing.folder.path.resolve() == folder.path.resolve():
                    return self._info(existing)
                raise AdapterError(f"an adapter named {name!r} is already served from {existing.folder.path}",
                                   param="name")
            self._uids += 1
            internal = f"a{self._uids}"
        r = self._post("/v1/load_lora_adapter", {"lora_name": internal, "lora_path": str(folder.path.resolve())})
        if r.status_code != 200:
            raise AdapterError(f"adapter {name!r} ({folder.path}): vLLM refused it: {_message(r)}")
        adapter = _Adapter(name, folder, internal, int(time.time()), owned_by, rank)
        with self._lock:
            self._adapters[name] = adapter
        log.info("registered adapter %r from %s as vLLM LoRA %s", name, folder.path, internal)
        return self._info(adapter)

    def unregister_adapter(self, name: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise ModelNotFoundError(f"no adapter named {name!r}", param="model")
        r = self._post("/v1/unload_lora_adapter", {"lora_name": adapter.internal})
        if r.status_code != 200:
            log.warning("vLLM did not unload %s (%s): %s", name, adapter.internal, _message(r))

    def refresh(self) -> None:
        """Pick up adapters that appeared in the adapters directory since the last look."""
        if self._adapters_dir is not None:
            register_new_adapters(self._adapters_dir, self._serves, self.register_adapter, self.rejected)

    def _serves(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    async def submit(self, request: GenerationRequest) -> VllmStream:
        if self._closed or not self._proc.alive():
            raise EngineUnavailableError("the vLLM engine is not running")
        target = self._route(request.model)
        if request.messages is not None and request.model != self._name:
            with self._lock:
                served = self._adapters.get(request.model)
            if served is not None:
                request = dataclasses.replace(request, messages=with_run_system_prompt(
                    request.messages, served.folder.system_prompt))
        # Tools and constrained decoding are our engine's (tunelab/engine/constrained.py, server/tools.py); this
        # engine sends vLLM plain token ids, so it refuses them rather than silently ignore them.
        if request.tools:
            raise InvalidRequestError("tools are not supported with `--engine vllm` yet (use the tunelab engine)",
                                      param="tools", code="tools_not_supported")
        if request.sampling.constraint is not None:
            param = "tool_choice" if request.sampling.constraint.kind == "tool_call" else "response_format"
            raise InvalidRequestError(f"{param} is not supported with `--engine vllm` yet (use the tunelab engine)",
                                      param=param)
        ids = self._prompt_ids(request)
        sp = request.sampling
        budget = self.max_model_len - len(ids)
        if sp.fit_to_context and budget >= 1 and sp.max_tokens > budget:
            sp = dataclasses.replace(sp, max_tokens=budget)
        if sp.max_tokens > budget:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens and max_tokens is {sp.max_tokens}: together over "
                f"this model's context of {self.max_model_len} tokens", param="max_tokens")
        sp = with_stop_rule(sp, self._stop)
        body: dict[str, Any] = {
            "model": target, "prompt": ids, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
            "top_p": sp.top_p, "top_k": sp.top_k if sp.top_k > 0 else -1,
            "repetition_penalty": sp.repetition_penalty, "stop": list(sp.stop),
            "stop_token_ids": sorted(self._stop.stop_ids), "skip_special_tokens": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.logprobs:
            body["logprobs"] = 0
        rid = request.request_id or uuid.uuid4().hex
        client = self._client()
        try:
            response = await client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"cannot reach vLLM: {e}") from e
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            cls = InvalidRequestError if response.status_code in (400, 422) else EngineError
            if response.status_code == 404:
                raise ModelNotFoundError(f"The model {request.model!r} does not exist", param="model")
            raise cls(f"vLLM: {_message(response)}")
        self._requests += 1
        return VllmStream(self, response, rid, len(ids))

    def health(self) -> dict[str, Any]:
        with self._lock:
            names = sorted(self._adapters)
        return {"engine": "vllm", "worker_alive": self._proc.alive(), "merged": None, "adapters": len(names),
                "loaded_adapters": names, "max_loaded_adapters": self.max_loaded_adapters,
                "running": self._running, "requests": self._requests, "tokens": self._tokens,
                "rejected_adapters": dict(self.rejected)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._http.close()
        self._proc.stop()

    # ------------------------------------------------------------------ helpers
    def _info(self, a: _Adapter) -> ModelInfo:
        return ModelInfo(a.name, a.created, a.owned_by, self._name, self.max_model_len)

    def _route(self, model: str) -> str:
        if model == self._name:
            return self._name
        with self._lock:
            adapter = self._adapters.get(model)
        if adapter is None:
            self.refresh()
            with self._lock:
                adapter = self._adapters.get(model)
        if adapter is None:
            raise ModelNotFoundError(f"The model {model!r} does not exist", param="model")
        return adapter.internal

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._tok
        if request.messages is not None:
            try:
                ids = chat_prompt_ids(tok, request.messages)
            except TunelabError as e:
                raise InvalidRequestError(f"the chat template refused these messages: {e.__cause__ or e}",
                                          param="messages") from e
        elif isinstance(request.prompt, list):
            if any(not isinstance(t, int) or t < 0 or t >= self._vocab for t in request.prompt):
                raise InvalidRequestError(f"prompt token ids must be in [0, {self._vocab})", param="prompt")
            ids = list(request.prompt)
        else:
            ids = list(tok(request.prompt or "")["input_ids"])
        if not ids:
            if tok.bos_token_id is None:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            ids = [tok.bos_token_id]
        return ids

    def _client(self) -> httpx.AsyncClient:
        # An httpx connection pool belongs to one event loop: one client per loop that submits.
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
            client = httpx.AsyncClient(base_url=self._proc.url, headers=self._proc.headers, limits=limits,
                                       timeout=httpx.Timeout(30, read=None))
            self._clients[loop] = client
        return client

    def _version(self) -> str:
        try:
            return str(self._http.get("/version").json().get("version", "?"))
        except (httpx.HTTPError, ValueError, AttributeError):
            return "?"

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        if self._closed or not self._proc.alive():
            raise EngineUnavailableError("the vLLM engine is not running")
        try:
            return self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"cannot reach vLLM: {e}") from e


def _finish(reason: str) -> FinishReason:
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    raise EngineError(f"vLLM ended the sequence: {reason}")


def _message(r: httpx.Response | dict[str, Any]) -> str:
    """The message of a vLLM error body ({"error": {"message": ...}} or {"message": ...}), else its text."""
    try:
        body = r if isinstance(r, dict) else r.json()
    except ValueError:
        return r.text[:500] if isinstance(r, httpx.Response) else str(r)
    err = body.get("error", body) if isinstance(body, dict) else body
    msg = err.get("message") if isinstance(err, dict) else err
    return str(msg or body)[:500]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rank(folder: AdapterFolder) -> int:
    ranks = [int(folder.config.get("r") or 8)]
    ranks += [int(v) for v in (folder.config.get("rank_pattern") or {}).values()]
    return max(ranks)


def _layer_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every 2-D weight in the base's safetensors headers (torch-free, for
    check_fits); empty when the base is a hub id or has no safetensors (vLLM then checks the adapter)."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    shapes: dict[str, tuple[int, int]] = {}
    for f in files:
        try:
            tensors = safetensors_shapes(f)
        except AdapterError:
            return {}
        for key, shape in tensors.items():
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            module = key.removesuffix(".weight")
            # nn.Linear stores (out, in); an embedding (num_embeddings, dim), which check_fits reads as (in, out).
            shapes[module] = (shape[0], shape[1]) if "embed" in module else (shape[1], shape[0])
    return shapes


__all__ = ["VllmEngine", "VllmStream"]
