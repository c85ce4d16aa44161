"""The web page at `/`, driven in a real headless Chromium: ask in blend and full side by side,
watch both answers stream in, see the sources and timings. Skipped where no browser is installed
(`apt-get install chromium chromium-driver`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_api import doc_text, index, launch

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium + chromedriver on this machine "
                                                                 "(apt-get install chromium chromium-driver)")


# RAGBLEND_SCREENSHOTS=DIR keeps the page's screenshot (the README's picture is taken so)
SCREENSHOT_DIR = Path(os.environ["RAGBLEND_SCREENSHOTS"]) if os.environ.get("RAGBLEND_SCREENSHOTS") else None


def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_the_page_streams_blend_and_full_side_by_side_with_sources_and_timings(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = launch(tmp_path, "--max-tokens", "64")
    driver = browser()
    try:
        index(s.http, id="page-doc", text=doc_text("p", 3))
        driver.get(s.base + "/")
        assert driver.title == "ragblend"
        driver.find_element(By.ID, "question").send_keys("Who designed the bridge?")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("12")
        driver.find_element(By.ID, "go").click()
        done = lambda d: all(d.find_element(By.ID, f"side-{x}").get_attribute("data-done") == "1" for x in "ab")  # noqa: E731
        WebDriverWait(driver, 60).until(done)
        for side, mode in (("a", "blend"), ("b", "full")):
            box = driver.find_element(By.ID, f"side-{side}")
            assert box.find_element(By.TAG_NAME, "h3").text == mode
            timings = box.find_element(By.CLASS_NAME, "timings").text
            assert "TTFT" in timings and "KV load" in timings and "prefill" in timings
            # random weights may decode whitespace: the count says tokens came (12 asked, EOS may cut)
            assert int(timings.split(" output tokens")[0].split("· ")[-1]) >= 1
            rows = box.find_elements(By.CLASS_NAME, "source")
            assert rows and "page-doc" in rows[0].text
        assert driver.get_screenshot_as_file(str(tmp_path / "page.png"))
    finally:
        driver.quit()
        s.stop()


def test_the_page_uploads_a_pdf_shows_its_cited_passage_and_deletes_a_document(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.docfiles import pdf_pages_bytes

    s = launch(tmp_path, "--max-tokens", "64", "--chunk-tokens", "48")
    driver = browser()
    pdf = tmp_path / "fleet.pdf"
    # each page ~30 tokens: one chunk each at --chunk-tokens 48
    pdf.write_bytes(pdf_pages_bytes([["Fleet Manual", "The bravo pump needs oil every five days, and its",
                                      "filter is checked by the crew of the lower deck each month.", "Page 1 of 3"],
                                     ["Fleet Manual", "The quagga valve opens at noon on every weekday, and the",
                                      "harbour master logs each opening in the green book.", "Page 2 of 3"],
                                     ["Fleet Manual", "The galley closes when the last ferry leaves the quay,",
                                      "and the cook locks the pantry before going ashore.", "Page 3 of 3"]]))
    try:
        index(s.http, id="old-notes", text=doc_text("p", 2))
        driver.get(s.base + "/")
        driver.find_element(By.ID, "file").send_keys(str(pdf))
        driver.find_element(By.CSS_SELECTOR, "#upload button").click()
        listed = lambda d: "fleet.pdf" in d.find_element(By.ID, "documents").text  # noqa: E731
        WebDriverWait(driver, 60).until(listed)
        driver.find_element(By.ID, "question").send_keys("When does the quagga valve open?")
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("8")
        driver.find_element(By.ID, "go").click()
        done = lambda d: all(d.find_element(By.ID, f"side-{x}").get_attribute("data-done") == "1" for x in "ab")  # noqa: E731
        WebDriverWait(driver, 60).until(done)
        sources = driver.find_element(By.ID, "side-a").find_elements(By.CLASS_NAME, "source")
        cited = next(r.text for r in sources if "quagga" in r.text)
        assert "page 2" in cited and "quagga valve opens at noon" in cited and "Fleet Manual" not in cited
        assert "speedup over full" in driver.find_element(By.ID, "side-a").text
        driver.get_screenshot_as_file(str(SCREENSHOT_DIR / "page-pdf.png") if SCREENSHOT_DIR else
                                      str(tmp_path / "page-pdf.png"))
        driver.find_element(By.CSS_SELECTOR, 'button.delete[data-id="old-notes"]').click()
        driver.switch_to.alert.accept()
        WebDriverWait(driver, 30).until(lambda d: "old-notes" not in d.find_element(By.ID, "documents").text)
        assert s.http.get("/v1/documents/old-notes").status_code == 404
    finally:
        driver.quit()
        s.stop()
