"""The page at `/` in a real headless browser (Debian's chromium through selenium): type a prompt,
press the button, see the picture; then paint a mask on an uploaded picture and inpaint it.
Skipped, with the reason, where no browser can be had (.ci/run installs chromium and its driver)."""

from __future__ import annotations

import shutil

import pytest
from serving import Served

WAIT_S = 120  # a cold model on a busy 2-core machine


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # a browser that cannot start here (no display libraries, ...)
        pytest.skip(f"chromium could not start: {str(exc).splitlines()[0][:200]}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("page"))
    driver = None
    try:
        driver = _driver()
        driver.get(served.url + "/")
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        served.stop()


def _pictures(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery figure img")


def test_type_a_prompt_press_the_button_see_the_picture(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(page, WAIT_S)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 4)
    assert Select(page.find_element(By.ID, "model")).first_selected_option.text == "shapes-clip"
    page.find_element(By.ID, "prompt").send_keys("a red circle")
    page.find_element(By.ID, "steps").send_keys("3")
    count = page.find_element(By.ID, "count")
    count.clear()
    count.send_keys("2")
    page.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_pictures(d)) == 2)
    image = _pictures(page)[0]
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert page.execute_script("return arguments[0].naturalWidth", image) == 32
    assert "a red circle" in image.get_attribute("title")
    link = page.find_element(By.CSS_SELECTOR, "#gallery figure a")
    assert link.get_attribute("download").endswith(".png") and link.get_attribute("href").startswith("data:image/png")
    assert page.find_element(By.ID, "progress").get_attribute("value") == "1"


def test_upload_a_picture_paint_a_mask_and_inpaint(page, tmp_path):
    from PIL import Image, ImageDraw
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(page, WAIT_S)
    picture = Image.new("RGB", (64, 64), (30, 90, 160))
    ImageDraw.Draw(picture).rectangle((16, 16, 48, 48), fill=(230, 200, 40))
    picture.save(tmp_path / "in.png")
    before = len(_pictures(page))
    page.find_element(By.CSS_SELECTOR, "#img2img summary").click()
    page.find_element(By.ID, "picture").send_keys(str(tmp_path / "in.png"))
    wait.until(lambda d: d.execute_script("return document.getElementById('picture-canvas').width") == 64)
    canvas = page.find_element(By.ID, "mask-canvas")
    ActionChains(page).move_to_element_with_offset(canvas, -60, -60).click_and_hold().move_by_offset(40, 40) \
        .release().perform()
    assert page.execute_script("return painted")
    page.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_pictures(d)) == before + 2)
    title = _pictures(page)[0].get_attribute("title")
    assert "Denoising strength" in title and "Mask hash" in title  # it went through img2img with the mask
