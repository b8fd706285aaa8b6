"""MPI inside an engine: find out whether ``mpiexec`` started it, and join its world.

An engine started by ``mpiexec`` (the ``mpi`` launcher passes ``--mpi``; the launcher's
environment variables are enough too) initialises MPI through ``mpi4py`` before it
registers, then registers with ``mpi_rank`` and ``mpi_size`` among its properties and asks
the controller for the engine id equal to its rank. User code on the engine uses the same
world: ``from mpi4py import MPI; MPI.COMM_WORLD.allreduce(x)``.

:func:`rank_from_env` is pure (an environment in, a rank out); :func:`join_world` imports
``mpi4py.MPI``, which initialises MPI (and finalises it when the engine exits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MPIStartError", "join_world", "rank_from_env", "size_from_env"]

#: environment variables mpiexec sets on each rank (Open MPI, then MPICH's Hydra)
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class MPIStartError(RuntimeError):
    """The engine was asked to use MPI and cannot; the message says why and what to do."""


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def rank_from_env(env: Mapping[str, str]) -> int | None:
    """This process's MPI rank as its launcher announced it, or None (not under mpiexec)."""
    return _first_int(env, RANK_VARIABLES)


def size_from_env(env: Mapping[str, str]) -> int | None:
    """The size of the world the launcher started, or None."""
    return _first_int(env, SIZE_VARIABLES)


def join_world() -> dict[str, Any]:
    """Initialise MPI (through mpi4py); return ``{"mpi_rank": r, "mpi_size": n}``.

    Raises :class:`MPIStartError` when mpi4py is missing or MPI cannot start.
    """
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MPIStartError(
            f"this engine was started with --mpi but cannot import mpi4py ({e}). Likely "
            "cause: mpi4py is not installed in the engine's Python environment, or it was "
            "built against an MPI library that is not installed. What to do: `pip install "
            "mpi4py` in that environment (it needs an MPI library, e.g. Debian's openmpi-bin "
            "and libopenmpi-dev), or start the engine without --mpi."
        ) from e
    except Exception as e:  # MPI_Init failures surface as RuntimeError or MPI.Exception
        raise MPIStartError(
            f"MPI failed to initialise in this engine: {e!r}. Likely cause: the engine was "
            "not started by a working mpiexec, or mpi4py and mpiexec come from different "
            "MPI libraries. What to do: check that `mpiexec -n 2 python -c \"from mpi4py "
            "import MPI\"` works on this host."
        ) from e
    world = MPI.COMM_WORLD
    return {"mpi_rank": world.Get_rank(), "mpi_size": world.Get_size()}
