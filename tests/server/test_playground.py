"""The playground page at `/`, driven in headless Chromium as a user would.

A real `starcoder2 serve` runs in a subprocess on the tiny random-weight checkpoint (gibberish, but
deterministic at temperature 0), so what the page inserts at the cursor can be compared with what
`POST /v1/completions` returns for the same prompt and suffix.

Needs Chromium, its WebDriver and selenium (Debian: `apt-get install chromium chromium-driver`,
`pip install selenium`); without them the browser tests skip. `STARCODER2_CHROMIUM` and
`STARCODER2_CHROMEDRIVER` name the binaries when they are not on PATH.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "starcoder2" / "server" / "static" / "playground.html"
API_KEY = "playground-test-key"
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    print(x)\n"  # the tiny model fills this one with printable text
MAX_TOKENS = 12
WAIT_S = 120  # generous: the test machine may be busy


# ---- what the tests need ------------------------------------------------------------------------

def _browser_binaries() -> tuple[str, str]:
    browser = os.environ.get("STARCODER2_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
        None)
    driver = os.environ.get("STARCODER2_CHROMEDRIVER") or shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.access(p, os.X_OK)), None)
    if not browser:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium chromium-driver)")
    if not driver:
        pytest.skip("chromedriver not installed (Debian: apt-get install chromium-driver)")
    for path in (browser, driver):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is not an executable")
    return browser, driver


def _utf16_len(s: str) -> int:
    """Length in JavaScript string units (textarea selection offsets)."""
    return len(s.encode("utf-16-le")) // 2


def _as_textarea(s: str) -> str:
    """A textarea stores line ends as \\n."""
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 60):
    """(status, parsed JSON or text, headers) of a GET (body None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), e.headers
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, raw.decode("utf-8", "replace"), headers


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """A live `starcoder2 serve` on the tiny checkpoint, requiring API_KEY; yields its base URL."""
    try:
        importlib.import_module("starcoder2.server.app")
    except Exception as e:  # noqa: BLE001 - any import failure means there is no server to test
        pytest.skip(f"starcoder2.server is not importable: {type(e).__name__}: {e}")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "starcoder2.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
           "--dtype", "fp32", "--api-key", API_KEY]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if _request(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {WAIT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through Debian's chromedriver (never Selenium Manager: machines are offline)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is an environment problem
        pytest.skip(f"headless Chromium did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The playground as served at `/`, in a fresh tab state (empty session storage)."""
    browser.get(server + "/")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(server + "/")
    return browser


@pytest.fixture
def offline_page(browser):
    """The page from disk with `fetch` stubbed per test: the page's own logic, no server needed."""
    browser.get(PAGE.as_uri())
    return browser


# ---- helpers a user's actions map to --------------------------------------------------------------

def _el(driver, element_id: str):
    return driver.find_element("id", element_id)


def _set_field(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    el = _el(driver, element_id)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(value)
    assert el.get_attribute("value") == value


def _type_code_with_cursor_in_the_middle(driver) -> None:
    """Types a function whose body line is empty, then moves the caret there with the keyboard."""
    from selenium.webdriver.common.keys import Keys

    editor = _el(driver, "editor")
    editor.click()
    # Tab indents with spaces: typed as a user would, the text is exactly PREFIX + SUFFIX.
    editor.send_keys("def add(a, b):", Keys.ENTER, Keys.TAB, Keys.ENTER, Keys.TAB, "print(x)", Keys.ENTER)
    assert editor.get_attribute("value") == PREFIX + SUFFIX
    editor.send_keys(Keys.CONTROL, Keys.HOME)
    editor.send_keys(Keys.DOWN, Keys.END)
    assert driver.execute_script("return arguments[0].selectionStart", editor) == _utf16_len(PREFIX)


def _wait_finished(driver, timeout: float = WAIT_S) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    status = _el(driver, "status")
    WebDriverWait(driver, timeout).until(
        lambda d: status.get_attribute("data-state") not in ("idle", "streaming"))
    return status.get_attribute("data-state")


def _model_id(server) -> str | None:
    status, body, _ = _request(server + "/v1/models")
    if status == 200 and isinstance(body, dict) and body.get("data"):
        return body["data"][0].get("id")
    return None


# ---- against the live server -------------------------------------------------------------------

def test_served_at_root(server):
    status, body, headers = _request(server + "/", key=None)
    assert status == 200, body
    assert headers.get_content_type() == "text/html"
    assert body == PAGE.read_text(encoding="utf-8")


def test_completion_streams_in_place_at_the_cursor(page, server):
    _set_field(page, "api-key", API_KEY)
    _type_code_with_cursor_in_the_middle(page)
    _set_field(page, "max-tokens", str(MAX_TOKENS))
    _set_field(page, "temperature", "0")
    _el(page, "complete").click()

    assert _wait_finished(page) == "done", _el(page, "error").text
    assert not _el(page, "error").is_displayed()
    value = _el(page, "editor").get_attribute("value")
    # The text around the cursor is untouched; what is between is the completion.
    assert value.startswith(PREFIX) and value.endswith(SUFFIX), value
    inserted = value[len(PREFIX):len(value) - len(SUFFIX)]

    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": MAX_TOKENS, "temperature": 0}
    if model := _model_id(server):
        body["model"] = model
    status, reference, _ = _request(server + "/v1/completions", body)
    assert status == 200, reference
    expected = reference["choices"][0]["text"]
    assert expected, "the tiny model generated nothing for this prompt: the comparison would be vacuous"
    assert inserted == _as_textarea(expected)

    # The completion is selected when done, so it stands out (and Complete again regenerates it).
    sel = page.execute_script("const e = arguments[0]; return [e.selectionStart, e.selectionEnd]", _el(page, "editor"))
    assert sel == [_utf16_len(PREFIX), _utf16_len(PREFIX) + _utf16_len(inserted)]

    status_el = _el(page, "status")
    text = status_el.text
    m = re.search(r"(\d+) tokens?\b", text)
    assert m and int(m.group(1)) > 0, text
    assert "first token" in text
    if int(m.group(1)) > 1:
        assert "tok/s" in text
    if status_el.get_attribute("data-token-source") == "usage":  # the server honoured stream_options
        assert int(m.group(1)) == reference["usage"]["completion_tokens"]
    if reference["usage"]["completion_tokens"] > 1:  # it arrived as server-sent events, in pieces
        assert int(status_el.get_attribute("data-events")) > 1

    # The key lives in this tab's session storage only.
    assert page.execute_script("return sessionStorage.getItem('starcoder2.playground.apiKey')") == API_KEY
    assert page.execute_script("return localStorage.length") == 0


def test_wrong_api_key_shows_the_error(page, server):
    from selenium.webdriver.common.keys import Keys

    _set_field(page, "api-key", "not-the-key")
    editor = _el(page, "editor")
    editor.click()
    editor.send_keys("x = 1", Keys.SHIFT, Keys.LEFT)  # select the "1": a completion would replace it
    editor.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut for Complete

    assert _wait_finished(page) == "error"
    error = _el(page, "error")
    assert error.is_displayed()
    status, reference, _ = _request(server + "/v1/completions", {"prompt": "x = 1", "max_tokens": 4},
                                    key="not-the-key")
    assert status == 401, reference
    assert "HTTP 401" in error.text
    if isinstance(reference, dict) and isinstance(reference.get("error"), dict):
        assert reference["error"]["message"] in error.text
    # Nothing inserted, and the selection the completion would have replaced is kept.
    assert editor.get_attribute("value") == "x = 1"
    assert page.execute_script("const e = arguments[0]; return [e.selectionStart, e.selectionEnd]", editor) == [4, 5]
    assert not _el(page, "complete").get_attribute("disabled")

    # With the right key the next request replaces the selection and clears the error.
    _set_field(page, "api-key", API_KEY)
    _set_field(page, "max-tokens", "3")
    _set_field(page, "temperature", "0")
    page.execute_script("arguments[0].setSelectionRange(4, 5)", editor)  # as it was
    _el(page, "complete").click()
    assert _wait_finished(page) == "done", _el(page, "error").text
    assert not _el(page, "error").is_displayed()
    # Nothing after the cursor: a plain completion of the text before it.
    status, reference, _ = _request(server + "/v1/completions", {"prompt": "x = ", "max_tokens": 3, "temperature": 0})
    assert status == 200, reference
    assert editor.get_attribute("value") == "x = " + _as_textarea(reference["choices"][0]["text"])


def test_invalid_parameter_shows_the_servers_message(page, server):
    _set_field(page, "api-key", API_KEY)
    editor = _el(page, "editor")
    editor.click()
    editor.send_keys("y = 2")
    _set_field(page, "max-tokens", "-1")
    _el(page, "complete").click()

    assert _wait_finished(page) == "error"
    status, reference, _ = _request(server + "/v1/completions", {"prompt": "y = 2", "max_tokens": -1})
    assert 400 <= status < 500, reference
    text = _el(page, "error").text
    assert f"HTTP {status}" in text
    if isinstance(reference, dict) and isinstance(reference.get("error"), dict):
        assert reference["error"]["message"] in text
    assert "max_tokens" in text
    assert editor.get_attribute("value") == "y = 2"


# ---- the page's own logic, with fetch stubbed --------------------------------------------------

# Replaces window.fetch with one that streams the given byte pieces as a text/event-stream body,
# then either closes it or (hold=true) keeps it open until the request is aborted.
STUB_FETCH = """
const [pieces, hold] = arguments;
window.__requests = [];
window.__aborted = false;
window.fetch = (url, init) => {
  if (!String(url).includes('completions')) return Promise.reject(new TypeError('offline'));
  window.__requests.push({url: String(url), headers: init.headers, body: JSON.parse(init.body)});
  const body = new ReadableStream({
    start(controller) {
      for (const p of pieces) controller.enqueue(new Uint8Array(p));
      const abort = () => {
        window.__aborted = true;
        controller.error(new DOMException('The user aborted a request.', 'AbortError'));
      };
      if (init.signal.aborted) abort(); else init.signal.addEventListener('abort', abort);
      if (!hold) controller.close();
    }
  });
  return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
};
"""


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\r\n\r\n"
                    for e in events)


def _chunk(text, finish=None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def test_events_split_anywhere_are_reassembled(offline_page):
    """Events split mid-line and mid-UTF-8 character, CRLF event ends, a CRLF line end split across two
    chunks, a usage chunk, then [DONE]."""
    page = offline_page
    texts = ["h\u00e9llo\r", "\n w\u00f6rld", " \U0001F642", "\r\n"]
    stream = _sse(*[_chunk(t) for t in texts[:-1]], _chunk(texts[-1], "length"),
                  {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}, b"[DONE]")
    pieces = [list(stream[i:i + 3]) for i in range(0, len(stream), 3)]
    page.execute_script(STUB_FETCH, pieces, False)
    _set_field(page, "stop-strings", "\\n\\n\n</s>")
    _set_field(page, "max-tokens", "9")
    page.execute_script("const e = arguments[0]; e.value = 'a = (\\n)'; e.setSelectionRange(5, 5);",
                        _el(page, "editor"))
    _el(page, "complete").click()

    assert _wait_finished(page) == "done"
    assert _el(page, "editor").get_attribute("value") == "a = (h\u00e9llo\n w\u00f6rld \U0001F642\n\n)"
    inserted = _as_textarea("".join(texts))  # selected, in JavaScript string units
    assert page.execute_script("const e = arguments[0]; return [e.selectionStart, e.selectionEnd]",
                               _el(page, "editor")) == [5, 5 + _utf16_len(inserted)]
    status = _el(page, "status")
    assert status.get_attribute("data-tokens") == "9" and "9 tokens" in status.text and "finish: length" in status.text
    sent = page.execute_script("return window.__requests[0]")
    assert sent["body"]["prompt"] == "a = (" and sent["body"]["suffix"] == "\n)"
    assert sent["body"]["stop"] == ["\n\n", "</s>"] and sent["body"]["max_tokens"] == 9
    assert sent["body"]["stream"] is True
    assert "Authorization" not in sent["headers"]  # no key entered, no header


def test_stop_aborts_the_request_and_keeps_the_partial_text(offline_page):
    page = offline_page
    page.execute_script(STUB_FETCH, [list(_sse(_chunk("partial")))], True)
    _set_field(page, "api-key", "k-123")
    editor = _el(page, "editor")
    editor.click()
    editor.send_keys("s = ")
    assert _el(page, "stop").get_attribute("disabled")
    _el(page, "complete").click()

    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(page, WAIT_S).until(lambda d: "partial" in editor.get_attribute("value"))
    assert _el(page, "status").get_attribute("data-state") == "streaming"
    assert editor.get_attribute("readonly")  # the completion owns the editor while it streams
    _el(page, "stop").click()

    assert _wait_finished(page) == "aborted"
    assert page.execute_script("return window.__aborted") is True
    assert page.execute_script("return window.__requests[0].headers.Authorization") == "Bearer k-123"
    assert editor.get_attribute("value") == "s = partial"
    assert page.execute_script("const e = arguments[0]; return [e.selectionStart, e.selectionEnd]", editor) == [4, 11]
    assert _el(page, "status").text.startswith("Stopped")
    assert not _el(page, "error").is_displayed()
    assert not editor.get_attribute("readonly")


# ---- no browser needed ------------------------------------------------------------------------

def test_page_is_self_contained():
    html = PAGE.read_text(encoding="utf-8")
    # No scripts, styles, fonts or images from elsewhere: machines running this may be offline.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert not re.search(r"""(url\(|@import|fetch\()\s*["']?(https?:)?//""", html, re.I)
    assert "<script src" not in html and "<link" not in html
    # Every control has a label that names it.
    for control in ("editor", "max-tokens", "temperature", "top-p", "stop-strings", "model", "api-key"):
        assert f'<label for="{control}"' in html, control
    assert "console.log" not in html  # nothing (an API key included) is logged
    assert "localStorage" not in html  # the key is kept in sessionStorage only
