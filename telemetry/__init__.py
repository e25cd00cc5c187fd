"""zps telemetry: what a running job says about itself and how it is shown.

The coordinator's view of every worker's progress and its stragglers (:mod:`.monitor`, with its Prometheus
collector), the live table of ``zps run`` / ``zps launch`` (:mod:`.live`) and ``zps top`` from another terminal or
host (:mod:`.top`). It imports only :mod:`zps.protocol`, so the roles can use it too.
"""
