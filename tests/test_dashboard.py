"""`peerdrive dashboard` in a real browser, and its token (issue 14).

A publisher (`peerdrive serve`) and a reader (`peerdrive mount`, the real
background daemon) run as processes on 127.0.0.1; the reader's dashboard is a
third process. Debian's headless Chromium, driven by selenium through Debian's
chromedriver (nothing is downloaded), loads the printed URL, sees the drive
and the tree with states, clicks Pin on a folder and sees it turn to device
with 100%: the mount really pinned it (the xattr says so, every block is in
the reader's store). The screenshot goes to the test's tmp directory; with
PEERDRIVE_UPDATE_SCREENSHOT=1 also to docs/dashboard.png (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, env_for, peerdrive, publish, write_random
from tests.processes import stop_pid
from tests.swarm_helpers import Swarm, read_ready_line, tail

pytestmark = pytest.mark.fuse

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MiB = 1 << 20


class Dashboard:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        parts = urllib.parse.urlsplit(url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.token = urllib.parse.parse_qs(parts.query)["token"][0]

    def get(self, path: str, token: str | None = "ok", headers: dict | None = None):
        return self.request("GET", path, token=token, headers=headers)

    def request(self, method: str, path: str, *, token: str | None = "ok",
                headers: dict | None = None, body: bytes | None = None
                ) -> tuple[int, bytes]:
        url = self.base + path
        if token is not None:
            t = self.token if token == "ok" else token
            url += ("&" if "?" in url else "?") + "token=" + urllib.parse.quote(t)
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Swarm, Path, Path, Dashboard]]:
    """A publisher serving a drive, a reader mounting it, the reader's dashboard."""
    src = tmp_path / "src"
    write_random(src / "photos" / "a.jpg", 2 * MiB, seed=1)
    write_random(src / "photos" / "2024" / "b.jpg", 3 * MiB // 2, seed=2)
    write_random(src / "videos" / "c.mp4", 3 * MiB, seed=3)
    (src / "readme.txt").write_text("hello\n")
    pub, reader = tmp_path / "home-pub", tmp_path / "home-reader"
    link = publish(pub, src)["read_link"]
    with Swarm(tmp_path / "swarm") as swarm:
        seeder = swarm.serve("pub", pub)
        mnt = tmp_path / "mnt"
        swarm.mount("reader", reader, link, mnt, bootstrap=[f"127.0.0.1:{seeder.port}"])
        log = tmp_path / "dashboard.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [PYTHON, "-m", "vfs.cli", "dashboard", "--json", "--no-open"],
                env=env_for(reader), cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=logf)
        try:
            ready = read_ready_line(proc, log)
            assert set(ready) == {"url"}
            url = ready["url"]
            assert url.startswith("http://127.0.0.1:") and "token=" in url  # loopback
            yield swarm, reader, mnt, Dashboard(url, proc, log)
        finally:
            stop_pid(proc.pid, proc)
            if proc.stdout is not None:
                proc.stdout.close()


def _pinned(path: Path) -> str:
    return os.getxattr(path, "user.peerdrive.pinned").decode()


def test_token_is_required_and_changes_need_the_header(node) -> None:
    _, reader, mnt, dash = node
    photos = str(mnt / "photos")
    for path in ("/", "/api/status", "/api/dashboard", "/static/app.js",
                 f"/api/tree?path={urllib.parse.quote(photos)}"):
        assert dash.get(path, token=None)[0] == 403, path
        assert dash.get(path, token="wrong" + dash.token[5:])[0] == 403, path
        assert dash.get(path)[0] == 200, path
    # the API serves what `status --json` prints, in the same shape
    code, body = dash.get("/api/status")
    api, cli = json.loads(body), json.loads(peerdrive(reader, "status", "--json").stdout)
    assert set(api) == set(cli) and api["drives"] == cli["drives"]
    assert [m["mountpoint"] for m in api["mounts"]] == [str(mnt)]
    code, body = dash.get(f"/api/status?path={urllib.parse.quote(photos)}")
    assert code == 200 and json.loads(body)["state"] == "cloud"
    # a cross-site form post: token in the URL and in a form field, no header
    form = urllib.parse.urlencode({"path": photos, "token": dash.token}).encode()
    for headers in ({"Content-Type": "application/x-www-form-urlencoded",
                     "Origin": "http://attacker.invalid"},
                    {"Content-Type": "application/json"}):
        code, _ = dash.request("POST", "/api/pin", headers=headers, body=form
                               if "form" in headers["Content-Type"] else
                               json.dumps({"path": photos}).encode())
        assert code == 403
    code, _ = dash.request("POST", "/api/pin", token=None, body=json.dumps({"path": photos})
                           .encode(), headers={"Content-Type": "application/json",
                                               "X-Peerdrive-Token": "wrong"})
    assert code == 403
    assert _pinned(mnt / "photos") == "0"
    # outside the node's mounts nothing is listed or touched, token or not
    code, body = dash.request("POST", "/api/pin", token=None,
                              body=json.dumps({"path": "/etc"}).encode(),
                              headers={"Content-Type": "application/json",
                                       "X-Peerdrive-Token": dash.token})
    assert code == 400 and b"not inside" in body
    assert dash.get("/api/tree?path=/etc")[0] == 400
    # with the header it does what `peerdrive pin --no-wait` does
    code, body = dash.request("POST", "/api/pin", token=None,
                              body=json.dumps({"path": photos}).encode(),
                              headers={"Content-Type": "application/json",
                                       "X-Peerdrive-Token": dash.token})
    assert code == 200 and json.loads(body)["pinned"][0]["pinned"] is True
    assert _pinned(mnt / "photos") == "1"


def _browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/setup installs "
                    "them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", f"--user-data-dir={tmp_path / 'chromium'}",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    return webdriver.Chrome(options=opts, service=service)


def test_browser_sees_the_tree_and_pins_a_folder(node, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, reader, mnt, dash = node
    photos = str(mnt / "photos")
    driver = _browser(tmp_path)
    try:
        driver.get(dash.url)
        wait = WebDriverWait(driver, 60, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,))

        def cell(path: str, col: int):
            return driver.find_element(By.CSS_SELECTOR,
                                       f'tr[data-path="{path}"] td:nth-child({col})')

        def state_of(path: str) -> tuple[str, str] | bool:
            found = driver.execute_script(
                "const td = document.querySelector(`tr[data-path=\"${arguments[0]}\"] "
                "td:nth-child(2)`); return td ? [td.dataset.state, td.dataset.percent] : null",
                path)
            return tuple(found) if found else False

        def click(path: str, col: int, selector: str) -> None:
            """A real click on a button in a row (a live update may replace the row: retry)."""
            def clicked(_) -> bool:
                try:
                    cell(path, col).find_element(By.CSS_SELECTOR, selector).click()
                    return True
                except WebDriverException:
                    return False
            wait.until(clicked)

        # the drive, with its safety light, and the tree of the mount with states
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drives-body tr[data-drive]"))
        drive_row = driver.find_element(By.CSS_SELECTOR, "#drives-body tr[data-drive]")
        assert str(mnt) in drive_row.text
        assert drive_row.find_element(By.CSS_SELECTOR, ".light").get_attribute("aria-label")
        wait.until(lambda d: state_of(photos))
        assert state_of(photos) == ("cloud", "0")
        assert state_of(str(mnt / "videos"))[0] == "cloud"
        assert cell(str(mnt / "readme.txt"), 1).text == "readme.txt"
        assert "this device" in driver.find_element(By.ID, "devices").text.lower()
        # pin the folder with its button: the mount fetches it whole, the page follows live
        click(photos, 7, 'button[data-action="pin"]')
        wait.until(lambda d: state_of(photos) == ("device", "100"),
                   message=f"photos never reached device 100%: {state_of(photos)}\n"
                           f"{tail(dash.log)}")
        assert cell(photos, 5).text == "yes"
        assert state_of(str(mnt / "videos"))[0] == "cloud"  # only what was pinned
        assert _pinned(mnt / "photos") == "1"  # what `peerdrive pin` sets
        st = json.loads(peerdrive(reader, "status", str(mnt / "photos"), "--json").stdout)
        assert st["state"] == "device" and st["pinned"] is True
        # into the folder: its files are on the device too
        click(photos, 1, "button")
        wait.until(lambda d: state_of(str(mnt / "photos" / "a.jpg")) == ("device", "100"))
        wait.until(lambda d: "photos" in d.find_element(By.ID, "breadcrumb").text)
        driver.find_element(By.ID, "breadcrumb").find_element(By.TAG_NAME, "button").click()
        # (the breadcrumb is rebuilt only on navigation: a live update never makes it stale)
        wait.until(lambda d: state_of(photos) == ("device", "100"))
        wait.until(lambda d: "last" in d.find_element(By.ID, "cache-chart").text
                   or d.find_elements(By.CSS_SELECTOR, "#cache-chart polyline"))
        time.sleep(1.5)  # one more live update, so the screenshot shows settled rates
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("PEERDRIVE_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")

        # a cross-site form post from another origin, in the browser itself: refused
        videos = str(mnt / "videos")
        action = f"{dash.base}/api/pin?token={dash.token}"
        page = (f'<form method="post" action="{action}"><input name="path" value="{videos}">'
                f'<input name="token" value="{dash.token}"></form>'
                "<script>document.forms[0].submit()</script>")
        driver.get("data:text/html;charset=utf-8," + urllib.parse.quote(page))
        wait.until(lambda d: d.current_url.startswith(dash.base))
        assert "forbidden" in driver.find_element(By.TAG_NAME, "body").text
        assert _pinned(mnt / "videos") == "0"
    finally:
        driver.quit()


def test_opens_the_browser_only_with_a_display_and_without_no_open(tmp_path: Path) -> None:
    """xdg-open gets the URL when DISPLAY is set; --no-open and no display: never run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    opened = tmp_path / "opened"
    (bin_dir / "xdg-open").write_text(f'#!/bin/sh\necho "$@" >> {opened}\n')
    (bin_dir / "xdg-open").chmod(0o755)
    home = tmp_path / "home"
    for extra, display, expect in (([], ":99", True), (["--no-open"], ":99", False),
                                   ([], None, False)):
        env = env_for(home)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        env.pop("WAYLAND_DISPLAY", None)
        env.pop("DISPLAY", None)
        if display:
            env["DISPLAY"] = display
        log = tmp_path / "dashboard.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen([PYTHON, "-m", "vfs.cli", "dashboard", "--json", *extra],
                                    env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=logf)
        try:
            url = read_ready_line(proc, log)["url"]
            if expect:
                deadline = time.monotonic() + 30
                while not opened.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert opened.read_text().split() == [url]
                opened.unlink()
            else:
                time.sleep(1)
                assert not opened.exists()
        finally:
            stop_pid(proc.pid, proc)
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == 0, tail(log)  # SIGTERM: a clean stop
