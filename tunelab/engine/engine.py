"""The engine: one base model in memory, many LoRA adapters routed by name, one worker thread batching
whatever requests are waiting into a single forward pass (PEFT's per-row `adapter_names`).

Requests that arrive while a batch runs join it between two tokens (continuous batching). Adapters are
registered (checked against the base, not loaded), loaded on first use and evicted least recently used
beyond `max_loaded_adapters`. Inside PEFT each adapter gets an internal name (`a<uid>`),
so any served name works (PEFT's module dicts forbid dots) and re-registering a name loads fresh weights.
Merged mode folds one adapter into the weights and serves only that adapter's name. No HTTP here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.data.templates import ToolFormat, tool_format
from tunelab.engine import constrained
from tunelab.engine.adapters import (
    AdapterFolder,
    check_fits,
    read_adapter_folder,
    register_new_adapters,
    with_run_system_prompt,
)
from tunelab.engine.batch import EngineStream, Sequence, run_batch
from tunelab.engine.constrained import RowConstraint
from tunelab.engine.sync import chat_prompt_ids, decode, pad_id, stop_rule, with_stop_rule
from tunelab.engine.types import (
    AdapterError,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    ModelNotFoundError,
)
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Adapter:
    name: str
    folder: AdapterFolder
    uid: int
    created: int
    owned_by: str

    @property
    def internal(self) -> str:
        return f"a{self.uid}"


class Engine:
    """Serve `model` (a loaded base) and adapters on it. Start with `Engine(...)`; `close()` stops the worker."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_name: str,
        max_loaded_adapters: int = 8,
        max_batch_size: int = 32,
        mixed_batching: bool = True,
        continuous_batching: bool = True,
        batch_wait_s: float = 0.002,
        adapters_dir: str | Path | None = None,
        max_model_len: int | None = None,
    ) -> None:
        if max_loaded_adapters < 1:
            raise TunelabError("max_loaded_adapters must be at least 1", 2)
        self._base: Any = model.eval()
        self._peft: Any = None
        self._tok = tokenizer
        self._name = base_name
        self.max_loaded_adapters = max_loaded_adapters
        self.max_batch_size = max_batch_size
        self.mixed_batching = mixed_batching
        self.continuous_batching = continuous_batching
        self.batch_wait_s = batch_wait_s
        self._device = next(model.parameters()).device
        self._created = int(time.time())
        cfg = model.config
        self.max_model_len = max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        # The one stop rule (chat template's end-of-turn marker + EOS), shared with tunelab.engine.sync.
        self._stop = stop_rule(tokenizer)
        self._eos = set(self._stop.stop_ids)
        self._pad = pad_id(tokenizer, self._stop)
        self._layer_shapes = _layer_shapes(model)
        self._base_names = {base_name, str(getattr(cfg, "_name_or_path", "")), str(getattr(model, "name_or_path", ""))}
        self._merged: str | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._loaded: OrderedDict[str, int] = OrderedDict()  # served name -> uid, least recently used first
        self._uids = 0
        self._adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.rejected: dict[str, str] = {}  # adapter folder -> why it is not served
        self._lock = threading.RLock()
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._pending: deque[Sequence] = deque()
        self._closed = False
        self._stopping = False  # the worker saw the close sentinel
        self._batch_on_peft = False  # whether the running batch's forward goes through the PEFT model
        self.stats = {"batches": 0, "tokens": 0, "rows": 0, "joined": 0, "adapter_loads": 0,
                      "adapter_evictions": 0, "running": 0, "peak_running": 0}
        self.load_seconds: dict[str, float] = {}
        if self._adapters_dir is not None:
            if self._adapters_dir.exists() and not self._adapters_dir.is_dir():
                raise TunelabError(f"adapters directory {self._adapters_dir} is not a directory", 2)
            # A missing directory is fine: runs that appear there later are picked up on the next look.
            self.refresh()
        self._worker = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype: str = "auto",
        load_in_4bit: bool = False,
        device: str | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        adapters_dir: str | Path | None = None,
        merge: str | None = None,
        served_model_name: str | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Load a base model by any `model:` form (4-bit too) and register adapters; `merge` names one of
        them to fold into the weights."""
        from tunelab.model.loading import load_model

        if device is None and torch.cuda.is_available() and not load_in_4bit:
            device = "cuda"
        base, tok = load_model(model, dtype=dtype, load_in_4bit=load_in_4bit, device=device)
        engine = cls(base, tok, base_name=served_model_name or model, adapters_dir=adapters_dir, **kwargs)
        try:
            for name, path in (adapters or {}).items():
                engine.register_adapter(name, path)
            if merge is not None:
                engine.merge(merge)
        except EngineError as e:
            engine.close()
            raise TunelabError(e.message, 2) from e
        return engine

    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights; from then on only `name` is served. Call before traffic."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise AdapterError(f"--merge {name}: no adapter of that name (known: {sorted(self._adapters) or 'none'})")
            from peft import PeftModel

            merged = PeftModel.from_pretrained(self._base, str(adapter.folder.path), adapter_name=adapter.internal)
            self._base = merged.merge_and_unload().eval()
            self._peft = None
            self._loaded.clear()
            self._adapters = {name: adapter}
            self._adapters_dir = None
            self._merged = name

    # ------------------------------------------------------------------ InferenceEngine
    @property
    def base_model_name(self) -> str:
        return self._name

    def list_models(self) -> list[ModelInfo]:
        self.refresh()
        with self._lock:
            adapters = [ModelInfo(a.name, a.created, a.owned_by, self._name, self.max_model_len)
                        for a in self._adapters.values()]
        if self._merged is not None:
            return adapters
        return [ModelInfo(self._name, self._created, "tunelab", None, self.max_model_len), *adapters]

    def register_adapter(self, name: str, path: str | Path, owned_by: str = "tunelab") -> ModelInfo:
        if not name or any(c.isspace() for c in name):
            raise AdapterError(f"adapter name {name!r} must be non-empty without spaces", param="name")
        if self._merged is not None:
            raise AdapterError(f"this server runs merged adapter {self._merged!r} and serves no other adapter")
        folder = read_adapter_folder(Path(path))
        check_fits(folder, name, self._layer_shapes, self._base_names, self._name)
        with self._lock:
            existing = self._adapters.get(name)
            if name == self._name:
                raise AdapterError(f"{name!r} is the base model's name", param="name")
            if existing is not None:
                if existing.folder.path.resolve() == folder.path.resolve():
                    return self._info(existing)
                raise AdapterError(f"an adapter named {name!r} is already served from {existing.folder.path}",
                                   param="name")
            self._uids += 1
            adapter = _Adapter(name, folder, self._uids, int(time.time()), owned_by)
            self._adapters[name] = adapter
        log.info("registered adapter %r from %s", name, folder.path)
        return self._info(adapter)

    def unregister_adapter(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise ModelNotFoundError(f"no adapter named {name!r}", param="model")
        # Its weights leave the model when the worker next needs room (it is first in line for eviction).

    def refresh(self) -> None:
        """Pick up adapters that appeared in the adapters directory since the last look."""
        if self._adapters_dir is not None:
            register_new_adapters(self._adapters_dir, self._serves, self.register_adapter, self.rejected)

    def _serves(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    async def submit(self, request: GenerationRequest) -> EngineStream:
        if self._closed or not self._worker.is_alive():
            raise EngineUnavailableError("the engine is shutting down")
        adapter = self._route(request.model)
        if adapter is not None and request.messages is not None:
            with self._lock:
                served = self._adapters.get(adapter)
            if served is not None:
                request = dataclasses.replace(request, messages=with_run_system_prompt(
                    request.messages, served.folder.system_prompt))
        ids = self._prompt_ids(request)
        budget = self.max_model_len - len(ids)
        if request.sampling.fit_to_context and budget >= 1 and request.sampling.max_tokens > budget:
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=budget))
        if request.sampling.max_tokens > budget:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens and max_tokens is {request.sampling.max_tokens}: together over "
                f"this model's context of {self.max_model_len} tokens", param="max_tokens")
        req = dataclasses.replace(request, sampling=with_stop_rule(request.sampling, self._stop),
                                  request_id=request.request_id or uuid.uuid4().hex)
        fmt = self._tool_format() if request.tools or (req.sampling.constraint is not None
                                                       and req.sampling.constraint.kind == "tool_call") else None
        seq = Sequence(req, ids, adapter, asyncio.get_running_loop(), asyncio.Queue(),
                       constraint=self._constraint(req, fmt))
        self._inbox.put(seq)
        return EngineStream(seq, len(ids), fmt)

    def health(self) -> dict[str, Any]:
        with self._lock:
            loaded = [n for n in self._loaded if n in self._adapters]
            return {
                "worker_alive": self._worker.is_alive(),
                "merged": self._merged,
                "adapters": len(self._adapters),
                "loaded_adapters": loaded,
                "max_loaded_adapters": self.max_loaded_adapters,
                "queued": self._inbox.qsize() + len(self._pending),
                "rejected_adapters": dict(self.rejected),
                **self.stats,
            }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ request preparation
    def _info(self, a: _Adapter) -> ModelInfo:
        return ModelInfo(a.name, a.created, a.owned_by, self._name, self.max_model_len)

    def _route(self, model: str) -> str | None:
        if self._merged is not None:
            if model == self._merged:
                return None  # folded into the weights: the plain forward is the adapter
            raise ModelNotFoundError(
                f"The model {model!r} does not exist: this server serves only merged adapter {self._merged!r}",
                param="model")
        if model == self._name:
            return None
        if model not in self._adapters:
            self.refresh()
        if model not in self._adapters:
            raise ModelNotFoundError(f"The model {model!r} does not exist", param="model")
        return model

    def _tool_format(self) -> ToolFormat:
        try:
            return tool_format(self._tok)
        except TunelabError as e:
            raise InvalidRequestError(str(e), param="tools", code="tools_not_supported") from e

    def _constraint(self, req: GenerationRequest, fmt: ToolFormat | None) -> RowConstraint | None:
        c = req.sampling.constraint
        if c is None:
            return None
        n_vocab = int(self._base.get_output_embeddings().weight.shape[0])
        try:
            return constrained.build(self._tok, n_vocab, self._eos, c, fmt)
        except constrained.GrammarError as e:
            param = "tool_choice" if c.kind == "tool_call" else "response_format"
            raise InvalidRequestError(f"{param} cannot be enforced: {e}", param=param) from e

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._tok
        if request.messages is not None:
            if request.tools:
                self._tool_format()  # a template that ignores tools is the client's 400, naming the template
            try:
                ids = chat_prompt_ids(tok, request.messages, request.tools)
            except TunelabError as e:  # jinja raises its own errors for messages a template refuses
                raise InvalidRequestError(f"the chat template refused these messages: {e.__cause__ or e}",
                                          param="messages") from e
        elif isinstance(request.prompt, list):
            vocab = self._base.get_input_embeddings().num_embeddings
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in request.prompt):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(request.prompt)
        else:
            ids = list(tok(request.prompt or "")["input_ids"])
        if not ids:
            if tok.bos_token_id is None:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            ids = [tok.bos_token_id]
        return ids

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            if not self._collect():
                break
            batch = self._select()
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    batch = self._ensure_loaded(batch)
                    if not batch:
                        continue
                    self.stats["running"] = len(batch)
                    self.stats["peak_running"] = max(self.stats["peak_running"], len(batch))
                    self._batch_on_peft = self._peft is not None
                    self.stats["batches"] += 1  # counted before running: clients may read stats on their reply
                    self.stats["rows"] += len(batch)
                    with self._context(batch):
                        made = run_batch(self._peft or self._base, batch, forward_kwargs=self._forward_kwargs,
                                         decode=self._decode, eos_ids=self._eos, pad_id=self._pad,
                                         device=self._device,
                                         admit=self._admit if self.continuous_batching else None)
                self.stats["tokens"] += made
            except Exception as e:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for seq in batch:
                    if not seq.done:
                        seq.push(EngineError(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.stats["running"] = 0
        for seq in self._pending:
            seq.push(EngineUnavailableError("the engine shut down before this request ran"))

    def _collect(self) -> bool:
        """Move arrivals from the inbox to the pending queue; block while idle. False once closed."""
        if self._stopping:
            return False
        if not self._pending:
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                return not self._closed
            if item is None:
                self._stopping = True
                return False
            self._pending.append(item)
            if self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # requests sent together arrive a moment apart: let them join
        self._drain()
        return not self._stopping

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._stopping = True
                return
            self._pending.append(item)

    def _admit(self, running: list[Sequence]) -> list[Sequence]:
        """Between two tokens of a running batch: the waiting sequences that may join it now."""
        self._drain()
        if self._stopping or not self._pending or not running:
            return []  # an emptied batch ends: the next one starts afresh (its own adapter context)
        # A batch that started before any adapter was loaded runs on the bare model object: loading one
        # now would patch its layers for every row, so only base requests may join it.
        joiners = self._select(running, adapters_ok=self._batch_on_peft)
        if not joiners:
            return []
        joiners = self._ensure_loaded(joiners, keep={s.adapter for s in running if s.adapter is not None})
        self.stats["rows"] += len(joiners)
        self.stats["joined"] += len(joiners)
        self.stats["running"] = len(running) + len(joiners)
        self.stats["peak_running"] = max(self.stats["peak_running"], self.stats["running"])
        return joiners

    def _select(self, running: list[Sequence] | None = None, adapters_ok: bool = True) -> list[Sequence]:
        """Take the next batch from pending, oldest first, within the batch size and the adapter budget;
        with `running` rows, the sequences that can join them."""
        running = running or []
        with self._lock:
            known = set(self._adapters)
        batch: list[Sequence] = []
        names: set[str] = {s.adapter for s in running if s.adapter is not None}
        rest: deque[Sequence] = deque()
        first: Sequence | None = running[0] if running else None
        capacity = self.max_batch_size - len(running)
        for seq in self._pending:
            if seq.cancelled.is_set():
                continue
            if seq.adapter is not None and seq.adapter not in known:
                seq.push(ModelNotFoundError(f"adapter {seq.adapter!r} was removed", param="model"))
                continue
            if first is None:
                first = seq
            fits = len(batch) < capacity and (adapters_ok or seq.adapter is None)
            if not self.mixed_batching or self._needs_own_batch(first.adapter):
                fits = fits and seq.adapter == first.adapter
            elif self._needs_own_batch(seq.adapter):
                fits = False
            elif seq.adapter is not None and seq.adapter not in names:
                fits = fits and len(names) < self.max_loaded_adapters
            if fits:
                batch.append(seq)
                if seq.adapter is not None:
                    names.add(seq.adapter)
            else:
                rest.append(seq)
        self._pending = rest
        return batch

    def _needs_own_batch(self, adapter: str | None) -> bool:
        # PEFT's mixed-batch forward does not support DoRA: such adapters run in batches of their own.
        a = self._adapters.get(adapter) if adapter is not None else None
        return a is not None and a.folder.use_dora

    def _ensure_loaded(self, batch: list[Sequence], keep: set[str] | None = None) -> list[Sequence]:
        """Load the batch's adapters (evicting least recently used ones, never those in `keep`); fail the
        requests whose adapter breaks."""
        wanted = [n for n in dict.fromkeys(s.adapter for s in batch) if n is not None]
        with self._lock:
            adapters = {n: self._adapters[n] for n in wanted if n in self._adapters}
        failed: dict[str, EngineError] = {}
        for name in wanted:
            a = adapters.get(name)
            if a is None:
                failed[name] = ModelNotFoundError(f"adapter {name!r} was removed", param="model")
            elif self._loaded.get(name) == a.uid:
                with self._lock:
                    self._loaded.move_to_end(name)
            else:
                try:
                    self._load(a)
                except Exception as e:
                    log.warning("adapter %r failed to load: %s", name, e)
                    failed[name] = EngineError(f"adapter {name!r} could not be loaded from {a.folder.path}: {e}",
                                               code="adapter_load_failed")
        self._evict(keep=set(wanted) | (keep or set()))
        if not failed:
            return batch
        for seq in batch:
            if seq.adapter in failed:
                seq.push(failed[seq.adapter])
        return [s for s in batch if s.adapter not in failed]

    def _load(self, a: _Adapter) -> None:
        from peft import PeftModel

        start = time.perf_counter()
        self._drop(a.name)  # a re-registered name: its old weights go first
        path = str(a.folder.path)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=a.internal, is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(path, adapter_name=a.internal, is_trainable=False)
        except Exception:
            if self._peft is not None and a.internal in self._peft.peft_config:
                self._peft.delete_adapter(a.internal)  # leave no half-loaded adapter behind
            raise
        with self._lock:
            self._loaded[a.name] = a.uid
        self.stats["adapter_loads"] += 1
        self.load_seconds[a.name] = time.perf_counter() - start

    def _evict(self, keep: set[str]) -> None:
        with self._lock:
            stale = [n for n, uid in self._loaded.items()
                     if n not in self._adapters or self._adapters[n].uid != uid]
        for name in stale:
            if name not in keep and len(self._loaded) > 1:
                self._drop(name)
        for name in list(self._loaded):
            if len(self._loaded) <= self.max_loaded_adapters:
                break
            if name not in keep:
                self._drop(name)
                self.stats["adapter_evictions"] += 1

    def _drop(self, name: str) -> None:
        uid = self._loaded.get(name)
        if uid is None:
            return
        if self._peft is not None and f"a{uid}" in self._peft.peft_config:
            self._peft.delete_adapter(f"a{uid}")
        with self._lock:
            self._loaded.pop(name, None)

    def _internal(self, adapter: str | None) -> str:
        if adapter is None:
            return "__base__"
        return f"a{self._loaded[adapter]}"

    def _forward_kwargs(self, rows: list[Sequence]) -> dict[str, Any]:
        if self._peft is None or not self.mixed_batching or self._needs_own_batch(rows[0].adapter):
            return {}
        return {"adapter_names": [self._internal(s.adapter) for s in rows]}

    def _context(self, batch: list[Sequence]) -> Any:
        """For a one-adapter batch (no mixing): activate that adapter, or switch adapters off for the base."""
        if self._peft is None or (self.mixed_batching and not self._needs_own_batch(batch[0].adapter)):
            return nullcontext()
        if batch[0].adapter is None:
            return self._peft.disable_adapter()
        self._peft.set_adapter(self._internal(batch[0].adapter))
        return nullcontext()

    def _decode(self, ids: list[int]) -> str:
        return decode(self._tok, ids)


def _layer_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Base module name -> (in, out) size, for every layer a LoRA adapter could patch."""
    from transformers.pytorch_utils import Conv1D

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            shapes[name] = (module.num_embeddings, module.embedding_dim)
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes[name] = (int(module.in_features), int(module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            shapes[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
    return shapes
