"""The MLflow dashboard as its users see it: `make ui` over a store with two runs of one experiment and a
three-trial sweep, opened in Debian's Chromium through Playwright from the links the harness prints.

Every page is saved as a screenshot under outputs/tests/dashboard/ (README's picture of the runs table is
`runs.png`); a failed check names its page. Skips, saying why, where Chromium or Playwright is missing (`make setup`
installs both)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.core.files import free_port
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO_ROOT / "outputs" / "tests" / "dashboard"
SMALL = ["max_steps=4", "eval_every=2", "eval_limit=16", "max_new_tokens=16", "backend=hf"]
LOCAL_UI = "http://127.0.0.1:5000"  # where the harness's links point for a local store (`make ui`'s default)
# the assistant panel opens itself on a first visit and covers a third of the page
QUIET = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
         "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
PAGE_TIMEOUT_MS = 60_000  # the UI's first load on two busy cores
VIEWPORT, WIDE = {"width": 1800, "height": 1000}, {"width": 3600, "height": 1000}


def _harness(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _link(stdout: str, label: str, base: str) -> str:
    (url,) = re.findall(rf"^  {label}\s+(\S+)", stdout, re.M)
    assert url.startswith(LOCAL_UI), url
    return base + url[len(LOCAL_UI):]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_model_dir):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (`make setup` installs it as root: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (`make setup`)")
    tmp = tmp_path_factory.mktemp("dashboard")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    out = f"output_dir={tmp / 'outputs'}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = _harness(env, "run", "simpo_qwen", *SMALL, out, "seed=0")
    second = _harness(env, "run", "simpo_qwen", *SMALL, out, "seed=1", "learning_rate=3e-05")
    _harness(env, "sweep", "simpo_qwen", *SMALL, "max_steps=2", out, "--trials", "3", "--pruner", "none", "--seed",
             "0", "--storage", f"sqlite:///{tmp / 'optuna.db'}", "--study", "dash")
    ui = subprocess.Popen(["make", "--no-print-directory", "-s", "ui", f"MLFLOW_TRACKING_URI={uri}", f"PORT={port}"],
                          cwd=REPO_ROOT, env=env, stdout=open(tmp / "ui.log", "w"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, (tmp / "ui.log").read_text()[-3000:]
                time.sleep(2)
        SHOTS.mkdir(parents=True, exist_ok=True)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            context = browser.new_context(viewport=VIEWPORT)
            context.add_init_script(QUIET)
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            yield {"page": context.new_page(), "base": base, "client": MlflowClient(uri),
                   "runs": _link(first, "its runs:", base), "first": _link(first, "MLflow UI:", base),
                   "second": _link(second, "MLflow UI:", base)}
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


class Page:
    """One page of the dashboard: opened, checked, saved as a screenshot; a failed check says which page."""

    def __init__(self, dashboard: dict, name: str, url: str):
        self.page, self.name = dashboard["page"], name
        self.page.goto(url)

    def wait_for(self, text: str, exact: bool = False) -> None:
        self.wait_until(self.page.get_by_text(text, exact=exact).first, repr(text))

    def wait_until(self, locator, what: str) -> None:
        try:
            locator.wait_for()
        except Exception as e:
            self.shot()
            raise AssertionError(f"page '{self.name}' ({self.page.url}): never showed {what}") from e

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.shot()
            raise AssertionError(f"page '{self.name}' ({self.page.url}): {what}")

    def shot(self) -> Path:
        path = SHOTS / f"{self.name}.png"
        self.page.screenshot(path=path)
        return path


def _run(client: MlflowClient, url: str):
    return client.get_run(re.search(r"/runs/([0-9a-f]{32})", url).group(1))


def test_the_printed_link_opens_the_runs_table_with_the_select_metric_and_overrides(dashboard):
    client = dashboard["client"]
    first, second = _run(client, dashboard["first"]), _run(client, dashboard["second"])
    page = Page(dashboard, "runs", dashboard["runs"])
    page.wait_for(second.info.run_name)
    page.wait_for(first.info.run_name)
    page.check("/runs" in page.page.url and "overview" not in page.page.url and "genai" not in page.page.url,
               "the experiment did not open in the runs table")
    page.page.set_viewport_size(WIDE)  # the table draws only the columns in sight
    page.page.get_by_role("columnheader", name="seed").first.wait_for()
    header = page.page.get_by_role("columnheader").all_inner_texts()
    for column in ("eval/rouge/rougeL", "learning_rate", "seed", "Dataset"):
        page.check(column in header, f"no column {column!r} in the runs table (header: {header!r})")
    body = page.page.get_by_role("grid").inner_text()
    page.page.set_viewport_size(VIEWPORT)
    for run in (first, second):
        value = run.data.metrics["eval/rouge/rougeL"]
        page.check(repr(value) in body, f"run {run.info.run_name!r}: its eval/rouge/rougeL {value!r} not shown")
    page.check("3e-05" in body and "sweep-dash" in body, "the second run's learning_rate or the sweep is missing")
    page.shot()


def test_the_compare_view_draws_both_runs_eval_curves(dashboard):
    client = dashboard["client"]
    names = [_run(client, dashboard[k]).info.run_name for k in ("first", "second")]
    only_these = urllib.parse.quote("attributes.run_name LIKE 'simpo_qwen%'")
    experiment = re.search(r"/experiments/(\d+)/", dashboard["runs"]).group(1)
    page = Page(dashboard, "compare", f"{dashboard['base']}/#/experiments/{experiment}/runs?"
                f"workflowType=machine_learning&compareRunsMode=CHART&searchFilter={only_these}")
    page.wait_for("2 matching runs")
    page.page.get_by_placeholder("Search metric charts").fill("eval/rouge/rougeL")
    card = page.page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.page.get_by_text("eval/rouge/rougeL", exact=True))
    page.wait_for("eval/rouge/rougeL", exact=True)
    page.check(card.count() == 1, f"{card.count()} charts titled eval/rouge/rougeL")
    # each run's curve is a plotly trace with a point per evaluation (and an unmarked copy of it for hovering)
    curves = card.locator("g.trace.scatter").filter(has=page.page.locator("path.point"))
    page.wait_until(curves.nth(1), "the eval/rouge/rougeL chart's second curve")
    points = [curve.locator("path.point").count() for curve in curves.all()]
    page.check(points == [3, 3], f"the eval/rouge/rougeL chart's curves have {points} points, not steps 0, 2, 4 "
                                 "of each run")
    legend = card.inner_text()
    page.check(all(f"{n} (eval/rouge/rougeL)" in legend for n in names), f"the legend does not name both runs: "
                                                                         f"{legend!r}")
    page.shot()


def test_a_run_page_shows_its_summary_datasets_and_system_metrics(dashboard):
    run = _run(dashboard["client"], dashboard["first"])
    page = Page(dashboard, "run", dashboard["first"])
    page.wait_for("baseline (step 0) vs final (step 4)")
    page.page.get_by_text("Show more").click()
    text = page.page.inner_text("body")
    page.check("eval/rouge/rougeL" in text and "95% interval" in text, "the description has no summary table")
    for name in ("preference.jsonl", "eval.jsonl"):
        page.check(name in text, f"dataset {name} not listed")
    digest = run.inputs.dataset_inputs[0].dataset.digest
    page.check(digest in text, f"the datasets' digest {digest} not shown")
    page.check("system/cpu_utilization_percentage" in text, "no system metrics")
    page.shot()


def test_the_sweep_parent_lists_its_trials(dashboard):
    client = dashboard["client"]
    experiment = client.get_experiment_by_name("simpo_qwen")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
    trials = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    page = Page(dashboard, "sweep", f"{dashboard['base']}/#/experiments/{experiment.experiment_id}/runs/"
                f"{parent.info.run_id}?workflowType=machine_learning")
    page.wait_for("Sweep dash")
    page.page.get_by_text("Show more").click()
    page.check(len(trials) == 3, f"{len(trials)} trial runs in the store")
    for trial in trials:  # in the description's table of trials and in MLflow's own list of child runs
        links = page.page.get_by_role("link", name=trial.info.run_name, exact=True)
        page.wait_until(links.nth(1), f"{trial.info.run_name} twice (description and child runs)")
        page.check(links.count() == 2, f"{trial.info.run_name} linked {links.count()} times")
    text = page.page.inner_text("body")
    page.check("Verdict:" in text and "3 trials (3 COMPLETE)" in text, "no verdict or trial count in the description")
    page.shot()
    (first,) = [t for t in trials if t.info.run_name == "trial-0"]
    # the description's link (MLflow opens a description's links in a new tab: followed here in this one)
    href = page.page.get_by_role("link", name="trial-0", exact=True).first.get_attribute("href")
    page.check(href.endswith(f"#/experiments/{experiment.experiment_id}/runs/{first.info.run_id}"),
               f"the description links trial-0 to {href!r}")
    trial = Page(dashboard, "trial", urllib.parse.urljoin(page.page.url, href))
    trial.wait_until(trial.page.get_by_role("heading", name="trial-0"), "the trial's name as its heading")
    trial.shot()
