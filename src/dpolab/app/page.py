"""The chat page, run by Streamlit (`dpolab app` launches it). UI only: model names resolve through
`dpolab.folders.run`/`dpolab.models`, prompts and tokens come from `dpolab.generation`, as in training and evaluation.

Options arrive as Streamlit passes them, in `sys.argv` after `--` ([page, MODEL, --compare BASE, --max-batch N, --runs-dir DIR]);
tests set `sys.argv` the same way.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from dpolab import EMBEDDED_MODEL
from dpolab.folders.info import RunInfo, load_run_info
from dpolab.generation import GenerationSettings, build_prompt, context_limit
from dpolab.models import load_model, load_tokenizer
from dpolab.serving import DEFAULT_MAX_BATCH, DecodeEngine, Ended, Queued, Request, Text

EXAMPLES = ("What is the purpose of life?", "How to live a healthy life?", "How do I make good tea?",
            "Tips for a job interview?")
DEFAULTS = GenerationSettings()
FIX_HINT = ("Run `make demo` to train the demo run, or pass a model folder: `dpolab app runs/NAME` "
            f"(a run, a sweep's folder, an exported model folder, or `{EMBEDDED_MODEL}`).")
ICON = Path(__file__).resolve().parents[1] / "resources" / "chat-icon.png"
CURSOR = " ▌"
EMPTY = "_(empty answer: the model ended at once)_"


# ---------------------------------------------------------------------------------------------------------- options
def parse_page_args(argv: list[str]) -> argparse.Namespace:
    """The server's options (the studio's, shared with this page when it runs as the studio's Chat page)."""
    from dpolab.app.common import parse_args

    return parse_args(argv)


def find_runs(runs_dir: Path) -> list[str]:
    """Runs and sweeps under `runs_dir` that hold a model, newest first, named `<runs_dir as given>/<name>`."""
    from dpolab.folders.catalog import model_folders

    return [str(path) for path in model_folders(runs_dir)]


# ----------------------------------------------------------------------------------------------------------- models
@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    engine: DecodeEngine  # batches the answers of everyone asking this model at once


def release(loaded: Loaded) -> None:
    loaded.engine.close()  # its worker threads hold the model: let both go


@st.cache_resource(show_spinner="Loading the model…", max_entries=4, on_release=release)
def load(resolved: str, max_batch: int = DEFAULT_MAX_BATCH) -> Loaded:
    """Once per process and model (keyed by the resolved folder/Hub id); shared by every browser session. An entry
    pushed out by a fifth model, or cleared, closes its engine."""
    model = load_model(resolved).eval()
    tokenizer = load_tokenizer(resolved)
    return Loaded(model, tokenizer, DecodeEngine(model, tokenizer, max_batch=max_batch))


class ModelProblem(Exception):
    pass


def open_model(name: str, max_batch: int = DEFAULT_MAX_BATCH) -> tuple[RunInfo, Loaded]:
    path = Path(name).expanduser()
    # `runs/typo` would otherwise be taken for a Hub id and fail with a confusing network error.
    if not path.exists() and path.parent != Path(".") and path.parent.is_dir():
        raise ModelProblem(f"no folder `{path.name}` in `{path.parent}`")
    try:
        info = load_run_info(name)
        if info.method == "reward":  # a score head: nothing to chat with (the CLI refuses it before serving)
            raise ModelProblem("a reward model (method reward) scores answers and cannot generate any")
        return info, load(info.model, max_batch)
    except Exception as exc:  # every failure becomes a message on the page, never a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelProblem(message) from exc


def show_problem(role: str, name: str, problem: ModelProblem) -> None:
    st.error(f"**Cannot load the {role}model `{name}`:** {problem}\n\n{FIX_HINT}", icon=":material/error:")


# ------------------------------------------------------------------------------------------------------- generation
def truncation_notice(loaded: Loaded, settings: GenerationSettings) -> None:
    st.warning(f"The conversation no longer fits the model's context of {context_limit(loaded.model)} tokens with "
               f"{settings.max_new_tokens} kept for the answer, so its oldest part was left out. *Clear chat* to start "
               "afresh, or lower *Max new tokens*.", icon=":material/content_cut:")


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def waiting_text(queued: Queued | None, since: float) -> str:
    """What an answer without text yet says: its place in line, or that the model is reading the prompt."""
    if queued is None:
        return f"reading the prompt… {time.monotonic() - since:.0f} s"
    eta = "" if queued.eta_s is None else f", about {max(queued.eta_s, 1):.0f} s"
    return f"waiting for the model: {ordinal(queued.position)} in line{eta} (others are being answered)"


def ending_note(reason: str | None, max_new_tokens: int) -> str | None:
    """The caption under a finished answer when the model did not end it itself."""
    if reason == "length":
        return f":material/more_horiz: cut at the limit of {max_new_tokens} new tokens (*Max new tokens*)"
    if reason == "stopped":
        return ":material/stop_circle: stopped"
    return None


def timing_note(timing: dict | None) -> str | None:
    if not timing or not timing.get("tokens"):
        return None
    rate = timing["tokens"] / max(timing["total_s"] - (timing["first_s"] or 0), 1e-3)
    return f"{timing['tokens']} tokens · first text after {timing['first_s']:.1f} s · {rate:.0f} tokens/s"


@dataclass
class Stream:
    """One answer streaming into one slot of the page."""

    request: Request
    slot: Any  # an st.empty()
    sink: list[str]
    started: float = field(default_factory=time.monotonic)
    queued: Queued | None = None
    first_text: float | None = None
    finished: float | None = None
    ended: Ended | None = None
    drawn: float = 0.0

    def timing(self) -> dict:
        end = self.finished or time.monotonic()
        return {"first_s": None if self.first_text is None else round(self.first_text - self.started, 2),
                "total_s": round(end - self.started, 2), "tokens": len(self.request.generated)}

    def take(self) -> bool:
        """Apply the events that have arrived; whether any did."""
        changed = False
        while self.ended is None:
            try:
                event = self.request.events.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if isinstance(event, Queued):
                self.queued = event
            elif isinstance(event, Text):
                self.queued = None
                self.first_text = self.first_text or time.monotonic()
                self.sink.append(event.piece)
            elif isinstance(event, Ended):
                self.ended, self.finished = event, time.monotonic()
        return changed


def stream_answers(streams: list[Stream], poll: float = 0.02, redraw: float = 0.25) -> None:
    """Show every stream in its slot as its events arrive, all at once, until each has ended; then its final form.

    A slot is redrawn at least every `redraw` s while waiting: each redraw is a point where Streamlit can end this
    run when the user clicks Stop (or does anything else), so even a waiting answer stops at once."""
    while any(s.ended is None for s in streams):
        changed = False
        for s in streams:
            if s.ended is not None:
                continue
            fresh = s.take()
            changed |= fresh
            now = time.monotonic()
            if s.ended is not None:
                show_final(s.slot, "".join(s.sink), s.ended.reason, s.request.settings.max_new_tokens, s.ended.error,
                           s.timing())
            elif fresh or now - s.drawn > redraw:
                if s.sink:
                    s.slot.markdown("".join(s.sink) + CURSOR)
                else:
                    s.slot.caption(waiting_text(s.queued, s.started))
                s.drawn = now
        if not changed:
            time.sleep(poll)


def show_final(slot, text: str, reason: str | None, max_new_tokens: int, error: str | None = None,
               timing: dict | None = None) -> None:
    """A finished answer: its text (never an empty bubble), why it ended if the model did not end it, its timing."""
    with slot.container():
        if text.strip() or reason != "error":
            st.markdown(text if text.strip() else EMPTY)
        if reason == "error":
            st.error(f"Generation failed: {error}", icon=":material/error:")
        notes = [n for n in (ending_note(reason, max_new_tokens), timing_note(timing)) if n]
        if notes:
            st.caption(" · ".join(notes))


# --------------------------------------------------------------------------------------------------------- the page
def sidebar_settings() -> GenerationSettings:
    st.subheader("Generation")
    greedy = st.toggle("Greedy (deterministic)", value=DEFAULTS.greedy, key="greedy",
                       help="Always pick the most likely next token; temperature, top-p and top-k are then unused.")
    max_new_tokens = st.number_input("Max new tokens", 1, 1024, DEFAULTS.max_new_tokens, step=16, key="max_new_tokens")
    temperature = st.slider("Temperature", 0.05, 2.0, DEFAULTS.temperature, 0.05, key="temperature", disabled=greedy)
    top_p = st.slider("Top-p", 0.05, 1.0, DEFAULTS.top_p, 0.05, key="top_p", disabled=greedy)
    top_k = st.number_input("Top-k (0 = off)", 0, 1000, DEFAULTS.top_k, step=10, key="top_k", disabled=greedy)
    repetition_penalty = st.slider("Repetition penalty", 1.0, 2.0, DEFAULTS.repetition_penalty, 0.05,
                                   key="repetition_penalty")
    seed = st.number_input("Seed", 0, 2**31 - 1, DEFAULTS.seed, key="seed",
                           help="The same seed and settings give the same answer.")
    return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=int(top_k), repetition_penalty=float(repetition_penalty), seed=int(seed),
                              greedy=bool(greedy))


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def model_card(info: RunInfo) -> None:
    loss = info.loss_type if info.method == "dpo" else None
    rows = [("Method", f"`{info.method}`" if info.run_dir or info.base_model else None),
            ("Template", f"`{info.template}`"), ("Base model", info.base_model and f"`{info.base_model}`"),
            ("Dataset", info.dataset and f"`{info.dataset}`"), ("β", info.beta),
            ("Loss", ", ".join(loss) if isinstance(loss, list) else loss)]
    final = (info.metrics or {}).get("final") or {}
    rows += [("Eval loss", final.get("loss")), ("Reward accuracy", final.get("rewards/accuracies")),
             ("Reward margin", final.get("rewards/margins")), ("Train pairs", (info.metrics or {}).get("train_pairs"))]
    policy = ((info.eval or {}).get("metrics") or {}).get("policy") or {}
    rows += [("Held-out accuracy", policy.get("accuracy")),
             ("Judge win rate", ((info.eval or {}).get("judge") or {}).get("win_rate"))]
    if info.run_dir is None and info.base_model is None:
        st.caption("No training record with this model, so prompts use the default template.")
    st.markdown("\n".join(f"- **{label}:** {_num(value)}" for label, value in rows if value is not None))


def history_for(messages: list[dict], side: str) -> list[tuple[str, str]]:
    """(role, content) turns as `side` ('tuned' or 'base') saw them: each model continues its own answers."""
    turns = []
    for message in messages:
        text = message["content"] if message["role"] == "user" else message.get(side, message.get("tuned", ""))
        turns.append((message["role"], text))
    return turns


def show_answer(message: dict, side: str) -> None:
    end = (message.get("ends") or {}).get(side) or {}
    reason = end.get("reason", "stopped" if message.get("stopped") else None)
    show_final(st.empty(), message[side], reason, message.get("max_new_tokens", 0), end.get("error"), end.get("timing"))


def show_history(messages: list[dict], labels: tuple[str, str]) -> None:
    for message in messages:
        with st.chat_message(message["role"]):
            if message["role"] == "user":
                st.markdown(message["content"])
                continue
            if message.get("truncated"):
                st.caption(":material/content_cut: The oldest part of the conversation was left out (context full).")
            if "base" in message:
                for column, side, label in zip(st.columns(2), ("tuned", "base"), labels):
                    with column:
                        st.markdown(f"**{label}**")
                        show_answer(message, side)
            else:
                show_answer(message, "tuned")


def answer(text: str, tuned: tuple[RunInfo, Loaded], base: tuple[RunInfo, Loaded] | None, settings: GenerationSettings,
           labels: tuple[str, str]) -> None:
    messages = st.session_state.messages
    info, loaded = tuned
    with st.chat_message("user"):
        st.markdown(text)
    sides = [("tuned", loaded)] + ([("base", base[1])] if base else [])
    try:
        prompts = [build_prompt(text, info.template, model.tokenizer, history_for(messages, side)) for side, model in sides]
    except ValueError as exc:  # e.g. template 'chat' with a tokenizer that has none
        st.error(f"Cannot format the prompt: {exc}")
        return
    messages.append({"role": "user", "content": text})
    stop = threading.Event()  # set on every way out: done, the Stop button, a new message, a closed tab
    streams: list[Stream] = []
    failure, stop_slot = None, None
    with st.chat_message("assistant"):
        try:
            columns = st.columns(2) if base else [st.container()]
            # Both requests go in before either streams: with one model each, the two columns decode at once.
            for column, label, (side, model), prompt in zip(columns, labels, sides, prompts):
                with column:
                    if base:
                        st.markdown(f"**{label}**")
                    notice, slot = st.empty(), st.container(key=f"live-{side}").empty()
                    # Drawn before the request goes in, in the same instant as the bubble: submitting can take a
                    # while (a long prompt, a busy server) and the bubble is never shown empty.
                    slot.caption(waiting_text(None, time.monotonic()))
                    request = model.engine.submit(prompt, info.template, settings, stop)
                    if request.truncated:
                        with notice.container():
                            truncation_notice(model, settings)
                    streams.append(Stream(request, slot, []))
            stop_slot = st.empty()
            # A click reruns the page: Streamlit ends this run at its next redraw and `finally` stops the engine.
            stop_slot.button("Stop", icon=":material/stop_circle:", key="stop_answer",
                             help="End the answer now; what it said so far stays in the chat.")
            stream_answers(streams)
            stop_slot.empty()
        except Exception as exc:  # a failed page step is reported in the chat, the app stays usable
            failure = f"{type(exc).__name__}: {exc}"
            st.error(f"Generation failed: {failure}", icon=":material/error:")
        finally:
            # Streamlit ends an interrupted run (Stop, a new rerun, a closed tab) by raising at a redraw: stop the
            # engine's work on these answers, keep what was shown.
            stop.set()
            reply = reply_record([side for side, _ in sides], streams, failure, settings)
            messages.append(reply)
            try:  # show it stopped at once: the rerun after a Stop click reaches this message only after the sidebar
                for (side, _), s in zip(sides, streams):
                    if s.ended is None:
                        end = reply["ends"][side]
                        show_final(s.slot, reply[side], end["reason"], settings.max_new_tokens, end["error"],
                                   end["timing"])
                if stop_slot is not None:
                    stop_slot.empty()
            except BaseException:  # noqa: BLE001 - a closed tab or the toolbar's Stop: nothing can be drawn any more
                pass


def reply_record(sides: list[str], streams: list[Stream], failure: str | None, settings: GenerationSettings) -> dict:
    """The assistant message kept in the chat: each side's text and how it ended ('stopped' if it had not)."""
    reply: dict = {"role": "assistant", "truncated": any(s.request.truncated for s in streams),
                   "max_new_tokens": settings.max_new_tokens, "ends": {}}
    for index, side in enumerate(sides):
        s = streams[index] if index < len(streams) else None
        reply[side] = "".join(s.sink) if s else ""
        if s is not None and s.ended is not None:
            reply["ends"][side] = {"reason": s.ended.reason, "error": s.ended.error, "timing": s.timing()}
        else:
            reply["ends"][side] = {"reason": "error" if failure else "stopped", "error": failure,
                                   "timing": s.timing() if s else None}
    reply["stopped"] = any(end["reason"] == "stopped" for end in reply["ends"].values())
    return reply


def compare_choice(default: str, current: str, runs_dir: Path) -> str:
    """The model answering beside the chosen one: its base model by default, or any other run, or a name typed in."""
    options = list(dict.fromkeys([default, *find_runs(runs_dir), EMBEDDED_MODEL]))
    if current in options[1:]:  # comparing a run with itself tells nothing
        options.remove(current)
    choice = st.selectbox("Compare with", options, index=0, key="base_name", accept_new_options=True,
                          help="The run's base model by default; pick any other run under the runs folder to see two "
                               "runs side by side, or type a model folder or Hub id.")
    return (choice or "").strip() or default


def linked(choices: list[str]) -> None:
    """Preselect the model a link asked for (`?model=FOLDER`, e.g. the Sweep page's "Chat with the best trial"), once:
    the widget's state is dropped when another page is shown, so a later visit starts from the link again."""
    wanted = st.query_params.get("model")
    if not wanted or "model_choice" in st.session_state:
        return
    target = Path(wanted).expanduser().resolve()
    match = next((c for c in choices if c != EMBEDDED_MODEL and Path(c).expanduser().resolve() == target), None)
    if match is not None:
        st.session_state["model_choice"] = match


def sidebar(args: argparse.Namespace, compare_default: bool):
    """The sidebar: model choice, compare toggle, slots for the base model and the run's record, settings."""
    with st.sidebar:
        st.header(":material/forum: dpolab chat", divider="gray")
        if args.model:
            name = args.model
            st.markdown(f"**Model** \n`{name}`")
        else:
            choices = find_runs(Path(args.runs_dir)) + [EMBEDDED_MODEL]
            linked(choices)
            name = st.selectbox("Model", choices, key="model_choice",
                                help=f"Runs found under `{args.runs_dir}/`, and the embedded default model.")
        compare = st.checkbox("Compare side by side", value=compare_default, key="compare",
                              help="Answer each prompt with a second model too (the base model, or any other run), "
                                   "side by side, same seed and settings.")
        base_slot = st.container()  # filled once the run says what its base model is
        about_slot = st.container()
        st.button("Clear chat", icon=":material/delete:", width="stretch", key="clear",
                  on_click=lambda: st.session_state.messages.clear())
        settings = sidebar_settings()
    return name, compare, base_slot, about_slot, settings


def main() -> None:
    args = parse_page_args(sys.argv)
    compare_default = bool(args.compare)
    compare_on = st.session_state.get("compare", compare_default)
    # A local file: a `:material/…:` page icon makes the browser fetch it from a font host, and the app stays offline.
    st.set_page_config(page_title="dpolab chat", page_icon=str(ICON),
                       layout="wide" if compare_on else "centered")
    st.session_state.setdefault("messages", [])
    name, compare, base_slot, about_slot, settings = sidebar(args, compare_default)

    st.title("Chat with a DPO-tuned model")
    st.caption("DPO (Direct Preference Optimization) fine-tunes a language model on pairs of answers, one preferred "
               "by people and one rejected, so that it leans toward the preferred kind. Tick *Compare* in the sidebar "
               "to see the base model it started from answer the same prompt beside it.")
    try:
        tuned = open_model(name, args.max_batch)
    except ModelProblem as problem:
        show_problem("", name, problem)
        return
    info = tuned[0]
    base = None
    base_name = args.compare or info.base_model or EMBEDDED_MODEL
    if compare:
        with base_slot:
            base_name = compare_choice(base_name, name, Path(args.runs_dir))
        try:
            base = open_model(base_name, args.max_batch)
        except ModelProblem as problem:
            show_problem("base ", base_name, problem)
    with about_slot.expander("About this model", icon=":material/info:"):
        model_card(info)

    where = f"`{name}` · template `{info.template}`" + (f" · compared with `{base_name}`" if base else "")
    st.markdown(f"**Model:** {where}")
    is_base = base_name == (args.compare or info.base_model or EMBEDDED_MODEL)
    labels = (f"DPO-tuned · {Path(name).name or name}",
              f"{'Base' if is_base else 'Compared'} · {Path(base_name).name or base_name}")

    with st.container(horizontal=True, horizontal_alignment="left", gap="small"):
        for example in EXAMPLES:
            st.button(example, key=f"example-{example}", icon=":material/chat_bubble:",
                      on_click=lambda text=example: st.session_state.update(pending=text))

    show_history(st.session_state.messages, labels)
    # "disable": no new message while an answer streams; the answer's own Stop button ends it (see answer()).
    text = st.chat_input("Ask the model something…", submit_mode="disable", key="prompt")
    text = st.session_state.pop("pending", None) or text
    if text is not None and text.strip():  # an empty or blank message is ignored
        answer(text.strip(), tuned, base, settings, labels)


if __name__ == "__main__":  # as Streamlit runs a page (and AppTest); importing it runs nothing
    main()
