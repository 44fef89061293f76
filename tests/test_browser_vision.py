"""The vision workflow in headless Chromium: a broken upload is refused with a clear message,
a real image is uploaded, a question about it runs on vlm-1, a generated token is selected and
its attention over the image is drawn. Screenshots land in test-output/browser/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.test_browser_workbench import ROOT, _idle, _need, _no_error, _shot, browser, server  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VLM1_WEIGHTS = ROOT / "sampler_core" / "data" / "vlm-1" / "model.safetensors"
PICTURE = ROOT / "assets" / "images" / "vlm" / "green_triangle_bottom_right.png"


def test_vision_in_chromium(server, browser, tmp_path) -> None:  # noqa: F811 - fixtures
    _need(VLM1_WEIGHTS.is_file(), f"vlm-1's weights are missing ({VLM1_WEIGHTS})")
    try:
        _drive(server, browser, tmp_path)
    except Exception:
        _shot(browser, "vision-failure")
        raise


def _scroll_to(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)
    time.sleep(0.6)  # let the scroll settle before a screenshot (not a speed check)


def _drive(server, driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Streamlit re-renders while tokens stream: an element read mid-render goes stale; retry.
    wait = WebDriverWait(driver, 240, ignored_exceptions=(StaleElementReferenceException,))
    driver.get(server)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'textarea[aria-label^="Prompt"]'))
    _idle(driver, wait)
    # Choose vlm-1 in the sidebar.
    model = driver.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"] [data-testid="stSelectbox"] input')
    model.click()
    model.send_keys("vlm-1", Keys.ENTER)
    _idle(driver, wait)
    max_len = driver.find_element(By.CSS_SELECTOR, 'input[aria-label="max_len"]')
    max_len.send_keys(Keys.CONTROL, "a")
    max_len.send_keys("6", Keys.ENTER)
    _idle(driver, wait)
    # Open the image panel; a broken file is refused with a message that says why.
    driver.find_element(By.XPATH, '//summary[.//p[contains(text(), "Image (for the vision model)")]]').click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[type="file"]'))
    broken = tmp_path / "broken.png"
    broken.write_bytes(PICTURE.read_bytes()[:200])
    upload.send_keys(str(broken))
    wait.until(lambda d: any("not a readable PNG, JPEG or WebP" in e.text for e in
                             d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')))
    _idle(driver, wait)
    _shot(driver, "vision-01-broken-upload")
    # Upload a real picture instead (it replaces the broken one).
    driver.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys(str(PICTURE))
    wait.until(lambda d: any("not about photos" in e.text for e in
                             d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentInfo"]')))
    _idle(driver, wait)
    _no_error(driver, "image uploaded")
    # Wrap a question in the chat template (the image goes after it), then run.
    driver.find_element(By.XPATH, '//summary[.//p[text()="Chat template helper"]]').click()
    message = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Message"]'))
    message.send_keys("What shape is in the picture?", Keys.ENTER)
    _idle(driver, wait)
    driver.find_element(By.XPATH, '//button[.//p[text()="Wrap in the model\'s chat template"]]').click()
    wait.until(lambda d: "im_start" in d.find_element(By.CSS_SELECTOR, 'textarea[aria-label^="Prompt"]')
               .get_attribute("value"))
    _idle(driver, wait)
    driver.find_element(By.XPATH, '//button[.//p[text()="Run"]]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "span.pide-chip")) > 16)
    _idle(driver, wait)
    chips = wait.until(lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "span.pide-chip")])
    assert sum(c.startswith("▦1 ") for c in chips) == 16, chips
    _no_error(driver, "after the vision run")
    _scroll_to(driver, driver.find_element(By.XPATH, '//h4[contains(., "Output")]'))
    _shot(driver, "vision-02-run")
    # Select the first generated token: the pill right after the last image patch.
    pills = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button')
    last_patch = max(i for i, p in enumerate(pills) if "▦" in p.text)
    pills[last_patch + 1].click()
    wait.until(lambda d: d.find_elements(By.XPATH, '//h5[contains(., "Where this token looked")]'))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .hm, .js-plotly-plot .heatmaplayer"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .layer-below image, "
                                                        ".js-plotly-plot image"))
    _idle(driver, wait)
    _no_error(driver, "token selected")
    _scroll_to(driver, driver.find_element(By.XPATH, '//h5[contains(., "Where this token looked")]'))
    _shot(driver, "vision-03-overlay")
    # The per-token table lists the image tokens.
    tab = driver.find_element(By.XPATH, '//*[@role="tab"][contains(., "Per-token table")]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", tab)
    tab.click()
    _idle(driver, wait)
    table = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))
    _scroll_to(driver, table)
    _shot(driver, "vision-04-table")
    # The Attention page: the heatmap over all context tokens, and the overlay for one row.
    driver.find_element(By.CSS_SELECTOR, 'a[href$="/attention"]').click()
    wait.until(lambda d: d.find_elements(By.XPATH, '//h4[contains(., "Over the image and the text")]'))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3)
    _idle(driver, wait)
    _no_error(driver, "attention page")
    _shot(driver, "vision-05-attention-heatmap")
    _scroll_to(driver, driver.find_element(By.XPATH, '//h4[contains(., "Over the image and the text")]'))
    _shot(driver, "vision-06-attention-overlay")
    # History keeps the image with the run.
    driver.find_element(By.CSS_SELECTOR, 'a[href$="/history"]').click()
    wait.until(lambda d: any("Image:" in e.text for e in d.find_elements(By.CSS_SELECTOR, "p")))
    _idle(driver, wait)
    _no_error(driver, "history page")
    _shot(driver, "vision-07-history")
