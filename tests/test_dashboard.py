"""Dashboard: JSON API over a temporary store with real Lightning-layout CSV files, file serving
without path traversal, Optuna studies in the same SQLite file, and one headless-Chromium test
(marker ``browser``; needs Debian's chromium + chromium-driver, see .ci/browser.sh)."""
from __future__ import annotations

import csv
import http.client
import json
import os
import threading
import time

from pathlib import Path

import pytest

from bench.dashboard import make_server
from bench.dashboard.markdown import render
from bench.tracking import ResultsStore, RunRecord, StorageError

IDS = ("20260101-000000-dense-aaaa", "20260101-000100-moe-bbbb", "20260101-000200-switch-cccc")
COLUMNS = ["epoch", "step", "train/flops_spent", "train/loss", "train/lr", "val/loss"]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """A Lightning CSVLogger metrics.csv: one header, sparse rows (empty where not logged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "hparams.yaml").write_text("{}\n")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})


def train_rows(steps, loss, flops_per_step=1e9):
    return [{"epoch": 0, "step": s, "train/flops_spent": (s + 1) * flops_per_step, "train/loss": loss(s),
             "train/lr": 1e-3} for s in steps]


@pytest.fixture
def store_dir(tmp_path):
    """results/ with moe-bench.db holding 3 runs: dense (one CSV), moe (resumed: two CSVs),
    switch (no CSV at all); plus REPORT.md, a plot and a secret file outside results/."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    url = f"sqlite:///{results / 'moe-bench.db'}"
    dense, moe, switch = (runs / i for i in IDS)
    write_metrics(dense / "csv" / "metrics.csv",
                  train_rows(range(10), lambda s: 5.0 - 0.25 * s)
                  + [{"epoch": 0, "step": 4, "val/loss": 4.5}, {"epoch": 1, "step": 9, "val/loss": 3.25}])
    # moe: first file logged steps 0-5, the run resumed from its step-3 checkpoint and logged 4-9 again.
    write_metrics(moe / "csv" / "metrics.csv", train_rows(range(6), lambda s: 6.0 - 0.1 * s))
    resumed = moe / "csv-resumed-20260101-010000" / "metrics.csv"
    write_metrics(resumed, train_rows(range(4, 10), lambda s: 2.0 - 0.1 * s) + [{"epoch": 1, "step": 9, "val/loss": 1.5}])
    base = dict(task="tinyshakespeare-char", preset="tiny", group="cmp", seed=1, status="finished",
                budget={"kind": "flops", "value": 1e10}, train_flops=1e10, steps=10)
    records = [
        RunRecord(run_id=IDS[0], family="dense", params={"total": 1000, "active": 1000},
                  metrics={"val_loss": 3.25, "quality": 0.0388}, timings={"wall_seconds": 12.5},
                  paths={"run_dir": str(dense), "csv_file": str(dense / "csv" / "metrics.csv")}, **base),
        RunRecord(run_id=IDS[1], family="moe", params={"total": 4000, "active": 1500},
                  metrics={"val_loss": 1.5, "quality": 0.223},
                  expert_stats=[{"tokens_per_expert": [10, 30, 20, 40], "fraction_dropped": 0.05}],
                  paths={"run_dir": str(moe), "csv_file": str(resumed)}, **base),
        RunRecord(run_id=IDS[2], family="switch", params={"total": 4000, "active": 1000},
                  metrics={"val_loss": float("nan")},
                  paths={"run_dir": str(switch), "csv_file": str(switch / "csv" / "metrics.csv")},
                  **{**base, "status": "failed"}),
    ]
    with ResultsStore(url) as store:
        for r in records:
            store.save(r)
    (results / "plots").mkdir()
    (results / "REPORT.md").write_text("# Report\n\nDense vs **MoE**.\n\n| run | loss |\n|---|---|\n| a | 1.5 |\n\n"
                                       "![curve](plots/loss.png)\n")
    (results / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (results / "plots" / "loss.html").write_text("<html><body>plot</body></html>")
    (tmp_path / "secret.txt").write_text("top secret")
    return url, results


@pytest.fixture
def dashboard(store_dir):
    url, results = store_dir
    server = make_server(url, port=0, results_dir=results)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def get(server, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (urllib would not normalise it either, but be sure)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def get_json(server, path: str) -> dict:
    status, body = get(server, path)
    assert status == 200, body
    return json.loads(body)


def test_runs_are_listed_with_their_numbers(dashboard):
    rows = get_json(dashboard, "/api/runs")["runs"]
    assert [r["run_id"] for r in rows] == list(IDS)
    dense = rows[0]
    assert (dense["family"], dense["task"], dense["status"], dense["steps"]) == ("dense", "tinyshakespeare-char", "finished", 10)
    assert dense["val_loss"] == 3.25 and dense["active_params"] == 1000 and dense["budget"] == "flops 1e+10"
    assert dense["quality_per_active_param"] == pytest.approx(0.0388 / (1000 / 1e6))  # per million active
    assert rows[2]["val_loss"] == "nan"  # NaN survives as a string: browsers reject bare NaN in JSON
    assert [r["run_id"] for r in get_json(dashboard, "/api/runs?family=moe")["runs"]] == [IDS[1]]


def test_curves_hold_the_csv_values(dashboard):
    query = "&".join(f"run={i}" for i in IDS)
    dense, moe, switch = get_json(dashboard, f"/api/curves?{query}")["runs"]

    train = dense["metrics"]["train/loss"]
    assert train["step"] == list(range(10))
    assert train["y"] == [5.0 - 0.25 * s for s in range(10)]
    assert train["x"]["flops"] == [(s + 1) * 1e9 for s in range(10)]
    val = dense["metrics"]["val/loss"]
    assert (val["step"], val["y"], val["x"]["flops"]) == ([4, 9], [4.5, 3.25], [5e9, 1e10])
    assert dense["note"] is None and set(dense["x_axes"]) == {"step", "flops"}
    assert "train/lr" in dense["metrics"] and "train/flops_spent" not in dense["metrics"]

    # Resumed run: steps 0-3 from the first file, 4-9 from the resumed one (superseding 4-5).
    train = moe["metrics"]["train/loss"]
    assert train["step"] == list(range(10))
    assert train["y"] == pytest.approx([6.0 - 0.1 * s for s in range(4)] + [2.0 - 0.1 * s for s in range(4, 10)])
    assert moe["metrics"]["val/loss"]["y"] == [1.5]

    assert switch["metrics"] == {} and switch["note"].startswith("no curve:") and "not found" in switch["note"]
    only = get_json(dashboard, f"/api/curves?run={IDS[0]}&metric=val/loss&metric=no/such")["runs"][0]
    assert list(only["metrics"]) == ["val/loss"] and only["available"] == ["train/loss", "train/lr", "val/loss"]
    unknown = get_json(dashboard, "/api/curves?run=nope")["runs"][0]
    assert unknown["note"] == "no curve: no such run in the store"


def test_unreadable_csv_is_a_note(dashboard, store_dir):
    _, results = store_dir
    csv_file = results.parent / "runs" / IDS[0] / "csv" / "metrics.csv"
    csv_file.write_text("epoch,loss\n0,1.0\n")  # no step column
    dense = get_json(dashboard, f"/api/curves?run={IDS[0]}")["runs"][0]
    assert dense["metrics"] == {} and "no 'step' column" in dense["note"]


def test_run_detail(dashboard):
    rec = get_json(dashboard, f"/api/run?id={IDS[1]}")["record"]
    assert rec["expert_stats"][0]["tokens_per_expert"] == [10, 30, 20, 40]
    assert get(dashboard, "/api/run?id=nope")[0] == 404


@pytest.mark.parametrize("path", [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt", "/files/plots/../../secret.txt",
    "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/files/moe-bench.db", "/static/../server.py",
    "/static/%2e%2e/server.py", "/files/plots/missing.png",
])
def test_no_file_outside_the_results_folder(dashboard, path):
    status, body = get(dashboard, path)
    assert status in (403, 404)
    assert b"top secret" not in body and b"root:" not in body and b"SQLite" not in body


def test_report_and_plots(dashboard):
    report = get_json(dashboard, "/api/report")
    assert "<h1>Report</h1>" in report["html"] and "<strong>MoE</strong>" in report["html"]
    assert "<td>1.5</td>" in report["html"] and 'src="/files/plots/loss.png"' in report["html"]
    assert {(p["name"], p["kind"]) for p in report["plots"]} == {("loss.png", "image"), ("loss.html", "html")}
    assert get(dashboard, "/files/plots/loss.png") == (200, b"\x89PNG\r\n\x1a\nfake")


def test_report_html_plots_use_the_local_plotly(dashboard, store_dir):
    _, results = store_dir
    (results / "plots" / "cdn.html").write_text(
        '<html><head><script charset="utf-8" src="https://cdn.plot.ly/plotly-3.0.1.min.js" integrity="sha256-x" '
        'crossorigin="anonymous"></script></head><body><script>Plotly.newPlot("a", [])</script></body></html>')
    (results / "plots" / "bare.html").write_text('<html><head></head><body><script>Plotly.newPlot("a", [])</script></body></html>')
    for name in ("cdn.html", "bare.html"):
        status, page = get(dashboard, f"/files/plots/{name}")
        assert status == 200 and b"cdn.plot.ly" not in page
        assert page.count(b'<script src="/static/plotly.min.js">') == 1


def test_port_in_use_is_a_clear_error(dashboard, store_dir):
    url, results = store_dir
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1:.*Pick another port"):
        make_server(url, port=dashboard.server_address[1], results_dir=results)


def test_requests_for_other_host_names_are_refused(dashboard):
    """A page on another site cannot read the results through DNS rebinding."""
    conn = http.client.HTTPConnection("127.0.0.1", dashboard.server_address[1], timeout=10)
    conn.request("GET", "/api/runs", headers={"Host": "attacker.example:8050"})
    res = conn.getresponse()
    assert res.status == 403 and b"20260101" not in res.read()
    conn.close()


def test_page_and_offline_plotly(dashboard):
    status, page = get(dashboard, "/")
    assert status == 200 and b'src="/static/plotly.min.js"' in page and b"cdn" not in page.lower()
    status, js = get(dashboard, "/static/plotly.min.js")
    assert status == 200 and len(js) > 1_000_000 and b"plotly.js" in js[:500]
    assert get(dashboard, "/static/app.js")[0] == 200


def test_optuna_studies_in_the_same_database(dashboard, store_dir):
    import optuna

    url, _ = store_dir
    assert get_json(dashboard, "/api/studies")["note"].startswith("no studies")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="dense-vs-moe", storage=url, direction="minimize")
    for run_id, _lr, value in ((IDS[0], 1e-3, 3.25), (IDS[1], 3e-3, 1.5)):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)  # sampled; the stored value is checked below
        trial.set_user_attr("run_id", run_id)
        study.tell(trial, value)
    listed = get_json(dashboard, "/api/studies")
    assert [s["name"] for s in listed["studies"]] == ["dense-vs-moe"]
    assert listed["studies"][0]["n_trials"] == 2 and listed["studies"][0]["best_run_id"] == IDS[1]
    assert listed["hint"].startswith("optuna-dashboard sqlite:///")
    trials = get_json(dashboard, "/api/study?name=dense-vs-moe")["trials"]
    assert [(t["number"], t["state"], t["values"], t["run_id"]) for t in trials] == \
        [(0, "complete", [3.25], IDS[0]), (1, "complete", [1.5], IDS[1])]
    assert trials[0]["params"]["lr"] == study.trials[0].params["lr"]
    assert get(dashboard, "/api/study?name=nope")[0] == 404


def test_storage_that_cannot_be_opened_refuses_to_start(tmp_path):
    with pytest.raises(StorageError, match="no results database"):
        make_server(f"sqlite:///{tmp_path / 'missing.db'}", port=0)
    assert not (tmp_path / "missing.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="not a valid SQLite database"):
        make_server(str(junk), port=0)
    with pytest.raises(StorageError):
        make_server("nosuchdialect://x/y", port=0)


def test_markdown_escapes_html():
    html = render("# T <b>\n\n<script>alert(1)</script> [x](javascript:alert(1)) `a<b`\n\n- one\n- two\n")
    assert "<script>" not in html and "&lt;script&gt;" in html and 'href="#"' in html
    assert "<code>a&lt;b</code>" in html and "<ul><li>one</li><li>two</li></ul>" in html


# -- headless Chromium -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    if missing:
        msg = (f"browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver "
               f"(or .ci/browser.sh) and pip install selenium")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)  # CI must never skip this silently
        pytest.skip(msg)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never go online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 15.0):
    """Poll a JS expression until it is truthy; returns its value."""
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


@pytest.mark.browser
def test_browser_compare_two_runs(dashboard, browser):
    from selenium.webdriver.common.by import By

    browser.get(dashboard.url)
    assert wait_for(browser, "document.body.dataset.ready === '1'"), "page did not finish loading"
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")
    assert sorted(r.get_attribute("data-run-id") for r in rows) == sorted(IDS)
    assert browser.execute_script("return !!window.Plotly"), "plotly.js not served"

    for run_id in IDS[:2]:
        browser.find_element(By.CSS_SELECTOR, f"input.run-select[value='{run_id}']").click()
    button = browser.find_element(By.ID, "compare-btn")
    assert button.text == "Compare selected (2)"
    button.click()
    # One plot per default metric (train/loss, val/loss), one trace per selected run.
    traces = wait_for(browser, "(() => { const p = [...document.querySelectorAll('#plots .js-plotly-plot')];"
                               " return p.length === 2 && p.map(d => [d.dataset.metric, d.data.length]); })()")
    assert traces == [["train/loss", 2], ["val/loss", 2]]
    assert browser.find_elements(By.CSS_SELECTOR, "#plots .js-plotly-plot g.trace")  # drawn, not just data
    assert wait_for(browser, "document.querySelectorAll('#compare-notes li').length === 0")

    browser.find_element(By.CSS_SELECTOR, "input.metric-box[value='train/lr']").click()  # fetched on demand
    assert wait_for(browser, "[...document.querySelectorAll('#plots .js-plotly-plot')].map(d => d.data.length)"
                             ".join() === '2,2,2'")
    browser.get(dashboard.url + f"#compare/{IDS[2]}")  # the run without a CSV file: a note, no crash
    note = wait_for(browser, "document.querySelector('#compare-notes li.note')?.textContent")
    assert note and note.startswith(f"{IDS[2]}: no curve:")


def test_run_without_csv_files_falls_back_to_the_records_curve(tmp_path):
    """Committed reference results keep no run directories: the record's own evaluation curve is shown."""
    from bench.dashboard import api

    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.save(RunRecord(run_id="ref", family="switch", status="finished", paths={"csv_file": str(tmp_path / "gone.csv")},
                         curve=[{"step": 50, "tokens": 2e5, "flops": 4e12, "seconds": 9.5, "loss": 2.9},
                                {"step": 100, "tokens": 4e5, "flops": 8e12, "seconds": 19.0, "loss": 2.5}]))
    run = api.run_curves(store, ["ref"])["runs"][0]
    val = run["metrics"]["val/loss"]
    assert (val["step"], val["y"], val["x"]["flops"]) == ([50, 100], [2.9, 2.5], [4e12, 8e12])
    assert run["note"] == "validation curve from the run record (no CSV files here)"
