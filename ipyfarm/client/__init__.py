"""The user-facing client: Client, views, AsyncResult."""

from .asyncresult import AsyncHubResult as AsyncHubResult
from .asyncresult import AsyncMapResult as AsyncMapResult
from .asyncresult import AsyncResult as AsyncResult
from .client import Client as Client
from .view import DirectView as DirectView
