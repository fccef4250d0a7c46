"""Portable exports: no absolute local path of this machine in any file an export carries.

Training records name local paths (dpolab.json: base model, data; training_args.json/.bin: output and logging
folders; adapter_config.json: the base model). On another machine they are meaningless and they leak user names
and folder layouts. Every string that is an absolute path becomes: the embedded model's name when it is the
embedded model; a path relative to the run when it lies inside the run or beside it in a shared project folder
(e.g. "../../data/hh"); else its last part only, as the model card already shows local paths.

training_args.bin (torch.save: a zip holding a pickle) is never unpickled: the pickle's string opcodes are rewritten
by walking the opcode stream (pickletools.genops parses, it does not execute); frames are dropped since their
lengths change (framing is optional in protocol 4+). A file with nothing to rewrite is copied byte for byte; one
that cannot be parsed is left out of the export (training_args.json holds the same settings).
"""

from __future__ import annotations

import json
import os
import pickletools
import struct
import tempfile
from pathlib import Path
from typing import Any


def _roots() -> list[Path]:
    """Folders too general to be a project folder a run shares with its data: /, the home and temp directories."""
    home = Path(os.path.expanduser("~"))  # "~" itself where no home can be found: then no home to protect
    return [Path("/"), Path(tempfile.gettempdir()).resolve()] + ([home.resolve()] if home.is_absolute() else [])


# The JSON records and configs an export carries; tokenizer files are left alone ("/" and "~" are tokens there).
RECORDS = ("dpolab.json", "training_args.json", "config.json", "generation_config.json", "tokenizer_config.json",
           "adapter_config.json")


def is_local_path(value: str) -> bool:
    """An absolute path of this machine: "~/…", or "/x/…" whose top folder exists here ("/" alone or "/>" is not)."""
    if "\n" in value or len(value) > 4096:
        return False
    if value.startswith("~/"):
        return True
    top = value[1:].split("/", 1)[0]
    return value.startswith("/") and bool(top) and top not in (".", "..") and Path("/", top).exists()


def portable_path(value: str, run_dir: Path | None) -> str:
    """`value` (an absolute path) as it may appear in an export."""
    from dpolab import EMBEDDED_MODEL
    from dpolab.models import embedded_model_dir

    path = Path(os.path.abspath(os.path.expanduser(value)))  # os.path: no error where HOME cannot be found
    embedded = Path(os.path.abspath(embedded_model_dir(convert=False)))
    if path == embedded or embedded in path.parents:
        return EMBEDDED_MODEL
    if run_dir is not None:
        run = Path(os.path.abspath(run_dir))
        common = Path(os.path.commonpath([path, run]))
        if common == run or not any(common == root or common in root.parents for root in _roots()):
            return Path(os.path.relpath(path, run)).as_posix()
    return path.name


def portable_json(data: Any, run_dir: Path | None) -> Any:
    """`data` with every absolute-path string made portable (keys are left alone)."""
    if isinstance(data, str):
        return portable_path(data, run_dir) if is_local_path(data) else data
    if isinstance(data, list):
        return [portable_json(item, run_dir) for item in data]
    if isinstance(data, dict):
        return {key: portable_json(value, run_dir) for key, value in data.items()}
    return data


def make_json_portable(file: Path, run_dir: Path | None) -> bool:
    """Rewrite a JSON file in place when it names local paths; untouched (byte for byte) otherwise."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return False  # not JSON after all: left as it is
    fixed = portable_json(data, run_dir)
    if fixed == data:
        return False
    file.write_text(json.dumps(fixed, indent=2, ensure_ascii=False) + "\n")
    return True


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def _unicode_op(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return b"\x8c" + struct.pack("<B", len(raw)) + raw  # SHORT_BINUNICODE (protocol 4)
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def portable_pickle(data: bytes, run_dir: Path | None) -> bytes:
    """The pickle `data` with absolute-path strings made portable, rewritten opcode by opcode without unpickling."""
    ops = list(pickletools.genops(data))
    if not any(op.name in _STRING_OPS and isinstance(arg, str) and is_local_path(arg) for op, arg, _ in ops):
        return data
    out = bytearray()
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    for (op, arg, pos), end in zip(ops, ends):
        if op.name == "FRAME":
            continue  # frame lengths change; unpicklers read unframed protocol-4 data as well
        if op.name in _STRING_OPS and isinstance(arg, str) and is_local_path(arg):
            out += _unicode_op(portable_path(arg, run_dir))
        else:
            out += data[pos:end]
    return bytes(out)


def portable_torch_file(data: bytes, run_dir: Path | None) -> bytes:
    """A torch.save file (a zip whose */data.pkl is the pickle) or a bare pickle, made portable; same bytes when there
    is nothing to rewrite. The zip is rewritten uncompressed, as torch writes it, entries in their order."""
    import io
    import zipfile

    if not data.startswith(b"PK"):
        return portable_pickle(data, run_dir)
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    fixed = [(info, portable_pickle(raw, run_dir) if info.filename.endswith("/data.pkl") else raw)
             for info, raw in entries]
    if all(a is b for (_, a), (_, b) in zip(entries, fixed)):
        return data
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for info, raw in fixed:  # the entries' own timestamps: the same input gives the same bytes
            target.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), raw)
    return out.getvalue()


def make_folder_portable(folder: Path, run_dir: Path | None) -> list[str]:
    """Rewrite every JSON record and training_args.bin in `folder`; returns the files that changed."""
    changed = [name for name in RECORDS if (folder / name).is_file() and make_json_portable(folder / name, run_dir)]
    args = folder / "training_args.bin"
    if args.is_file():
        data = args.read_bytes()
        try:
            fixed = portable_torch_file(data, run_dir)
        except Exception:  # neither zip nor pickle pickletools can parse: it cannot be checked, so it is not exported
            args.unlink()
            return changed + [args.name]
        if fixed != data:
            args.write_bytes(fixed)
            changed.append(args.name)
    return changed
