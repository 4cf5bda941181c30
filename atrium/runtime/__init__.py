"""The composition root and what runs the process: top of the layers, imported by nothing
in atrium but ``run.py``.

``root`` builds the process's supervision tree (pool, HTTP servers, jobs, workspaces,
metrics, cluster, bridge); ``process_group`` runs several such processes behind
one port (``--workers``); ``retention`` is the periodic pruning of old rows; and
``metrics_server`` reads the live gauges at scrape time and serves ``/metrics``.
"""
