"""``moe-bench dashboard``: a local, offline web app to browse the results store.

Runs table (filter, sort, select), training curves of selected runs from their Lightning CSV
files (plotly.js served from the installed ``plotly`` package), one run's record and expert load,
the Optuna studies kept in the same database, and ``results/REPORT.md`` with ``results/plots/``.
Depends only on ``bench.tracking`` and optuna; serves read-only GET requests on 127.0.0.1.

    from bench.dashboard import serve
    serve("sqlite:///results/moe-bench.db", port=8050)   # blocks until Ctrl-C
"""
from bench.dashboard.server import DashboardServer, make_server, serve

__all__ = ["DashboardServer", "make_server", "serve"]
