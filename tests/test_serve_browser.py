"""The page at ``/`` in a real browser: headless Chromium (Debian's chromium + chromium-driver) via
Selenium uploads a real photo and must show the top-5 labels the API gives for it."""

from __future__ import annotations

import json
import shutil

import pytest

from test_predict import MODEL, model_and_photos
from test_serve import EXAMPLES, start_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.mark.slow
def test_page_uploads_a_photo_and_shows_its_top5(tmp_path):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, ckpt, _, _ = model_and_photos(tmp_path / "model")
    server = start_server(tmp_path / "server", ckpt, "--backend", "eager")
    photo = EXAMPLES / "cat.jpg"
    status, want = server.json("POST", "/v1/classify?top_k=5", photo.read_bytes())
    assert status == 200
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        assert "hrnet" in driver.title
        driver.find_element(By.ID, "files").send_keys(str(photo))
        wait = WebDriverWait(driver, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "ol.top li")))
        items = driver.find_elements(By.CSS_SELECTOR, "ol.top li")
        assert [int(li.get_attribute("data-index")) for li in items] == [t["index"] for t in want]
        shown = [li.find_element(By.CLASS_NAME, "class-label").text for li in items]
        assert shown == [t["label"].split(",")[0] for t in want]
        # the page describes the served model, not "ImageNet"
        summary = driver.find_element(By.ID, "model-summary").text
        assert MODEL in summary and "1000 classes" in summary, summary
        assert "ImageNet" not in driver.find_element(By.TAG_NAME, "header").text
        driver.find_element(By.ID, "model-summary").click()
        assert driver.find_element(By.ID, "class-names").text.startswith("tench, Tinca tinca")
        driver.find_element(By.CLASS_NAME, "cam-button").click()
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('img.cam'); return i && i.complete && i.naturalWidth > 0"))
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, json.dumps(errors)
    finally:
        driver.quit()
        assert server.stop() == 0
