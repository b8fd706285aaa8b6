"""The ipyfarm-engine kernelspec: the committed ``jupyter-config/`` copy (the wheel's data
file) and what ``ipyfarm kernelspec`` installs come from one function, and Jupyter's own
``jupyter kernelspec list`` finds the installed one. Everything goes to temporary dirs
(JUPYTER_DATA_DIR / --prefix): the user's Jupyter config is never touched."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from ipyfarm.cli import install_kernelspec
from ipyfarm.kernelspec import KERNEL_NAME, engine_kernelspec, kernelspec_json

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "jupyter-config" / "kernels" / KERNEL_NAME / "kernel.json"


def test_the_committed_kernel_json_is_the_generated_one():
    assert COMMITTED.read_text() == kernelspec_json("python"), (
        f"{COMMITTED} drifted from ipyfarm.kernelspec: regenerate it with "
        "python -c 'from ipyfarm.kernelspec import kernelspec_json; "
        "print(kernelspec_json(), end=\"\")' > jupyter-config/kernels/ipyfarm-engine/kernel.json")


def test_the_wheel_ships_the_committed_file_where_jupyter_looks():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    assert data_files[f"share/jupyter/kernels/{KERNEL_NAME}"] == [
        str(COMMITTED.relative_to(ROOT))]


def test_install_writes_the_same_spec_with_this_python(tmp_path):
    where = Path(install_kernelspec(prefix=str(tmp_path)))
    assert where == tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME
    installed = (where / "kernel.json").read_text()
    assert installed == kernelspec_json(sys.executable)
    committed = json.loads(COMMITTED.read_text())
    spec = json.loads(installed)
    assert spec["argv"][0] == sys.executable
    assert dict(spec, argv=spec["argv"][1:]) == dict(committed, argv=committed["argv"][1:])
    assert spec == engine_kernelspec(sys.executable)


def _listed(env):
    out = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)["kernelspecs"]


def _ipyfarm(args, env):
    proc = subprocess.run([sys.executable, "-m", "ipyfarm", "kernelspec", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_jupyter_lists_the_kernel_after_ipyfarm_kernelspec_user(tmp_path):
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    env.pop("JUPYTER_PATH", None)
    before = _listed(env)
    if KERNEL_NAME in before:  # this Python's prefix has one already (a wheel install)
        assert not before[KERNEL_NAME]["resource_dir"].startswith(str(tmp_path))
    out = _ipyfarm(["--user"], env)
    where = tmp_path / "data" / "kernels" / KERNEL_NAME
    assert f"installed the {KERNEL_NAME} kernelspec in {where}" in out
    found = _listed(env)[KERNEL_NAME]
    assert found["resource_dir"] == str(where)
    assert found["spec"]["argv"] == engine_kernelspec(sys.executable)["argv"]
    assert found["spec"]["display_name"] == "ipyfarm engine"


def test_jupyter_lists_the_kernel_after_ipyfarm_kernelspec_prefix(tmp_path):
    prefix = tmp_path / "prefix"
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    _ipyfarm(["--prefix", str(prefix)], env)
    found = _listed(env)[KERNEL_NAME]
    assert found["resource_dir"] == str(prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME)
    shown = {k: found["spec"][k] for k in engine_kernelspec()}  # Jupyter adds defaults
    assert shown == engine_kernelspec(sys.executable)
