"""Provenance of recorded measurements (``data/measurements/*.json``).

Every GPU figure in the book is plotted from a recording, never typed in. A recording says where its numbers
come from: the device, the date (UTC), the library versions and the exact command. Benchmarks build their JSON
with :func:`provenance` and write it with :func:`write_recording`, so every recording carries the same fields.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

__all__ = ["provenance", "write_recording"]


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, Any]:
    import torch

    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def provenance(command: str) -> dict[str, Any]:
    """The provenance fields of a recording: ``device``, ``date`` (UTC, ISO 8601), ``versions``, ``command``.

    ``command`` is the command line that reproduces the recording, e.g. ``"python benchmarks/bench_x.py"``.
    """
    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"command must be the non-empty command line that made the recording, got {command!r}")
    return {
        "device": _device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "command": command,
    }


def write_recording(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (which must contain the :func:`provenance` fields) as indented JSON to ``path``."""
    missing = [key for key in ("device", "date", "versions", "command") if key not in record]
    if missing:
        raise ValueError(f"record must carry its provenance; missing {missing} (use refimpl.recording.provenance)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
