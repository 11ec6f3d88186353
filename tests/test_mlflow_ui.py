"""The MLflow UI reached through `python -m bench.tracking ui` (what `nox -s mlflow-ui` runs) shows the runs table
first, and the evaluation curve (reward mean logged with step = S) reads back as one point per step count, which is
what MLflow's line chart plots against "Step".

The UI check starts a real `mlflow ui` on a free loopback port over a small store, opens the printed URL in headless
Chromium (the DevTools pipe client of test_report_browser.py) and reads the rendered page's text; the control opens
the same experiment without the URL parameter, where MLflow 3.17 lands on its GenAI traces view.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bench import tracking

STEPS = (1, 2, 4, 8)


def _store(tmp_path) -> tuple[str, str, list[str]]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = tracking.Store(uri)
    experiment_id = store.experiment_id("ui")
    names = []
    for method, offset in (("ddpo", 0.02), ("pso", 0.05)):
        name = f"{method}/toy-turbo/toy-all/k4/s0"
        with store.start_run(experiment_id, name, {"method": method, "cell_id": method}) as run:
            for s in STEPS:  # as bench.evaluate logs it: the mean of every reward with step = S
                run.log_metrics({"eval/test/toy-all/mean": 0.5 + offset + 0.01 * s,
                                 f"eval/test/toy-all/s{s}/mean": 0.5 + offset + 0.01 * s}, step=s)
        names.append(name)
    return uri, experiment_id, names


def test_reward_against_step_count_reads_back_as_a_curve(tmp_path):
    uri, experiment_id, names = _store(tmp_path)
    runs = tracking.load_runs(uri, "ui")
    assert sorted(runs.run_name) == sorted(names)
    exp = tracking._client(uri).get_experiment(experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    for _, run in runs.iterrows():
        history = tracking.metric_history(uri, run.run_id, "eval/test/toy-all/mean").sort_values("step")
        assert history.step.tolist() == list(STEPS)
        offset = 0.02 if run.method == "ddpo" else 0.05
        assert history.value.tolist() == pytest.approx([0.5 + offset + 0.01 * s for s in STEPS])
        # the latest value (the runs table's column) is the one at the largest S
        assert run["metrics.eval/test/toy-all/mean"] == pytest.approx(0.5 + offset + 0.08)


def test_ui_command_prints_the_runs_table_url(tmp_path, capsys):
    uri, experiment_id, _ = _store(tmp_path)
    assert tracking.main(["ui", "--uri", uri, "--port", "5123", "--print"]) == 0
    out = capsys.readouterr().out
    url = f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert f"stepbench/ui: {url}" in out
    assert "http://127.0.0.1:5123/#/experiments?workflowType=machine_learning" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _page_text(browser, session, want: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": "document.body.innerText"},
                            session=session)["result"].get("value") or ""
        if want in text:
            return text
        time.sleep(1.0)
    return text


@pytest.mark.timeout(300)
def test_mlflow_ui_opens_on_the_runs_table(tmp_path):
    from test_report_browser import CHROMIUM, DevTools

    if CHROMIUM is None:
        pytest.skip("chromium not installed: apt-get install -y chromium")
    uri, experiment_id, names = _store(tmp_path)
    port = _free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.tracking", "ui", "--uri", uri, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    browser = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow ui did not start:\n" + (tmp_path / "ui.log").read_text()[-3000:])
                time.sleep(0.5)
        printed = re.search(r"stepbench/ui: (\S+)", (tmp_path / "ui.log").read_text())
        assert printed, (tmp_path / "ui.log").read_text()
        browser = DevTools(tmp_path / "chromium-profile", timeout=90)
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Runtime.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)

        # control: the experiment's bare address in a fresh browser profile opens MLflow 3's GenAI view
        browser.call("Page.navigate", {"url": f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"},
                     session=session)
        bare = _page_text(browser, session, "Traces", 60)
        assert "Traces" in bare and names[0] not in bare, bare[:2000]

        browser.call("Page.navigate", {"url": printed.group(1)}, session=session)
        text = _page_text(browser, session, names[1], 90)
        assert all(name in text for name in names), text[:3000]  # the runs table, both runs listed
        href = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": "location.href"},
                            session=session)["result"]["value"]
        assert f"/experiments/{experiment_id}/runs" in href
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / "mlflow-ui-runs.png").write_bytes(png)
    finally:
        if browser is not None:
            browser.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
