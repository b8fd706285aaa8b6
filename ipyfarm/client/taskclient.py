"""TaskClient: the oldest IPython task-farming interface, on top of a LoadBalancedView.

::

    tc.run(task) ─► rc.load_balanced_view(retries=task.retries, placement=task.depend)
       │              .apply_async(ops.run_task, code, push, pull, clear_before, clear_after)
       │                      │ runs on the engine the scheduler picks
       ▼                      ▼
    task id 0,1,2,...   ◄── attempt done: failed after its retries, and a recovery_task?
       │                       yes: submit the recovery task under the same task id
       ▼                       no:  the task's TaskResult is final
    get_task_result(id) / barrier(ids) / queue_status() / abort(id)

Task ids are small integers counted per TaskClient; each maps to the msg_id of the
attempt now running (the task itself, or one of its recovery tasks). A ``Task``'s
``depend`` predicate becomes the view's ``placement`` flag, ``retries`` the view's
``retries``. :class:`TaskResult` times are ``datetime`` objects (as in
``AsyncResult.metadata``), ``duration`` is seconds from submission to completion.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Iterable

from .. import error

__all__ = ["MapTask", "StringTask", "Task", "TaskClient", "TaskResult"]


def _ops() -> Any:
    from ..engine import ops

    return ops


# ---------------------------------------------------------------------- task descriptions
class _BaseTask:
    """What every task has: namespace clearing, retries, a recovery task, a dependency."""

    def __init__(self, clear_before: bool = False, clear_after: bool = False,
                 retries: int = 0, recovery_task: _BaseTask | None = None,
                 depend: Callable[[dict], bool] | None = None):
        self.clear_before = clear_before
        self.clear_after = clear_after
        self.retries = retries
        self.recovery_task = recovery_task
        self.depend = depend

    def _check(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) \
                or self.retries < 0:
            raise ValueError(f"{self!r}: retries must be a count >= 0, not {self.retries!r}")
        if self.depend is not None and not callable(self.depend):
            raise TypeError(f"{self!r}: depend must be a function of an engine's properties "
                            f"dict (or None), not {type(self.depend).__name__}")
        if self.recovery_task is not None and not isinstance(self.recovery_task, _BaseTask):
            raise TypeError(f"{self!r}: recovery_task must be a Task or MapTask, "
                            f"not {type(self.recovery_task).__name__}")

    def _call(self) -> tuple[Callable, tuple]:
        """The engine-side function and its arguments."""
        raise NotImplementedError

    def _results(self, value: Any) -> dict:
        """The ``TaskResult.results`` dict from the engine-side function's return value."""
        raise NotImplementedError


class Task(_BaseTask):
    """Python/IPython source to run on an engine (``StringTask`` is the same class).

    ``pull``: a name or list of names whose values become ``TaskResult.results``;
    ``push``: a dict put in the engine's namespace before the code runs;
    ``clear_before`` / ``clear_after``: empty the engine's namespace before / after;
    ``retries``: reruns after a failure (elsewhere when possible); ``recovery_task``: a
    task run when this one still fails, whose result then stands for this task's;
    ``depend``: ``f(properties) -> bool``, the engines this task may run on.
    Every attribute can be set after construction.
    """

    def __init__(self, expression: str, pull: str | list | tuple | None = None,
                 push: dict | None = None, clear_before: bool = False,
                 clear_after: bool = False, retries: int = 0,
                 recovery_task: _BaseTask | None = None,
                 depend: Callable[[dict], bool] | None = None):
        super().__init__(clear_before, clear_after, retries, recovery_task, depend)
        self.expression = expression
        self.pull = pull
        self.push = push

    def __repr__(self) -> str:
        code = self.expression if len(self.expression) <= 40 else self.expression[:37] + "..."
        return f"Task({code!r}, pull={self.pull!r})"

    def _check(self) -> None:
        if not isinstance(self.expression, str):
            raise TypeError(f"a Task's expression must be source code (str), "
                            f"not {type(self.expression).__name__}")
        pull = self.pull
        if pull is not None and not isinstance(pull, str) and not (
                isinstance(pull, list | tuple) and all(isinstance(n, str) for n in pull)):
            raise TypeError(f"{self!r}: pull must be a name or a list of names, not {pull!r}")
        if self.push is not None and not isinstance(self.push, dict):
            raise TypeError(f"{self!r}: push must be a dict of name: value, "
                            f"not {type(self.push).__name__}")
        super()._check()

    def _call(self) -> tuple[Callable, tuple]:
        pull = self.pull if self.pull is None or isinstance(self.pull, str) else list(self.pull)
        return _ops().run_task, (self.expression, dict(self.push or {}), pull,
                                 bool(self.clear_before), bool(self.clear_after))

    def _results(self, value: Any) -> dict:
        return dict(value)


StringTask = Task


class MapTask(_BaseTask):
    """A function call on an engine: ``function(*args, **kwargs)``.

    Its ``TaskResult.results`` is ``{"result": return_value}`` (so ``tr.ns.result``).
    The other attributes are those of :class:`Task`.
    """

    def __init__(self, function: Callable, args: tuple | list | None = None,
                 kwargs: dict | None = None, clear_before: bool = False,
                 clear_after: bool = False, retries: int = 0,
                 recovery_task: _BaseTask | None = None,
                 depend: Callable[[dict], bool] | None = None):
        super().__init__(clear_before, clear_after, retries, recovery_task, depend)
        self.function = function
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"MapTask({getattr(self.function, '__name__', self.function)!r})"

    def _check(self) -> None:
        if not callable(self.function):
            raise TypeError(f"a MapTask needs a callable, not {type(self.function).__name__}")
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise TypeError(f"{self!r}: kwargs must be a dict, not {type(self.kwargs).__name__}")
        super()._check()

    def _call(self) -> tuple[Callable, tuple]:
        return _ops().run_function, (self.function, tuple(self.args or ()),
                                     dict(self.kwargs or {}), bool(self.clear_before),
                                     bool(self.clear_after))

    def _results(self, value: Any) -> dict:
        return {"result": value}


# ---------------------------------------------------------------------- results
class _ResultNS:
    """Attribute access to a results dict: ``tr.ns.a is tr.results['a']``."""

    def __init__(self, results: dict):
        object.__setattr__(self, "_results", results)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._results[name]
        except KeyError:
            raise AttributeError(f"the task pulled no {name!r}; it pulled "
                                 f"{sorted(self._results)}") from None

    def __dir__(self) -> list[str]:
        return sorted(self._results)

    def __repr__(self) -> str:
        return f"NS({self._results!r})"


class TaskResult:
    """A finished task: ``results`` (pulled names; ``{"result": value}`` for a MapTask),
    ``ns`` (the same by attribute), ``taskid``, ``engineid`` (where the final attempt ran),
    ``submitted`` / ``started`` / ``completed`` (datetimes), ``duration`` (seconds from
    submission to completion), ``failure`` (the exception, or None).

    When the task failed and a recovery task ran, the result is the recovery task's:
    ``recovered`` is True, ``failures`` lists the earlier failures (the task's own first)
    and ``task`` is the task that produced this result.
    """

    def __init__(self, taskid: int, task: _BaseTask, results: dict, failure: Any,
                 metadata: Any, submitted: Any, failures: list):
        self.taskid = taskid
        self.task = task
        self.results = results
        self.failure = failure
        self.failures = failures
        self.recovered = bool(failures)
        md = metadata or {}
        self.engineid = md.get("engine_id")
        self.submitted = submitted
        self.started = md.get("started")
        self.completed = md.get("completed") or md.get("received")
        self.msg_id = md.get("msg_id")

    @property
    def ns(self) -> _ResultNS:
        return _ResultNS(self.results)

    @property
    def duration(self) -> float | None:
        if self.submitted is None or self.completed is None:
            return None
        try:
            return (self.completed - self.submitted).total_seconds()
        except TypeError:  # one naive, one aware datetime
            return None

    def raise_exception(self) -> None:
        """Raise the failure, if any."""
        if self.failure is not None:
            raise self.failure

    def __repr__(self) -> str:
        shown = self.results if self.failure is None else repr(self.failure)
        return f"TaskResult[ID:{self.taskid}]:{shown}"


# ---------------------------------------------------------------------- bookkeeping
class _Entry:
    """One task id: its chain (task, recovery, ...), the attempt running, its future."""

    def __init__(self, taskid: int, chain: list[_BaseTask]):
        self.taskid = taskid
        self.chain = chain
        self.step = 0
        self.ar: Any = None  # the AsyncResult of the attempt running (or last run)
        self.msg_ids: list[str] = []  # of every attempt
        self.submitted: Any = None
        self.failures: list = []
        self.aborted = False
        self.future: Future = Future()


def _recovery_chain(task: _BaseTask) -> list[_BaseTask]:
    """``[task, task.recovery_task, ...]``, checked; a loop is an error."""
    chain: list[_BaseTask] = []
    seen: set[int] = set()
    t: _BaseTask | None = task
    while t is not None:
        if not isinstance(t, _BaseTask):
            raise TypeError(f"run needs a Task, StringTask or MapTask, not {type(t).__name__}")
        if id(t) in seen:
            raise ValueError(
                f"the recovery tasks of {task!r} loop back to {t!r}; a recovery chain must "
                "end (set the last recovery_task to None)")
        seen.add(id(t))
        t._check()
        chain.append(t)
        t = t.recovery_task
    return chain


def _frozen(task: _BaseTask) -> _BaseTask:
    """A copy, so that changing a Task after ``run`` does not change what runs."""
    clone = object.__new__(type(task))
    clone.__dict__.update(task.__dict__)
    clone.recovery_task = None
    return clone


class TaskClient:
    """Task farming (the IPython 0.9 interface): ``run`` tasks, get their ``TaskResult``.

    ``TaskClient(client)`` uses a connected :class:`~ipyfarm.Client`; ``TaskClient()`` or
    ``TaskClient(profile=...)`` connects one (as ``ipp.Client(**kwargs)``) and closes it
    in :meth:`close`.
    """

    def __init__(self, client: Any = None, **client_kwargs: Any):
        if client is None:
            from .client import Client

            client = Client(**client_kwargs)
            self._owns_client = True
        elif client_kwargs:
            raise TypeError(f"pass either a client or Client arguments, not both: "
                            f"{sorted(client_kwargs)}")
        else:
            self._owns_client = False
        self.client = client
        self.view = client.load_balanced_view()
        self._entries: dict[int, _Entry] = {}
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TaskClient: {len(self._entries)} tasks, {self.client!r}>"

    # ------------------------------------------------------------------ submitting
    def run(self, task: _BaseTask, block: bool = False) -> int:
        """Submit ``task``; returns its task id (``block=True``: after it finished)."""
        chain = [_frozen(t) for t in _recovery_chain(task)]
        with self._lock:
            entry = _Entry(next(self._counter), chain)
            self._entries[entry.taskid] = entry
        try:
            self._submit(entry)
        except BaseException:
            with self._lock:
                del self._entries[entry.taskid]
            raise
        if block:
            entry.future.result()
        return entry.taskid

    def _submit(self, entry: _Entry) -> None:
        task = entry.chain[entry.step]
        f, args = task._call()
        view = self.client.load_balanced_view(retries=task.retries, placement=task.depend)
        ar = view.apply_async(f, *args)
        with self._lock:
            entry.ar = ar
            entry.msg_ids.extend(ar.msg_ids)
            if entry.submitted is None:
                entry.submitted = ar.metadata.get("submitted")
            aborted = entry.aborted
        if aborted:  # abort() came while this recovery attempt was being sent
            self.client.abort(ar.msg_ids)
        ar.add_done_callback(lambda fut, e=entry: self._attempt_done(e, fut))

    def _attempt_done(self, entry: _Entry, ar: Any) -> None:
        """Runs on the client's I/O thread: finish the task or start its recovery."""
        try:
            self._next_step(entry, ar)
        except Exception as e:  # a bug here must not leave the task pending forever
            if not entry.future.done():
                self._settle(entry, entry.chain[entry.step], None, e, ar)

    def _next_step(self, entry: _Entry, ar: Any) -> None:
        task = entry.chain[entry.step]
        failure = ar.exception()
        with self._lock:
            recover = (failure is not None and not entry.aborted
                       and entry.step + 1 < len(entry.chain))
            if recover:
                entry.failures.append(failure)
                entry.step += 1
        if recover:
            try:
                self._submit(entry)
            except Exception as e:  # the client closed, ...: the task ends failed
                self._settle(entry, entry.chain[entry.step], None, e, ar)
            return
        value = None if failure is not None else ar.result()
        self._settle(entry, task, value, failure, ar)

    def _settle(self, entry: _Entry, task: _BaseTask, value: Any, failure: Any, ar: Any) -> None:
        results: dict = {}
        if failure is None:
            try:
                results = task._results(value)
            except Exception as e:
                failure = e
        tr = TaskResult(entry.taskid, task, results, failure, ar.metadata, entry.submitted,
                        list(entry.failures))
        entry.future.set_result(tr)

    # ------------------------------------------------------------------ results
    def _entry(self, taskid: int) -> _Entry:
        try:
            return self._entries[taskid]
        except KeyError:
            raise KeyError(f"no task {taskid!r} in this TaskClient (ids run from 0 to "
                           f"{len(self._entries) - 1 if self._entries else 'none yet'}; "
                           "clear() forgets finished ones)") from None

    def get_task_result(self, taskid: int, block: bool = False,
                        timeout: float | None = None) -> TaskResult | None:
        """The task's :class:`TaskResult`; None while it runs, unless ``block``
        (then wait, up to ``timeout`` seconds: ``ipp.error.TimeoutError``)."""
        entry = self._entry(taskid)
        if not block:
            return entry.future.result() if entry.future.done() else None
        try:
            return entry.future.result(timeout)
        except FuturesTimeout:
            raise error.TimeoutError(
                f"task {taskid} did not finish within {timeout} s") from None

    def barrier(self, taskids: int | Iterable[int], timeout: float | None = None) -> None:
        """Wait until the tasks have finished (failed ones count as finished)."""
        ids = [taskids] if isinstance(taskids, int) else list(taskids)
        entries = [self._entry(t) for t in ids]
        if timeout is None:
            for e in entries:
                e.future.result()
            return
        import time

        deadline = time.monotonic() + timeout
        for e in entries:
            try:
                e.future.result(max(0.0, deadline - time.monotonic()))
            except FuturesTimeout:
                left = [x.taskid for x in entries if not x.future.done()]
                raise error.TimeoutError(
                    f"{len(left)} of {len(entries)} tasks did not finish within {timeout} s: "
                    f"{left[:10]}{'...' if len(left) > 10 else ''}") from None

    def queue_status(self, verbose: bool = False) -> dict:
        """This TaskClient's tasks by state: ``scheduled`` (submitted, on no engine yet),
        ``pending`` (on an engine: running, as the controller's default hwm=1 lets an
        engine hold one task), ``succeeded``, ``failed``. Counts, or task ids if
        ``verbose``."""
        with self._lock:
            entries = list(self._entries.values())
        on_engines: set[str] = set()
        if any(not e.future.done() for e in entries):
            for key, q in self.client.queue_status(verbose=True).items():
                if key != "unassigned":
                    on_engines.update(q["tasks"])
                    on_engines.update(q["queue"])
        out: dict[str, list[int]] = {"scheduled": [], "pending": [], "succeeded": [],
                                     "failed": []}
        for e in entries:  # done is read after the controller answered: no task is lost
            if e.future.done():
                state = "failed" if e.future.result().failure is not None else "succeeded"
            elif e.ar is not None and e.ar.msg_ids[0] in on_engines:
                state = "pending"
            else:
                state = "scheduled"
            out[state].append(e.taskid)
        if verbose:
            return {k: sorted(v) for k, v in out.items()}
        return {k: len(v) for k, v in out.items()}

    # ------------------------------------------------------------------ control
    def abort(self, taskid: int) -> None:
        """Abort a task that has not started (and its recovery tasks); returns at once.

        A finished task raises ``IndexError``; a running one can't be stopped this way
        (interrupt its engine with ``client.send_signal``) and ends normally.
        """
        entry = self._entry(taskid)
        with self._lock:
            if entry.future.done():
                raise IndexError(f"task {taskid} already completed; nothing to abort")
            entry.aborted = True
            ar = entry.ar
        if ar is not None and not ar.done():  # None: _submit sees ``aborted`` and aborts
            self.client.abort(ar.msg_ids)

    def spin(self) -> None:
        """Kept for compatibility: the controller reschedules on its own (also when
        engine properties change), and results arrive on a background thread."""
        self.client.spin()

    def clear(self) -> None:
        """Forget the results of finished tasks (here and in the client's cache)."""
        with self._lock:
            done = [e for e in self._entries.values() if e.future.done()]
            for e in done:
                del self._entries[e.taskid]
        msg_ids = [m for e in done for m in e.msg_ids if m not in self.client.outstanding]
        if msg_ids:
            self.client.purge_local_results(msg_ids)

    # ------------------------------------------------------------------ quick parallelism
    def map(self, func: Callable, *sequences: Any) -> list:
        """``list(map(func, *sequences))``, load balanced over the engines."""
        return list(self.view.map(func, *sequences, block=True))

    def parallel(self, **flags: Any) -> Callable:
        """Decorator: the decorated ``f(seq)`` maps ``f`` over ``seq`` on the engines
        (load balanced) and returns the list of results."""
        return self.view.parallel(block=True, **flags)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the client if this TaskClient connected it (tasks keep running)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
