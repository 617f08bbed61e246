"""``moe-bench dashboard``: a local, offline web app to browse the results store.

Runs table (filter, sort, select; each run named by its arm), training curves of selected runs from
their Lightning CSV files (plotly.js served from the installed ``plotly`` package), each group's
arms over seeds (mean curve and paired gap to the baseline with 95% intervals, from
``bench.report.stats``), one run's record and expert load, the Optuna studies kept in the same
database with Optuna's own figures, and ``results/REPORT.md`` with ``results/plots/``. The store is
opened read-only: nothing is written into or beside the database. Serves GET requests on 127.0.0.1.

    from bench.dashboard import serve
    serve("sqlite:///results/moe-bench.db", port=8050)   # blocks until Ctrl-C
"""
from bench.dashboard.server import DashboardServer, make_server, serve

__all__ = ["DashboardServer", "make_server", "serve"]
