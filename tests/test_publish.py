"""Publish stage: export folder + model card, push to a local imitation of the Hub, token hygiene, safe loading."""

import base64
import csv
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import prepare_data
from dpolab.engine.train import run_training
from dpolab.publish import PublishError, export_model, push_model
from tests.conftest import write_jsonl

TOKEN = "hf_dpolabTestToken9f3b2c7d1e8a4b6c"  # a fake token: its only job is to be searched for
REPO = "alice/tiny-dpo"
EXPORT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                "training_args.bin", "training_args.json", "dpolab.json", "README.md"}


# ---------------------------------------------------------------- fixtures: a tiny finished run and its export

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, tiny_llama):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {3 * i + 1}."}
            for i in range(16)]
    src = write_jsonl(tmp_path_factory.mktemp("src") / "pairs.jsonl", rows)
    data = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), data, tokenizer=tokenizer)
    out = tmp_path_factory.mktemp("runs") / "tiny-run"
    run_training(TrainConfig(output_dir=out, model=str(tiny_llama), data=DataConfig(dataset=str(data)), epochs=1,
                             batch_size=4, learning_rate=1e-3, report_to=[], seed=3, save_total_limit=1))
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    return export_model(run_dir, tmp_path_factory.mktemp("exports") / "tiny-export")


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path / "README.md" if path.is_dir() else path)


def _metrics(card) -> dict:
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def _snippet(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    assert len(blocks) == 1, "the card has exactly one python snippet"
    return blocks[0]


def _python(script: str) -> subprocess.CompletedProcess:
    # cwd="/" so that the repo's src/ is not importable by accident: plain transformers only.
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=300)


# ---------------------------------------------------------------- export

def test_export_writes_a_self_contained_folder(run_dir, exported):
    assert EXPORT_FILES <= {p.name for p in exported.iterdir()}
    assert (exported / "tokenizer.json").read_bytes() == (run_dir / "model" / "tokenizer.json").read_bytes()
    # The records are the run's with its local paths made portable (tests/test_gguf.py checks no path is left).
    from dpolab.publish.portable import portable_json, portable_torch_file

    args = (run_dir / "model" / "training_args.bin").read_bytes()
    assert (exported / "training_args.bin").read_bytes() == portable_torch_file(args, run_dir)
    for name in ("training_args.json", "dpolab.json"):
        record = json.loads((run_dir / "model" / name).read_text())
        assert json.loads((exported / name).read_text()) == portable_json(record, run_dir), name
    from safetensors.torch import load_file

    weights, trained = load_file(exported / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert weights.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(weights[name], tensor) and weights[name].dtype == tensor.dtype, name
    assert not list(exported.parent.glob(".*export-*")), "the temporary folder was left behind"
    with pytest.raises(PublishError, match="--overwrite"):
        export_model(run_dir, exported)
    with pytest.raises(PublishError, match="would replace the source"):
        export_model(run_dir, run_dir / "model", overwrite=True)


def test_exported_and_sharded_folders_generate_the_run_tokens_without_dpolab(run_dir, exported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = export_model(run_dir, tmp_path / "sharded", max_shard_size="2MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()

    prompt = "Q: What is 3 plus 3?\nA:"
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", use_safetensors=True)
    torch.manual_seed(0)
    ids = tok(prompt, return_tensors="pt")
    tokens = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist()
    # A tiny model's greedy tokens hardly move with small weight changes: the logits are compared too.
    logits = model(**ids).logits[0, -1, :50].tolist()
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokens = []
        for folder in {[str(exported), str(sharded)]!r}:
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
            torch.manual_seed(0)
            ids = tok({prompt!r}, return_tensors="pt")
            tokens.append(model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist())
            tokens.append(model(**ids).logits[0, -1, :50].tolist())
        assert "dpolab" not in sys.modules
        print(json.dumps(tokens))
    """)
    run = _python(script)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got[0] == tokens and got[2] == tokens
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(got[3]), torch.tensor(logits), atol=1e-5, rtol=0)


def test_model_card_is_the_card_export_writes(run_dir, exported):
    from dpolab.publish import model_card

    assert model_card(run_dir) == (exported / "README.md").read_text()
    assert model_card(run_dir / "model") == (exported / "README.md").read_text()
    assert f'model_id = "{REPO}"' in model_card(run_dir, repo_id=REPO)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # nothing written


def test_card_metadata_equals_metrics_json(run_dir, exported):
    card = _card(exported)
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert _metrics(card) == {"eval_loss": best["loss"], "reward_accuracy": best["rewards/accuracies"],
                              "reward_margin": best["rewards/margins"]}
    assert card.data.library_name == "transformers" and {"dpo", "dpolab"} <= set(card.data.tags)
    assert card.data.model_name == "tiny-run"
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not Hub ids
    assert "Q: {prompt}\\nA:" in card.text and "learning rate" in card.text.lower() and "0.001" in card.text
    assert "offensive" in card.text and "hallucinate" in card.text


def test_card_takes_accuracy_and_margin_from_eval_json(run_dir, tmp_path):
    from dpolab.publish.card import build_card
    from dpolab.folders.info import load_run_info

    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "model.safetensors"))
    (copy / "eval").mkdir()
    (copy / "eval" / "eval.json").write_text(json.dumps(
        {"metrics": {"policy": {"accuracy": 0.8125, "margin_mean": 1.5}, "reference": {"ranking_accuracy": 0.5}}}))
    card = build_card(load_run_info(str(copy)), "run")
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert _metrics(card) == {"eval_loss": best["loss"], "reward_accuracy": 0.8125, "reward_margin": 1.5}


def test_card_for_the_embedded_base_model_names_its_hub_id_and_license():
    from dpolab.publish.card import build_card
    from dpolab.folders.info import RunInfo

    info = RunInfo(model="x", run_dir=None, template="chat", base_model="smollm2-135m-instruct",
                   dataset="Anthropic/hh-rlhf", beta=0.1, loss_type="sigmoid", config=None, metrics=None, eval=None)
    card = build_card(info, "smol-dpo", repo_id="alice/smol-dpo")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["Anthropic/hh-rlhf"] and not card.data.eval_results
    snippet = _snippet(str(card))
    assert 'model_id = "alice/smol-dpo"' in snippet and "add_generation_prompt=True" in snippet


def test_card_snippet_runs_against_the_exported_folder(exported):
    snippet = _snippet((exported / "README.md").read_text())
    assert 'prompt = f"Q: {question}\\nA:"' in snippet  # the training format, verbatim
    model_id = re.search(r'^model_id = "(.*)"$', snippet, flags=re.M).group(1)
    run = _python(snippet.replace(f'"{model_id}"', repr(str(exported))) + '\nimport sys\nassert "dpolab" not in sys.modules\n')
    assert run.returncode == 0, run.stderr[-3000:]


def test_sweep_export_shows_search_space_and_trials(run_dir, tmp_path):
    sweep = tmp_path / "my-sweep"
    shutil.copytree(run_dir, sweep / "best", ignore=shutil.ignore_patterns("checkpoints"))
    (sweep / "best" / "best.json").write_text(json.dumps({"trial": 2, "params": {"beta": 0.3}, "value": 0.41, "objective": "eval_loss"}))
    (sweep / "sweep.yaml").write_text("search_space:\n  beta: {low: 0.05, high: 0.5, log: true}\n  learning_rate: [1.0e-4, 1.0e-3]\n")
    with open(sweep / "trials.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["number", "value", "params_beta", "state"], [0, 0.52, 0.07, "COMPLETE"],
                          [1, 0.47, 0.12, "COMPLETE"], [2, 0.41, 0.3, "COMPLETE"]])
    card = _card(export_model(sweep, tmp_path / "out"))
    assert card.data.model_name == "my-sweep"
    assert "learning_rate" in card.text and "log: true" in card.text
    assert "| number | value | params_beta | state |" in card.text and "| 2 | 0.41 | 0.3 | COMPLETE |" in card.text
    assert "Best trial: #2, eval_loss 0.41" in card.text


def test_export_never_unpickles_and_refuses_pickled_weights(run_dir, tmp_path):
    class Boom:
        def __reduce__(self):  # unpickling this would create the sentinel file
            return (Path(tmp_path / "unpickled").write_text, ("!",))

    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "model" / "training_args.bin").write_bytes(pickle.dumps(Boom()))
    out = export_model(copy, tmp_path / "out")
    assert not (tmp_path / "unpickled").exists()
    assert (out / "training_args.bin").read_bytes() == (copy / "model" / "training_args.bin").read_bytes()

    (copy / "model" / "model.safetensors").rename(copy / "model" / "pytorch_model.bin")
    with pytest.raises(PublishError, match="safetensors"):
        export_model(copy, tmp_path / "out2")
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out2").exists()


# ---------------------------------------------------------------- push, against a local imitation of the Hub

class FakeHub:
    """Answers the endpoints huggingface_hub 2.x calls for create_repo + upload_folder, and records every request.

    preupload answers uploadMode "regular" for every file so the content travels inside the commit (no LFS/Xet)."""

    def __init__(self):
        self.requests, self.status = [], 200
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                status, payload = hub.route(self.command, self.path.split("?")[0], body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method, path, body):
        if self.status != 200:
            return self.status, {"error": "Invalid credentials in Authorization header"}
        if path == "/api/repos/create":
            request = json.loads(body)
            return 200, {"url": f"{self.url}/{request['organization']}/{request['name']}"}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            return 200, {"commitUrl": f"{self.url}/{match.group(1)}/commit/0123abcd", "commitOid": "0123abcd"}
        return 404, {"error": f"no route {method} {path}"}

    def commits(self) -> list[list[dict]]:
        return [[json.loads(line) for line in r["body"].splitlines()] for r in self.requests if "/commit/" in r["path"]]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login of the machine leaks in
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.server.shutdown()


def _uploaded(commit: list[dict]) -> dict[str, bytes]:
    return {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in commit if op["key"] == "file"}


def test_push_run_creates_repo_and_commits_every_file(hub, run_dir):
    result = push_model(run_dir, REPO, private=True, token=TOKEN, endpoint=hub.url)
    create = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    assert json.loads(create[0]["body"]) == {"name": "tiny-dpo", "organization": "alice", "visibility": "private", "type": "model"}
    (commit,) = hub.commits()
    assert hub.requests[-1]["path"] == f"/api/models/{REPO}/commit/main"
    assert commit[0]["value"]["summary"] == "Upload tiny-run trained with dpolab"
    files = _uploaded(commit)
    assert EXPORT_FILES <= set(files) and set(files) == {name for name, _ in result["files"]}
    from dpolab.publish.portable import portable_torch_file

    assert files["training_args.bin"] == portable_torch_file((run_dir / "model" / "training_args.bin").read_bytes(),
                                                             run_dir)
    assert f'model_id = "{REPO}"' in files["README.md"].decode()
    for request in hub.requests:
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in request["path"] and TOKEN.encode() not in request["body"]


def test_push_exported_folder_names_the_repo_in_its_card_and_keeps_the_folder(hub, exported):
    before = (exported / "README.md").read_text()
    push_model(exported, "bob/other", revision="dev", token=TOKEN, endpoint=hub.url)
    (commit,) = hub.commits()
    assert hub.requests[-1]["path"] == "/api/models/bob/other/commit/dev"
    assert commit[0]["value"]["summary"] == "Upload tiny-run trained with dpolab"
    files = _uploaded(commit)
    assert 'model_id = "bob/other"' in files["README.md"].decode()
    assert files["model.safetensors"] == (exported / "model.safetensors").read_bytes()
    assert (exported / "README.md").read_text() == before


def test_push_errors_are_one_line_publish_errors(hub, exported, monkeypatch):
    hub.status = 401
    with pytest.raises(PublishError) as info:
        push_model(exported, REPO, token=TOKEN, endpoint=hub.url)
    assert "401" in str(info.value) and "\n" not in str(info.value) and TOKEN not in str(info.value)
    with pytest.raises(PublishError, match="OWNER/NAME"):
        push_model(exported, "no-owner", token=TOKEN, endpoint=hub.url, dry_run=True)
    hub.server.shutdown()
    hub.server.server_close()  # nothing listens there any more: the offline case
    with pytest.raises(PublishError, match="cannot reach") as info:
        push_model(exported, REPO, token=TOKEN, endpoint=hub.url)
    assert "\n" not in str(info.value)
    with pytest.raises(PublishError, match="no Hugging Face token"):
        push_model(exported, REPO, endpoint=hub.url)


def _cli(args, hub, monkeypatch):
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from dpolab.cli import app

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return CliRunner().invoke(app, args)


def test_cli_push_dry_run_makes_no_request(hub, exported, monkeypatch):
    result = _cli(["push", str(exported), "--repo", REPO, "--dry-run"], hub, monkeypatch)
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert "model.safetensors" in result.stdout and "README.md" in result.stdout
    assert "## Intended use and limitations" in result.stdout and f'model_id = "{REPO}"' in result.stdout
    assert TOKEN not in result.output


def test_cli_push_401_prints_one_line_error(hub, exported, monkeypatch):
    hub.status = 401
    result = _cli(["push", str(exported), "--repo", REPO], hub, monkeypatch)
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and TOKEN not in result.output
    assert isinstance(result.exception, SystemExit)


def test_cli_export_help_and_error(tmp_path):
    from typer.testing import CliRunner

    from dpolab.cli import app

    runner = CliRunner()
    assert "--overwrite" in runner.invoke(app, ["export", "--help"]).output
    assert "--dry-run" in runner.invoke(app, ["push", "--help"]).output
    result = runner.invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and result.stderr.startswith("error:")


# ---------------------------------------------------------------- the token never leaves the Authorization header

def test_token_appears_nowhere_but_the_authorization_header(hub, run_dir, tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # found by huggingface_hub's own lookup, as for a user
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.addHandler(caplog.handler)
    old_level = hf_logger.level
    hf_logging.set_verbosity_debug()
    try:
        with caplog.at_level(logging.DEBUG):
            folder = export_model(run_dir, tmp_path / "export")
            push_model(run_dir, REPO, endpoint=hub.url)
            push_model(folder, REPO, endpoint=hub.url)
    finally:
        hf_logger.removeHandler(caplog.handler)
        hf_logger.setLevel(old_level)
    out, err = capfd.readouterr()
    assert len(hub.commits()) == 2
    for file in folder.rglob("*"):
        assert TOKEN.encode() not in file.read_bytes(), file
    for commit in hub.commits():
        for name, content in _uploaded(commit).items():
            assert TOKEN.encode() not in content, name
    assert caplog.records and TOKEN not in caplog.text and TOKEN not in out and TOKEN not in err
    for request in hub.requests:
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
        rest = {k: v for k, v in request["headers"].items() if k != "authorization"}
        assert TOKEN not in json.dumps(rest) and TOKEN not in request["path"] and TOKEN.encode() not in request["body"]
