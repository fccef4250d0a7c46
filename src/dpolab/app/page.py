"""The chat page, run by Streamlit (`dpolab app` launches it). UI only: model names resolve through
`dpolab.folders.run`/`dpolab.models`, prompts and tokens come from `dpolab.generation`, as in training and evaluation.

Options arrive as Streamlit passes them, in `sys.argv` after `--` ([page, MODEL, --compare BASE, --runs-dir DIR]);
tests set `sys.argv` the same way.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from dpolab import EMBEDDED_MODEL
from dpolab.folders.info import RunInfo, load_run_info
from dpolab.generation import (
    GenerationSettings,
    build_prompt,
    context_limit,
    stream_text,
)
from dpolab.models import load_model, load_tokenizer, model_folder

EXAMPLES = ("What is the purpose of life?", "How to live a healthy life?", "How do I make good tea?",
            "Tips for a job interview?")
DEFAULTS = GenerationSettings()
FIX_HINT = ("Run `make demo` to train the demo run, or pass a model folder: `dpolab app runs/NAME` "
            f"(a run, a sweep's folder, an exported model folder, or `{EMBEDDED_MODEL}`).")
CURSOR = " ▌"
EMPTY = "_(empty answer: the model ended at once)_"


# ---------------------------------------------------------------------------------------------------------- options
def parse_page_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="page.py", add_help=False, exit_on_error=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--compare")
    parser.add_argument("--runs-dir", default="runs")
    # Only our own argv is ours to parse: imported elsewhere (e.g. by pytest), sys.argv belongs to someone else.
    ours = bool(argv) and Path(argv[0]).resolve() == Path(__file__).resolve()
    return parser.parse_args(argv[1:] if ours else [])


def find_runs(runs_dir: Path) -> list[str]:
    """Runs and sweeps under `runs_dir` that hold a model (model/config.json, or a sweep's best/), newest first."""
    if not runs_dir.is_dir():
        return []
    found = [child for child in runs_dir.iterdir() if child.is_dir() and model_folder(child) is not None]
    return [str(child) for child in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


# ----------------------------------------------------------------------------------------------------------- models
@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    lock: threading.Lock  # one generation at a time on this model, whichever browser session asks


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def load(resolved: str) -> Loaded:
    """Once per process and model (keyed by the resolved folder/Hub id); shared by every browser session."""
    model = load_model(resolved).eval()
    return Loaded(model, load_tokenizer(resolved), threading.Lock())


class ModelProblem(Exception):
    pass


def open_model(name: str) -> tuple[RunInfo, Loaded]:
    path = Path(name).expanduser()
    # `runs/typo` would otherwise be taken for a Hub id and fail with a confusing network error.
    if not path.exists() and path.parent != Path(".") and path.parent.is_dir():
        raise ModelProblem(f"no folder `{path.name}` in `{path.parent}`")
    try:
        info = load_run_info(name)
        if info.method == "reward":  # a score head: nothing to chat with (the CLI refuses it before serving)
            raise ModelProblem("a reward model (method reward) scores answers and cannot generate any")
        return info, load(info.model)
    except Exception as exc:  # every failure becomes a message on the page, never a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelProblem(message) from exc


def show_problem(role: str, name: str, problem: ModelProblem) -> None:
    st.error(f"**Cannot load the {role}model `{name}`:** {problem}\n\n{FIX_HINT}", icon=":material/error:")


# ------------------------------------------------------------------------------------------------------- generation
def tee(pieces: Iterable[str], sink: list[str]) -> Iterator[str]:
    """Yield `pieces`, keeping what was shown in `sink` (an interrupted stream keeps its partial answer)."""
    for piece in pieces:
        sink.append(piece)
        yield piece


def truncation_notice(loaded: Loaded, settings: GenerationSettings) -> None:
    st.warning(f"The conversation no longer fits the model's context of {context_limit(loaded.model)} tokens with "
               f"{settings.max_new_tokens} kept for the answer, so its oldest part was left out. *Clear chat* to start "
               "afresh, or lower *Max new tokens*.", icon=":material/content_cut:")


def stream_one(loaded: Loaded, template: str, prompt: str, settings: GenerationSettings, stop: threading.Event,
               sink: list[str]) -> bool:
    """Stream one answer into the current container; whether the prompt was truncated."""
    pieces, truncated = stream_text(loaded.model, loaded.tokenizer, prompt, template, settings, stop=stop, lock=loaded.lock)
    if truncated:
        truncation_notice(loaded, settings)
    st.write_stream(tee(pieces, sink), cursor=CURSOR)
    return truncated


def stream_side_by_side(jobs: list[tuple[Loaded, str]], template: str, settings: GenerationSettings,
                        stop: threading.Event, sinks: list[list[str]], columns) -> list[bool]:
    """Stream several answers at once, each into its column, in the order their pieces arrive."""
    merged: queue.Queue = queue.Queue()
    flags, slots = [], []

    def pump(index: int, pieces: Iterator[str]) -> None:
        try:
            for piece in pieces:
                merged.put((index, piece))
        except Exception as exc:  # e.g. the streamer's timeout: end this column with a message, not a hang
            merged.put((index, f"\n\n[generation failed: {type(exc).__name__}]"))
        merged.put((index, None))

    for index, ((loaded, prompt), column) in enumerate(zip(jobs, columns)):
        pieces, truncated = stream_text(loaded.model, loaded.tokenizer, prompt, template, settings, stop=stop,
                                        lock=loaded.lock)
        flags.append(truncated)
        with column:
            if truncated:
                truncation_notice(loaded, settings)
            slots.append(st.empty())
            # Sampled answers take turns on the RNG (see generation.py): say why a column is still blank.
            slots[-1].caption("waiting for the model…")
        threading.Thread(target=pump, args=(index, pieces), daemon=True).start()
    open_streams = len(jobs)
    while open_streams:
        index, piece = merged.get()
        if piece is None:
            open_streams -= 1
            slots[index].markdown("".join(sinks[index]) or EMPTY)
            continue
        sinks[index].append(piece)
        slots[index].markdown("".join(sinks[index]) + CURSOR)
    return flags


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


def show_answer(text: str, stopped: bool) -> None:
    st.markdown(text if text.strip() else EMPTY)
    if stopped:
        st.caption(":material/stop_circle: stopped")


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
                        show_answer(message[side], message.get("stopped", False))
            else:
                show_answer(message["tuned"], message.get("stopped", False))


def answer(text: str, tuned: tuple[RunInfo, Loaded], base: tuple[RunInfo, Loaded] | None, settings: GenerationSettings,
           labels: tuple[str, str]) -> None:
    messages = st.session_state.messages
    info, loaded = tuned
    with st.chat_message("user"):
        st.markdown(text)
    try:
        prompts = [build_prompt(text, info.template, loaded.tokenizer, history_for(messages, "tuned"))]
        if base:
            prompts.append(build_prompt(text, info.template, base[1].tokenizer, history_for(messages, "base")))
    except ValueError as exc:  # e.g. template 'chat' with a tokenizer that has none
        st.error(f"Cannot format the prompt: {exc}")
        return
    messages.append({"role": "user", "content": text})
    reply: dict = {"role": "assistant", "tuned": ""}
    sinks: list[list[str]] = [[], []]
    stop = threading.Event()  # set on every way out: done, the Stop button, a new message, a closed tab
    outcome = "interrupted"
    with st.chat_message("assistant"):
        try:
            if base:
                columns = st.columns(2)
                for column, label in zip(columns, labels):
                    column.markdown(f"**{label}**")
                flags = stream_side_by_side([(loaded, prompts[0]), (base[1], prompts[1])], info.template, settings,
                                            stop, sinks, columns)
            else:
                flags = [stream_one(loaded, info.template, prompts[0], settings, stop, sinks[0])]
            reply["truncated"] = any(flags)
            outcome = "done"
        except Exception as exc:  # a failed generation is reported in the chat, the app stays usable
            outcome = "failed"
            st.error(f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            # Streamlit ends an interrupted run by raising inside write_stream: stop the worker, keep the partial text.
            stop.set()
            reply["tuned"] = "".join(sinks[0])
            if base:
                reply["base"] = "".join(sinks[1])
            reply["stopped"] = outcome == "interrupted"
            messages.append(reply)


def sidebar(args: argparse.Namespace, compare_default: bool):
    """The sidebar: model choice, compare toggle, slots for the base model and the run's record, settings."""
    with st.sidebar:
        st.header(":material/forum: dpolab chat", divider="gray")
        if args.model:
            name = args.model
            st.markdown(f"**Model** \n`{name}`")
        else:
            choices = find_runs(Path(args.runs_dir)) + [EMBEDDED_MODEL]
            name = st.selectbox("Model", choices, key="model_choice",
                                help=f"Runs found under `{args.runs_dir}/`, and the embedded default model.")
        compare = st.checkbox("Compare with the base model", value=compare_default, key="compare",
                              help="Answer each prompt with the base model too, side by side, same seed and settings.")
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
    st.set_page_config(page_title="dpolab chat", page_icon=":material/forum:",
                       layout="wide" if compare_on else "centered")
    st.session_state.setdefault("messages", [])
    name, compare, base_slot, about_slot, settings = sidebar(args, compare_default)

    st.title("Chat with a DPO-tuned model")
    st.caption("DPO (Direct Preference Optimization) fine-tunes a language model on pairs of answers, one preferred "
               "by people and one rejected, so that it leans toward the preferred kind. Tick *Compare* in the sidebar "
               "to see the base model it started from answer the same prompt beside it.")
    try:
        tuned = open_model(name)
    except ModelProblem as problem:
        show_problem("", name, problem)
        return
    info = tuned[0]
    base = None
    base_name = args.compare or info.base_model or EMBEDDED_MODEL
    if compare:
        with base_slot:
            base_name = st.text_input("Base model", value=base_name, key="base_name",
                                      help="Defaults to the model the run started from.").strip() or base_name
        try:
            base = open_model(base_name)
        except ModelProblem as problem:
            show_problem("base ", base_name, problem)
    with about_slot.expander("About this model", icon=":material/info:"):
        model_card(info)

    where = f"`{name}` · template `{info.template}`" + (f" · compared with `{base_name}`" if base else "")
    st.markdown(f"**Model:** {where}")
    labels = (f"DPO-tuned · {Path(name).name or name}", f"Base · {Path(base_name).name or base_name}")

    with st.container(horizontal=True, horizontal_alignment="left", gap="small"):
        for example in EXAMPLES:
            st.button(example, key=f"example-{example}", icon=":material/chat_bubble:",
                      on_click=lambda text=example: st.session_state.update(pending=text))

    show_history(st.session_state.messages, labels)
    text = st.chat_input("Ask the model something…", submit_mode="stop", key="prompt")
    text = st.session_state.pop("pending", None) or text
    if text is not None and text.strip():  # an empty or blank message is ignored
        answer(text.strip(), tuned, base, settings, labels)


if __name__ == "__main__":  # as Streamlit runs a page (and AppTest); importing it runs nothing
    main()
