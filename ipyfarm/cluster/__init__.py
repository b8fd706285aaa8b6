"""Starting controllers and engines."""

from .cluster import Cluster as Cluster
from .launcher import LocalEngineLauncher as LocalEngineLauncher
