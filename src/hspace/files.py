"""Every file hspace writes or reads from a user's disk goes through here.

- ``write_atomic``: a temporary file with a name of its own (process id and a random part) beside the
  target, flushed to the disk (``fsync``), then ``os.replace`` and an ``fsync`` of the folder, so that after
  a power loss the name holds the old file or the whole new one, never an empty one; a failed write (a full
  disk) removes its temporary file, leaves what was there untouched and raises ``HspaceError`` naming the file.
- ``staged_folder``: a method's result (several files) is written into a hidden staging folder and only
  moved into place when every file was written, so a failure never leaves a partial set behind.
- ``check_output_dir`` / ``check_output_file``: outputs are checked before any computation.
- ``read_json``, ``read_safetensors``: readers that turn every way a file can be wrong into a clear error.
- ``safe_name``: names from users or files become file names that never leave their folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import HspaceError

MAX_JSON_DEPTH = 64


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, however the writer reports it: an OSError, or a library's own error (safetensors raises
    SafetensorError "... No space left on device (os error 28)")."""
    return getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e) or "No space left on device" in str(e)


def _write_error(path: Path, e: BaseException) -> HspaceError:
    if _disk_full(e):
        return HspaceError(f"the disk is full: cannot write {str(path)!r} (nothing there was overwritten); free space and run the same command again")
    return HspaceError(f"cannot write {str(path)!r}: {getattr(e, 'strerror', None) or e}")


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, flush tmp to the disk and move it onto ``path`` (then flush the folder's entry);
    on any failure remove tmp and keep ``path`` as it was."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) or (isinstance(e, Exception) and _disk_full(e)):
            raise _write_error(path, e) from None
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2))


def save_image(image, path: str | Path) -> Path:
    """A PIL image as PNG, atomically."""
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a staging folder; when the block ends without error, move every file in it into ``folder``
    (replacing files of the same name, keeping others). On error nothing reaches ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = folder / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        _move_into(stage, folder)
    except Exception as e:
        if isinstance(e, OSError) or (not isinstance(e, HspaceError) and _disk_full(e)):
            raise _write_error(folder, e) from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into(source: Path, folder: Path) -> None:
    """Move every file under ``source`` to the same place under ``folder``, replacing files of the same name; a
    subfolder that exists there already is filled file by file (a pipeline folder's ``transformer/`` exported again)."""
    for item in sorted(source.iterdir()):
        target = folder / item.name
        if item.is_dir() and target.is_dir():
            _move_into(item, target)
        else:
            os.replace(item, target)
    fsync(folder)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove temporary files and staging folders that a killed process left in ``folder`` (those of
    processes that are no longer alive); returns how many were removed."""
    removed = 0
    for item in Path(folder).glob(".*"):
        match = re.fullmatch(r"\..*\.(\d+)-[0-9a-f]{8}\.tmp|\.staging-(\d+)-[0-9a-f]{8}", item.name)
        if match and not pid_alive(int(match.group(1) or match.group(2))):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    item.unlink()
            removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writable_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """Raise before any work unless ``path`` is (or can become) a writable folder: a file is written there for a
    moment to be sure (permissions alone do not tell: /proc and /sys look writable to root)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HspaceError(f"{what} {str(path)!r} is a file; give a folder")
    for link in [path, *path.parents]:
        if link.is_symlink() and not link.exists():
            raise HspaceError(f"{what} {str(path)!r} goes through the link {str(link)!r} to {os.readlink(link)!r}, which does not exist")
    base = _writable_ancestor(path)
    if not base.is_dir():
        raise HspaceError(f"{what} {str(path)!r} lies under the file {str(base)!r}; give a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hspace-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HspaceError(f"{what} {str(path)!r} cannot be written: {str(base)!r} refuses a file ({e.strerror or e})") from None
    return path


def check_output_file(path: str | Path, what: str = "-o") -> Path:
    """Raise before any work unless ``path`` can be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise HspaceError(f"{what} {str(path)!r} is a folder; give a file name")
    check_output_dir(path.parent, what=f"{what} {str(path)!r}: its folder")
    return path


def read_json(path: str | Path, what: str, kind: type = dict):
    """JSON of the expected kind (dict or list) from ``path``, or an error naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HspaceError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HspaceError(f"cannot read {what} {str(path)!r}: {e}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise HspaceError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, kind):
        raise HspaceError(f"{what} {str(path)!r} must hold a JSON {'object' if kind is dict else kind.__name__}, got {type(data).__name__}")
    return data


def parse_json_object(text: str, what: str) -> dict:
    """A JSON object from metadata text (bounded nesting), or an error naming ``what``."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError) as e:
        raise HspaceError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HspaceError(f"{what} must be a JSON object, got {type(data).__name__}")
    if _depth(data) > MAX_JSON_DEPTH:
        raise HspaceError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth(value, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level + 1)
    return level


def read_safetensors(path: str | Path, kind: str, what: str) -> tuple[dict, dict]:
    """(metadata, tensors) of an hspace safetensors file of ``kind`` (its metadata's "kind"), or an error
    naming the file: missing, not safetensors, truncated, or another kind of file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HspaceError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for files that are not safetensors
        raise HspaceError(f"{str(path)!r} is not a safetensors file (expected an {what}): {e}") from None
    if metadata.get("kind") != kind:
        raise HspaceError(f"{str(path)!r} is not an {what} (kind={metadata.get('kind')!r}, expected {kind!r})")
    return metadata, tensors


def check_inside(folder: str | Path, root: str | Path, what: str) -> Path:
    """``folder`` unless it leads (through a symbolic link) out of ``root``: a received artefact may hold a
    planted link, and nothing hspace writes may follow one out of the artefact's folder."""
    folder, root = Path(folder), Path(root)
    real, real_root = folder.resolve(), root.resolve()
    if real != real_root and real_root not in real.parents:
        raise HspaceError(f"{what} {str(folder)!r} leads outside {str(root)!r} (to {str(real)!r}, through a link); "
                          "refusing to write there: remove the link")
    return folder


def safe_name(name: str, fallback: str = "direction", suffix: str = "") -> str:
    """A file name made of ``name``: letters, digits and ``._+-=()`` kept, anything else (a path separator)
    replaced by '_', no leading dot, at most 120 characters with ``suffix`` (cut before it, so it is never lost)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+\-=()]", "_", str(name)).lstrip(".")[: 120 - len(suffix)]
    return (cleaned or fallback) + suffix


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats told apart ("face", "face-2", ...), so that no file overwrites another of the same run."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def free_name(folder: Path, name: str, suffix: str) -> Path:
    """``folder/name+suffix``, or the first ``name-N+suffix`` that does not exist yet (never replace a file)."""
    path, n = folder / f"{name}{suffix}", 1
    while path.exists() or path.is_symlink():
        n += 1
        path = folder / f"{name}-{n}{suffix}"
    return path
