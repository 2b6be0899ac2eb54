"""`tunelab export --format ollama`: the folder (model.gguf + Modelfile), the Modelfile's SYSTEM, stop tokens and
parameters taken from the run, and its TEMPLATE executed by Go's real text/template (what Ollama runs) on
Ollama's `.Messages` data, compared with the Hugging Face chat template's rendering of the same conversation.
The Go checks skip with the reason where no `go` toolchain is installed (`apt-get install golang-go`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from export_fixtures import DEFAULT_SYSTEM, RUN_SYSTEM, Exported, bpe_tokenizer

from tunelab.errors import TunelabError
from tunelab.export.ollama import chat_shape, go_template, modelfile

GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// The shape Ollama gives a TEMPLATE: .Messages with .Role and .Content.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Any:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go): the TEMPLATE cannot be executed here")
    d = tmp_path_factory.mktemp("gorender")
    (d / "render.go").write_text(GO_RENDER)
    env = {"HOME": str(d), "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"), "PATH": "/usr/bin:/bin",
           "GO111MODULE": "off", "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(d / "render"), str(d / "render.go")], check=True, cwd=d, env=env,
                   timeout=300)

    def render(template: str, messages: list[dict[str, str]]) -> str:
        out = subprocess.run([str(d / "render")], input=json.dumps({"template": template, "messages": messages}),
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout

    return render


def _parse(modelfile_text: str) -> dict[str, Any]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile_text, re.S | re.M)
    params: dict[str, list[str]] = {}
    for k, v in re.findall(r"^PARAMETER (\S+) (.+)$", modelfile_text, re.M):
        params.setdefault(k, []).append(v)
    return {"from": re.findall(r"^FROM (.+)$", modelfile_text, re.M), "template": template and template.group(1),
            "system": system and system.group(1), "params": params}


CONVERSATIONS = [
    [{"role": "user", "content": "echo red cat"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red cat"}, {"role": "user", "content": "?"}],
    [{"role": "user", "content": "multi\nline {{ braces }}"}, {"role": "assistant", "content": "done"}],
]


def _hf(tok: Any, messages: list[dict[str, str]]) -> str:
    # A conversation ending with the assistant is a prefill that Ollama continues: HF's continue_final_message.
    last_asst = messages[-1]["role"] == "assistant"
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=not last_asst,
                                       continue_final_message=last_asst))


def test_folder_and_modelfile_from_the_run(exported: Exported) -> None:
    import gguf

    files = sorted(p.name for p in exported.ollama.iterdir())
    assert files == ["Modelfile", "model.gguf"]
    mf = _parse((exported.ollama / "Modelfile").read_text())
    assert mf["from"] == ["./model.gguf"]
    assert mf["system"] == RUN_SYSTEM  # the run's data.system_prompt, which training added to every example
    # The end-of-turn rule of training and the engine (marker <|im_end|>, also the EOS), once.
    assert mf["params"]["stop"] == ['"<|im_end|>"']
    # The run's recorded decoding: greedy, eval.generation's max_new_tokens (64 in this run) and penalty.
    assert mf["params"]["temperature"] == ["0"]
    assert mf["params"]["num_predict"] == ["64"]
    assert mf["params"]["repeat_penalty"] == ["1.0"]
    assert gguf.GGUFReader(exported.ollama / "model.gguf").fields["general.architecture"].contents() == "llama"


def test_template_renders_like_the_chat_template(exported: Exported, go_render: Any) -> None:
    """Ollama prepends SYSTEM as a system message when a request has none; then the Go TEMPLATE must give the
    exact text the HF chat template gives (which the engine tokenizes)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported.run / "tokenizer")
    mf = _parse((exported.ollama / "Modelfile").read_text())
    for conv in CONVERSATIONS:
        msgs = [{"role": "system", "content": mf["system"]}, *conv]
        assert go_render(mf["template"], msgs) == _hf(tok, msgs)


def test_default_system_message_becomes_system(go_render: Any) -> None:
    tok = bpe_tokenizer()
    text = _parse(modelfile(tok, "model.gguf"))
    assert text["system"] == DEFAULT_SYSTEM  # SmolLM2-style: the template's own default when none is given
    for conv in CONVERSATIONS:
        assert go_render(text["template"], [{"role": "system", "content": DEFAULT_SYSTEM}, *conv]) == _hf(tok, conv)


def test_template_with_a_head_and_no_default_system(go_render: Any) -> None:
    tok = bpe_tokenizer()
    tok.chat_template = (  # Llama 3's shape: BOS once, then header-wrapped turns
        "{{ bos_token }}{% for m in messages %}<|endoftext|>{{ m['role'] }}\n\n{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n\n{% endif %}")
    shape = chat_shape(tok)
    assert shape.head == "<|im_start|>" and shape.default_system == ""
    assert "SYSTEM" not in modelfile(tok, "m.gguf")
    for conv in CONVERSATIONS:
        for msgs in (conv, [{"role": "system", "content": "be brief"}, *conv]):
            assert go_render(go_template(shape), msgs) == _hf(tok, msgs)


def test_position_dependent_templates_are_refused() -> None:
    tok = bpe_tokenizer()
    # Llama 2's shape: the system prompt folded into the first user turn.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ sys }}<</SYS>> {% endif %}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
    with pytest.raises(TunelabError, match="write the Modelfile TEMPLATE by hand|write it by hand"):
        chat_shape(tok)


def test_cli_refuses_a_file_as_ollama_folder(tmp_path: Path, exported: Exported) -> None:
    from tunelab.export import export

    f = tmp_path / "x"
    f.write_text("keep")
    with pytest.raises(TunelabError, match="is a file; --format ollama writes a folder"):
        export(str(exported.run), "ollama", f)
    assert f.read_text() == "keep"
