"""`fmn serve` driven by headless Chromium: forget a concept, check the grid and the download.

Chromium and its driver come from Debian (`make browser`, which `.ci/run` calls); selenium is
pinned in requirements-lock.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import urllib.request

import pytest

from forget_me_not.errors import FmnError
from forget_me_not.serve.app import make_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reports = tmp_path_factory.mktemp("reports")
    (reports / "leaderboard.html").write_text("<html><body>a leaderboard</body></html>")
    srv = make_server("embedded", port=_free_port(), reports=reports, device="cpu", n=2,
                      workdir=tmp_path_factory.mktemp("jobs"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _post(srv, body: dict) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{srv.server_address[1]}/api/forget"
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_input_is_shown_as_the_cli_says_it_and_a_port_in_use_is_named(server):
    code, out = _post(server, {"client": "x", "concept": " "})
    assert code == 400 and out["error"].startswith("say what to forget")
    code, out = _post(server, {"client": "x", "concept": "qwxz"})
    assert code == 400 and "letter by letter" in out["error"]
    code, out = _post(server, {"client": "x", "concept": "star", "recipe": "magic"})
    assert code == 400 and "unknown recipe 'magic'" in out["error"]
    with pytest.raises(FmnError, match=f"port {server.server_address[1]} is in use"):
        make_server("embedded", port=server.server_address[1])
    assert not list(server.jobs.root.iterdir())  # nothing written for a refused request


@pytest.mark.skipif(shutil.which("chromedriver") is None and not os.environ.get("CI"),
                    reason="run `make browser` first (CI installs it and never skips)")
def test_the_page_forgets_a_concept_in_a_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,1400"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(browser, 240)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#method option")) > 1)
        browser.save_screenshot(str(tmp_path / "before.png"))
        browser.find_element(By.ID, "concept").send_keys("star")
        browser.find_element(By.CSS_SELECTOR, "#method option[value='uce']").click()
        browser.find_element(By.ID, "go").click()
        wait.until(ready.visibility_of_element_located((By.ID, "grid")))
        wait.until(lambda b: b.execute_script(
            "const g = document.getElementById('grid'); return g.complete && g.naturalWidth > 0"))
        browser.save_screenshot(str(tmp_path / "after.png"))
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.score")
        assert rows and rows[0].text.startswith("star 100%")
        link = browser.find_element(By.ID, "download").get_attribute("href")
        with urllib.request.urlopen(link) as response:
            data = response.read()
        path = tmp_path / "patch.safetensors"
        path.write_bytes(data)
        from forget_me_not.patch import load_patch

        assert load_patch(path).metadata["method"] == "uce"
        assert "leaderboard.html" in browser.find_element(By.ID, "reports").text
        # A second forget from the same page while none runs is accepted again.
        assert browser.find_element(By.ID, "go").is_enabled()
    finally:
        browser.quit()
    assert (tmp_path / "before.png").stat().st_size > 0 and (tmp_path / "after.png").exists()
    keep = os.environ.get("FMN_SCREENSHOTS")  # a folder to keep the screenshots in
    if keep:
        for name in ("before.png", "after.png"):
            shutil.copy(tmp_path / name, os.path.join(keep, f"serve-{name}"))
