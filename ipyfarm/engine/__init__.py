"""ipyfarm engines: Jupyter kernels that also run ipyfarm tasks.

Data flow inside one engine process::

    controller DEALER ──► shell ROUTER ──► FarmKernel.apply_request / execute_request
                                              │  outputs: EngineSession.send ─► OutputCapture
                                              ▼
                          reply (+ metadata: stdout, stderr, outputs, execute_result, error)
    registration DEALER ◄─► controller ROUTER "registration"   (ControllerLink thread)

Modules: ``kernel`` (FarmKernel), ``capture`` (outputs collected per request),
``link`` (registration + heartbeats), ``app`` (the ``python -m ipyfarm.engine``
entry point), ``ops`` (tiny apply targets used by the client), ``properties``.

Importing this package imports nothing heavy: the client imports ``ipyfarm.engine.ops``.
"""
