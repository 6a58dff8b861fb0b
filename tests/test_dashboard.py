"""The status dashboard (``/dashboard``) in a real headless Chromium against a real server.

One server with keys and a fake cloud; the browser enters the admin key in the page's form and
the page polls ``/admin/*`` itself. Checked: no console error (CSP violations included), the
breaker card going closed -> open (the cloud refuses connections, the probes open it) -> closed,
the local models, the route mix and failovers, shadow readiness, the journal events, journal
text shown as text (never HTML), a refused key asking again, and a screenshot saved as a test
artifact (``$UNDERSTUDY_TEST_ARTIFACTS``, default ``.cache/test-artifacts/dashboard.png``).

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (``make setup``);
without them the test fails, it does not skip.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EMBED_MODEL, ROOT, CHAT_MODEL, FakeCloud, ServerProc, run_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN_KEY = "admin-key-dashboard-test"
CLIENT_KEY = "client-key-dashboard-test"
XSS_MODEL = '<b id="xss">not bold</b>'
CHEST = "Crushing chest pain spreading to my jaw and I am sweating a lot."


def config_for(cloud: FakeCloud) -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"
connect_timeout_s = 1.0
first_byte_timeout_s = 1.5
read_timeout_s = 1.0
probe_interval_s = 0.3
probe_interval_open_s = 0.2
probe_timeout_s = 0.5
failure_threshold = 2
failure_min_calls = 1000
open_base_s = 1.0

[[workloads]]
name = "triage"
models = ["triage-model"]
cloud_model = "gpt-4o-mini"
fallback = "local"
local_model = "triage-minilm"
cloud_system_prompt = "Answer with JSON only: {{\\"label\\": ..., \\"confidence\\": ...}}"
shadow_rate = 1.0

[[workloads]]
name = "general"
models = ["gpt-4o"]
fallback = "none"
"""


def scripted(body: dict[str, Any]) -> str:
    if "Crushing chest pain" in json.dumps(body.get("messages")):
        return '{"label": "emergent", "confidence": 0.97}'
    return "The cloud model says hello."


@pytest.fixture(scope="module")
def dash_cloud() -> Iterator[FakeCloud]:
    c = FakeCloud(script=scripted).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def srv(dash_cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    env = {"UNDERSTUDY_ADMIN_KEY": ADMIN_KEY, "UNDERSTUDY_API_KEYS": CLIENT_KEY}
    with run_server(tmp_path_factory.mktemp("dashboard"), config_for(dash_cloud), env=env) as s:
        yield s


def artifacts_dir() -> Path:
    path = Path(os.environ.get("UNDERSTUDY_TEST_ARTIFACTS") or ROOT / ".cache" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def browser(tmp: Path) -> Any:
    """Headless Chromium through Debian's chromedriver; fails (not skips) when they are missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.fail(f"the dashboard test needs {', '.join(missing)}: run `make setup` "
                    "(it installs Debian's chromium and chromium-driver, and selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", f"--user-data-dir={tmp / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log")))


def wait_for(what: str, check: Callable[[], Any], timeout: float, driver: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - an element not there yet, or replaced between two reads
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    logs = driver.get_log("browser") if driver is not None else []
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r}); browser log: {logs}")


def severe(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("level") == "SEVERE"]


def client_post(srv: ServerProc, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)


def chat(srv: ServerProc, model: str, text: str = "Hello") -> httpx.Response:
    return client_post(srv, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4})


def test_dashboard(srv: ServerProc, dash_cloud: FakeCloud, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # The page itself is open; its data is not.
    page = httpx.get(srv.url + "/dashboard", timeout=10)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(srv.url + "/admin/status", timeout=10).status_code == 401

    # Traffic for the journal: a cloud answer (shadowed locally), a local embedding, and a model
    # name that is HTML (the journal keeps it; the page must show it as text).
    r = chat(srv, "triage-model", CHEST)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
    assert client_post(srv, "/v1/embeddings", {"model": EMBED_MODEL, "input": "hello"}).status_code == 200
    assert chat(srv, XSS_MODEL).headers["x-understudy-route"] == "cloud"

    driver = browser(tmp_path)
    try:
        driver.get(srv.url + "/dashboard")
        form = wait_for("the key form", lambda: driver.find_element(By.ID, "auth").is_displayed(), 10, driver)
        assert form and not driver.find_element(By.ID, "dash").is_displayed()
        driver.find_element(By.ID, "key-input").send_keys(ADMIN_KEY)
        driver.find_element(By.ID, "key-submit").click()

        def breaker() -> str:
            return driver.find_element(By.ID, "breaker-cloud").get_attribute("data-state")

        wait_for("the breaker closed", lambda: breaker() == "closed", 10, driver)
        assert driver.execute_script("return sessionStorage.getItem('understudy.adminKey')") == ADMIN_KEY
        assert driver.execute_script("return document.cookie") == ""

        rows = wait_for("the model table", lambda: driver.find_elements(By.CSS_SELECTOR, "#models-body tr[data-model]"), 10, driver)
        models = {row.get_attribute("data-model"): row.text for row in rows}
        assert {CHAT_MODEL, EMBED_MODEL, "triage-minilm"} <= set(models), models
        assert re.search(r"\b\d+ / \d+\b", models[CHAT_MODEL]), models[CHAT_MODEL]  # running / slots
        assert "tok/s" in models[CHAT_MODEL] and "tok/s" in models[EMBED_MODEL]

        events = wait_for("journal events", lambda: driver.find_elements(By.CSS_SELECTOR, "#events li.event"), 10, driver)
        assert events
        wait_for("the route mix", lambda: int(driver.find_element(By.ID, "mix-cloud").text) >= 2, 10, driver)
        assert driver.find_elements(By.CSS_SELECTOR, "#route-plot svg rect.route-cloud")
        wait_for("shadow readiness", lambda: "%" in driver.find_element(By.ID, "readiness-triage").text, 10, driver)
        assert driver.find_element(By.ID, "plan-summary").text.startswith("plan:")
        assert driver.find_element(By.ID, "hardware").text

        # Journal text is text: the HTML model name is shown literally and never becomes an element.
        wait_for("the HTML model name, as text", lambda: XSS_MODEL in driver.find_element(By.ID, "events").text, 10, driver)
        assert not driver.find_elements(By.ID, "xss")

        # Outage: the probes open the breaker; a covered request fails over, an uncovered one is refused.
        dash_cloud.set_fault("refuse")
        wait_for("the breaker open", lambda: breaker() == "open", 15, driver)
        card = driver.find_element(By.ID, "breaker-cloud")
        assert "state-open" in card.get_attribute("class") and "connect_error" in card.text
        r = chat(srv, "triage-model", CHEST)
        assert r.headers["x-understudy-route"] == "local" and r.headers["x-understudy-fallback-reason"]
        assert chat(srv, "gpt-4o").status_code == 503
        wait_for("the failover counted", lambda: int(driver.find_element(By.ID, "failovers").text) >= 1, 10, driver)
        wait_for("the refusal counted", lambda: int(driver.find_element(By.ID, "mix-none").text) >= 1, 10, driver)
        assert driver.find_elements(By.CSS_SELECTOR, "#failover-reasons li")
        assert driver.find_elements(By.CSS_SELECTOR, "#route-plot svg rect.route-local")

        shot = artifacts_dir() / "dashboard.png"
        shot.unlink(missing_ok=True)
        assert driver.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)

        dash_cloud.set_fault("ok")
        wait_for("the breaker closed again", lambda: breaker() == "closed", 15, driver)

        problems = severe(driver.get_log("browser"))
        assert not problems, f"console errors: {problems}"

        # A refused key: the page asks again, with the reason.
        driver.execute_script("sessionStorage.setItem('understudy.adminKey', 'wrong-key')")
        driver.refresh()
        wait_for("the key form again", lambda: driver.find_element(By.ID, "auth").is_displayed(), 10, driver)
        assert "401" in driver.find_element(By.ID, "auth-error").text
        assert driver.execute_script("return sessionStorage.getItem('understudy.adminKey')") is None
        others = [e for e in severe(driver.get_log("browser")) if "401" not in e.get("message", "")]
        assert not others, f"console errors: {others}"
    finally:
        dash_cloud.set_fault("ok")
        driver.quit()
