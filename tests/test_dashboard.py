"""Dashboard: JSON API over a temporary store with real Lightning-layout CSV files, file serving
without path traversal, Optuna studies in the same SQLite file, and one headless-Chromium test
(marker ``browser``; needs Debian's chromium + chromium-driver, see .ci/browser.sh)."""
from __future__ import annotations

import contextlib
import csv
import http.client
import shutil
import sqlite3
import json
import os
import threading
import time
import warnings

from pathlib import Path

import pytest

from bench.dashboard import make_server
from bench.dashboard.report_page import render
from bench.tracking import ResultsStore, RunRecord, StorageError

IDS = ("20260101-000000-dense-aaaa", "20260101-000100-moe-bbbb", "20260101-000200-switch-cccc")
COLUMNS = ["epoch", "step", "train/flops_spent", "train/loss", "train/lr", "val/loss"]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """A Lightning CSVLogger metrics.csv: one header, sparse rows (empty where not logged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "hparams.yaml").write_text("{}\n")
    with open(path, "w", newline="") as f:
        columns = COLUMNS + sorted({k for row in rows for k in row} - set(COLUMNS))
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in columns})


def train_rows(steps, loss, flops_per_step=1e9):
    return [{"epoch": 0, "step": s, "train/flops_spent": (s + 1) * flops_per_step, "train/loss": loss(s),
             "train/lr": 1e-3} for s in steps]


# The moe run's last evaluation, as RoutingHealth records it in expert_stats[0]["eval"].
MOE_EVAL = {"tokens_per_expert": [20, 30, 25, 25], "max_violation": 0.2, "dead_experts": 0, "fraction_dropped": 0.0,
            "dropped_pos": [0.0, 0.0, 0.01, 0.02], "router_entropy": 1.25, "topk_margin": 0.3,
            "assignment_stability": 0.875}


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
    write_metrics(resumed, train_rows(range(4, 10), lambda s: 2.0 - 0.1 * s)
                  + [{"epoch": 1, "step": 9, "moe/layer0/fraction_dropped": 0.05},
                     {"epoch": 1, "step": 9, "val/loss": 1.5, "moe_eval/layer0/max_violation": 0.2}])
    base = dict(task="tinyshakespeare-char", preset="tiny", group="cmp", seed=1, status="finished",
                budget={"kind": "flops", "value": 1e10}, train_flops=1e10, steps=10)
    records = [
        RunRecord(run_id=IDS[0], family="dense", params={"total": 1000, "active": 1000},
                  metrics={"val_loss": 3.25, "quality": 0.0388}, timings={"wall_seconds": 12.5},
                  paths={"run_dir": str(dense), "csv_file": str(dense / "csv" / "metrics.csv")}, **base),
        RunRecord(run_id=IDS[1], family="moe", params={"total": 4000, "active": 1500},
                  metrics={"val_loss": 1.5, "quality": 0.223},
                  expert_stats=[{"tokens_per_expert": [10, 30, 20, 40], "fraction_dropped": 0.05, "eval": MOE_EVAL}],
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


@contextlib.contextmanager
def serving(url: str, results: Path):
    server = make_server(url, port=0, results_dir=results)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def dashboard(store_dir):
    with serving(*store_dir) as server:
        yield server


# -- a reproduction: arms over seeds ----------------------------------------------------------------

REPRO_GROUP = "repro-switch-vs-dense-tiny"
T2, T1 = 4.302652729749464, 12.706204736174698  # Student-t 97.5% quantiles, 2 and 1 degrees of freedom
DENSE = {s: [3.0 + 0.1 * s, 2.5 + 0.1 * s, 2.0 + 0.1 * s] for s in range(3)}  # val loss at 100, 200, 300 tokens


def arm_run(arm: str, seed: int, losses: list[float], status: str = "finished") -> RunRecord:
    """A record as the runner writes it for one arm and seed of the switch-vs-dense plan."""
    xs = (100, 200, 300)[:len(losses)]
    curve = [{"step": 10 * (i + 1), "tokens": x, "flops": 6e6 * x, "loss": y} for i, (x, y) in enumerate(zip(xs, losses))]
    family = arm.split()[0]
    return RunRecord(run_id=f"sv-{arm.replace(' ', '_')}-s{seed}", name=f"switch-vs-dense: {arm}", group=REPRO_GROUP,
                     task="tinyshakespeare-char", family=family, preset="tiny", seed=seed, status=status, curve=curve,
                     metrics={"val_loss": losses[-1]}, extra={"reproduction": "switch-vs-dense", "arm": arm})


@pytest.fixture
def repro_store(store_dir):
    """store_dir plus a switch-vs-dense reproduction: dense (3 seeds), switch cf=1.25 (3 seeds, 0.1/0.2/0.3
    below dense; seed 2 stopped evaluating after 200 tokens), switch cf=1.0 (one seed), a failed run."""
    url, results = store_dir
    with ResultsStore(url) as store:
        for seed, losses in DENSE.items():
            store.save(arm_run("dense", seed, losses))
        for seed in range(3):
            losses = [y - 0.1 * (seed + 1) for y in DENSE[seed]]
            store.save(arm_run("switch cf=1.25", seed, losses[:2] if seed == 2 else losses))
        store.save(arm_run("switch cf=1.0", 0, [2.95, 2.45, 1.95]))
        store.save(arm_run("switch cf=1.0", 1, [9.0, 9.0, 9.0], status="failed"))
    return url, results


@pytest.fixture
def repro_dashboard(repro_store):
    with serving(*repro_store) as server:
        yield server


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
    detail = get_json(dashboard, f"/api/run?id={IDS[1]}")
    assert detail["record"]["expert_stats"][0]["tokens_per_expert"] == [10, 30, 20, 40]
    evaluation, training = detail["health"]
    assert evaluation == {"layer": 0, "source": "evaluation", "experts": 4, "max_violation": 0.2, "dead_experts": 0,
                          "fraction_dropped": 0.0, "dropped_by_position": [0.0, 0.0, 0.01, 0.02],
                          "router_entropy": 1.25, "topk_margin": 0.3, "assignment_stability": 0.875}
    # The training batch kept only its load and dropped share: MaxVio from the load, 40 / 25 - 1.
    assert training["source"] == "last training batch" and training["max_violation"] == pytest.approx(0.6)
    assert training["fraction_dropped"] == 0.05 and training["assignment_stability"] is None
    assert get_json(dashboard, f"/api/run?id={IDS[0]}")["health"] == []  # dense: nothing routed
    assert get(dashboard, "/api/run?id=nope")[0] == 404


def test_routing_health_rows_per_layer_and_source():
    from bench.dashboard.health import routing_health

    stats = [{"tokens_per_expert": [3, 1], "dead_experts": 0.0, "router_entropy": 0.5, "dropped_by_position": [0.5, 0.0]},
             {"load": 0.02, "eval": {"tokens_per_expert": [0, 8], "dead_experts": 1}},  # moe-rnn: "load" is its loss
             "not a dict", {"z_loss": 0.1}]
    rows = routing_health(stats)
    assert [(r["layer"], r["source"]) for r in rows] == [(0, "last training batch"), (1, "evaluation")]
    assert rows[0]["max_violation"] == pytest.approx(3 / 2 - 1) and rows[0]["dropped_by_position"] == [0.5, 0.0]
    assert rows[1]["max_violation"] == pytest.approx(8 / 4 - 1) and rows[1]["dead_experts"] == 1
    assert rows[1]["experts"] == 2 and routing_health(None) == [] and routing_health([]) == []


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
    # loss.png is shown by the report itself: only the plot it does not show is listed apart
    assert [(p["name"], p["kind"]) for p in report["plots"]] == [("loss.html", "html")]
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
    html, used = render("# T <b>\n\n<script>alert(1)</script> [x](javascript:alert(1)) `a<b`\n\n- one\n- two\n"
                        "\n[plot](plots/a%20b.html) [web](https://example.org/x)\n")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html and "[x](javascript:alert(1))" in html  # left as text, not a link
    assert "<code>a&lt;b</code>" in html and "<ul>\n<li>one</li>\n<li>two</li>\n</ul>" in html
    assert 'href="/files/plots/a%20b.html"' in html and 'href="https://example.org/x"' in html
    assert used == {"plots/a b.html"}


def test_verdicts_are_text_badges():
    """Verdicts need no emoji font: the report's marks (and older reports' emoji) become badges."""
    html, _ = render("| claim | verdict |\n|---|---|\n| a | **reproduced** |\n| b | inconclusive |\n"
                     "| c | **no effect beyond delta** |\n\n- ❌ refuted claim\n- ✅️ fine\n")
    assert '<td><span class="verdict reproduced">reproduced</span></td>' in html
    assert '<td><span class="verdict inconclusive">inconclusive</span></td>' in html
    assert '<span class="verdict no-effect">no effect beyond delta</span>' in html
    assert '<li><span class="verdict refuted">refuted</span> refuted claim</li>' in html
    assert '<li><span class="verdict reproduced">reproduced</span> fine</li>' in html
    assert not any(ch in html for ch in "✅❌➖❔\ufe0f")


def test_runs_and_curves_name_the_arm(repro_dashboard):
    rows = {r["run_id"]: r for r in get_json(repro_dashboard, "/api/runs")["runs"]}
    assert rows["sv-switch_cf=1.25-s0"]["arm"] == "switch cf=1.25"
    assert rows["sv-switch_cf=1.25-s0"]["reproduction"] == "switch-vs-dense"
    assert rows[IDS[0]]["arm"] == "dense"  # no arm tag and no name: the family
    runs = get_json(repro_dashboard, "/api/curves?run=sv-switch_cf=1.0-s0&run=sv-switch_cf=1.25-s0")["runs"]
    assert [r["label"] for r in runs] == ["switch cf=1.0 · seed 0", "switch cf=1.25 · seed 0"]
    assert runs[1]["metrics"]["val/loss"]["y"] == pytest.approx([2.9, 2.4, 1.9])
    twice = get_json(repro_dashboard, "/api/curves?run=sv-dense-s1&run=sv-dense-s1")["runs"]
    assert [r["label"] for r in twice] == ["dense · seed 1 (sv-dense-s1)"] * 2  # the same label: the id tells them apart


def test_arms_mean_interval_and_paired_gap(repro_dashboard):
    data = get_json(repro_dashboard, f"/api/arms?group={REPRO_GROUP}")
    assert data["baseline"] == "dense" and data["x"] == "tokens"  # the plan's baseline
    assert [a["arm"] for a in data["arms"]] == ["dense", "switch cf=1.0", "switch cf=1.25"]  # the plan's order
    dense, cf1, cf125 = data["arms"]
    half = T2 * 0.1 / 3 ** 0.5  # sd 0.1 over 3 seeds
    assert dense["seeds"] == [0, 1, 2] and dense["curve"]["x"] == [100, 200, 300]
    assert dense["curve"]["mean"] == pytest.approx([3.1, 2.6, 2.1])
    assert dense["curve"]["low"] == pytest.approx([3.1 - half, 2.6 - half, 2.1 - half])
    assert dense["curve"]["high"] == pytest.approx([3.1 + half, 2.6 + half, 2.1 + half])
    assert dense["final_val_loss"] == pytest.approx({"mean": 2.1, "low": 2.1 - half, "high": 2.1 + half, "n": 3})
    assert dense["gap"] is None
    # only the x values every seed has (seed 2 stopped at 200 tokens)
    assert cf125["curve"]["x"] == [100, 200] and cf125["curve"]["mean"] == pytest.approx([2.9, 2.4])
    gap = cf125["gap"]  # per-seed gaps -0.1, -0.2, -0.3; at 300 tokens only seeds 0 and 1 (sd 0.05 * sqrt 2)
    assert gap["x"] == [100, 200, 300] and gap["n"] == [3, 3, 2]
    assert gap["mean"] == pytest.approx([-0.2, -0.2, -0.15])
    assert gap["low"] == pytest.approx([-0.2 - half, -0.2 - half, -0.15 - T1 * 0.05])
    assert gap["high"][0] == pytest.approx(-0.2 + half)
    # one finished seed (the failed run does not count): a mean, no interval
    assert cf1["seeds"] == [0] and cf1["curve"]["low"] == [None, None, None]
    assert cf1["gap"]["mean"] == pytest.approx([-0.05, -0.05, -0.05]) and cf1["gap"]["low"] == [None] * 3

    flops = get_json(repro_dashboard, f"/api/arms?group={REPRO_GROUP}&x=flops&baseline=switch cf=1.25".replace(" ", "%20"))
    assert flops["baseline"] == "switch cf=1.25" and flops["arms"][0]["curve"]["x"] == pytest.approx([6e8, 1.2e9, 1.8e9])
    assert flops["arms"][0]["gap"]["mean"][0] == pytest.approx(0.2)
    assert get_json(repro_dashboard, "/api/arms?group=nope")["note"] == "no finished runs in group 'nope'"
    assert get(repro_dashboard, f"/api/arms?group={REPRO_GROUP}&x=bogus")[0] == 400


def make_study(url: str, name: str = "lr-search", n: int = 3, directions=("minimize",), metric_names=None,
               objectives=None):
    """A small Optuna study in the results database, with intermediate values and run ids."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=list(directions),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    if metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names)
    if objectives:
        study.set_user_attr("objectives", objectives)
    for i in range(n):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        layers = trial.suggest_int("layers", 1, 4)
        if len(directions) == 1:  # Optuna keeps intermediate values of single-objective trials only
            trial.report(3.0 - i * 0.1, step=1)
        trial.set_user_attr("run_id", IDS[i % len(IDS)])
        values = [2.0 + lr * 10 + 0.01 * layers, 1000.0 * layers][:len(directions)]
        study.tell(trial, values)
    return study


def test_study_figures_are_optunas_own(dashboard, store_dir):
    url, _ = store_dir
    make_study(url, "lr-search", n=3, metric_names=["val_loss"])
    data = get_json(dashboard, "/api/study_plots?name=lr-search")
    kinds = [f["kind"] for f in data["figures"]]
    assert kinds == ["history", "importances", "parallel", "intermediate"] and data["notes"] == []
    history = data["figures"][0]["figure"]
    assert history["layout"]["yaxis"]["title"]["text"] == "val_loss"  # the study's metric name, not "Objective Value"
    assert history["layout"]["title"]["text"] == "optimization history: val_loss"
    assert {t["name"] for t in history["data"]} >= {"val_loss", "Best Value"}
    assert sorted(data["figures"][1]["figure"]["data"][0]["y"]) == ["layers", "lr"]  # importances per parameter
    assert get_json(dashboard, "/api/study?name=lr-search")["objectives"] == ["val_loss"]

    make_study(url, "one-trial", n=1)
    notes = get_json(dashboard, "/api/study_plots?name=one-trial")["notes"]
    assert notes == ["parameter importances: Objective 0: needs at least 2 completed trials and 1 parameter "
                     "(1 completed, 2 parameters)"]
    # multi-objective, names only in the user attr (studies made before set_metric_names)
    make_study(url, "pareto", n=3, directions=("minimize", "minimize"), objectives=["val_loss", "active_params"])
    data = get_json(dashboard, "/api/study_plots?name=pareto")
    assert [f["title"] for f in data["figures"]] == [
        "optimization history: val_loss", "optimization history: active_params",
        "parameter importances: val_loss", "parameter importances: active_params",
        "parallel coordinates: val_loss", "parallel coordinates: active_params", "intermediate values", "Pareto front"]
    pareto = data["figures"][-1]["figure"]["layout"]
    assert (pareto["xaxis"]["title"]["text"], pareto["yaxis"]["title"]["text"]) == ("val_loss", "active_params")
    assert get(dashboard, "/api/study_plots?name=nope")[0] == 404


def copy_store(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite file (its WAL content included), as a backup would make."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dst)) as b:
        a.backup(b)


@pytest.mark.parametrize("permissions", ["writable", "read-only"])
def test_read_only_store_writes_nothing(repro_store, tmp_path, permissions):
    """The dashboard on a copy of a store (runs + an Optuna study) creates no -wal/-shm/journal file
    beside it, changes no byte of it, and works in a read-only directory."""
    url, results = repro_store
    make_study(url, "lr-search", n=3, metric_names=["val_loss"])
    ro = tmp_path / "ro"
    ro.mkdir()
    db = ro / "moe-bench.db"
    copy_store(Path(url.removeprefix("sqlite:///")), db)
    shutil.copy(results / "REPORT.md", ro / "REPORT.md")
    assert db.read_bytes()[18:20] == b"\x02\x02"  # a WAL-mode file: the case that used to leave -wal/-shm
    before, content = sorted(os.listdir(ro)), db.read_bytes()
    if permissions == "read-only":
        db.chmod(0o444)
        ro.chmod(0o555)
    try:
        with serving(f"sqlite:///{db}", ro) as server:
            runs = get_json(server, "/api/runs")["runs"]
            assert len(runs) == len(IDS) + 8 and {r["arm"] for r in runs} >= {"dense", "switch cf=1.25"}
            assert get_json(server, f"/api/run?id={IDS[1]}")["record"]["family"] == "moe"
            assert get_json(server, f"/api/arms?group={REPRO_GROUP}")["arms"][0]["curve"]["mean"] == pytest.approx([3.1, 2.6, 2.1])
            assert [s["name"] for s in get_json(server, "/api/studies")["studies"]] == ["lr-search"]
            assert len(get_json(server, "/api/study?name=lr-search")["trials"]) == 3
            assert get_json(server, "/api/study_plots?name=lr-search")["figures"]
            assert "<h1>Report</h1>" in get_json(server, "/api/report")["html"]
            assert sorted(os.listdir(ro)) == before  # also while it is open
        assert sorted(os.listdir(ro)) == before and db.read_bytes() == content
    finally:
        ro.chmod(0o755)
        db.chmod(0o644)


def test_read_only_store_follows_a_live_writer(store_dir):
    """While a training run writes (its -wal/-shm exist), the dashboard reads through them: new runs
    show up, and no file is added or left behind."""
    url, results = store_dir
    folder = results
    with ResultsStore(url) as writer, serving(url, results) as server:
        writer.list()  # the writer's connection is open: -wal and -shm exist
        before = sorted(os.listdir(folder))
        assert {"moe-bench.db-wal", "moe-bench.db-shm"} <= set(before)
        assert len(get_json(server, "/api/runs")["runs"]) == len(IDS)
        writer.save(arm_run("dense", 0, DENSE[0]))
        assert [r["run_id"] for r in get_json(server, "/api/runs")["runs"]][-1] == "sv-dense-s0"
        assert sorted(os.listdir(folder)) == before
    assert not any(name.startswith("moe-bench.db-") for name in os.listdir(folder))  # the writer cleaned up


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


def page_ready(driver, url: str) -> None:
    driver.get(url)
    assert wait_for(driver, "document.body.dataset.ready === '1'"), "page did not finish loading"


@pytest.mark.browser
def test_browser_runs_table_names_arms(repro_dashboard, browser):
    page_ready(browser, repro_dashboard.url)
    arms = browser.execute_script("return Object.fromEntries([...document.querySelectorAll('#runs-table tbody tr')]"
                                  ".map(tr => [tr.dataset.runId, tr.querySelector('td.arm').textContent.trim()]))")
    assert arms["sv-switch_cf=1.25-s0"] == "switch cf=1.25" and arms["sv-switch_cf=1.0-s0"] == "switch cf=1.0"
    assert arms[IDS[0]] == "dense"
    # At 1400 px the quality columns are on screen without scrolling.
    shown = browser.execute_script(
        "return ['val_loss', 'quality', 'quality_per_active_param'].map(k => document.querySelector("
        "`#runs-table th[data-key='${k}']`).getBoundingClientRect().right <= document.documentElement.clientWidth)")
    assert shown == [True, True, True]
    # Narrower: the table scrolls sideways and the arm column (with the checkbox) stays in place.
    browser.set_window_size(800, 1000)
    moved = browser.execute_script(
        "const box = document.querySelector('#view-runs .scroll'); const cell = document.querySelector('#runs-table td.arm');"
        "const before = cell.getBoundingClientRect().left; box.scrollLeft = 400;"
        "return [box.scrollWidth > box.clientWidth, box.scrollLeft, cell.getBoundingClientRect().left - before]")
    assert moved[0] and moved[1] > 0 and moved[2] == 0


@pytest.mark.browser
def test_browser_arms_view_legends_name_the_arms(repro_dashboard, browser):
    page_ready(browser, repro_dashboard.url + f"#arms/{REPRO_GROUP}")
    legend = ("(() => { const d = document.querySelector('%s'); return d && d.data && "
              "d.data.filter(t => t.showlegend !== false).map(t => t.name); })()")
    assert wait_for(browser, legend % "#arms-curves") == ["dense", "switch cf=1.0", "switch cf=1.25"]
    assert wait_for(browser, legend % "#arms-gap") == ["switch cf=1.0 − dense", "switch cf=1.25 − dense"]
    drawn = browser.execute_script("return [...document.querySelectorAll('#arms-curves .legendtext')].map(t => t.textContent)")
    assert drawn == ["dense", "switch cf=1.0", "switch cf=1.25"]
    # bands: a filled trace under the mean of every arm with two or more seeds
    fills = browser.execute_script("return document.querySelector('#arms-curves').data.filter(t => t.fill === 'toself').map(t => t.name)")
    assert fills == ["dense (95% CI)", "switch cf=1.25 (95% CI)"]
    # The legend sits right of the plot area and clear of the x-axis title.
    boxes = browser.execute_script(
        "const d = document.querySelector('#arms-curves'); const r = (s) => d.querySelector(s).getBoundingClientRect();"
        "const legend = r('.legend'), plot = r('.nsewdrag'), xtitle = r('.g-xtitle');"
        "return [legend.left >= plot.right, xtitle.right <= legend.left || xtitle.top >= legend.bottom]")
    assert boxes == [True, True]
    assert browser.execute_script("return [...document.querySelectorAll('#arms-table tbody tr td:first-child')]"
                                  ".map(td => td.textContent)") == ["dense", "switch cf=1.0", "switch cf=1.25"]


@pytest.mark.browser
def test_browser_studies_show_optuna_figures(dashboard, store_dir, browser):
    make_study(store_dir[0], "lr-search", n=3, metric_names=["val_loss"])
    page_ready(browser, dashboard.url + "#study/lr-search")
    kinds = wait_for(browser, "(() => { const d = [...document.querySelectorAll('#study-figures .js-plotly-plot')];"
                              " return d.length === 4 && d.map(x => x.dataset.kind); })()")
    assert kinds == ["history", "importances", "parallel", "intermediate"]
    title = browser.execute_script("return document.querySelector('#study-figures .js-plotly-plot .gtitle').textContent")
    assert title == "optimization history: val_loss"
    assert browser.execute_script("return document.querySelectorAll('#study-figures .js-plotly-plot g.trace').length") > 0


@pytest.mark.browser
def test_browser_report_shows_each_plot_once(dashboard, store_dir, browser):
    _, results = store_dir
    (results / "REPORT.md").write_text("# Report\n\n| claim | verdict |\n|---|---|\n| a | **reproduced** |\n| b | ❔ |\n\n"
                                       "![curve](plots/loss.png)\n")
    page_ready(browser, dashboard.url + "#report")
    srcs = wait_for(browser, "(() => { const r = document.querySelector('#report-body');"
                             " return r && [...document.querySelectorAll('#view-report img, #view-report iframe')]"
                             ".map(e => e.getAttribute('src')); })()")
    assert srcs == ["/files/plots/loss.png", "/files/plots/loss.html"]  # inline once; the gallery only has the other
    badges = browser.execute_script(
        "return [...document.querySelectorAll('#report-body .verdict')].map(b => [b.className, b.textContent,"
        " getComputedStyle(b).backgroundColor !== 'rgba(0, 0, 0, 0)'])")
    assert badges == [["verdict reproduced", "reproduced", True], ["verdict inconclusive", "inconclusive", True]]


@pytest.mark.browser
def test_browser_run_page_shows_routing_health(dashboard, browser):
    page_ready(browser, dashboard.url + f"#run/{IDS[1]}")
    cells = wait_for(browser, "(() => { const rows = [...document.querySelectorAll('#routing-health tbody tr')];"
                              " return rows.length === 2 && rows.map(tr => Object.fromEntries([...tr.cells]"
                              ".map(td => [td.dataset.key, td.textContent]))); })()")
    assert cells, "routing health table not drawn"
    evaluation, training = cells
    assert (evaluation["source"], evaluation["max_violation"], evaluation["dead_experts"]) == ("evaluation", "0.2000", "0")
    assert evaluation["dropped_by_position"] == "0.00% / 0.00% / 1.00% / 2.00%"
    assert (evaluation["router_entropy"], evaluation["assignment_stability"]) == ("1.2500", "87.50%")
    assert (training["source"], training["max_violation"], training["fraction_dropped"]) == ("last training batch", "0.6000", "5.00%")
    assert training["assignment_stability"] == "-"
    page_ready(browser, dashboard.url + f"#run/{IDS[0]}")
    assert wait_for(browser, "document.querySelector('p#routing-health')?.textContent.startsWith('no routing health')")

    # Curves: each kind of routing metric folds into its own group, apart from the loss curves.
    page_ready(browser, dashboard.url + f"#compare/{IDS[1]}")
    groups = wait_for(browser, "(() => { const g = [...document.querySelectorAll('#metric-boxes details')];"
                               " return g.length === 2 && g.map(d => [d.dataset.group,"
                               " [...d.querySelectorAll('input.metric-box')].map(b => b.value)]); })()")
    assert groups == [["moe/", ["moe/layer0/fraction_dropped"]], ["moe_eval/", ["moe_eval/layer0/max_violation"]]]
    browser.execute_script("document.querySelector(\"input.metric-box[value='moe_eval/layer0/max_violation']\").click()")
    assert wait_for(browser, "(() => { const d = document.querySelector(\"#plots [data-metric='moe_eval/layer0/max_violation']\");"
                             " return d && d.data && d.data[0].y.join(); })()") == "0.2"
