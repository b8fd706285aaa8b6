"""Finding a cluster to connect to: an explicit file, a profile, this process, the newest."""

from __future__ import annotations

from pathlib import Path

from .. import error, paths

__all__ = ["find_connection_info"]


def _no_cluster_message(where: str) -> str:
    return (
        f"No ipyfarm cluster found ({where}). Start one from a shell with "
        "`ipyfarm start -n 4 --daemonize`, or in Python with "
        "`rc = ipyfarm.Cluster(n=4).start_and_connect_sync()`; or pass "
        "Client(url_file=...) / Client(profile=...) for a cluster started elsewhere."
    )


def find_connection_info(url_file: str | Path | None = None,
                         profile: str | None = None) -> dict:
    """The controller's connection info: explicit file, profile, this process, newest."""
    if url_file is not None:
        path = Path(url_file)
        if not path.exists():
            raise error.NoClusterError(_no_cluster_message(f"no file {path}"))
        return paths.read_json(path)
    if profile is not None:
        path = paths.cluster_file(profile)
        if not path.exists():
            raise error.NoClusterError(_no_cluster_message(f"no file for profile {profile!r}"))
        info = paths.read_json(path)
        if not paths.pid_alive(int(info.get("pid", -1))):
            raise error.NoClusterError(_no_cluster_message(
                f"the cluster of profile {profile!r} (pid {info.get('pid')}) is not running"))
        return info
    from ..controller.embedded import current_embedded

    embedded = current_embedded()
    if embedded is not None:
        return embedded.connection_info()
    found = paths.find_cluster_files()
    if not found:
        raise error.NoClusterError(_no_cluster_message(
            f"no embedded controller in this process, no running cluster in {paths.runtime_dir()}"))
    return found[0][1]
