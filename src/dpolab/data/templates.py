"""Prompt templates. Training, evaluation and the app format prompts through these functions only.

`qa` (the original study's format), precisely:
    each earlier user turn      -> "Q: {content}\n"
    each earlier assistant turn -> "A: {content}\n"
    the prompt ends with        -> "Q: {last user turn}\nA:"
    a response is rendered as   -> " {response, stripped}"   (then EOS is appended as a token)
`raw`: the prompt text and the response exactly as in the source (HH: "...\n\nAssistant:" + " response").
`chat`: the tokenizer's chat template, prompt with the generation prompt, response = the rest of the rendered
conversation (it carries the template's own end-of-turn token).
"""

from __future__ import annotations

from collections.abc import Sequence

from dpolab.data.shapes import Drop, Pair, Unpaired

TEMPLATES = ("qa", "raw", "chat")
Messages = Sequence[tuple[str, str]]


def qa_prompt(messages: Messages) -> str:
    lines = []
    for role, content in messages:
        if role == "system":
            continue
        lines.append(f"{'Q' if role == 'user' else 'A'}: {content.strip()}\n")
    return "".join(lines) + "A:"


def _chat(messages: Messages) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def format_prompt(messages: Messages, template: str, tokenizer=None, prompt_text: str | None = None) -> str:
    """The prompt string exactly as the model saw it in training."""
    if template == "qa":
        return qa_prompt(messages)
    if template == "raw":
        if prompt_text is not None:
            return prompt_text
        return "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in messages if r != "system") + "\n\nAssistant:"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use --template qa or raw")
        return tokenizer.apply_chat_template(_chat(messages), add_generation_prompt=True, tokenize=False)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def format_response(response: str, template: str, messages: Messages = (), prompt: str = "", tokenizer=None) -> str:
    if template == "qa":
        return " " + response.strip()
    if template == "raw":
        return response
    full = tokenizer.apply_chat_template(_chat([*messages, ("assistant", response.strip())]), tokenize=False)
    if not full.startswith(prompt):
        raise Drop("template_mismatch", "the chat template renders the prompt differently inside the conversation")
    return full[len(prompt) :]


def render(pair: Pair, template: str, tokenizer=None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text for one pair."""
    prompt = format_prompt(pair.messages, template, tokenizer, pair.prompt_text)
    chosen = format_response(pair.chosen, template, pair.messages, prompt, tokenizer)
    rejected = format_response(pair.rejected, template, pair.messages, prompt, tokenizer)
    return prompt, chosen, rejected


def render_unpaired(row: Unpaired, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, completion) text for one unpaired row: the prompt as a pair's, the completion as a response."""
    prompt = format_prompt(row.messages, template, tokenizer, row.prompt_text)
    return prompt, format_response(row.completion, template, row.messages, prompt, tokenizer)
