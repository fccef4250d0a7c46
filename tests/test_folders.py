"""The folder modules: ownership markers, what --overwrite may replace, and the run/sweep layouts read back."""

import subprocess
import sys
from pathlib import Path

import pytest

from dpolab.errors import FolderError
from dpolab.folders import owner
from dpolab.folders.run import RunFolder
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _dpolab(*args, cwd, env=None, timeout=300):
    import os

    return subprocess.run([sys.executable, "-m", "dpolab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})})


def _user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": b"my notes", "pairs.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n',
             "sub/keep.bin": b"\x00\x01"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _still_there(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


@pytest.mark.parametrize("command", [["train", "-o", ".", "--overwrite", "--max-steps", "1"],
                                     ["data", "prepare", "-o", ".", "--overwrite"]])
def test_overwrite_of_the_working_directory_is_refused_and_deletes_nothing(tmp_path, command):
    files = _user_files(tmp_path)
    run = _dpolab(*command, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "refusing to overwrite" in run.stderr and "working directory" in run.stderr
    _still_there(tmp_path, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "pairs.jsonl", "sub"]


def test_overwrite_of_the_folder_holding_the_input_is_refused(tmp_path):
    work = tmp_path / "work"
    files = _user_files(work)
    run = _dpolab("train", "-d", str(work / "pairs.jsonl"), "-o", str(work), "--overwrite", cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "holds the input" in run.stderr
    _still_there(work, files)


def test_check_replaceable_only_accepts_dpolab_folders_of_the_same_kind(tmp_path, monkeypatch):
    owner.check_replaceable(tmp_path / "missing", "run", "--output-dir")  # nothing there: fine
    (tmp_path / "empty").mkdir()
    owner.check_replaceable(tmp_path / "empty", "run", "--output-dir")
    foreign = tmp_path / "foreign"
    _user_files(foreign)
    with pytest.raises(FolderError, match="did not create it"):
        owner.check_replaceable(foreign, "run", "--output-dir")
    ours = tmp_path / "ours"
    RunFolder(ours).create(overwrite=False)
    owner.check_replaceable(ours, "run", "--output-dir")
    with pytest.raises(FolderError, match="dpolab run folder, not a prepared folder"):
        owner.check_replaceable(ours, "prepared", "--out")
    legacy = tmp_path / "legacy"  # written before the marker existed: recognised by its contents
    legacy.mkdir()
    (legacy / "config.yaml").write_text("model: x\n")
    (legacy / "metrics.json").write_text("{}")
    assert owner.kind_of(legacy) == "run"
    owner.check_replaceable(legacy, "run", "--output-dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        owner.check_replaceable(tmp_path / "file.txt", "run", "--output-dir")
    monkeypatch.setenv("HOME", str(ours))
    with pytest.raises(FolderError, match="home directory"):
        owner.check_replaceable(ours, "run", "--output-dir")


def test_run_folder_round_trip(tmp_path):
    from dpolab.config import TrainConfig

    run = RunFolder(tmp_path / "run")
    run.create(overwrite=False)
    cfg = TrainConfig(output_dir=run.path, beta=0.3)
    run.write_config(cfg)
    run.write_data_report({"template": "raw", "train": 3})
    run.write_metrics({"best": {"loss": 0.5}})
    assert TrainConfig.model_validate(run.read_config()) == cfg
    assert run.read_data_report()["template"] == "raw" and run.read_metrics()["best"]["loss"] == 0.5
    assert run.read_eval() is None and run.read_log_history() is None and run.is_finished()
    assert owner.kind_of(run.path) == "run"


def test_file_names_of_the_layouts_are_spelled_only_in_the_folder_modules():
    src = REPO / "src" / "dpolab"
    names = ('"data_report.json"', '"best.json"', '"trainer_state.json"', '"metrics.json"', '"sweep.yaml"',
             '"config.yaml"', '"prepared.json"')
    offenders = [f"{path.relative_to(src)}: {name}" for path in src.rglob("*.py") if path.parent.name != "folders"
                 for name in names if name in path.read_text()]
    assert offenders == []


def test_prepare_over_a_foreign_folder_is_refused(tmp_path):
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data

    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    target = tmp_path / "target"
    files = _user_files(target)
    with pytest.raises(FolderError, match="did not create it"):
        prepare_data(DataConfig(dataset=str(src)), target, overwrite=True)
    _still_there(target, files)
