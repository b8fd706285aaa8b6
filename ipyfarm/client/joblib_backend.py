"""A joblib backend that runs ``joblib.Parallel`` work on a LoadBalancedView.

``view.register_joblib_backend()`` then ``with joblib.parallel_backend("ipyparallel"):``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def _backend_class() -> type:
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

    class FarmBackend(AutoBatchingMixin, ParallelBackendBase):
        supports_retrieve_callback = True

        def __init__(self, view: Any = None, **kwargs: Any):
            super().__init__(**kwargs)
            self.view = view

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            return max(1, len(self.view))

        def configure(self, n_jobs: int = 1, parallel: Any = None, **kwargs: Any) -> int:
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

        def submit(self, func: Any, callback: Any = None) -> Any:
            ar = self.view.apply_async(func)
            if callback is not None:
                ar.add_done_callback(callback)
            return ar

        def retrieve_result_callback(self, out: Any) -> Any:
            return out.get()

        def abort_everything(self, ensure_ready: bool = True) -> None:
            try:
                self.view.abort()
            except Exception:
                pass

    return FarmBackend


def register(view: Any, name: str = "ipyparallel", make_default: bool = False) -> None:
    try:
        from joblib.parallel import register_parallel_backend
    except ImportError:
        raise ImportError("register_joblib_backend needs joblib: pip install joblib") from None
    cls = _backend_class()
    register_parallel_backend(name, lambda **kw: cls(view=view, **kw),
                              make_default=make_default)
