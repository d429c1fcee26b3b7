"""The chat page end to end in headless Chromium (Debian's `chromium` + `chromium-driver`, via Selenium):
start a session, see the reply stream in, reload, continue the same session.

Skipped with a reason when Selenium or the browser is missing, unless MEGALODON_REQUIRE_BROWSER=1 (CI),
where that is a failure. MEGALODON_SCREENSHOT=PATH saves a screenshot of the page at the end.
"""

from __future__ import annotations

import copy
import os
import shutil

import httpx
import pytest
import torch

from .helpers import live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser():
    missing = []
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install selenium)")
    for path in (CHROMIUM, DRIVER):
        if not os.path.exists(path):
            missing.append(f"{path} (apt-get install chromium chromium-driver)")
    if missing:
        reason = "no browser for the chat page test: missing " + ", ".join(missing)
        if os.environ.get("MEGALODON_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800", "--no-proxy-server"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


# Counts text changes of assistant messages: more than one means the reply arrived in pieces.
OBSERVE = """
window.__updates = 0;
new MutationObserver((ms) => { for (const m of ms) {
  const el = m.target.nodeType === 1 ? m.target : m.target.parentElement;
  if (el && el.closest && el.closest('.msg.assistant')) window.__updates++; } })
  .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.mark.slow
def test_chat_page_streams_and_continues_after_reload(make_app, loaded):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = loaded
    quiet = copy.deepcopy(model)  # a random model: keep it from ending its replies at once with EOS
    with torch.no_grad():
        quiet.output.output.weight[tok.eos_id].zero_()
    driver = _browser()
    try:
        with live_server(make_app(model=(quiet, tok))) as url:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            wait.until(lambda d: "model: tiny" in d.find_element(By.ID, "model-name").text)
            for field, value in (("max-tokens", "60"), ("temperature", "0")):
                el = driver.find_element(By.ID, field)
                driver.execute_script("arguments[0].value = arguments[1]", el, value)
            driver.find_element(By.ID, "new-session").click()
            wait.until(lambda d: d.find_element(By.ID, "session-info").text.startswith("Session sess-"))
            sid = driver.find_element(By.CSS_SELECTOR, "#session-list li.active").get_attribute("data-id")
            driver.execute_script(OBSERVE)
            box = driver.find_element(By.ID, "input")
            box.send_keys("Hello, who are you?")
            box.send_keys(Keys.ENTER)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
            first = driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text
            assert driver.find_element(By.ID, "status").text == ""
            assert driver.execute_script("return window.__updates") > 1  # streamed, not one block
            info = httpx.get(f"{url}/v1/sessions/{sid}").json()
            assert info["turns"] == 1 and info["tokens"] > 0
            shown = driver.find_element(By.ID, "session-info")
            assert shown.get_attribute("data-tokens") == str(info["tokens"])
            assert shown.get_attribute("data-state-bytes") == str(info["state_bytes"])

            driver.refresh()  # the page comes back to the same session with its history
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2)
            assert driver.find_element(By.CSS_SELECTOR, "#session-list li.active").get_attribute("data-id") == sid
            assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello, who are you?"
            assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text == first
            for field, value in (("max-tokens", "60"), ("temperature", "0")):
                el = driver.find_element(By.ID, field)
                driver.execute_script("arguments[0].value = arguments[1]", el, value)
            box = driver.find_element(By.ID, "input")
            box.send_keys("Tell me more.")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 1
                       and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
            info2 = httpx.get(f"{url}/v1/sessions/{sid}").json()
            assert info2["turns"] == 2 and info2["tokens"] > info["tokens"] and info2["messages"] == 4
            wait.until(lambda d: d.find_element(By.ID, "session-info").get_attribute("data-tokens")
                       == str(info2["tokens"]))
            if os.environ.get("MEGALODON_SCREENSHOT"):
                driver.save_screenshot(os.environ["MEGALODON_SCREENSHOT"])
    finally:
        driver.quit()
