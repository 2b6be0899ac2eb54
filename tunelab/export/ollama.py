"""An Ollama `Modelfile` for an exported GGUF: TEMPLATE, SYSTEM, stop tokens and decoding parameters.

The TEMPLATE (Go text/template, Ollama's `.Messages` form) is not translated from the Jinja source, which can
be any program; it is read off what the chat template renders, as `tunelab.data.templates.end_of_turn` does:
conversations with sentinel contents are rendered and the text around each sentinel is each role's wrapper.
A template whose wrappers depend on the position of a message (beyond a default system block) cannot be
expressed this way and is refused with a clear error. Stop tokens are the end-of-turn rule training and the
engine use (`end_of_turn(tok)`: the marker and EOS); SYSTEM is the run's `data.system_prompt` (training added it
to every conversation without one), else the template's own default system message; the parameters are the
run's recorded decoding (greedy, `eval.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import _render, end_of_turn
from tunelab.errors import TunelabError

_S, _U, _A, _U2, _D = (f"\u2063TUNELAB-{k}\u2063" for k in ("SYSTEM", "USER", "ASSISTANT", "USER2", "DEFAULT"))


@dataclass(frozen=True)
class ChatShape:
    """The chat template as wrappers: `head` once at the start, then per role `prefix + content + suffix`;
    `generation` opens the assistant's reply; `default_system` is what the template uses when a conversation
    has no system message ("" when it adds none)."""

    head: str
    roles: dict[str, tuple[str, str]]
    generation: str
    default_system: str


def _wrapper(block: str, content: str, what: str) -> tuple[str, str]:
    k = block.find(content)
    if k < 0 or block.count(content) != 1:
        raise TunelabError(f"the chat template does not render the {what} message's content once; "
                           "write the Modelfile TEMPLATE by hand", 2)
    return block[:k], block[k + len(content):]


def _after(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise TunelabError(f"the chat template rewrites earlier turns when a {what} message follows "
                           "(not expressible as an Ollama TEMPLATE); write it by hand", 2)
    return longer[len(shorter):]


def chat_shape(tok: Any) -> ChatShape:
    """Read the role wrappers off the tokenizer's chat template (see the module docstring)."""
    msg = [{"role": "system", "content": _S}, {"role": "user", "content": _U},
           {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}]
    r = [_render(tok, msg[:n]) for n in range(1, 5)]  # s, s+u, s+u+a, s+u+a+u2
    user_pre, user_suf = _wrapper(_after(r[3], r[2], "user"), _U2, "user")
    asst_pre, asst_suf = _wrapper(_after(r[2], r[1], "assistant"), _A, "assistant")
    first_user = _after(r[1], r[0], "user")
    if first_user != user_pre + _U + user_suf:
        raise TunelabError("the chat template wraps the first user message differently from later ones; "
                           "write the Modelfile TEMPLATE by hand", 2)
    sys_head, sys_suf = _wrapper(r[0], _S, "system")
    generation = _after(_render(tok, msg[:2], gen_prompt=True), r[1], "generation prompt")

    # Without a system message: either only a head (the text before the system block), or a default system block.
    no_sys, user_block = _render(tok, [{"role": "user", "content": _U}]), user_pre + _U + user_suf
    if not no_sys.endswith(user_block):
        raise TunelabError("the chat template wraps a user message differently without a system message; "
                           "write the Modelfile TEMPLATE by hand", 2)
    lead = no_sys[: len(no_sys) - len(user_block)]  # what precedes the user block
    if sys_head.startswith(lead):  # no default system message: `lead` is the head
        head, sys_pre, default = lead, sys_head[len(lead):], ""
    elif lead.startswith(sys_head) and lead.endswith(sys_suf) and len(lead) >= len(sys_head) + len(sys_suf):
        # A default system block: SYSTEM carries it, so the template always sees a system message first.
        head, sys_pre = "", sys_head
        default = lead[len(sys_head):len(lead) - len(sys_suf)]
    else:
        raise TunelabError("the chat template adds text without a system message that is not a system block; "
                           "write the Modelfile TEMPLATE by hand", 2)
    roles = {"system": (sys_pre, sys_suf), "user": (user_pre, user_suf), "assistant": (asst_pre, asst_suf)}
    return ChatShape(head, roles, generation, default)


def _lit(text: str) -> str:
    """Literal text inside a Go template: `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(shape: ChatShape) -> str:
    """Ollama's `.Messages` TEMPLATE: each message in its role's wrapper; after a last message that is not the
    assistant's, the generation prompt (a last assistant message is left open, to be continued)."""
    (sp, ss), (up, us), (ap, as_) = (shape.roles[k] for k in ("system", "user", "assistant"))
    # No `{{-` trims: wrappers end in meaningful newlines, and the template has no layout whitespace to drop.
    return (
        f"{_lit(shape.head)}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f'{{{{ if eq .Role "system" }}}}{_lit(sp)}{{{{ .Content }}}}{_lit(ss)}'
        f'{{{{ else if eq .Role "user" }}}}{_lit(up)}{{{{ .Content }}}}{_lit(us)}'
        f'{{{{ else if eq .Role "assistant" }}}}{_lit(ap)}{{{{ .Content }}}}{{{{ if not $last }}}}{_lit(as_)}{{{{ end }}}}'
        "{{ end }}"
        f'{{{{ if and $last (ne .Role "assistant") }}}}{_lit(shape.generation)}{{{{ end }}}}'
        "{{ end }}"
    )


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise TunelabError(f'the {what} contains """, which a Modelfile cannot quote', 2)
    return f'"""{text}"""'


def _param_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stop_strings(tok: Any) -> list[str]:
    """The end-of-turn rule as Ollama stop strings: the marker, then EOS (each once)."""
    eot = end_of_turn(tok)
    stops = [eot.text] if eot.text else []
    for tid in sorted(eot.stop_ids):
        text = tok.convert_ids_to_tokens(int(tid))
        if isinstance(text, str) and text and text not in stops:
            stops.append(text)
    return stops


def modelfile(tok: Any, gguf_name: str, *, system_prompt: str | None = None,
              parameters: dict[str, float | int] | None = None) -> str:
    """The Modelfile text for `gguf_name` (a path relative to the Modelfile)."""
    shape = chat_shape(tok)
    system = system_prompt if system_prompt else shape.default_system
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quoted(go_template(shape), 'chat template')}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    lines.append("")
    lines += [f"PARAMETER stop {_param_str(s)}" for s in stop_strings(tok)]
    lines += [f"PARAMETER {k} {v}" for k, v in (parameters or {}).items()]
    return "\n".join(lines) + "\n"
