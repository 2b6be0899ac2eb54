"""`Generator`: a base model, run folder or adapter folder loaded for generation in this process, for
`tunelab generate`/`chat` and library users. A thin wrapper over the engine's synchronous batch sampler
(`tunelab.engine.sync`), so its greedy text is the server's and `tunelab eval`'s for the same prompt:
same chat template rendering, same end-of-turn stop rule, same decoding. Sampling options are the API's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunelab.data.records import Conversation, Message
from tunelab.data.templates import with_system_prompt
from tunelab.engine.sync import Completion, chat_prompt_ids, sample
from tunelab.engine.types import SamplingParams
from tunelab.errors import TunelabError


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    description: str
    system_prompt: str | None = None
    """Added to conversations that have no system message: a run's own `data.system_prompt`, as in training
    and `tunelab eval`."""

    @classmethod
    def load(cls, target: str, merge: bool = False, dtype: str = "auto") -> Generator:
        from tunelab.model.adapters import load_for_inference, read_run_config

        model, tok, desc = load_for_inference(target, dtype=dtype, merge=merge)
        system = None
        p = Path(target)
        if (p / "config.yaml").is_file():
            data = read_run_config(p).get("data")
            system = data.get("system_prompt") if isinstance(data, dict) else None
        return cls(model, tok, desc, system if isinstance(system, str) and system else None)

    def prompt_ids(self, messages: Sequence[dict[str, Any]], system: str | None = None) -> list[int]:
        """The conversation as the model sees it: the system prompt added if it has none, then the chat
        template with the generation prompt."""
        try:
            msgs = [Message(str(m["role"]), str(m["content"])) for m in messages]
        except KeyError as e:
            raise TunelabError(f"a message has no {e.args[0]!r} field", 2) from None
        conv = with_system_prompt(Conversation(tuple(msgs)), system if system is not None else self.system_prompt)
        return chat_prompt_ids(self.tokenizer, [m.template_dict() for m in conv])

    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        *,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        max_batch_size: int = 32,
    ) -> list[Completion]:
        """One completion per conversation, batched; options as the OpenAI API's (temperature 0 = greedy)."""
        _check_sampling(max_tokens, temperature, top_p)
        params = SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop))
        return sample(self.model, self.tokenizer, [self.prompt_ids(c, system) for c in conversations], params,
                      max_batch_size=max_batch_size)

    def chat(self, messages: Sequence[dict[str, Any]], **options: Any) -> str:
        """The reply to one conversation (options as for `generate`)."""
        return self.generate([messages], **options)[0].text


def _check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    if max_tokens < 1:
        raise TunelabError(f"max_tokens must be at least 1, got {max_tokens}", 2)
    if not 0 <= temperature <= 2:
        raise TunelabError(f"temperature must be between 0 and 2, got {temperature}", 2)
    if not 0 < top_p <= 1:
        raise TunelabError(f"top_p must be in (0, 1], got {top_p}", 2)


class LocalChatClient:
    """The slice of the `openai` client that the judge and synth use (`client.chat.completions.create(...)`),
    answered in this process by a `Generator`: `base_url: local` points them at a local model (base name or
    run folder in `model`) without starting a server; same engine, same stop rule."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, *, model: str, messages: list[dict[str, Any]], temperature: float = 1.0,
                max_tokens: int | None = None, top_p: float = 1.0, seed: int | None = None,
                stop: str | list[str] | None = None, **_ignored: Any) -> Any:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        (out,) = self.generator.generate([messages], max_tokens=max_tokens or 256, temperature=temperature,
                                         top_p=top_p, seed=seed, stop=stops)
        message = SimpleNamespace(role="assistant", content=out.text)
        return SimpleNamespace(model=model, choices=[SimpleNamespace(index=0, message=message,
                                                                     finish_reason=out.finish_reason)])
