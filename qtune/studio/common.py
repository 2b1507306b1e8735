"""What every studio route shares: the Studio (project folder, output folder, settings), the API error, the checks
that keep every path inside the project, JSON bodies, and child processes with their logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.errors import USER_ERRORS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_BODY = 1 << 20  # the studio's forms are small: 1 MiB is plenty
STATE_DIR = ".studio"  # <dir>/.studio/: what the studio launched (configs, logs, records)
EXPORTS = "exports"  # <dir>/exports/<name>-<format>[-<type>]: what the export jobs write
# Folders kept beside the runs in <dir>: no run may be called so (docs/studio.md, Names), and no adapter is listed
# from them (a run's checkpoints, its TensorBoard logs, a push dry run).
RESERVED_NAMES = (EXPORTS, STATE_DIR)
RESERVED_SUFFIXES = (".checkpoints", ".runs", ".hub")


class ApiError(Exception):
    """A client error: its HTTP status, a message saying what and where, and the form field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass
class Studio:
    """One studio: the project folder it was started in, the output folder under it, and its settings."""

    project: Path  # absolute, resolved
    dir: Path  # the runs' and adapters' folder (output.dir), absolute, inside project
    token: str | None = None
    host: str = "127.0.0.1"
    base: str | None = None  # the playground's base (None: the newest adapter's, else the embedded model)
    quant: str = "nf4"
    dtype: str | None = None
    playground: Any = None  # qtune.studio.playground.Playground, once created
    processes: dict[str, Any] = field(default_factory=dict)  # runs this studio launched: name -> Launched
    jobs: dict[str, Any] = field(default_factory=dict)  # export jobs: id -> Job
    # runs an earlier studio over this folder launched, which this one was asked to stop: name -> pid
    stopping: dict[str, int] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.dir / STATE_DIR

    def relative(self, path: Path) -> str:
        """`path` as the page shows it: relative to the project folder."""
        try:
            return str(Path(path).resolve().relative_to(self.project))
        except ValueError:
            return str(path)


def check_name(name: Any, what: str = "name", field: str | None = None) -> str:
    """A run or adapter name: a plain folder name (no path, no leading dot), or a 400 naming the field."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ApiError(
            400,
            f"{what} {name!r} is not a plain name: letters, digits, '.', '_', '-', starting with a letter or digit",
            field,
        )
    return name


def check_output_name(name: Any, field: str = "output.name") -> str:
    """A run's name (output.name): a plain name that is none of the folders the studio and qtune keep beside the
    runs (exports/, .studio/, <name>.checkpoints, .runs, .hub), or a 400 naming the field."""
    check_name(name, field, field)
    if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
        raise ApiError(
            400,
            f"{field}: {name!r} is reserved ({', '.join(RESERVED_NAMES)} and names ending in "
            f"{', '.join(RESERVED_SUFFIXES)} are folders kept beside the runs); pick another name",
            field,
        )
    return name


def inside(studio: Studio, path: Any, what: str, field: str | None = None) -> Path:
    """`path` (relative to the project folder, or absolute) resolved, links followed; a 400 naming `field` if it
    leads outside the project folder."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ApiError(400, f"{what}: give a path inside the project folder", field)
    try:
        resolved = (studio.project / Path(path).expanduser()).resolve()
    except RuntimeError as e:  # ~nosuchuser/x: no such home folder (or a link loop)
        message = f"{what}: cannot resolve {path!r} ({e}); give a path inside the project folder"
        raise ApiError(400, message, field) from None
    if not resolved.is_relative_to(studio.project):
        raise ApiError(400, f"{what}: {path} is outside the project folder {studio.project}", field)
    return resolved


async def read_json(request) -> dict[str, Any]:
    """The request's JSON object (at most MAX_BODY bytes; an empty body is {}), or a 400/413 saying what is wrong."""
    from qtune.serve.openai_api import RequestError, parse_json, read_body

    try:  # (the checks of `qtune serve`: size, JSON, an object, no lone surrogate)
        raw = await read_body(request, MAX_BODY)
        return parse_json(raw) if raw else {}
    except RequestError as e:
        raise ApiError(e.status, e.message, e.param) from None


def api(handler):
    """Wrap a route: an ApiError or a qtune error is a JSON 4xx naming what was wrong; a bug is a JSON 500."""
    from starlette.responses import JSONResponse

    async def endpoint(request):
        try:
            return await handler(request)
        except ApiError as e:
            return JSONResponse({"error": {"message": e.message, "field": e.field}}, status_code=e.status)
        except USER_ERRORS as e:
            return JSONResponse({"error": {"message": str(e), "field": None}}, status_code=400)
        except Exception as e:  # a bug: the page shows the reason, the studio stays up
            message = f"internal error: {type(e).__name__}: {e}"
            return JSONResponse({"error": {"message": message, "field": None}}, status_code=500)

    return endpoint


def spawn(studio: Studio, argv: list[str], log: Path) -> subprocess.Popen:
    """Start `python -m qtune.cli ARGV...` in the project folder, in its own process group (so a stop reaches its
    children too), stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the user's HF_HUB_OFFLINE (and the rest) apply as they are
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtune.cli", *argv],
            cwd=studio.project,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def tail(path: Path, lines: int = 80) -> str:
    """The last `lines` lines of a log, progress-bar redraws (carriage returns) reduced to their final state."""
    try:
        with Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r") for line in text.split("\n")]
    return "\n".join(kept[-lines:])


def error_line(text: str) -> str | None:
    """The last `error: ...` line of a log (what the CLI prints when a run fails), if any."""
    # (a progress bar redraws its line with carriage returns: the error may follow one on the same line)
    found = [line for line in re.split(r"[\r\n]", text) if line.startswith("error:")]
    return found[-1][len("error:") :].strip() if found else None
