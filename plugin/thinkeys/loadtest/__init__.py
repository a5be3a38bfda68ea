"""``thinkeys loadtest``: concurrent-users load test of OpenAI-compatible servers, stock vs thin keys.

Modules: :mod:`~thinkeys.loadtest.ramp` (users, steps, the ramp), :mod:`~thinkeys.loadtest.server_metrics`
(vLLM's ``/metrics``: running / waiting / preemptions), :mod:`~thinkeys.loadtest.target` (what a URL
serves), :mod:`~thinkeys.loadtest.servers` (local servers for ``compare``), :mod:`~thinkeys.loadtest.report`
and :mod:`~thinkeys.loadtest.plot` (JSON, tables, PNG), :mod:`~thinkeys.loadtest.cli` (the command).
"""
