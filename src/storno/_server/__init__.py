"""storno's operator surfaces: HTTP API, webhook, dashboard, metrics, tracing, logs.

Needs the ``storno[server]`` extra (tracing: ``storno[otel]``). The public names are in
:mod:`storno.server`; the modules here are its implementation.
"""
