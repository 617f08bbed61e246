"""The dashboard's HTTP server: stdlib ``ThreadingHTTPServer``, read-only GET endpoints.

    /                        the page (static/index.html + app.js + style.css)
    /static/plotly.min.js    plotly.js from the installed ``plotly`` package (never a CDN)
    /api/info                storage URL, results folder, whether plotly.js is available
    /api/runs                runs table rows (?task= &family= &status= &group= filter exactly)
    /api/run?id=RUN_ID       one record
    /api/curves?run=A&run=B  CSV curves of several runs (&metric=train/loss&metric=... : only those)
    /api/arms?group=G        per arm over seeds: mean curve with 95% interval, gap to the baseline
                             (&x=tokens|flops|step &baseline=ARM)
    /api/studies             Optuna studies in the same database
    /api/study?name=NAME     one study's trials
    /api/study_plots?name=N  Optuna's plotly figures of one study
    /api/report              REPORT.md as HTML and the plots under plots/ it does not show

The store is opened read-only: nothing is written into or beside the database.
    /files/<path>            a report/plot file inside the results folder (nothing outside it)
"""
from __future__ import annotations

import errno
import importlib.util
import json
import mimetypes
import socket
import sys
import threading
import traceback
import webbrowser

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from bench.dashboard import api, arms, report_page
from bench.dashboard.studies import Studies
from bench.tracking.records import ResultsStore, StorageError, normalize_storage_url, sqlite_file

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


def plotly_js() -> bytes | None:
    """plotly.min.js shipped inside the ``plotly`` Python package, or None when not installed."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if path.is_file():
        return path.read_bytes()
    from plotly.offline import get_plotlyjs  # other layouts of the package

    return get_plotlyjs().encode()


class DashboardServer(ThreadingHTTPServer):
    """Serves one results store and one results folder; ``url`` is where to point a browser."""

    daemon_threads = True  # Ctrl-C does not wait for open browser connections

    def __init__(self, store: ResultsStore, host: str, port: int, results_dir: Path):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.store, self.results_dir = store, results_dir
        self.studies = Studies(store)
        self.storage_shown = store.engine.url.render_as_string(hide_password=True)
        self.loopback_only = host in LOOPBACK_NAMES
        self._plotly: bytes | None = None
        self._plotly_lock = threading.Lock()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def plotly_js(self) -> bytes | None:
        with self._plotly_lock:
            if self._plotly is None:
                self._plotly = plotly_js()
            return self._plotly

    def server_close(self) -> None:
        super().server_close()
        self.store.close()


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "moe-bench-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: errors are reported below
        pass

    # -- responses ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=86400" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(api.jsonable(obj), allow_nan=False, default=str).encode()
        self._send(status, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _file(self, path: Path, cache: bool = False) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        self._send(200, path.read_bytes(), ctype, cache)

    # -- routing -----------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        """A server on loopback answers only requests naming a loopback host (DNS rebinding)."""
        if not self.server.loopback_only:
            return True
        host = self.headers.get("Host", "")
        name = host[:host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
        return name in LOOPBACK_NAMES

    def do_GET(self) -> None:  # http.server's name for the GET handler
        try:
            if not self._host_ok():
                return self._error(403, "this dashboard only answers requests to 127.0.0.1/localhost")
            parts = urlsplit(self.path)
            self._route(unquote(parts.path), parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except StorageError as e:
            self._error(503, str(e))
        except Exception as e:  # noqa: BLE001 (one bad request must not stop the server)
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"{type(e).__name__}: {e}")

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        one = {k: v[0] for k, v in query.items() if v and v[0]}
        srv = self.server
        if path in ("/", "/index.html"):
            return self._file(STATIC_DIR / "index.html")
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon", cache=True)
        if path == "/static/plotly.min.js":
            js = srv.plotly_js()
            if js is None:
                return self._send(404, b"console.error('plotly.js missing: pip install plotly');",
                                  "application/javascript")
            return self._send(200, js, "application/javascript; charset=utf-8", cache=True)
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            target = STATIC_DIR / name
            if "/" in name or "\\" in name or name.startswith(".") or not target.is_file():
                return self._error(404, f"not found: {path}")
            return self._file(target)
        if path.startswith("/files/"):
            target = api.inside(srv.results_dir, path[len("/files/"):])
            if target is None:
                return self._error(403, "only report and plot files inside the results folder are served")
            if not target.is_file():
                return self._error(404, f"not found: {path}")
            if target.suffix.lower() == ".html":
                page = api.offline_plot_html(target.read_text(encoding="utf-8", errors="replace"))
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            return self._file(target)
        if path == "/api/info":
            return self._json({"storage": srv.storage_shown, "results_dir": str(srv.results_dir.absolute()),
                               "plotly": importlib.util.find_spec("plotly") is not None,
                               "optuna_hint": srv.studies.hint})
        if path == "/api/runs":
            filters = {k: one.get(k) for k in ("task", "family", "group", "status")}
            return self._json(api.runs(srv.store, **filters))
        if path == "/api/run":
            detail = api.run_detail(srv.store, one.get("id", ""))
            return self._json(detail) if detail else self._error(404, f"no run {one.get('id')!r} in the store")
        if path == "/api/curves":
            return self._json(api.run_curves(srv.store, query.get("run", []), query.get("metric")))
        if path == "/api/arms":
            if not one.get("group"):
                return self._error(400, "which group? /api/arms?group=NAME")
            if one.get("x", "tokens") not in arms.X_AXES:
                return self._error(400, f"x must be one of {', '.join(arms.X_AXES)}")
            return self._json(arms.arms(srv.store, one["group"], one.get("x", "tokens"), one.get("baseline")))
        if path == "/api/studies":
            return self._json(srv.studies.summaries())
        if path == "/api/study":
            trials = srv.studies.trials(one.get("name", ""))
            return self._json(trials) if trials else self._error(404, f"no study {one.get('name')!r}")
        if path == "/api/study_plots":
            figures = srv.studies.figures(one.get("name", ""))
            return self._json(figures) if figures else self._error(404, f"no study {one.get('name')!r}")
        if path == "/api/report":
            return self._json(report_page.report(srv.results_dir))
        return self._error(404, f"not found: {path}")


def _check_sqlite_exists(storage: str | None) -> None:
    """A dashboard only reads: a missing SQLite file is a mistyped path, not a new database."""
    db = sqlite_file(storage)
    if db is not None and not db.is_file():
        url = normalize_storage_url(storage)
        raise StorageError(f"no results database at {db} (storage {url!r}): "
                           f"train a run first (`moe-bench train ...`), or pass the storage URL of an "
                           f"existing database (--storage or $MOE_BENCH_STORAGE)")


def make_server(storage: str | None, host: str = "127.0.0.1", port: int = 8050,
                results_dir: str | Path = "results") -> DashboardServer:
    """A started-but-not-serving dashboard server (call ``serve_forever()``; port 0 picks a free
    port, see ``.url``). Raises StorageError when the store cannot be opened and OSError when the
    address cannot be bound."""
    _check_sqlite_exists(storage)
    store = ResultsStore(storage, read_only=True)  # a dashboard only reads
    try:
        store.list()  # fail now, not on the first page load
        return DashboardServer(store, host, port, Path(results_dir))
    except OSError as e:
        store.close()
        hint = "; is another dashboard running there? Pick another port" if e.errno == errno.EADDRINUSE else ""
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    except BaseException:
        store.close()
        raise


def serve(storage: str | None = None, host: str = "127.0.0.1", port: int = 8050,
          results_dir: str | Path = "results", open_browser: bool = False) -> None:
    """Serve the dashboard until Ctrl-C; prints the URL first."""
    server = make_server(storage, host, port, results_dir)
    print(f"moe-bench dashboard on {server.url}  (storage {server.storage_shown}, results "
          f"{Path(results_dir).absolute()}; Ctrl-C stops)", flush=True)
    if host not in LOOPBACK_NAMES:
        print(f"note: listening on {host}: anyone who can reach this machine can read the results", flush=True)
    if open_browser:
        threading.Timer(0.3, webbrowser.open, [server.url]).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
