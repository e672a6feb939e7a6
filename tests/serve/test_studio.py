"""The studio page at ``/``: its API (plan, signed media URLs) over HTTP, and the page itself in a real headless
Chromium (Debian's chromium + chromedriver, driven by Selenium) against the real Serve app."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import TOKEN_A, TOKEN_B, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SKYRAY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
DEMO = (ROOT / "skyray" / "serve" / "studio" / "demo.yaml").read_text()
TYPO = DEMO.replace("  - id: drift\n    continue: true\n    prompt:", "  - id: drift\n    continue: true\n    promt:")


def test_plan_and_signed_media(serve_env, client):
    r = client.post("/v1/plan", content=DEMO, headers={"Content-Type": "application/x-yaml"})
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert r.json()["ok"] and (plan["windows"], plan["frames"], [s["windows"] for s in plan["shots"]]) == (5, 50,
                                                                                                       [2, 2, 1])
    assert plan["gpu_seconds"] > 0 and "opening" in plan["text"]
    bad = client.post("/v1/plan", content=TYPO, headers={"Content-Type": "application/x-yaml"}).json()
    line = TYPO.splitlines().index("    promt: a red square moving down on a black background") + 1
    typo = next(i for i in bad["issues"] if "did you mean 'prompt'" in i["message"])
    assert not bad["ok"] and typo["line"] == line and typo["message"].startswith(f"storyboard:{line}: shot 'drift'")
    assert httpx.post(f"{serve_env.base_url}/v1/plan", content=DEMO).status_code == 401

    job = client.post("/v1/films", content=DEMO, headers={"Content-Type": "application/x-yaml"}).json()["id"]
    wait_for(client, job, {"done"})
    media = client.post(f"/v1/jobs/{job}/media").json()
    assert set(media["shots"]) == {"opening", "drift", "cut"} and media["video"] and media["contact_sheet"]
    for url in (media["video"], *media["shots"].values()):
        assert TOKEN_A not in url and "sig=" in url
    anon = httpx.Client(base_url=serve_env.base_url)
    film = anon.get(media["video"], headers={"Range": "bytes=0-99"})  # a <video> element's request: no header
    assert film.status_code == 206 and len(film.content) == 100
    assert anon.get(media["contact_sheet"]).headers["content-type"] == "image/png"
    assert anon.get(media["video"].replace("sig=", "sig=0")).status_code == 403
    expired = media["video"].replace(f"exp={media['expires_at']}", "exp=1000")
    assert anon.get(expired).status_code == 403
    assert anon.get(media["video"].replace("film.mp4", "manifest.json")).status_code == 404
    # Shot clips and images for every client, with the token.
    assert client.get(f"/v1/jobs/{job}/shots/cut").headers["content-type"] == "video/mp4"
    assert client.get(f"/v1/jobs/{job}/thumbnail").headers["content-type"] == "image/jpeg"
    with serve_env.client(TOKEN_B) as other:
        assert other.post(f"/v1/jobs/{job}/media").status_code == 404
        assert other.get(f"/v1/jobs/{job}/shots/cut").status_code == 404


@pytest.fixture
def chromium():
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("chromium and chromium-driver are installed by the README's test command (apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, check, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "studio-failed.png"))
    raise AssertionError(f"timed out waiting for {what}; page: {driver.find_element('tag name', 'body').text[:2000]}")


def test_studio_renders_the_demo_in_chromium(serve_env, chromium):
    d = chromium
    by_id = lambda i: d.find_element("id", i)  # noqa: E731
    d.get(serve_env.base_url + "/")
    assert d.title == "skyray studio"
    by_id("token").send_keys(TOKEN_A)
    by_id("save-token").click()
    assert d.execute_script("return sessionStorage.getItem('skyray-token')") == TOKEN_A
    assert d.execute_script("return localStorage.length") == 0
    _wait(d, lambda: "5 windows" in by_id("plan").text, what="the demo's plan")

    # A typo is shown with its line number before anything is submitted.
    d.execute_script("const a = document.getElementById('storyboard'); a.value = arguments[0];"
                     "a.dispatchEvent(new Event('input'));", TYPO)
    _wait(d, lambda: "did you mean 'prompt'" in by_id("issues").text, what="the typo's error")
    assert by_id("issues").text.startswith("line ") and not by_id("submit").is_enabled()
    by_id("demo").click()
    _wait(d, lambda: by_id("submit").is_enabled() and "5 windows" in by_id("plan").text, what="the plan again")

    by_id("submit").click()
    _wait(d, lambda: by_id("percent").text == "100%" and by_id("status").text == "done", timeout=120,
          what="progress to reach 100%")
    _wait(d, lambda: len(d.find_elements("css selector", "#clips video")) == 3, what="three shot clips")
    assert d.find_elements("css selector", "#previews img"), "no per-window previews arrived"
    played = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const v = document.getElementById('film');
        const go = () => { v.muted = true; v.play().then(() => setTimeout(() => done(
            {t: v.currentTime, ready: v.readyState, duration: v.duration, src: v.currentSrc}), 700),
            (e) => done({error: String(e)})); };
        if (v.readyState >= 1) go(); else { v.onloadedmetadata = go; v.onerror = () => done({error: 'load'}); }
    """)
    assert "error" not in played, played
    assert played["ready"] >= 2 and abs(played["duration"] - 50 / 8) < 0.3 and played["t"] > 0, played
    assert "sig=" in played["src"] and TOKEN_A not in played["src"]
    clips = d.execute_script("return [...document.querySelectorAll('#clips video')].map(v => v.readyState)")
    assert all(r >= 1 for r in clips), clips
    _wait(d, lambda: d.execute_script("return document.getElementById('sheet').naturalWidth") > 0,
          what="the contact sheet")
    job = by_id("job-id").text
    by_id("refresh").click()
    _wait(d, lambda: job in by_id("jobs").text, what="the job in the job list")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(ARTIFACTS / "studio.png"))
