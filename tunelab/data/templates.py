"""Render conversations with the tokenizer's chat template and build label masks.

Loss falls on assistant tokens only by default (`train_on`), honouring per-message `weight`, and each trained
assistant turn includes its end-of-turn marker so the fine-tuned model learns to stop. That marker comes from
`end_of_turn(tok)`, derived once per tokenizer from its chat template; generation everywhere (the engine, hence
`tunelab generate`/`eval`/`serve` and RL rollouts) stops on the same marker. The mask is computed
on characters (where each assistant turn sits in the rendered text) and mapped to tokens with the fast
tokenizer's offsets, so it works for any template that renders a conversation prefix as a text prefix.

Tools are rendered by the template itself (`apply_chat_template(..., tools=...)`): assistant tool-call turns are
trained like any assistant turn, tool results (role `tool`) never are. `tool_format(tok)` probes the template
once for how it writes a call (Hermes/Qwen `<tool_call>` JSON or a bare JSON object as Llama 3 does), the
format the server parses and constrains; a template that ignores tools is an error naming it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from tunelab.data.records import Conversation, Message
from tunelab.errors import TunelabError

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (not shifted); IGNORE_INDEX where not trained
    truncated: bool = False
    full_length: int = 0

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def with_system_prompt(conv: Conversation, system_prompt: str | None) -> list[Message]:
    msgs = list(conv.messages)
    if system_prompt and not any(m.role in ("system", "developer") for m in msgs):
        msgs.insert(0, Message("system", system_prompt))
    return msgs


def _render(tok: Any, msgs: list[dict[str, Any]], gen_prompt: bool = False,
            tools: list[dict[str, Any]] | None = None) -> str:
    try:
        out = tok.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=gen_prompt)
    except Exception as e:  # jinja errors: e.g. a template that rejects a role
        raise TunelabError(f"the chat template could not render a conversation: {e}") from e
    return str(out)


@dataclass(frozen=True)
class ToolFormat:
    """How a chat template writes an assistant's tool call. `kind` "hermes": each call is
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Hermes, Qwen); "json": the turn is a bare
    JSON object `{"name": ..., <args_key>: {...}}` (Llama 3.1+ with `"parameters"`)."""

    kind: str
    args_key: str = "arguments"


_PROBE = "tunelab_probe_fn"
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE, "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_tool_cache: weakref.WeakKeyDictionary[Any, ToolFormat | str] = weakref.WeakKeyDictionary()


def template_name(tok: Any) -> str:
    name = getattr(tok, "name_or_path", "") or ""
    return f"the chat template of {name!r}" if name else "this tokenizer's chat template"


def tool_format(tok: Any) -> ToolFormat:
    """The template's tool-call format (probed once per tokenizer); TunelabError naming the template when it
    does not render tool definitions or tool calls."""
    try:
        got = _tool_cache[tok]
    except (KeyError, TypeError):
        got = _probe_tools(tok)
        try:
            _tool_cache[tok] = got
        except TypeError:  # pragma: no cover
            pass
    if isinstance(got, str):
        raise TunelabError(got)
    return got


def _probe_tools(tok: Any) -> ToolFormat | str:
    user = [{"role": "user", "content": "hi"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe", "type": "function", "function": {"name": _PROBE, "arguments": {"x": 1}}}]}
    name = template_name(tok)
    hint = ("use a base whose template supports tool calling (Qwen2.5, Llama 3.1+, Hermes) or give the "
            "tokenizer a tool-aware chat_template")
    if not getattr(tok, "chat_template", None):
        return f"{name} is missing, so it cannot render tools; {hint}"
    try:
        prompt = _render(tok, user, gen_prompt=True, tools=[_PROBE_TOOL])
        full = _render(tok, [*user, call], tools=[_PROBE_TOOL])
    except TunelabError as e:
        return f"{name} cannot render tool calls ({e.__cause__ or e}); {hint}"
    rendered_call = full[len(prompt):] if full.startswith(prompt) else full
    if _PROBE not in prompt or _PROBE not in rendered_call:
        what = "tool definitions" if _PROBE not in prompt else "assistant tool_calls"
        return f"{name} has no tool support: it ignores {what}; {hint}"
    if "<tool_call>" in rendered_call:
        return ToolFormat("hermes")
    return ToolFormat("json", "parameters" if '"parameters"' in rendered_call else "arguments")


def conversation_tools(conv: Conversation) -> list[dict[str, Any]] | None:
    """The tools to render `conv` with; checks the template can when the conversation uses tools at all."""
    return list(conv.tools) if conv.tools else None


def _uses_tools(conv: Conversation) -> bool:
    return bool(conv.tools) or any(m.tool_calls for m in conv.messages)


@dataclass(frozen=True)
class EndOfTurn:
    """What closes an assistant turn under this tokenizer's chat template, and so where generation stops.

    `text` is the marker as rendered (e.g. `<|im_end|>`, `<|eot_id|>`), "" when the template closes a turn with
    nothing; `token_id` is its id when the marker is one token, else None (then `text` is a stop string).
    `stop_ids` are the token ids that end generation: the marker's and the tokenizer's EOS.
    """

    text: str
    token_id: int | None
    stop_ids: frozenset[int]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings generation needs on top of `stop_ids`: a multi-token marker."""
        return (self.text,) if self.text and self.token_id is None else ()


_SENTINEL = "\u2063TUNELAB-END-OF-TURN-PROBE\u2063"
_eot_cache: weakref.WeakKeyDictionary[Any, EndOfTurn] = weakref.WeakKeyDictionary()


def end_of_turn(tok: Any) -> EndOfTurn:
    """Derive the end-of-turn marker from the chat template (cached per tokenizer object).

    Renders a one-exchange conversation with a sentinel as the assistant's reply and reads what the template
    writes after it: the first special token there (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Mistral's
    `</s>`) or, if none, the closing text itself; trailing whitespace is layout, not part of the marker.
    """
    try:
        return _eot_cache[tok]
    except (KeyError, TypeError):
        pass
    eot = _derive_end_of_turn(tok)
    try:
        _eot_cache[tok] = eot
    except TypeError:  # pragma: no cover - an object that cannot be weakly referenced: just recompute
        pass
    return eot


def _derive_end_of_turn(tok: Any) -> EndOfTurn:
    eos = tok.eos_token_id if isinstance(tok.eos_token_id, int) else None
    closing = ""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = _render(tok, msgs)
        k = text.rfind(_SENTINEL)
        closing = text[k + len(_SENTINEL) :] if k >= 0 else ""
    specials = [t for t in dict.fromkeys([*tok.all_special_tokens, *tok.get_added_vocab()]) if t]
    hits = [(closing.find(t), -len(t), t) for t in specials if t in closing]
    if hits:
        pos, _, marker = min(hits)  # the earliest special token, the longest one at a tie
        if not closing[:pos].strip():
            one = int(tok.convert_tokens_to_ids(marker))
            return EndOfTurn(marker, one, frozenset({one} | ({eos} if eos is not None else set())))
    marker = closing.strip()
    if not marker:  # the template writes nothing after a reply: the model is expected to emit EOS
        return EndOfTurn("", None, frozenset({eos} if eos is not None else set()))
    ids = tok(marker, add_special_tokens=False)["input_ids"]
    tid = int(ids[0]) if len(ids) == 1 else None
    stops = ({tid} if tid is not None else set()) | ({eos} if eos is not None else set())
    return EndOfTurn(marker, tid, frozenset(stops))


def _end_of_turn(tok: Any, text: str, start: int, end: int) -> int:
    """Trim a span so it ends right after the end-of-turn marker (the trailing newline is not trained)."""
    marker = end_of_turn(tok).text
    if marker:
        k = text.rfind(marker, start, end)
        if k >= 0:
            return k + len(marker)
    return end


def assistant_spans(tok: Any, msgs: list[Message], train_on: str,
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans [start, end) to train on."""
    dicts = [m.template_dict() for m in msgs]
    full = _render(tok, dicts, tools=tools)
    if train_on == "all":
        return full, [(0, len(full))]
    idx = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    if train_on == "last_assistant":
        idx = idx[-1:]
    idx = [i for i in idx if (w := msgs[i].weight) is None or w > 0]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in idx:
        prefix = _render(tok, dicts[:i], gen_prompt=True, tools=tools) if i > 0 else None
        upto = _render(tok, dicts[: i + 1], tools=tools)
        if prefix is not None and full.startswith(upto) and upto.startswith(prefix):
            start, end = len(prefix), len(upto)
        elif msgs[i].tool_calls:
            raise TunelabError(f"{template_name(tok)} does not render conversations as growing prefixes, so the "
                               "tokens of an assistant tool call cannot be located for the label mask")
        else:
            # Template is not prefix-stable (e.g. it rewrites earlier turns): find the content itself.
            start = full.find(msgs[i].content, cursor)
            if start < 0:
                raise TunelabError("cannot locate an assistant turn in the rendered chat template output")
            end = start + len(msgs[i].content)
            marker = end_of_turn(tok).text
            k = full.find(marker, end) if marker else -1
            end = k + len(marker) if k >= 0 else end
        end = _end_of_turn(tok, full, start, end)
        spans.append((start, end))
        cursor = end
    return full, spans


def encode(
    tok: Any,
    conv: Conversation,
    *,
    train_on: str = "assistant",
    max_len: int | None = None,
    system_prompt: str | None = None,
) -> Encoded:
    msgs = with_system_prompt(conv, system_prompt)
    if _uses_tools(conv):
        tool_format(tok)  # a template without tool support: the error names it, rather than silently dropping tools
    text, spans = assistant_spans(tok, msgs, train_on, conversation_tools(conv))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    si = 0
    for j, (a, b) in enumerate(offsets):
        if b <= a:  # zero-width (some special tokens): attribute to its start position
            b = a + 1
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            labels[j] = ids[j]
    full_len = len(ids)
    truncated = max_len is not None and full_len > max_len
    if truncated:
        assert max_len is not None
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels, truncated, full_len)


def encode_prompt(tok: Any, messages: list[Message], system_prompt: str | None = None,
                  tools: tuple[dict[str, Any], ...] = ()) -> list[int]:
    """Token ids of a prompt ready for generation (ends with the assistant header)."""
    msgs = with_system_prompt(Conversation(tuple(messages)), system_prompt)
    return render_prompt_ids(tok, [m.template_dict() for m in msgs], list(tools) or None)


def render_prompt_ids(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The one way a chat prompt becomes token ids for generation (training's prompts, eval, the server):
    the chat template with the generation prompt (and the tools, rendered by the template), tokenized without
    adding special tokens again."""
    if tools or any(m.get("tool_calls") for m in messages):
        tool_format(tok)
    text = _render(tok, messages, gen_prompt=True, tools=tools)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def preview(tok: Any, conv: Conversation, train_on: str = "assistant", system_prompt: str | None = None) -> Any:
    """A rich Text of the rendered example with trained tokens highlighted."""
    from rich.text import Text

    enc = encode(tok, conv, train_on=train_on, system_prompt=system_prompt)
    out = Text()
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        piece = tok.decode([tid])
        out.append(piece, style="bold green on grey11" if lab != IGNORE_INDEX else "dim")
    return out
