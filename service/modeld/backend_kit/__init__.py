"""Plumbing shared by the backends shipped with modeld (``reference``, ``llama-cpp``).

A backend is a process serving LocalAI's ``backend.Backend`` gRPC service on ``--addr``.
This package holds what does not depend on the engine: the process entry point with its
signal handling (:mod:`.server`), turning errors into gRPC statuses (:mod:`.rpc`), one-line
logging to stderr (:mod:`.log`) and process memory figures (:mod:`.memory`).
"""
