"""Atomic file writes, shared by every module that leaves files behind (data caches, checkpoints,
metrics, figures): a reader, or a crash half-way, sees the old file or the complete new one."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside `path`, then rename it over `path`.

    The temporary name is unique per process and call (concurrent writers, e.g. DDP ranks, never
    share one); it is removed if `write` fails. Plain open() rather than mkstemp, whose files are
    private (0600): the result gets the permissions any new file gets."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # a failed write() (a full disk) names no file: name the one being written
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, payload, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent))
