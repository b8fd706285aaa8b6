"""ipyfarm: interactive parallel computing for Jupyter.

``import ipyfarm as ipp`` gives ipyparallel 9's public names::

    with ipp.Cluster(n=4) as rc:
        rc[:].apply_sync(lambda: 42)
"""

from . import error as error
from .client.asyncresult import AsyncHubResult as AsyncHubResult
from .client.asyncresult import AsyncMapResult as AsyncMapResult
from .client.asyncresult import AsyncResult as AsyncResult
from .client.client import Client as Client
from .client.dependency import Dependency as Dependency
from .client.dependency import depend as depend
from .client.dependency import dependent as dependent
from .client.dependency import require as require
from .client.lbview import LoadBalancedView as LoadBalancedView
from .client.remotefunction import ParallelFunction as ParallelFunction
from .client.remotefunction import RemoteFunction as RemoteFunction
from .client.remotefunction import parallel as parallel
from .client.remotefunction import remote as remote
from .client.taskclient import MapTask as MapTask
from .client.taskclient import StringTask as StringTask
from .client.taskclient import Task as Task
from .client.taskclient import TaskClient as TaskClient
from .client.taskclient import TaskResult as TaskResult
from .client.view import DirectView as DirectView
from .cluster.cluster import Cluster as Cluster
from .error import CompositeError as CompositeError
from .error import RemoteError as RemoteError
from .protocol.serialize import Reference as Reference
from .protocol.serialize import interactive as interactive


def load_ipython_extension(ip):
    """``%load_ext ipyfarm``: the %px magics (the first %px starts a cluster) and %farm."""
    from .magics import load_ipython_extension as load

    load(ip)


def __getattr__(name: str):
    # the dashboard imports ipywidgets: only when asked for
    if name == "Dashboard":
        from .widgets.dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
version_info = (0, 1, 0)

__all__ = [
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "Cluster",
    "CompositeError",
    "Dependency",
    "DirectView",
    "LoadBalancedView",
    "MapTask",
    "ParallelFunction",
    "Reference",
    "RemoteError",
    "RemoteFunction",
    "StringTask",
    "Task",
    "TaskClient",
    "TaskResult",
    "error",
    "depend",
    "dependent",
    "interactive",
    "parallel",
    "remote",
    "require",
]
