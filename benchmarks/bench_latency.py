"""Where the time of one task goes: the figures behind the round-trip and throughput work.

    python benchmarks/bench_latency.py [--quick]

Prints, on an embedded cluster of 2 engines:

- the raw ``apply_request`` and ``execute_request`` round trips to one engine (a DEALER
  straight to its shell port, no controller): the engine's own share;
- a load-balanced ``apply_sync`` cut into stages, from timestamps taken in the notebook
  process (the hub's and the client's entry points, wrapped) and the engine's own
  ``started`` / ``completed``;
- the CPU each thread of each process spends per no-op task in an ``apply_async`` loop
  (``/proc`` times), and that loop's rate for several ``hwm`` settings.

Not a test: it asserts nothing. To compare two versions, run it with each on
``PYTHONPATH`` one after the other (the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import psutil
import zmq


def noop(*args: Any) -> None:
    return None


def start(n: int = 2, **kwargs: Any) -> tuple[Any, Any]:
    import ipyfarm as ipp

    cluster = ipp.Cluster(n=n, log_level="ERROR", **kwargs)
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=120)
    return cluster, rc


def raw_round_trips(rc: Any, seconds: float) -> dict[str, float]:
    """Microseconds per request sent straight to engine 0's shell socket."""
    import ipykernel

    from ipyfarm.protocol.serialize import pack_apply
    from ipyfarm.protocol.session import FarmSession

    with open(rc[0].apply_sync(ipykernel.get_connection_file)) as f:
        info = json.load(f)
    session = FarmSession(key=info["key"].encode(), username="bench")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    apply_bufs = pack_apply(noop, (), {})
    execute = {"code": "pass", "silent": False, "store_history": True,
               "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
    out = {}
    try:
        for name, msg_type, content, bufs in (("apply", "apply_request", {}, apply_bufs),
                                              ("execute", "execute_request", execute, [])):
            def one(msg_type: str = msg_type, content: dict = content,
                    bufs: list = bufs) -> None:
                msg = session.msg(msg_type, content=content)
                sock.send_multipart(session.serialize_with_buffers(msg, None, bufs))
                if not sock.poll(10_000):
                    raise TimeoutError(f"engine 0 did not answer a raw {msg_type}")
                sock.recv_multipart()

            for _ in range(50):
                one()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                one()
                n += 1
            out[name] = (time.perf_counter() - t0) / n * 1e6
    finally:
        sock.close(0)
        ctx.term()
    return out


STAGES = ["build the request", "submit (hub code)", "hub send -> engine starts",
          "the task", "engine reply -> hub", "hub: decode, record the reply",
          "client: the result", "-> the waiting thread", "total"]


def stages(cluster: Any, rc: Any, n: int) -> list[float]:
    """Median microseconds of each stage of a load-balanced apply_sync.

    A client of an embedded controller submits on its own thread while the hub waits
    (Hub.post_task), and a small reply is handled on the hub's thread (ClientIO
    inline): "submit" and "client: the result" include no thread hand-over then.
    """
    import ipyfarm.controller.commands as C

    hub = cluster.controller.hub
    marks: dict[str, float] = {}

    def mark(obj: Any, name: str, key: str, after: bool = False) -> Any:
        orig = getattr(obj, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not after:
                marks.setdefault(key, time.perf_counter())
            out = orig(*args, **kwargs)
            if after:
                marks.setdefault(key, time.perf_counter())
            return out
        setattr(obj, name, wrapped)
        return wrapped

    mark(hub, "_on_engine_shell", "reply_in")
    hub._command_table[C.DispatchTask] = mark(hub, "_do_DispatchTask", "sent", after=True)
    mark(rc._io, "_post_task", "posted")
    mark(rc, "_on_reply", "client_in")
    mark(rc, "_on_reply", "client_done", after=True)
    view = rc.load_balanced_view()
    for _ in range(100):
        view.apply_sync(noop)
    offset = time.time() - time.perf_counter()
    rows = []
    for _ in range(n):
        marks.clear()
        t0 = time.perf_counter()
        ar = view.apply_async(noop)
        ar.get(10)
        end = time.perf_counter()
        started = ar.metadata["started"].timestamp() - offset
        completed = ar.metadata["completed"].timestamp() - offset
        m = marks
        rows.append([m["posted"] - t0, m["sent"] - m["posted"], started - m["sent"],
                     completed - started, m["reply_in"] - completed,
                     m["client_in"] - m["reply_in"], m["client_done"] - m["client_in"],
                     end - m["client_done"], end - t0])
    return [statistics.median(r[i] for r in rows) * 1e6 for i in range(len(STAGES))]


def thread_cpu(procs: list) -> dict[tuple, float]:
    out = {}
    for p in procs:
        try:
            for t in p.threads():
                try:
                    with open(f"/proc/{p.pid}/task/{t.id}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                out[(p.pid, t.id, name)] = t.user_time + t.system_time
        except psutil.NoSuchProcess:
            pass
    return out


def loop(rc: Any, seconds: float, cpu: bool) -> tuple[float, dict]:
    """apply_async rounds of 3,000 no-op tasks for ``seconds``: (tasks/s, CPU us/task)."""
    view = rc.load_balanced_view()
    for ar in [view.apply_async(noop) for _ in range(200)]:
        ar.get(60)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    before = thread_cpu(procs) if cpu else {}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ars = [view.apply_async(noop) for _ in range(3000)]
        for ar in ars:
            ar.get(120)
        n += 3000
    rate = n / (time.perf_counter() - t0)
    per_task = {}
    if cpu:
        after = thread_cpu(procs)
        for key, value in after.items():
            spent = value - before.get(key, 0.0)
            if spent > 0.01:
                per_task[key] = spent / n * 1e6
    return rate, per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter loops")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 5.0
    cluster, rc = start()
    try:
        raw = raw_round_trips(rc, seconds / 2)
        print(f"raw round trip to one engine: apply {raw['apply']:.0f} us, "
              f"execute('pass') {raw['execute']:.0f} us")
        print("load-balanced apply_sync, median per stage (us):")
        for name, value in zip(STAGES, stages(cluster, rc, 500 if args.quick else 2000),
                               strict=True):
            print(f"  {name:28s} {value:7.0f}")
        rate, per_task = loop(rc, seconds, cpu=True)
        main_pid = psutil.Process().pid
        print(f"apply_async loop (hwm=1): {rate:.0f} tasks/s; CPU per task (us), by thread:")
        for (pid, tid, name), us in sorted(per_task.items()):
            who = "notebook process" if pid == main_pid else f"engine pid {pid}"
            print(f"  {who:18s} thread {tid} {name:12s} {us:6.0f}")
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    for hwm in (2, 0):
        cluster, rc = start(hwm=hwm)
        try:
            rate, _ = loop(rc, seconds, cpu=False)
            print(f"apply_async loop (hwm={hwm}): {rate:.0f} tasks/s")
        finally:
            rc.close()
            cluster.stop_cluster_sync()


if __name__ == "__main__":
    main()
