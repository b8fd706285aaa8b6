"""MPI engines: ``mpiexec`` (Open MPI from Debian: openmpi-bin, libopenmpi-dev) starts them,
``mpi4py`` joins them in one ``COMM_WORLD``; engine ids follow ranks; ``%px`` code talks MPI.

Pure command builders against golden strings first, then one 4-engine MPI cluster for the
module (real mpiexec, real engines, real ZeroMQ), then small clusters for stop / kill /
second-world stories and the ``ipyfarm start --engines mpi`` CLI.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm.cluster.mpi import (
    MPIEngineLauncher,
    MPIExecNotFound,
    _as_args,
    mpi_engine_command,
    mpi_flavor,
    mpiexec_command,
)
from ipyfarm.engine.mpi import rank_from_env, size_from_env

from .conftest import cli_cluster, gone, kill_pids, running_cluster, wait_until

HAVE_MPI = shutil.which("mpiexec") is not None
try:
    import mpi4py  # noqa: F401
except ImportError:
    HAVE_MPI = False
# the CI installs both (.ci/run's APT_PACKAGES, the `test` extra); elsewhere the real-MPI
# tests say what is missing instead of failing on it
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpiexec (apt-get install "
                               "openmpi-bin libopenmpi-dev) and mpi4py (pip install mpi4py)")

ENGINE = ["/py", "-m", "ipyfarm.engine", "--controller-file", "/run/c.json",
          "--log-level", "WARN"]


# ---------------------------------------------------------------------- pure builders
def test_engine_command_joins_the_mpi_world():
    cmd = mpi_engine_command("/run/c.json", 42, "WARNING", "/py")
    assert " ".join(cmd) == ("/py -m ipyfarm.engine --controller-file /run/c.json "
                             "--log-level WARN --parent-pid 42 --mpi")
    assert " ".join(mpi_engine_command("/run/c.json", None, "DEBUG", "/py")) == (
        "/py -m ipyfarm.engine --controller-file /run/c.json --log-level DEBUG --mpi")


def test_mpiexec_command_open_mpi_as_root_oversubscribed():
    cmd = mpiexec_command(4, ENGINE, "/usr/bin/mpiexec", as_root=True, oversubscribe=True)
    assert " ".join(cmd) == (
        "/usr/bin/mpiexec -n 4 --allow-run-as-root --oversubscribe --bind-to none "
        "/py -m ipyfarm.engine --controller-file /run/c.json --log-level WARN")


def test_mpiexec_command_plain_user_extra_args_default_binding():
    cmd = mpiexec_command(2, ENGINE, mpi_args=["--host", "a,b", "-x", "OMP_NUM_THREADS=1"],
                          bind_to=None)
    assert " ".join(cmd) == (
        "mpiexec -n 2 --host a,b -x OMP_NUM_THREADS=1 "
        "/py -m ipyfarm.engine --controller-file /run/c.json --log-level WARN")


def test_mpiexec_command_leaves_open_mpi_switches_out_for_other_mpis():
    cmd = mpiexec_command(3, ENGINE, "mpiexec.hydra", ["-ppn", "3"], as_root=True,
                          oversubscribe=True, flavor="mpich")
    assert " ".join(cmd) == (
        "mpiexec.hydra -n 3 -ppn 3 "
        "/py -m ipyfarm.engine --controller-file /run/c.json --log-level WARN")


@pytest.mark.parametrize("n", [0, -1, 2.0, True, "4"])
def test_mpiexec_command_refuses_a_bad_world_size(n):
    with pytest.raises(ValueError, match="n >= 1"):
        mpiexec_command(n, ENGINE)


@pytest.mark.parametrize("text, flavor", [
    ("mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n",
     "openmpi"),
    ("mpiexec (Open MPI) 5.0.3\n", "openmpi"),
    ("HYDRA build details:\n    Version:                                 4.0.2\n", "mpich"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.6\n", "mpich"),
    ("something else 1.0\n", "unknown"),
])
def test_mpi_flavor_from_the_version_text(text, flavor):
    assert mpi_flavor(text) == flavor


def test_mpi_args_as_a_list_or_one_string():
    assert _as_args("--host a,b -x 'A=1 2'", "mpi_args") == ["--host", "a,b", "-x", "A=1 2"]
    assert _as_args(["-x", "A", 3], "mpi_args") == ["-x", "A", "3"]
    assert _as_args(None, "mpi_args") == []
    with pytest.raises(TypeError, match="mpi_args must be"):
        _as_args({"host": "a"}, "mpi_args")


def test_rank_and_size_from_the_launchers_environment():
    assert rank_from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == 3
    assert size_from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert rank_from_env({"PMI_RANK": "0", "PMI_SIZE": "2"}) == 0
    assert rank_from_env({"HOME": "/root"}) is None
    assert rank_from_env({"PMI_RANK": "x"}) is None


def test_missing_mpiexec_is_a_clear_error_and_leaves_nothing_running(tmp_path):
    launcher = MPIEngineLauncher(tmp_path / "c.json", mpiexec="no-such-mpiexec-h2")
    with pytest.raises(MPIExecNotFound) as info:
        launcher.start(2)
    text = str(info.value)
    assert "'no-such-mpiexec-h2' was not found" in text
    assert "apt-get install openmpi-bin" in text and "mpiexec=/path/to/mpiexec" in text
    assert launcher.poll() == {}
    # through a Cluster: the error surfaces and the controller is stopped with it
    c = ipp.Cluster(n=2, engines="mpi", engine_options={"mpiexec": "no-such-mpiexec-h2"},
                    profile=f"test-mpi-missing-{os.getpid()}")
    with pytest.raises(MPIExecNotFound):
        c.start_and_connect_sync()
    assert c.controller is None


def test_launcher_options_are_checked():
    with pytest.raises(TypeError, match="oversubscribe must be"):
        MPIEngineLauncher("c.json", oversubscribe="yes")
    with pytest.raises(TypeError, match="takes no option"):
        MPIEngineLauncher("c.json", hosts=["a"])


# ---------------------------------------------------------------------- one MPI world
@pytest.fixture(scope="module")
def mpi_cluster():
    if not HAVE_MPI:
        pytest.skip("needs mpiexec (apt-get install openmpi-bin libopenmpi-dev) and mpi4py")
    with running_cluster(4, profile=f"test-mpi-{os.getpid()}", engines="mpi") as (c, rc):
        yield c, rc


@pytest.fixture
def rc(mpi_cluster):
    return mpi_cluster[1]


@needs_mpi
def test_engine_ids_are_the_mpi_ranks(rc):
    assert rc.ids == [0, 1, 2, 3]
    for engine_id, info in rc.engines.items():
        assert info["properties"]["mpi_rank"] == engine_id
        assert info["properties"]["mpi_size"] == 4

    def rank():
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank()

    assert rc[:].apply_sync(rank) == [0, 1, 2, 3]
    assert rc[2].apply_sync(rank) == 2


@needs_mpi
def test_one_mpiexec_started_all_ranks(mpi_cluster, rc):
    c, _ = mpi_cluster
    (world,) = c.launcher.describe()["worlds"]
    assert world["n"] == 4
    assert sorted(world["ranks"]) == sorted(info["pid"] for info in rc.engines.values())
    assert re.match(r"\S*mpiexec -n 4 .*-m ipyfarm\.engine .*--mpi$", world["command"])
    assert ("--allow-run-as-root" in world["command"]) == (os.geteuid() == 0)
    mpiexec = psutil.Process(world["pid"])
    assert {p.pid for p in mpiexec.children(recursive=True)} >= set(world["ranks"])
    # the dashboard's launcher line (and `ipyfarm list`'s column)
    from ipyfarm.widgets.model import launcher_summary

    assert launcher_summary(c.launcher.describe()) == "mpi 1 mpiexec, 4 ranks"


@needs_mpi
def test_kernel_still_works_push_pull_execute(rc):
    dview = rc[:]
    dview.push({"a": 5}, block=True)
    dview.execute("from mpi4py import MPI\nb = a * 2 + MPI.COMM_WORLD.Get_rank()",
                  block=True)
    assert dview.pull("b", block=True) == [10, 11, 12, 13]
    assert rc[1].pull("b", block=True) == 11


@pytest.fixture(scope="module")
def ip(tmp_path_factory, mpi_cluster):
    """An IPython shell with %px activated on the MPI engines (as in tests/test_magics.py)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing import tools

    hooks = sys.displayhook, sys.excepthook
    shell = InteractiveShell.instance(config=tools.default_config(),
                                      ipython_dir=str(tmp_path_factory.mktemp("ipython")))
    shell.run_line_magic("load_ext", "ipyfarm")
    mpi_cluster[1].activate()
    try:
        yield shell
    finally:
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def run(ip, cell):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = ip.run_cell(cell)
    assert result.success, cap.stdout + cap.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", cap.stdout)


@needs_mpi
def test_allreduce_inside_px(ip, rc):
    run(ip, "%px from mpi4py import MPI; comm = MPI.COMM_WORLD")
    out = run(ip, "%px total = comm.allreduce(comm.Get_rank() + 1); print('sum', total)")
    for engine_id in range(4):
        assert f"[stdout:{engine_id}] sum 10" in out
    assert rc[:].pull("total", block=True) == [10, 10, 10, 10]


@needs_mpi
def test_scatter_and_gather_of_arrays_through_mpi(ip, rc):
    cell = """%%px
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
chunk = 250_000
whole = np.arange(size * chunk, dtype="f8") if rank == 0 else None
part = np.empty(chunk, dtype="f8")
comm.Scatter(whole, part, root=0)
first = float(part[0])
gathered = comm.gather(float(part.sum()), root=0)
back = np.empty(size * chunk, dtype="f8") if rank == 0 else None
comm.Gather(part * 2, back, root=0)
ok = rank != 0 or bool((back == 2 * whole).all())
"""
    run(ip, cell)
    chunk, n = 250_000, 1_000_000
    assert rc[:].pull("first", block=True) == [0.0, chunk, 2 * chunk, 3 * chunk]
    gathered = rc[0].pull("gathered", block=True)
    assert sum(gathered) == n * (n - 1) / 2 and len(gathered) == 4
    assert rc[1].pull("gathered", block=True) is None
    assert rc[:].pull("ok", block=True) == [True] * 4


def mark_then_sleep_in_steps(folder, seconds):
    import os
    import time

    open(os.path.join(folder, str(os.getpid())), "w").close()  # started: interruptible now
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)


@needs_mpi
def test_interrupting_mpi_engines_leaves_the_world_whole(mpi_cluster, rc, tmp_path):
    c, _ = mpi_cluster
    pids = dict(_rank_pids(rc))
    ar = rc[:].apply_async(mark_then_sleep_in_steps, str(tmp_path), 60)
    assert wait_until(lambda: len(os.listdir(tmp_path)) == 4, 30)
    rc.send_signal("SIGINT")
    with pytest.raises(ipp.error.CompositeError, match="KeyboardInterrupt"):
        ar.get(30)
    # the same processes, still one world
    assert _rank_pids(rc) == pids and len(c.launcher.describe()["worlds"]) == 1
    assert rc[:].apply_sync(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.allreduce(1)
                            ) == [4, 4, 4, 4]


# ---------------------------------------------------------------------- small worlds
def _rank_pids(rc):
    return {engine_id: info["pid"] for engine_id, info in rc.engines.items()}



@needs_mpi
def test_a_second_start_is_a_second_world_and_stop_leaves_no_rank():
    with running_cluster(2, profile=f"test-mpi2-{os.getpid()}", engines="mpi") as (c, rc):
        c.start_engines_sync(2)
        rc.wait_for_engines(4, timeout=60)
        assert rc.ids == [0, 1, 2, 3]
        props = {i: info["properties"] for i, info in rc.engines.items()}
        # the second world's ranks 0 and 1 found ids 0 and 1 taken: they got 2 and 3, in
        # the order they registered
        assert [(props[i]["mpi_rank"], props[i]["mpi_size"]) for i in (0, 1)] == [
            (0, 2), (1, 2)]
        assert sorted((props[i]["mpi_rank"], props[i]["mpi_size"]) for i in (2, 3)) == [
            (0, 2), (1, 2)]

        def world_sum():
            from mpi4py import MPI

            return MPI.COMM_WORLD.allreduce(10 ** MPI.COMM_WORLD.Get_rank())

        assert rc[:].apply_sync(world_sum) == [11, 11, 11, 11]
        assert len(c.launcher.describe()["worlds"]) == 2
        pids = list(_rank_pids(rc).values())
        second = [_rank_pids(rc)[2], _rank_pids(rc)[3]]
        mpiexecs = list(c.launcher.pids)
        # stopping engine 2 stops its whole world (engines 2 and 3), not the first one
        c.stop_engines_sync([2])
        assert wait_until(lambda: rc.ids == [0, 1], 30), rc.ids
        assert gone(second) and len(c.launcher.describe()["worlds"]) == 1
        assert rc[:].apply_sync(world_sum) == [11, 11]
    # running_cluster checked that no child process is left; the ranks' pids too
    assert gone(pids) and gone(mpiexecs)


def ignore_sigint_and_sleep(seconds):
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(seconds)


@needs_mpi
def test_a_rank_killed_for_its_time_limit_ends_its_world_and_the_controller_hears_of_all():
    with running_cluster(2, profile=f"test-mpi3-{os.getpid()}", engines="mpi") as (c, rc):
        pids = _rank_pids(rc)
        (mpiexec,) = c.launcher.pids
        assert not c.launcher.kill_engine(pids[0], "another-host")
        other = rc[0].apply_async(ignore_sigint_and_sleep, 60)
        stuck = rc[1]
        with stuck.temp_flags(time_limit=1):
            ar = stuck.apply_async(ignore_sigint_and_sleep, 60)
        # the controller interrupts, then has the launcher SIGKILL rank 1; Open MPI's
        # mpiexec aborts the world, and the launcher reports every rank
        with pytest.raises(ipp.error.TaskTimeout, match="was killed"):
            ar.get(30)
        with pytest.raises(ipp.error.EngineError, match="engine 0 died"):
            other.get(30)
        assert wait_until(lambda: rc.ids == [], 30), rc.ids
        assert wait_until(lambda: gone(pids.values()), 15)
        assert wait_until(lambda: mpiexec in c.launcher.exited, 15)
        assert c.launcher.exited[mpiexec] != 0
        with pytest.raises(IndexError, match="no engine 0"):
            rc[0].apply_sync(os.getpid)


@needs_mpi
def test_ipyfarm_start_engines_mpi_daemonized(tmp_path):
    profile = f"mpi-cli-{os.getpid()}"
    with cli_cluster(tmp_path, profile) as cluster:
        cluster.start("--engines", "mpi", "-n", "4", timeout=120)
        code = ("rc.wait_for_engines(4, timeout=60)\n"
                "def f():\n"
                "    from mpi4py import MPI\n"
                "    c = MPI.COMM_WORLD\n"
                "    return c.Get_rank(), c.allreduce(c.Get_rank())\n"
                "print(rc.ids, rc[:].apply_sync(f))\n"
                "print([i['pid'] for i in rc.engines.values()])\n"
                "rc.close()\n")
        lines = cluster.client(code, timeout=120).splitlines()
        assert lines[0] == "[0, 1, 2, 3] [(0, 6), (1, 6), (2, 6), (3, 6)]"
        cluster.track(json.loads(lines[1]))
        listing = cluster.cli("list").stdout
        assert re.search(rf"{profile}\s+{cluster.controller_pid}\s+4\s+process .* mpi 1 "
                         r"mpiexec, 4 ranks", listing), listing
        cluster.stop(gone_within=20, timeout=60)


@needs_mpi
def test_engines_started_by_hand_under_mpiexec_find_their_ranks_without_mpi_flag():
    """docs/mpi.md's by-hand command: ranks see mpiexec's environment and join MPI."""
    with running_cluster(0, profile=f"test-mpi4-{os.getpid()}") as (c, rc):
        cmd = ["mpiexec", "-n", "2", "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, "-m", "ipyfarm.engine", "--controller-file",
                str(c.controller.file)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        pids = []
        try:
            rc.wait_for_engines(2, timeout=60)
            pids = list(_rank_pids(rc).values())
            assert {i: info["properties"]["mpi_rank"] for i, info in rc.engines.items()} == {
                0: 0, 1: 1}
            assert rc[:].apply_sync(lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.Get_size()
                                    ) == [2, 2]
            rc.shutdown(targets=[0, 1], block=True)  # both ranks end: mpiexec exits 0
            assert proc.wait(30) == 0, proc.stdout.read().decode()
            assert wait_until(lambda: gone(pids), 15)
        finally:
            kill_pids(pids + [proc.pid])
            proc.wait(10)
            proc.stdout.close()


@needs_mpi
def test_an_engine_without_mpi4py_fails_the_start_saying_why(tmp_path, caplog):
    # an mpi4py that cannot be imported, put first on the ranks' path (-x exports it)
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text(
        "raise ImportError('mpi4py hidden by the test')\n")
    options = {"mpi_args": ["-x", f"PYTHONPATH={tmp_path}"]}
    c = ipp.Cluster(n=2, engines="mpi", engine_options=options, engine_timeout=60,
                    profile=f"test-mpi5-{os.getpid()}")
    with caplog.at_level("WARNING", logger="ipyfarm.cluster"):
        with pytest.raises(ipp.error.EngineError, match="exited during start-up"):
            c.start_and_connect_sync()
    assert c.controller is None and c.launcher.poll() == {}
    text = caplog.text
    assert "cannot import mpi4py (mpi4py hidden by the test)" in text, text
    assert "pip install mpi4py" in text
