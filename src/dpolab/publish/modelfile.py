"""The training prompt format for local runtimes: a Jinja chat template for the GGUF file (llama.cpp, LM Studio,
transformers) and a Go template for Ollama's Modelfile.

Design: a runtime must build exactly the prompt string `dpolab.data.templates.format_prompt` built in training, or the
model sees a format it was never tuned on. `qa` and `raw` are dpolab's own formats, so their Jinja is written here
(tests render it on 100 real HH conversations against `format_prompt`); `chat` is the tokenizer's own chat template,
copied verbatim. Ollama speaks Go templates, not Jinja: qa and raw get hand-written equivalents, chat gets one only
when the tokenizer's template is ChatML (checked by rendering probe conversations), else the Modelfile leaves
TEMPLATE out and Ollama falls back to the template it recognises in the GGUF metadata. Measured: the Jinja renders
100/100 HH conversations like format_prompt in transformers (tests) and in llama.cpp's own Jinja engine (bench); the
Go templates do the same in Go's text/template (tests/test_gguf.py, where a Go toolchain is installed). One known
gap: Go templates have no strip, so a qa turn typed with leading/trailing spaces keeps them in Ollama.
"""

from __future__ import annotations

from dpolab.generation import GenerationSettings

# format_prompt("qa"): earlier turns as "Q: …\n" / "A: …\n" (content stripped, system turns dropped), then "A:".
# Jinja's `trim` is Python's str.strip(), so jinja2 (transformers) renders exactly qa_prompt.
QA_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'Q: ' + (message['content'] | trim) + '\\n' }}"
    "{%- elif message['role'] != 'system' -%}{{ 'A: ' + (message['content'] | trim) + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)
# format_prompt("raw") without source text: "\n\nHuman: …" / "\n\nAssistant: …" turns, then "\n\nAssistant:".
RAW_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] != 'system' -%}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)
# Go templates cannot strip strings (Ollama adds no such function): content goes in as typed.
QA_GO = ('{{- range .Messages }}{{ if eq .Role "user" }}Q: {{ .Content }}\n'
         '{{ else if ne .Role "system" }}A: {{ .Content }}\n{{ end }}{{ end }}A:')
RAW_GO = ('{{- range .Messages }}{{ if eq .Role "user" }}\n\nHuman: {{ .Content }}'
          '{{ else if ne .Role "system" }}\n\nAssistant: {{ .Content }}{{ end }}{{ end }}\n\nAssistant:')
CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
             '<|im_start|>assistant\n')


def jinja_template(template: str, chat_template: str | None) -> str:
    """The Jinja chat template that renders the training prompt of `template` (qa, raw or chat)."""
    if template == "qa":
        return QA_JINJA
    if template == "raw":
        return RAW_JINJA
    if template == "chat" and chat_template:
        return chat_template
    raise ValueError(f"no Jinja equivalent for template {template!r}" + (" (the tokenizer has no chat template)"
                                                                         if template == "chat" else ""))


def _chatml(messages: list[dict[str, str]], system: str | None) -> str:
    turns = ([{"role": "system", "content": system}] if system is not None and messages[0]["role"] != "system"
             else []) + messages
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns) + "<|im_start|>assistant\n"


def chatml_system(render) -> tuple[bool, str | None]:
    """(is ChatML, default system prompt) for a chat template, told by `render(messages)` on probe conversations.

    `render` renders with add_generation_prompt=True. The default system prompt is what the template adds when the
    conversation has none (SmolLM2 adds one)."""
    plain = render([{"role": "user", "content": "Hi"}])
    head, sep, _ = plain.partition("<|im_end|>\n")
    system = head.removeprefix("<|im_start|>system\n") if head.startswith("<|im_start|>system\n") and sep else None
    probes = [[{"role": "user", "content": "Hi"}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}],
              [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
    try:
        ok = all(render(p) == _chatml(p, system) for p in probes)
    except Exception:  # a template that cannot render a probe is no ChatML we can vouch for
        ok = False
    return ok, system if ok else None


def go_template(template: str, render=None) -> str | None:
    """Ollama's TEMPLATE for the training format, or None when there is no exact Go equivalent (chat, not ChatML)."""
    if template == "qa":
        return QA_GO
    if template == "raw":
        return RAW_GO
    is_chatml, system = chatml_system(render) if render is not None else (False, None)
    if not is_chatml:
        return None
    if system is None:
        return CHATML_GO
    default = system.replace("{{", "{{ `{{` }}")  # the default system text is literal, never template code
    return ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
            f"{default}<|im_end|>\n{{{{ end }}}}" + CHATML_GO)


def modelfile_text(gguf_name: str, template: str, stops: list[str], context: int | None, render=None,
                   settings: GenerationSettings = GenerationSettings()) -> str:
    """An Ollama Modelfile beside `gguf_name`: FROM, TEMPLATE, stop tokens and the app's generation defaults.

    Ollama's repeat_penalty looks back 64 tokens (repeat_last_n) where transformers' repetition_penalty looks at the
    whole sequence; the value is the app's, the window is Ollama's."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile && ollama run NAME   (dpolab template: {template})",
             f"FROM ./{gguf_name}"]
    go = go_template(template, render)
    if go is None:
        lines.append("# No exact Go template for this chat template: Ollama uses the one it recognises in the GGUF.")
    else:
        lines.append(f'TEMPLATE """{go}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops) if stop and '"' not in stop]
    lines += [f"PARAMETER temperature {settings.temperature}", f"PARAMETER top_p {settings.top_p}",
              f"PARAMETER top_k {settings.top_k}", f"PARAMETER repeat_penalty {settings.repetition_penalty}",
              f"PARAMETER num_predict {settings.max_new_tokens}", f"PARAMETER seed {settings.seed}"]
    if context:
        lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"
