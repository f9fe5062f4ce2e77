"""Adapter files on disk: atomic writes, and reading safetensors / JSON with clear errors.

Writes: each file is staged as a temporary file next to its destination and fsynced; then all
staged files replace their destinations (``os.replace``), the previous versions kept as hard
links until the end, so any error restores every previous file byte-identical and removes
every temporary file. Reads: the safetensors header is validated in Python (sizes, dtypes,
offsets) before ``safetensors`` maps the data, so a damaged file gives an
:class:`~funclora.AdapterFileError` naming the file, never a crash inside a library. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import warnings

import torch

from .errors import AdapterFileError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
DEFAULT = "default"


class AtomicWrites:
    """Stage files next to their destinations, then swap them all in; undo everything on error."""

    def __init__(self):
        self.staged: list[tuple[str, str]] = []     # (temporary file, destination)
        self.backups: list[tuple[str, str | None]] = []
        self.made: list[str] = []
        self.committed = False

    def makedirs(self, folder: str) -> None:
        missing = []
        while folder and not os.path.isdir(folder):
            if os.path.lexists(folder):
                raise NotADirectoryError(f"save_adapter: {folder!r} exists and is not a folder, so the adapter "
                                         "cannot be written under it; choose another destination.")
            missing.append(folder)
            folder = os.path.dirname(folder)
        for d in reversed(missing):
            os.mkdir(d)
            self.made.append(d)

    def stage(self, dest: str, write) -> None:
        tmp = _temp_name(dest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        self.staged.append((tmp, dest))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        try:
            for tmp, dest in self.staged:
                backup = None
                if os.path.lexists(dest):
                    backup = _temp_name(dest)
                    try:
                        os.link(dest, backup)
                    except OSError:
                        shutil.copy2(dest, backup)
                self.backups.append((dest, backup))
                os.replace(tmp, dest)
            for folder in dict.fromkeys(os.path.dirname(d) for _, d in self.staged):
                _fsync_dir(folder)
            self.committed = True
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        for i in reversed(range(len(self.backups))):
            dest, backup = self.backups[i]
            try:
                if backup is not None:
                    os.replace(backup, dest)  # a no-op if dest is still the backup's hard link
                elif os.path.lexists(dest):
                    os.remove(dest)
            except OSError:
                if backup is not None and _same_file(dest, backup):
                    continue  # dest still is the backup's hard link (same bytes): cleanup removes the backup
                # keep the backup file: it is the only copy of the old file
                warnings.warn(f"save_adapter: could not restore {dest!r}; its previous content is in {backup!r}.",
                              RuntimeWarning, stacklevel=4)
                self.backups[i] = (dest, "keep")

    def cleanup(self) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)
        for _, backup in self.backups:
            if backup not in (None, "keep"):
                _remove(backup)
        if not self.committed:
            for d in reversed(self.made):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def _temp_name(dest: str) -> str:
    folder, base = os.path.split(dest)
    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(f, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save

    f.write(save(tensors, metadata=metadata))


# safetensors dtype -> bytes per element (the dtypes torch reads)
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100_000_000


def existing_folder(path, fn: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: the folder {path!r} does not exist. funclora reads local folders; download "
                                "a hub adapter first (e.g. huggingface_hub.snapshot_download).")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: {path!r} is a file; pass the folder that holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}.")
    return path


def named_adapters(folder: str) -> list[str]:
    return sorted(e for e in os.listdir(folder) if not e.startswith(".")
                  and os.path.isfile(os.path.join(folder, e, CONFIG_NAME)))


def subfolder(path, name: str, fn: str) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ValueError(f"{fn}: adapter name {name!r} must be a plain folder name (no '/', no NUL byte, "
                         "not '.' or '..').")
    path = os.fspath(path)
    if "\0" in path:
        raise ValueError(f"{fn}: the path {path!r} contains a NUL byte; no file system accepts it.")
    return path if name == DEFAULT else os.path.join(path, name)


def adapter_folder(path, adapter_name, fn: str) -> str:
    folder = existing_folder(path, fn)
    if adapter_name not in (None, DEFAULT):
        sub = subfolder(folder, adapter_name, fn)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"{fn}: {folder!r} has no adapter named {adapter_name!r} (no folder {sub!r}); "
                                    f"named adapters there: {named_adapters(folder)}.")
        return sub
    if not os.path.exists(os.path.join(folder, CONFIG_NAME)) and not os.path.exists(os.path.join(folder, WEIGHTS_NAME)):
        names = named_adapters(folder)
        if names:
            raise FileNotFoundError(f"{fn}: {folder!r} has no default adapter ({CONFIG_NAME} at its root) but holds "
                                    f"the named adapters {names}: pass adapter_name={names[0]!r}, or use "
                                    "load_adapters to read them all.")
    return folder


def read_json(file: str, fn: str) -> dict:
    """The JSON object in ``file`` (an ``adapter_config.json``); errors name the file and the fix."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{fn}: {file!r} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{fn}: {file!r} is not UTF-8 text ({e}); it should be PEFT's JSON config.") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{fn}: {file!r} is not valid JSON ({e}); rewrite it, e.g. with "
                               "config.to_json_string().") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{fn}: {file!r} must hold a JSON object, found {type(data).__name__}.")
    return data


def read_header(file: str, fn: str) -> tuple[dict, int]:
    """The validated safetensors header ``{name: {dtype, shape, data_offsets}}`` and the data start."""
    if not os.path.isfile(file):
        pickle = os.path.join(os.path.dirname(file), PICKLE_NAME)
        if os.path.isfile(pickle):
            raise AdapterFileError(
                f"{fn}: {os.path.dirname(file)!r} holds {PICKLE_NAME}, a pickle file (PEFT's "
                "safe_serialization=False); funclora never unpickles. If you trust it, convert it once: "
                "`import torch, safetensors.torch; safetensors.torch.save_file(torch.load(path_to_bin, "
                f"weights_only=True), path_to_folder + '/{WEIGHTS_NAME}', metadata={{'format': 'pt'}})`.")
        raise FileNotFoundError(f"{fn}: {file!r} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    size = os.path.getsize(file)

    def bad(what):
        return AdapterFileError(f"{fn}: {file!r} is not a valid safetensors file: {what}. Save it again.")

    header, n = _raw_header(file, size, bad)
    spans = [_entry_span(name, info, bad) for name, info in header.items() if name != "__metadata__"]
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise bad(f"{name!r} starts at byte {begin} of the data, expected {end}")
        end = stop
    if 8 + n + end != size:
        raise bad(f"the tensors need {8 + n + end} bytes but the file has {size} "
                  f"({'truncated' if size < 8 + n + end else 'trailing bytes'})")
    return header, 8 + n


def _raw_header(file: str, size: int, bad) -> tuple[dict, int]:
    """``(header JSON object, its length n)``: the 8-byte length, then n bytes of JSON."""
    if size == 0:
        raise bad("the file is empty")
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it has only {size} bytes (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise bad(f"its header claims {n} bytes but the file has {size} (truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    return header, n


def _entry_span(name: str, info, bad) -> tuple[int, int, str]:
    """``(begin, end, name)`` of one header entry, after checking its dtype, shape and byte count."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"the entry {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPE_SIZES:
        raise bad(f"{name!r} has dtype {dtype!r}; adapters use one of {sorted(_DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"{name!r} has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"{name!r} has data_offsets {offsets!r}")
    numel = 1
    for s in shape:
        numel *= s
    if offsets[1] - offsets[0] != numel * _DTYPE_SIZES[dtype]:
        raise bad(f"{name!r} has {offsets[1] - offsets[0]} bytes of data but shape {shape} {dtype} needs "
                  f"{numel * _DTYPE_SIZES[dtype]}")
    return offsets[0], offsets[1], name


def read_weights(folder: str, fn: str) -> tuple[dict[str, torch.Tensor], dict]:
    file = os.path.join(folder, WEIGHTS_NAME)
    header, _ = read_header(file, fn)
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in header if k != "__metadata__"}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - safetensors' Rust panics derive from BaseException
        raise AdapterFileError(f"{fn}: {file!r} could not be read as safetensors: {e}. Save it again.") from None
    return tensors, header.get("__metadata__", {})
