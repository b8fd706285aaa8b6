"""Cluster lifecycle (sync and async), engines added and removed, the demo CLI."""

import asyncio
import os
import subprocess
import sys


import ipyfarm as ipp

from .conftest import gone, wait_until



def test_async_with_cluster_and_engines_added_and_removed():
    async def main():
        async with ipp.Cluster(n=1, profile=f"async-{os.getpid()}") as rc:
            cluster = rc.cluster
            assert rc.ids == [0]
            pids = await cluster.start_engines(2)
            await asyncio.to_thread(rc.wait_for_engines, 3, 30)
            assert await rc[:].apply_async(lambda: 1) == [1, 1, 1]
            await cluster.stop_engines([1])
            assert await asyncio.to_thread(wait_until, lambda: 1 not in rc.ids, 10)
            assert sorted(rc.ids) == [0, 2]
            all_pids = list(cluster.launcher.exited) + cluster.launcher.pids
            return all_pids, pids

    all_pids, added = asyncio.run(main())
    assert len(added) == 2
    assert wait_until(lambda: gone(all_pids), 10)


def test_display_outputs_prints_per_engine(cluster, capsys):
    rc = cluster[1]
    ar = rc[:].execute("print('from', 'engine')", silent=False)
    ar.get(10)
    capsys.readouterr()
    ar.display_outputs()
    out = capsys.readouterr().out
    assert "[stdout:0] from engine" in out and "[stdout:1] from engine" in out


def test_demo_command_runs(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "ipyfarm", "demo", "-n", "2"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "demo finished in" in out.stdout
    assert "remote error comes back as RemoteError" in out.stdout
    assert not list(tmp_path.glob("ipyfarm-cluster-*.json"))
