"""The Slurm engine launcher: golden command lines and batch scripts, then a real Slurm.

The real part runs a one-node Slurm (munged + slurmctld + slurmd, Debian's packages,
started as our children by :mod:`tests.slurm_fixture`, as root) for the module: engines are
submitted with sbatch, run under srun inside the job, are signalled and cancelled with
scancel, and the job's state shows in describe(), farm_status(), the dashboard and
``ipyfarm list``. On a failure the daemons' logs are printed with the test's output.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm.cluster.slurm import (
    SlurmEngineLauncher,
    SlurmError,
    batch_script,
    controller_script,
    exit_code,
    kill_command,
    parse_sbatch_output,
    parse_squeue_output,
    sbatch_command,
    scancel_command,
    squeue_command,
)

from .conftest import wait_until
from .slurm_fixture import missing_commands, single_node_slurm, slurm_conf

ENGINE = ["/venv/bin/python", "-m", "ipyfarm.engine", "--controller-file",
          "/run/ipyfarm-cluster-x.json", "--log-level", "WARN"]


# ---------------------------------------------------------------------- pure builders
def test_batch_script_with_every_option_golden():
    script = batch_script(
        4, ENGINE, job_name="farm", output="/logs/farm-%j.out", partition="debug",
        walltime="00:30:00", cpus_per_task=2, mem_per_cpu="500M",
        sbatch_options=["--account=proj", "--exclusive"],
        prologue=["module load python/3.11", "export OMP_NUM_THREADS=1"],
        srun_options=["--cpu-bind=cores"])
    assert script == (
        "#!/bin/bash\n"
        "#SBATCH --job-name=farm\n"
        "#SBATCH --ntasks=4\n"
        "#SBATCH --output=/logs/farm-%j.out\n"
        "#SBATCH --partition=debug\n"
        "#SBATCH --time=00:30:00\n"
        "#SBATCH --cpus-per-task=2\n"
        "#SBATCH --mem-per-cpu=500M\n"
        "#SBATCH --account=proj\n"
        "#SBATCH --exclusive\n"
        "module load python/3.11\n"
        "export OMP_NUM_THREADS=1\n"
        "srun --cpu-bind=cores /venv/bin/python -m ipyfarm.engine --controller-file "
        "/run/ipyfarm-cluster-x.json --log-level WARN\n")


def test_batch_script_minimal_golden_and_quoting():
    cmd = ["/my venv/python", "-m", "ipyfarm.engine", "--controller-file", "/a b/c's.json"]
    assert batch_script(1, cmd) == (
        "#!/bin/bash\n"
        "#SBATCH --job-name=ipyfarm-engines\n"
        "#SBATCH --ntasks=1\n"
        "srun '/my venv/python' -m ipyfarm.engine --controller-file '/a b/c'\"'\"'s.json'\n")


@pytest.mark.parametrize("bad, match", [
    ({"n": 0}, "n >= 1"),
    ({"n": True}, "n >= 1"),
    ({"partition": "a b"}, "whitespace"),
    ({"output": "/logs/x\n#SBATCH --x"}, "whitespace"),
    ({"sbatch_options": ["--account=x --qos=y"]}, "whitespace"),
    ({"prologue": ["echo a\nrm -rf x"]}, "newline"),
])
def test_batch_script_refuses_what_would_break_the_script(bad, match):
    kwargs = {"n": 2, **bad}
    with pytest.raises(ValueError, match=match):
        batch_script(kwargs.pop("n"), ENGINE, **kwargs)


def test_controller_script_golden():
    script = controller_script("hpc", 8, python="/venv/bin/python", output="/logs/ctl-%j.out",
                               walltime="2:00:00",
                               engine_options={"partition": "compute", "poll_interval": 10,
                                               "sbatch_options": ["--exclusive"]},
                               controller_args=["--ip", "10.0.0.5"])
    assert script == (
        "#!/bin/bash\n"
        "#SBATCH --job-name=ipyfarm-controller\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --output=/logs/ctl-%j.out\n"
        "#SBATCH --time=2:00:00\n"
        "exec /venv/bin/python -m ipyfarm controller --profile hpc -n 8 --engines slurm "
        "--engine-opt partition=compute --engine-opt poll_interval=10 "
        "--engine-opt 'sbatch_options=[\"--exclusive\"]' --ip 10.0.0.5\n")


def test_command_lines_golden():
    assert sbatch_command() == ["sbatch", "--parsable"]
    assert sbatch_command("/opt/slurm/bin/sbatch") == ["/opt/slurm/bin/sbatch", "--parsable"]
    assert squeue_command([12, 13]) == ["squeue", "--noheader", "--states=all",
                                        "--jobs=12,13", "--format=%i|%T|%r"]
    assert scancel_command([12]) == ["scancel", "12"]
    assert scancel_command([12, 13], signal.SIGINT) == ["scancel", "--signal=INT", "12", "13"]
    assert scancel_command([5], signal.SIGKILL, full=True) == [
        "scancel", "--signal=KILL", "--full", "5"]
    assert kill_command(12, 4242, "node3") == [
        "srun", "--jobid=12", "--overlap", "--nodes=1", "--ntasks=1", "--nodelist=node3",
        "kill", "-KILL", "4242"]
    assert kill_command(12, 4242, "n", signal.SIGTERM, srun="/s/srun")[-2:] == ["-TERM", "4242"]


def test_parsing_slurms_answers():
    assert parse_sbatch_output("42\n") == 42
    assert parse_sbatch_output("43;cluster2\n") == 43
    with pytest.raises(SlurmError, match="no job id"):
        parse_sbatch_output("Submitted batch job 44\n")
    out = ("12|RUNNING|None\n13|PENDING|Resources\n 14|CANCELLED by 0|None\n"
           "12.0|RUNNING|None\ngarbage\n15|\n")
    assert parse_squeue_output(out) == {12: ("RUNNING", "None"), 13: ("PENDING", "Resources"),
                                        14: ("CANCELLED", "None")}
    assert [exit_code(s) for s in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED",
                                   "CANCELLED", "FAILED", "TIMEOUT", "GONE")] == [
        None, None, None, 0, 1, 1, 1, 1]


def test_the_launchers_script_runs_one_engine_per_task(tmp_path):
    launcher = SlurmEngineLauncher(tmp_path / "c.json", partition="debug", walltime="1:00",
                                   python="/venv/bin/python", output="/l/e-%j.out",
                                   log_level="DEBUG")
    assert launcher.script(3).splitlines() == [
        "#!/bin/bash", "#SBATCH --job-name=ipyfarm-engines", "#SBATCH --ntasks=3",
        "#SBATCH --output=/l/e-%j.out", "#SBATCH --partition=debug", "#SBATCH --time=1:00",
        f"srun /venv/bin/python -m ipyfarm.engine --controller-file {tmp_path / 'c.json'} "
        "--log-level DEBUG"]
    assert launcher.describe() == {"backend": "slurm", "jobs": [], "running": 0}
    assert launcher.poll() == {} and launcher.wait(0)
    assert launcher.job_log(7) == "/l/e-7.out" and launcher.hint() == ""
    launcher.states.update({7: "PENDING", 8: "FAILED", 9: "COMPLETED", 10: "RUNNING"})
    launcher.reasons[7] = "Resources"
    assert launcher.hint() == (
        "Slurm job 7 is PENDING (Resources): `squeue -j 7` and `scontrol show job 7` say what "
        "it waits for; Slurm job 8 ended FAILED; its output is in /l/e-8.out")
    default = SlurmEngineLauncher(tmp_path / "c.json", log_dir=tmp_path / "logs")
    assert default.job_log(3) == str(tmp_path / "logs" / "ipyfarm-engines-3.out")
    assert launcher.poll() == {7: None, 10: None} and not launcher.wait(0)
    with pytest.raises(ValueError, match="whitespace"):  # bad options fail at once
        SlurmEngineLauncher(tmp_path / "c.json", partition="a b")
    with pytest.raises(TypeError):
        SlurmEngineLauncher(tmp_path / "c.json", no_such_option=1)


def test_stop_warns_and_does_not_raise_when_scancel_is_missing(tmp_path, caplog):
    launcher = SlurmEngineLauncher(tmp_path / "c.json", scancel=str(tmp_path / "no-scancel"))
    launcher.states[99999] = "RUNNING"
    launcher.stop(timeout=0.1)  # a cluster's teardown must go on
    assert "no-scancel' was not found" in caplog.text and "scancel 99999" in caplog.text
    with pytest.raises(SlurmError, match="no-scancel"):  # an explicit signal does raise
        launcher.signal(signal.SIGINT)


def test_slurm_conf_of_the_test_cluster(tmp_path):
    conf = slurm_conf(tmp_path, "node0", 7001, 7002, tmp_path / "munge.socket", cpus=4)
    assert "SlurmdParameters=config_overrides" in conf.splitlines()
    assert f"AuthInfo=socket={tmp_path / 'munge.socket'}" in conf.splitlines()
    assert "NodeName=node0 NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN" in conf.splitlines()


# ---------------------------------------------------------------------- a real Slurm
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_commands()
    if missing or os.geteuid() != 0:
        pytest.skip(f"a real Slurm needs root and {missing or 'its commands'} (Debian: "
                    "apt-get install slurmctld slurmd slurm-client munge)")
    with single_node_slurm(tmp_path_factory.mktemp("slurm"), cpus=4) as s:
        yield s
    assert not s.leftovers(), "processes of the test Slurm survived its stop"


@pytest.fixture(autouse=True)
def _daemon_logs_on_failure(request):
    """Print the Slurm daemons' logs after a failed test (shown with its output)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and "slurm" in request.fixturenames:
        print(request.getfixturevalue("slurm").logs())


@pytest.fixture(scope="module")
def farm(slurm, tmp_path_factory):
    """An embedded controller with 2 engines in one Slurm job, stopped after the module."""
    logs = tmp_path_factory.mktemp("slurm-engines")
    c = ipp.Cluster(n=2, engines="slurm", profile=f"test-slurm-{os.getpid()}",
                    heartbeat_timeout=4.0,
                    engine_options={"poll_interval": 0.5, "output": f"{logs}/engines-%j.out"})
    t0 = time.monotonic()
    try:
        rc = c.start_and_connect_sync()
        print(f"\n2 engines of a Slurm job registered in {time.monotonic() - t0:.2f} s")
        yield c, rc
    finally:
        c.stop_cluster_sync()


def engine_env():
    return (os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_PROCID"), os.getpid())


def test_engines_register_from_inside_the_slurm_job(farm, slurm):
    c, rc = farm
    (job,) = c.launcher.job_ids
    found = rc[:].apply_sync(engine_env)
    assert {j for j, _, _ in found} == {str(job)}
    assert sorted(p for _, p, _ in found) == ["0", "1"]
    for _, _, pid in found:  # run by Slurm's step daemon, not by this process
        assert psutil.Process(pid).parent().name() == "slurmstepd"
        assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
    view = rc.load_balanced_view()
    assert view.map_sync(lambda x: x * x, range(40)) == [x * x for x in range(40)]


def test_job_state_in_describe_farm_status_and_the_dashboard(farm, slurm):
    c, rc = farm
    (job,) = c.launcher.job_ids
    assert slurm.jobs()[job] == "RUNNING"
    assert wait_until(lambda: c.launcher.describe().get("state") == "RUNNING", 10)
    desc = c.launcher.describe()
    assert desc["backend"] == "slurm" and desc["job_id"] == job and desc["running"] == 1
    assert desc["jobs"] == [{"job_id": job, "state": "RUNNING"}]
    assert desc["log"].endswith(f"/engines-{job}.out") and "hint" not in desc
    assert rc.farm_status()["launcher"] == desc
    from ipyfarm.widgets.model import FarmModel

    snap = FarmModel().update(rc.farm_status(), now=0.0)
    assert snap.launcher == f"slurm job {job} RUNNING"
    assert f"launcher: slurm job {job} RUNNING" in snap.to_text()
    pytest.importorskip("ipywidgets")
    from ipyfarm.widgets.dashboard import Dashboard

    d = Dashboard(rc, autostart=False)
    try:
        assert d.launcher_line.value == f"launcher: slurm job {job} RUNNING"
    finally:
        d.close()


def test_signal_reaches_the_engines_through_scancel(farm):
    c, rc = farm
    ar = rc[0].apply_async(time.sleep, 120)
    assert wait_until(lambda: rc.farm_status()["tasks"]["running"] == 1, 20)
    t0 = time.monotonic()
    c.launcher.signal(signal.SIGINT)
    with pytest.raises(ipp.error.RemoteError) as info:
        ar.get(timeout=30)
    print(f"\nscancel --signal=INT interrupted a running task in {time.monotonic() - t0:.2f} s")
    assert info.value.ename == "KeyboardInterrupt"
    assert rc[:].apply_sync(lambda: "still here") == ["still here"] * 2


def test_stop_one_engine_then_kill_one_in_a_second_job(farm, slurm):
    c, rc = farm
    (second,) = c.start_engines_sync(2)
    assert second != c.launcher.job_ids[0]
    rc.wait_for_engines(4, timeout=60)
    found = dict(zip(rc.ids, rc[:].apply_sync(engine_env), strict=True))
    (a, pid_a), (b, pid_b) = [(e, v[2]) for e, v in found.items() if v[0] == str(second)]
    # one engine: SIGTERM by a step in its job; the job runs on with the other
    c.stop_engines_sync([a])
    assert wait_until(lambda: not psutil.pid_exists(pid_a), 10)
    assert wait_until(lambda: a not in rc.ids, 20)
    assert slurm.jobs()[second] == "RUNNING"
    # a stuck one: SIGKILL (the controller's kill_engine); its death fails the job
    t0 = time.monotonic()
    assert c.launcher.kill_engine(pid_b, socket.gethostname())
    assert wait_until(lambda: not psutil.pid_exists(pid_b), 10)
    print(f"\nkill_engine (srun --overlap kill) ended engine {b} in "
          f"{time.monotonic() - t0:.2f} s")
    assert wait_until(lambda: c.launcher.job_states()[second] == "FAILED", 20)
    assert c.launcher.exited == {second: 1}
    assert c.launcher.describe()["running"] == 1
    assert wait_until(lambda: b not in rc.ids, 20)  # heartbeat_timeout=4 s
    assert rc[:].apply_sync(lambda: 1) == [1, 1]


def test_stop_cancels_the_job_and_its_engines_are_gone(farm, slurm):
    c, rc = farm
    job = c.launcher.job_ids[0]
    pids = [pid for _, _, pid in rc[:].apply_sync(engine_env)]
    t0 = time.monotonic()
    c.stop_cluster_sync()
    print(f"\nstop (scancel, wait until the job left) took {time.monotonic() - t0:.2f} s")
    assert slurm.jobs()[job] == "CANCELLED"
    assert c.launcher.job_states()[job] == "CANCELLED" and c.launcher.pids == []
    assert c.launcher.describe()["state"] == "FAILED"  # the newest job: the second one
    assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 10)
    assert wait_until(lambda: slurm.node_state() == "idle", 20)


def test_a_job_that_fails_at_start_up_says_where_its_output_is(slurm, tmp_path):
    c = ipp.Cluster(n=1, engines="slurm", profile=f"test-slurm-bad-{os.getpid()}",
                    engine_options={"python": str(tmp_path / "no-python"), "poll_interval": 0.5,
                                    "output": f"{tmp_path}/bad-%j.out"})
    with pytest.raises(ipp.error.EngineError) as info:
        c.start_and_connect_sync()
    (job,) = c.launcher.job_ids
    log = tmp_path / f"bad-{job}.out"
    assert f"Slurm job {job} ended FAILED; its output is in {log}" in str(info.value)
    assert "no-python" in log.read_text()  # srun's complaint, for the user to read
    assert c.controller is None  # the failed start stopped the controller


def ipyfarm_cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "ipyfarm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_start_list_stop_with_slurm_engines(slurm, tmp_path):
    profile = f"slurm-cli-{os.getpid()}"
    before = set(slurm.jobs())
    started = ipyfarm_cli("start", "--engines", "slurm", "-n", "2", "--daemonize",
                          "--profile", profile, "--engine-opt", "poll_interval=0.5",
                          "--engine-opt", f"output={tmp_path}/engines-%j.out")
    file = ipp.paths.cluster_file(profile)
    pid = json.loads(file.read_text())["pid"] if file.exists() else None
    try:
        assert started.returncode == 0, started.stderr
        (job,) = set(slurm.jobs()) - before

        def listed():
            out = ipyfarm_cli("list", timeout=60).stdout
            return [ln for ln in out.splitlines() if ln.startswith(profile)]

        assert wait_until(lambda: f"slurm job {job} RUNNING" in "".join(listed()), 20), \
            listed()
        assert listed()[0].split()[2] == "2"  # engines
        stopped = ipyfarm_cli("stop", "--profile", profile)
        assert stopped.returncode == 0, stopped.stderr
        assert slurm.jobs()[job] == "CANCELLED"
        assert not file.exists()
    finally:
        if pid and psutil.pid_exists(pid):
            psutil.Process(pid).kill()
        active = [str(j) for j, s in slurm.jobs().items()
                  if j not in before and s in ("PENDING", "RUNNING")]
        if active:
            slurm.run("scancel", *active)


def test_engines_of_a_killed_controller_leave_and_their_job_ends(slurm, tmp_path):
    profile = f"slurm-orphan-{os.getpid()}"
    before = set(slurm.jobs())
    started = ipyfarm_cli("start", "--engines", "slurm", "-n", "2", "--daemonize",
                          "--profile", profile, "--engine-opt", "poll_interval=0.5",
                          "--engine-opt", f"output={tmp_path}/engines-%j.out")
    file = ipp.paths.cluster_file(profile)
    pid = json.loads(file.read_text())["pid"] if file.exists() else None
    try:
        assert started.returncode == 0, started.stderr
        (job,) = set(slurm.jobs()) - before
        psutil.Process(pid).kill()  # no scancel from it: the engines must notice alone
        t0 = time.monotonic()
        assert wait_until(lambda: slurm.jobs()[job] not in ("RUNNING", "COMPLETING"), 60), \
            slurm.jobs()
        print(f"\nthe job of a killed controller's engines ended "
              f"({slurm.jobs()[job]}) {time.monotonic() - t0:.1f} s later")
    finally:
        if pid and psutil.pid_exists(pid):
            psutil.Process(pid).kill()
        file.unlink(missing_ok=True)
        active = [str(j) for j, s in slurm.jobs().items()
                  if j not in before and s in ("PENDING", "RUNNING")]
        if active:
            slurm.run("scancel", *active)


def test_missing_sbatch_is_a_clear_error(tmp_path):
    c = ipp.Cluster(n=1, engines="slurm", profile=f"test-nosbatch-{os.getpid()}",
                    engine_options={"sbatch": str(tmp_path / "no-such-sbatch")})
    try:
        with pytest.raises(SlurmError, match="was not found.*not installed or not on PATH"):
            c.start_cluster_sync()
    finally:
        c.stop_cluster_sync()


def test_a_refused_submission_carries_sbatchs_message(slurm, tmp_path):
    before = slurm.jobs()
    launcher = SlurmEngineLauncher(tmp_path / "c.json", partition="nosuchpartition")
    with pytest.raises(SlurmError) as info:
        launcher.start(2)
    message = str(info.value)
    assert "sbatch refused the job of 2 engines" in message
    assert "invalid partition specified: nosuchpartition" in message  # sbatch's stderr
    assert "fix the engine options" in message
    assert slurm.jobs() == before and launcher.job_ids == []


def test_cli_the_controller_as_a_slurm_job_and_its_engines_as_another(slurm, tmp_path):
    profile = f"slurm-ctl-{os.getpid()}"
    before = set(slurm.jobs())
    t0 = time.monotonic()
    started = ipyfarm_cli("start", "--controller", "slurm", "--engines", "slurm", "-n", "2",
                          "--profile", profile, "--engine-opt", "poll_interval=0.5",
                          "--engine-opt", f"output={tmp_path}/engines-%j.out")
    file = ipp.paths.cluster_file(profile)
    try:
        assert started.returncode == 0, (started.stderr, slurm.jobs())
        controller_job = int(started.stdout.split("controller in Slurm job ")[1].split(",")[0])
        print(f"\nipyfarm start --controller slurm: ready in {time.monotonic() - t0:.2f} s")
        assert f"stop with `scancel {controller_job}`" in started.stdout
        with ipp.Client(url_file=file, timeout=10) as rc:
            assert len(rc.ids) == 2
            controller = psutil.Process(json.loads(file.read_text())["pid"])
            assert controller.environ()["SLURM_JOB_ID"] == str(controller_job)
            launcher = rc.farm_status()["launcher"]
            engine_job = launcher["job_id"]
            assert {controller_job, engine_job} == set(slurm.jobs()) - before
            assert wait_until(lambda: rc.farm_status()["launcher"]["state"] == "RUNNING", 10)
            assert {j for j, _, _ in rc[:].apply_sync(engine_env)} == {str(engine_job)}
        listed = [ln for ln in ipyfarm_cli("list").stdout.splitlines()
                  if ln.startswith(profile)]
        assert listed and listed[0].split()[2] == "2"
        assert listed[0].endswith(f"slurm job {engine_job} RUNNING")
        # cancelling the controller's job stops the controller, which cancels the engines
        slurm.run("scancel", str(controller_job))
        assert wait_until(lambda: slurm.jobs()[engine_job] == "CANCELLED", 30), slurm.jobs()
        assert wait_until(lambda: not file.exists(), 10)
        assert wait_until(lambda: slurm.node_state() == "idle", 30)
    finally:
        active = [str(j) for j, s in slurm.jobs().items()
                  if j not in before and s in ("PENDING", "RUNNING")]
        if active:
            slurm.run("scancel", *active)


def test_cli_a_refused_controller_job_says_why(slurm):
    before = slurm.jobs()
    out = ipyfarm_cli("start", "--controller", "slurm", "--engines", "slurm", "-n", "1",
                      "--profile", f"slurm-nope-{os.getpid()}", "--timeout", "20",
                      env=dict(os.environ, SBATCH_PARTITION="nosuchpartition"))
    assert out.returncode == 1
    assert "sbatch refused the controller's job" in out.stderr
    assert "invalid partition specified: nosuchpartition" in out.stderr
    assert slurm.jobs() == before
