"""The search page in headless Chromium (Debian's chromium + chromium-driver, through selenium): upload a
reference, type a modification, see the results grid, click a result to make it the next reference.

Screenshots go to $CIRFLOW_TEST_ARTIFACTS (default: test-artifacts/ at the repository root). The browser is
installed by `make test` (make browser) where it can be; where it is missing, or with `CIRFLOW_SKIP_BROWSER=1`, this
file is skipped with the reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import ServiceConfig
from tests.indexing.conftest import XSS_ID
from tests.indexing.service_setup import LiveServer, Shop

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CIRFLOW_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
# stack.md: without the background-networking flags Chromium's calls to outside hosts fail noisily.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000", "--disable-dev-shm-usage")

if os.environ.get("CIRFLOW_SKIP_BROWSER") == "1":
    pytest.skip("CIRFLOW_SKIP_BROWSER=1", allow_module_level=True)
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    # `make test` installs them where it can (Debian/Ubuntu, as root or with sudo) and says so where it cannot.
    pytest.skip(f"{CHROMIUM} and {DRIVER} are missing (make browser installs Debian's chromium and chromium-driver "
                "on Debian or Ubuntu, as root or with password-less sudo)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the check: the message above is the useful one)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def waiting(browser: webdriver.Chrome) -> WebDriverWait:
    """A 30 s wait whose conditions may find an element the page re-renders before they read it: stale means
    "not yet" there (a loaded run once failed on it), not an error."""
    return WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))


@pytest.fixture(scope="module")
def shop(hostile_shop: Shop) -> Shop:
    """36 catalog items, one of them a PNG named x.html (which the page shows as any other image)."""
    return hostile_shop


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not look for drivers online
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_type_search_and_refine_from_a_result(shop: Shop, browser: webdriver.Chrome,
                                                     tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reference = tmp_path / "my reference.png"
    reference.write_bytes(shop.images[1004])
    wait = waiting(browser)
    with LiveServer(create_app(ServiceConfig(index=shop.indexes, reload_seconds=0))) as live:
        browser.get(live.url + "/")
        wait.until(lambda d: "items" in d.find_element(By.ID, "served").text)
        assert "catalog toys" in browser.find_element(By.ID, "served").text

        browser.find_element(By.ID, "file").send_keys(str(reference))
        wait.until(ec.visibility_of_element_located((By.ID, "preview")))
        assert "my reference.png" in browser.find_element(By.ID, "reference-note").text
        browser.find_element(By.ID, "text").send_keys("make it red and move it to the left")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 24)
        status = browser.find_element(By.ID, "status").text
        assert "composed" in status and "24 results" in status
        hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  h.find_element(By.TAG_NAME, "img")) for h in hits))
        browser.save_screenshot(str(ARTIFACTS / "search-page-results.png"))

        chosen = hits[2].get_attribute("data-id")
        hits[2].click()
        assert f"catalog item {chosen}" in browser.find_element(By.ID, "reference-note").text
        assert browser.find_element(By.ID, "text").get_attribute("value") == ""
        browser.find_element(By.ID, "text").send_keys("same but blue")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit")
                   and d.find_elements(By.CSS_SELECTOR, "#results .hit")[0].get_attribute("data-id") != chosen
                   and "composed" in d.find_element(By.ID, "status").text)
        ids = [h.get_attribute("data-id") for h in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]
        assert chosen not in ids  # the reference is left out of its own results
        browser.save_screenshot(str(ARTIFACTS / "search-page-refined.png"))

        # A bad request shows the service's message, and the page keeps working.
        browser.find_element(By.ID, "clear-reference").click()
        browser.find_element(By.ID, "text").clear()
        browser.find_element(By.ID, "text").send_keys("x" * 1200)
        browser.find_element(By.ID, "go").click()
        wait.until(ec.visibility_of_element_located((By.ID, "error")))
        assert "over this service's limit of 1000" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(ARTIFACTS / "search-page-error.png"))

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "422" not in e["message"]]
    assert errors == []


def test_browsing_the_catalog_picks_a_reference(shop: Shop, browser: webdriver.Chrome) -> None:
    wait = waiting(browser)
    with LiveServer(create_app(ServiceConfig(index=shop.indexes, reload_seconds=0))) as live:
        browser.get(live.url + "/")
        browser.find_element(By.CSS_SELECTOR, "#browse summary").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalog img")) == 24)
        browser.find_element(By.ID, "next-page").click()
        wait.until(lambda d: "25–36 of 36" in d.find_element(By.ID, "page-note").text)
        thumbs = browser.find_elements(By.CSS_SELECTOR, "#catalog img")
        assert len(thumbs) == 12
        thumbs[0].click()
        assert "catalog item 1024" in browser.find_element(By.ID, "reference-note").text
        browser.find_element(By.ID, "go").click()  # no text: an image-only search
        wait.until(lambda d: "image-only" in d.find_element(By.ID, "status").text)


def _console_errors(browser: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_a_catalog_image_named_html_runs_no_script_on_the_origin(hostile_shop: Shop,
                                                                   browser: webdriver.Chrome) -> None:
    """The stored XSS of the hostile-input review: a valid PNG with a script appended, named x.html, is in the
    catalog. Opened in the browser, it must be an image, not a page whose script runs on the service's origin."""
    browser.get_log("browser")  # drop what earlier tests left
    with LiveServer(create_app(ServiceConfig(index=hostile_shop.indexes, reload_seconds=0))) as live:
        browser.get(f"{live.url}/items/{XSS_ID}/image")
        time.sleep(0.5)  # what a script would have done, it has done by now
        assert browser.title != "pwned"
        assert browser.execute_script("return document.contentType") == "image/png"
        assert browser.execute_script("return document.images.length") == 1  # Chromium's image viewer
        browser.save_screenshot(str(ARTIFACTS / "xss-image-as-image.png"))


def test_the_page_and_the_api_docs_run_under_the_csp_offline(shop: Shop, browser: webdriver.Chrome) -> None:
    """The page and Swagger UI load from the service alone (Chromium runs with no route to another host) and
    break no rule of the Content-Security-Policy (a violation is a console error)."""
    wait = waiting(browser)
    browser.get_log("browser")
    with LiveServer(create_app(ServiceConfig(index=shop.indexes, reload_seconds=0))) as live:
        browser.get(live.url + "/docs")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
        assert "cirflow search" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path[data-path='/search']"))
        browser.save_screenshot(str(ARTIFACTS / "api-docs.png"))
        browser.get(live.url + "/")
        wait.until(lambda d: "items" in d.find_element(By.ID, "served").text)
    assert _console_errors(browser) == []


def test_the_page_asks_for_the_api_key_and_uses_it(shop: Shop, browser: webdriver.Chrome, tmp_path: Path) -> None:
    key = "page-key-0123456789abcdef"
    wait = waiting(browser)
    with LiveServer(create_app(ServiceConfig(index=shop.indexes, reload_seconds=0, api_key=key))) as live:
        browser.get(live.url + "/")
        wait.until(ec.visibility_of_element_located((By.ID, "key-form")))
        assert "API key" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: "items" in d.find_element(By.ID, "served").text)
        browser.find_element(By.ID, "text").send_keys("make it red")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 24)
        images = [h.find_element(By.TAG_NAME, "img") for h in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  img) for img in images))
        assert all(img.get_attribute("src").startswith("blob:") for img in images)
        browser.save_screenshot(str(ARTIFACTS / "search-page-api-key.png"))
        browser.execute_script("sessionStorage.clear()")
