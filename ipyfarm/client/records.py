"""What a Client asks the controller about tasks: queue and result status, stored results,
resubmission, the task database, purging, and the farm's status for dashboards.

:class:`~ipyfarm.client.client.Client` mixes this in (``self`` is the client, with its
``_hub_request``, ``_resolve_targets`` and records); kept apart so :mod:`.client` stays
the connection, sending and receiving.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jupyter_client.jsonutil import extract_dates

from .. import error
from .asyncresult import AsyncHubResult, AsyncResult, Metadata

__all__ = ["ClientRecords"]


def _aware_dates(value: Any) -> Any:
    """Naive datetimes in a query mean local time: say so before they become JSON."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.astimezone()
    if isinstance(value, dict):
        return {k: _aware_dates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_aware_dates(v) for v in value]
    return value


class ClientRecords:
    """Task-record methods of :class:`~ipyfarm.client.client.Client` (a mixin)."""

    results: dict
    metadata: dict
    history: list
    outstanding: set
    block: bool

    def queue_status(self, targets: Any = "all", verbose: bool = False) -> dict:
        """Per engine: ``{"queue": n, "completed": n, "tasks": n}`` plus ``unassigned``."""
        tgt = None if targets in ("all", None) else self._resolve_targets(targets)
        reply = self._hub_request("queue_request", {"targets": tgt, "verbose": verbose})
        reply.pop("status", None)
        out: dict[Any, Any] = {}
        for k, v in reply.items():
            out[int(k) if k.lstrip("-").isdigit() else k] = v
        if isinstance(targets, int) and targets in out:
            return out[targets]
        return out

    def result_status(self, msg_ids: Any, status_only: bool = True) -> dict:
        """Which of ``msg_ids`` the controller has finished: ``{"pending": [...], "completed": [...]}``."""
        ids = self._msg_ids_of(msg_ids)
        reply = self._hub_request("result_request", {"msg_ids": ids, "status_only": True})
        return {"pending": reply["pending"], "completed": reply["completed"],
                "missing": reply["missing"]}

    def _fetch_results(self, msg_ids: list[str]) -> list[str]:
        """Ask the controller to resend stored results; returns ids it does not know."""
        reply = self._hub_request("result_request", {"msg_ids": msg_ids})
        if reply["released"]:
            raise KeyError(
                f"the controller no longer holds the results of {reply['released']}: they "
                "were too large to keep or pushed out by newer results (it stores results "
                "up to a size limit); rerun the tasks")
        return reply["missing"]

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None,
                   owner: bool = False) -> AsyncResult:
        """An AsyncResult for earlier tasks, also ones another client submitted."""
        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        single = isinstance(indices_or_msg_ids, int | str)
        ids = self._msg_ids_of(indices_or_msg_ids)
        local = all(m in self.metadata for m in ids)
        if local:
            ar = AsyncResult(self, ids, "get_result", single=single)
        else:
            for m in ids:
                self.metadata.setdefault(m, Metadata(msg_id=m))
            ar = AsyncHubResult(self, ids, "get_result", single=single)
            ar._watch_remote()
        if block if block is not None else self.block:
            ar.wait()
        return ar

    def resubmit(self, indices_or_msg_ids: Any = None, metadata: Any = None,
                 block: bool | None = None) -> AsyncResult:
        """Run finished tasks again (new msg_ids, same request); returns their AsyncResult.

        The controller keeps requests within a memory budget: a task whose request was
        too large (or pushed out by newer ones) can't be resubmitted and is named in the
        error.
        """
        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        ids = self._msg_ids_of(indices_or_msg_ids)
        reply = self._hub_request("resubmit_request", {"msg_ids": ids})
        if reply.get("status") != "ok":
            raise error.IPyFarmError(reply.get("evalue", "resubmit failed"))
        new_ids = [reply["resubmitted"][m] for m in ids]
        with self._lock:
            for old_id, new_id in zip(ids, new_ids, strict=True):
                old = self.metadata.get(old_id)
                md = Metadata(msg_id=new_id, engine_id=None)
                if old is not None:
                    md["after"], md["follow"] = list(old["after"]), list(old["follow"])
                self.metadata.setdefault(new_id, md)
                if new_id not in self.results:
                    self.outstanding.add(new_id)
                self.history.append(new_id)
        ar = AsyncResult(self, new_ids, "resubmit", single=len(new_ids) == 1 and
                         isinstance(indices_or_msg_ids, int | str))
        if block if block is not None else self.block:
            ar.wait()
        return ar

    def farm_status(self) -> dict:
        """A snapshot of the farm for dashboards: ``engines`` (id, hostname, pid, state
        idle/busy/dead, queue, completed, failed, rss, lost_reason), ``tasks`` (running,
        queued, waiting, ok, error, aborted), ever-growing ``dispatched`` / ``finished``
        counters (their change over time is the throughput), ``scheme``, ``hwm``."""
        return self._hub_request("status_request", {})["farm"]

    def db_query(self, query: dict, keys: list | None = None) -> list[dict]:
        """Task records matching ``query`` (ipyparallel's operators: ``$lt``, ``$gt``,
        ``$lte``, ``$gte``, ``$eq``, ``$ne``, ``$in``, ``$nin``, ``$glob``)."""
        if not isinstance(query, dict):
            raise TypeError(f"query must be a dict, not {type(query).__name__}")
        reply = self._hub_request("db_request", {"query": _aware_dates(query), "keys": keys})
        if reply.get("status") != "ok":
            exc = {"KeyError": KeyError, "TypeError": TypeError}.get(reply.get("ename", ""),
                                                                      ValueError)
            raise exc(reply.get("evalue", "query failed"))
        return [extract_dates(r) for r in reply["records"]]

    def hub_history(self) -> list[str]:
        """Every msg_id the controller has a record of, oldest first."""
        return self._hub_request("history_request", {})["history"]

    def purge_local_results(self, jobs: Any = "all") -> None:
        all_ = isinstance(jobs, str) and jobs == "all"
        ids = list(self.results) if all_ else self._msg_ids_of(jobs)
        for m in ids:
            if m in self.outstanding:
                raise RuntimeError(f"task {m} is still running; wait for it before purging")
        for m in ids:
            self.results.pop(m, None)
            self.metadata.pop(m, None)

    def purge_hub_results(self, jobs: Any = (), targets: Any = ()) -> None:
        if isinstance(jobs, str) and jobs == "all":
            msg_ids: Any = "all"
        else:
            msg_ids = self._msg_ids_of(jobs) if jobs else []
        engine_ids = [] if not targets else self._resolve_targets(targets)
        self._hub_request("purge_request", {"msg_ids": msg_ids, "engine_ids": engine_ids})

    def purge_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget finished results on the controller and here (``jobs="all"`` for all)."""
        self.purge_hub_results(jobs, targets)
        if isinstance(jobs, str) and jobs == "all":
            self.purge_local_results("all")
        elif jobs:
            self.purge_local_results(jobs)

    def purge_everything(self) -> None:
        self.purge_results("all")
        self.history = [m for m in self.history if m in self.outstanding]
