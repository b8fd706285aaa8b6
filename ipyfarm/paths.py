"""Where connection files live, and how they are written (JSON, mode 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

__all__ = [
    "cluster_file",
    "find_cluster_files",
    "pid_alive",
    "read_json",
    "runtime_dir",
    "write_secure_json",
]


def runtime_dir() -> Path:
    """The Jupyter runtime directory (``JUPYTER_RUNTIME_DIR`` respected), created 0700."""
    path = Path(jupyter_runtime_dir())
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def cluster_file(profile: str = "default") -> Path:
    """The connection file of the cluster of ``profile``."""
    return runtime_dir() / f"ipyfarm-cluster-{profile}.json"


def write_secure_json(path: Path | str, data: dict) -> None:
    """Write ``data`` so that only the owner can read it, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_json(path: Path | str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_cluster_files() -> list[tuple[Path, dict]]:
    """Cluster files whose controller process is alive, newest first."""
    found = []
    for path in runtime_dir().glob("ipyfarm-cluster-*.json"):
        try:
            info = read_json(path)
        except (OSError, ValueError):
            continue
        if pid_alive(int(info.get("pid", -1))):
            found.append((path.stat().st_mtime, path, info))
    found.sort(key=lambda t: t[0], reverse=True)
    return [(p, i) for _, p, i in found]
