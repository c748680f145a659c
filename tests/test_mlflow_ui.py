"""The MLflow UI as users see it: a real ``mlflow server`` over the tiny study's sqlite file, opened in
headless Chromium (Debian's ``chromium`` driven by Playwright; never ``playwright install``).

Checks that the nested trial runs, their speedup/drift values, the params and the study report can be
found where a user looks for them, and saves screenshots (to the session's tmp folder; with
``UPDATE_SCREENSHOTS=1`` also to ``docs/``, which the README shows).

MLflow 3 UI gotchas handled here: ``#/experiments/<id>`` opens an overview, the runs table is
``#/experiments/<id>/runs``; child runs start collapsed under their parent; metric columns are hidden
until chosen; the compare view's metric table is virtualised (only ~7 rows exist in the DOM, the rest
appear when it scrolls) and shows a metric a run lacks as "NaN"; an "MLflow Assistant" panel opens on
a fresh profile's first visit; the page renders after "load", so every step waits for elements.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SERVER_START_TIMEOUT = 180  # ~8-14 s on an idle machine; much more when Ray studies run beside it
UI_TIMEOUT_MS = 60_000
# the closed network here floods refused connections unless every background service is off
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no server log: {exc})"


def _close_enough(shown: float, true: float) -> bool:
    # the compare view rounds to 3 decimals (2 above 10, 1 above 100); the runs table shows more
    return math.isclose(shown, true, rel_tol=1e-3, abs_tol=1e-3)


def _number(text: str) -> float:
    return float(text.strip().rstrip("…").rstrip("."))


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_chromium()
    if path is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or $CHROMIUM): run scripts/install_browser.sh "
                    "(apt-get install chromium chromium-driver) to test the MLflow UI")
    return path


@pytest.fixture(scope="module")
def study(tiny_study) -> dict:
    """The tiny study's MLflow contents, read with the client: what the UI must show."""
    done = tiny_study["process"]
    assert done.returncode == 0, "the tiny study failed:\n" + done.stdout[-3000:] + done.stderr[-3000:]
    db = (tiny_study["output"] / "mlflow.db").resolve()
    assert db.exists(), f"the study wrote no {db}"
    name = yaml.safe_load(Path(tiny_study["space"]).read_text())["experiment"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} in {db}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("amp.kind") == "study"]
    assert len(parents) == 1, f"expected one study parent run, found {len(parents)}"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = {r.info.run_name for r in children}
    # what a user looks for first: a mixed-precision trial and an fp32 reference
    assert {"O1-bf16-b2", "fp32 reference seed 0"} <= names, names
    return {"db": db, "experiment_id": experiment.experiment_id, "parent": parent, "children": children}


@pytest.fixture(scope="module")
def mlflow_server(study, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port> over the study's sqlite file; stopped (its whole
    process group, by pid) after the module. The runs' artifact URIs are absolute local paths, which
    the server reads directly; ``--artifacts-destination`` only keeps new uploads out of the cwd."""
    home = tmp_path_factory.mktemp("mlflow-server")
    log_path = home / "server.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{study['db']}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--serve-artifacts", "--artifacts-destination", str(home / "mlartifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering:\n"
                            f"{' '.join(cmd)}\n--- server log ---\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health within {SERVER_START_TIMEOUT} s:\n"
                            f"{' '.join(cmd)}\n--- server log ---\n{_tail(log_path)}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the server's own session: it and its uvicorn worker
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing (it is in the test extra): pip install -e '.[test]'")
    # Playwright gives every launch a fresh temporary profile (it refuses --user-data-dir in args)
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """save(page_or_locator, name): to tmp always, to docs/ too with UPDATE_SCREENSHOTS=1."""
    folder = tmp_path_factory.mktemp("ui-screenshots")

    def save(target, name: str) -> Path:
        path = folder / name
        target.screenshot(path=str(path))
        assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(path, DOCS / name)
        print(f"screenshot: {path}")
        return path

    return save


@pytest.fixture
def page(browser, mlflow_server):
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    # a fresh profile opens the "MLflow Assistant" side panel on first load: mark it as already shown
    context.add_init_script("window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
    context.set_default_timeout(UI_TIMEOUT_MS)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------- helpers
def _open(page, server, route: str, ready, what: str):
    """Go to ``#/<route>`` and wait for ``ready`` (a locator); on timeout fail with what the page and
    the server show."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{server['url']}/#/{route}")
    try:
        ready.first.wait_for(state="visible")
    except PlaywrightTimeout:
        shot = server["log"].parent / f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower())}.png"
        page.screenshot(path=str(shot))
        pytest.fail(f"{what}: nothing to see at {page.url} after {UI_TIMEOUT_MS // 1000} s "
                    f"(screenshot {shot})\n--- page text ---\n{page.inner_text('body')[:2000]}\n"
                    f"--- server log ---\n{_tail(server['log'])}")


def _close_assistant(page) -> None:
    """In case the side panel opened anyway (its local-storage key is MLflow's, not an API)."""
    question = page.get_by_placeholder(re.compile("^Ask a question"))
    if question.count() and question.first.is_visible():
        page.get_by_role("button", name="Close", exact=True).filter(visible=True).first.click(timeout=10_000)


def _cosmetic(step, *args) -> None:
    """Screenshot dressing (column widths, hidden columns): never a reason to fail the test."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        step(*args)
    except PlaywrightError as exc:
        print(f"cosmetic UI step {step.__name__} skipped: {str(exc).splitlines()[0]}")


def _set_column(page, name: str, shown: bool = True) -> None:
    """Tick (or untick) one column in the runs table's "Columns" picker, which must be open."""
    page.get_by_placeholder("Search columns").fill(name)
    title = page.locator('[class*="-tree-title"]', has_text=re.compile(f"^{re.escape(name)}$"))
    node = page.get_by_test_id("column-selector-tree").locator('[class*="-tree-treenode"]').filter(has=title).first
    node.wait_for(state="visible", timeout=10_000)
    if bool(node.locator('[class*="-tree-checkbox-checked"]').count()) != shown:
        node.locator('[class*="-tree-checkbox"]').first.click(timeout=10_000)


def _hide_column(page, name: str) -> None:
    _set_column(page, name, shown=False)


def _widen_column(page, col_id: str, by: int) -> None:
    handle = page.locator(f'[role="columnheader"][col-id="{col_id}"] .ag-header-cell-resize').first
    handle.hover(timeout=5000)
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.down()
    for dx in range(10, by + 1, 10):  # ag-grid needs real intermediate moves to start a resize
        page.mouse.move(x + dx, y)
    page.mouse.up()


# the compare view's metric table: a name grid (links to the metric's chart) and, next to it, a values
# grid with one column per run; both virtualised and scrolled together
_METRIC_GRIDS_JS = """() => {
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const names = grids.find(g => g.querySelector('a[title="Plot chart"]'));
  return [names, grids[grids.indexOf(names) + 1]];
}"""
_METRIC_TOP_JS = """(metric) => {
  const names = (%s)()[0];
  const link = [...names.querySelectorAll('a')].find(a => a.textContent.trim() === metric);
  return link ? parseFloat(link.closest('div[style*="top"]').style.top) : null;
}""" % _METRIC_GRIDS_JS
_METRIC_VALUES_JS = """(top) => {
  const values = (%s)()[1];
  return [...values.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
      .filter(cell => parseFloat(cell.style.top) === top)
      .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
      .map(cell => cell.textContent.trim());
}""" % _METRIC_GRIDS_JS
_SCROLL_METRICS_JS = """(to) => {
  const values = (%s)()[1];
  values.scrollTop = to === null ? values.scrollTop + values.clientHeight / 2 : to;
  return values.scrollTop + values.clientHeight >= values.scrollHeight - 1;
}""" % _METRIC_GRIDS_JS


def _compare_metric_row(page, metric: str, columns: int) -> list[str]:
    """The values of one metric in the compare view, one per run column. Both grids are virtualised
    and the name grid follows the values grid's scrolling (with some lag): scroll until the metric's
    name exists, then bring its row near the top of the values grid (it stays in view) and read it."""
    page.locator('.ReactVirtualized__Grid a[title="Plot chart"]').first.wait_for(state="attached")
    at_end = page.evaluate(_SCROLL_METRICS_JS, 0)
    for _ in range(200):
        page.wait_for_timeout(150)
        top = page.evaluate(_METRIC_TOP_JS, metric)
        if top is not None:
            page.evaluate(_SCROLL_METRICS_JS, max(0.0, top - 90))
            row: list[str] = []
            for _ in range(100):
                row = page.evaluate(_METRIC_VALUES_JS, top)
                if len(row) >= columns:
                    return row
                page.wait_for_timeout(100)
            pytest.fail(f"metric {metric!r}: {len(row)} values shown for {columns} runs: {row}")
        if at_end:
            break
        at_end = page.evaluate(_SCROLL_METRICS_JS, None)
    pytest.fail(f"metric {metric!r} not found in the compare view's metric table")


# ------------------------------------------------------------------------------------------------ tests
def test_runs_table_shows_nested_trials_with_speedup_and_drift(page, mlflow_server, study, screenshots):
    parent, children = study["parent"], study["children"]
    parent_link = page.locator(f'a[href$="/runs/{parent.info.run_id}"]')
    _open(page, mlflow_server, f"experiments/{study['experiment_id']}/runs", parent_link, "runs table")
    _close_assistant(page)
    assert parent_link.first.inner_text().strip() == parent.info.run_name

    # children start collapsed under the study's parent run: expand it
    first_child = page.get_by_role("link", name="O1-bf16-b2", exact=True).first
    if not first_child.is_visible():
        parent_row = page.locator(f'[role="row"][row-id="{parent.info.run_id}"]').filter(has=parent_link)
        parent_row.locator('[col-id="attributes.`Run Name`"] button').first.click()
    for child in children:
        expect_row = page.locator(f'[role="row"][row-id="{child.info.run_id}"]')
        expect_row.get_by_role("link", name=child.info.run_name, exact=True).wait_for(state="visible")
    assert page.get_by_role("link", name="fp32 reference seed 0", exact=True).first.is_visible()
    assert first_child.is_visible()

    # metric columns are hidden until chosen: choose speedup, drift and the quality metric
    page.get_by_role("button", name="Columns", exact=True).click()
    for metric in ("speedup", "drift", "quality_ssim"):
        _set_column(page, metric)
    for attribute in ("Dataset", "Source", "Models"):  # room for the metrics in the screenshot
        _cosmetic(_hide_column, page, attribute)
    page.keyboard.press("Escape")
    for metric in ("speedup", "drift"):
        page.get_by_role("columnheader", name=metric, exact=True).first.wait_for(state="visible")

    # every child's speedup (and drift where it has one) is in its row, as logged
    shown_drift = 0
    for child in children:
        row = page.locator(f'[role="row"][row-id="{child.info.run_id}"]')
        for metric in ("speedup", "drift"):
            cell = row.locator(f'[role="gridcell"][col-id="metrics.`{metric}`"]').first
            text = cell.inner_text().strip()
            true = child.data.metrics.get(metric)
            if true is None:
                assert text in ("-", ""), (child.info.run_name, metric, text)
                continue
            assert _close_enough(_number(text), true), (child.info.run_name, metric, text, true)
            shown_drift += metric == "drift"
    assert shown_drift >= 1, "no trained trial with a drift value in the runs table"

    _cosmetic(_widen_column, page, "attributes.`Run Name`", 110)
    for metric in ("speedup", "drift", "quality_ssim"):
        _cosmetic(_widen_column, page, f"metrics.`{metric}`", 30)
    page.mouse.move(5, 5)  # no hover highlight in the picture
    page.set_viewport_size({"width": 1600, "height": 620})  # the table, not a page of white below it
    page.wait_for_timeout(1000)
    screenshots(page, "mlflow-ui.png")


def test_compare_view_shows_trials_params_speedup_and_drift(page, mlflow_server, study, screenshots):
    children = study["children"]
    ids = [r.info.run_id for r in children]
    route = ("compare-runs?runs=" + urllib.parse.quote(json.dumps(ids))
             + "&experiments=" + urllib.parse.quote(json.dumps([study["experiment_id"]])))
    page.set_viewport_size({"width": 1600, "height": 1800})  # plot, run details, params and metrics
    name_row = page.locator("tr").filter(has=page.locator("th", has_text=re.compile(r"^Run Name:?$")))
    _open(page, mlflow_server, route, name_row, "compare view")
    _close_assistant(page)
    page.get_by_text(f"Comparing {len(ids)} Runs", exact=False).first.wait_for(state="visible")

    # one column per trial, in a known order
    names = [t.strip() for t in name_row.first.locator("td").all_inner_texts()]
    assert sorted(names) == sorted(r.info.run_name for r in children), names
    by_name = {r.info.run_name: r for r in children}
    columns = [by_name[n] for n in names]

    # params without clicks: the settings that make each trial what it is
    for param in ("opt_level", "dtype", "batch_size"):
        row = page.locator("tr").filter(has=page.locator("th", has_text=re.compile(f"^{param}$"))).first
        shown = [t.strip() for t in row.locator("td").all_inner_texts()]
        assert shown == [r.data.params.get(param, "") for r in columns], (param, shown)

    # metrics without clicks: speedup for every trial, drift for the trained ones (a metric a run
    # lacks shows as "NaN")
    shown_drift = 0
    for metric in ("drift", "speedup"):
        shown = _compare_metric_row(page, metric, len(columns))
        assert len(shown) == len(columns), (metric, shown)
        for run, text in zip(columns, shown):
            true = run.data.metrics.get(metric)
            if true is None:
                assert text in ("NaN", "-", ""), (run.info.run_name, metric, text)
            else:
                assert _close_enough(_number(text), true), (run.info.run_name, metric, text, true)
                shown_drift += metric == "drift"
    assert shown_drift >= 1, "no trained trial with a drift value in the compare view"

    # the picture: the page as first opened (the metric table unscrolled: its name column lags one
    # scroll event behind the values, an MLflow UI bug), only the params that differ, and the
    # settings against speedup in the coordinates plot
    page.reload()
    name_row.first.wait_for(state="visible")
    _close_assistant(page)
    _cosmetic(lambda: page.get_by_role("switch", name="Parameters - Show diff only").click(timeout=5000))
    _cosmetic(_plot_speedup, page)
    page.get_by_role("link", name="drift", exact=True).first.wait_for(state="visible")
    page.mouse.move(5, 5)
    page.wait_for_timeout(1000)
    screenshots(page, "mlflow-compare.png")


def _plot_speedup(page) -> None:
    """Parallel coordinates: the chosen params against speedup only. Every trial has a speedup; with
    drift on an axis the plot draws the trials that have none at a made-up value."""
    select = page.locator('xpath=//div[normalize-space(text())="Metrics:"]/following-sibling::div[1]')
    for remove in select.locator('[class*="select-selection-item-remove"]').all():
        remove.click(timeout=5000)
    try:
        select.locator("input").click(timeout=5000)
        page.keyboard.type("speedup")
        page.locator('[class*="select-item-option"][title="speedup"]').first.click(timeout=5000)
    finally:
        page.keyboard.press("Escape")


def test_study_report_is_served_as_an_artifact(page, mlflow_server, study, screenshots):
    parent = study["parent"]
    report = page.get_by_text("report.md", exact=True)
    _open(page, mlflow_server, f"experiments/{study['experiment_id']}/runs/{parent.info.run_id}/artifacts",
          report, "study run artifacts")
    _close_assistant(page)
    for name in ("pix2pixhd.yaml", "results.parquet", "report_images"):
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    report.first.click()
    # the server reads the study's artifact files and the UI renders the markdown
    page.get_by_role("heading", name="Recommendation").first.wait_for(state="visible")
    page.get_by_text("O1-bf16-b2").first.wait_for(state="visible")
    page.mouse.move(5, 5)
    screenshots(page, "mlflow-report.png")
