"""End-to-end browser tests: the page at ``/`` in a real Chromium against a daemon subprocess.

Playwright (sync API) drives Debian's Chromium (/usr/bin/chromium); no browser is ever
downloaded. Without Chromium or the ``playwright`` package every test here FAILS with
a message saying what to install; nothing is skipped. Playwright is imported lazily, so
a missing package fails these tests instead of stopping the collection of the suite.

One Chromium per module, a fresh browser context (own storage, own tabs) per test.
Console errors of every page are collected and must be empty, apart from the
connection-refused WebSocket errors a page logs while its daemon is down (reconnect
test only).

Set EBBCAST_UPDATE_SCREENSHOT=1 to refresh the screenshots in docs/ (drain,
upgrade, resume; each run also saves them in the test's tmp_path).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from helpers import FAST, REPO, STEP_TIMEOUT, serve_on_a_port_of_its_own

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
#: Quiet daemons: no periodic frames unless a test asks for them.
QUIET = {"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"}
DOCS_SCREENSHOT = REPO / "docs" / "screenshot-drain.png"
UPGRADE_SCREENSHOT = REPO / "docs" / "screenshot-upgrade.png"
RESUME_SCREENSHOT = REPO / "docs" / "screenshot-resume.png"
#: What Chromium logs when a WebSocket connect finds nothing listening (a page that
#: had a welcome reconnects with ?since=N&epoch=E).
REFUSED_RE = re.compile(r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/ws(\?[^']*)?' "
                        r"failed: .*net::ERR_CONNECTION_REFUSED")


def page_url(ws_url: str) -> str:
    """ws://host:port/ws -> http://host:port/"""
    parts = urlsplit(ws_url)
    return urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, "/", "", ""))


# -- the browser ------------------------------------------------------------------

class LazyChromium:
    """One Chromium for the module, launched on first use (inside a test, so a missing
    browser or package is a test FAILURE with a clear message, not a setup error)."""

    def __init__(self) -> None:
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._failure: str | None = None

    def get(self) -> Browser:
        if self._browser is not None:
            return self._browser
        if self._failure is None:
            self._failure = self._launch()
        if self._failure is not None:
            pytest.fail(self._failure, pytrace=False)
        assert self._browser is not None
        return self._browser

    def _launch(self) -> str | None:
        if not os.access(CHROMIUM, os.X_OK):
            return (f"{CHROMIUM} not found: the browser tests need Debian's Chromium "
                    "(apt-get install chromium); Playwright's own browsers are not used")
        try:
            from playwright.sync_api import Error, sync_playwright
        except ImportError as exc:
            return (f"the browser tests need the playwright package ({exc}): "
                    'pip install -e ".[test]" (or pip install playwright); '
                    "never `playwright install`, Debian's Chromium is used")
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                timeout=30_000)
        except Error as exc:
            self.close()
            return f"could not launch {CHROMIUM} with Playwright: {exc}"
        return None

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None


@pytest.fixture(scope="module")
def chromium() -> Iterator[LazyChromium]:
    lazy = LazyChromium()
    yield lazy
    lazy.close()


class Tabs:
    """Pages in one fresh browser context; records every page's console errors."""

    def __init__(self, chromium: LazyChromium) -> None:
        self._chromium = chromium
        self._context: BrowserContext | None = None
        self.errors: list[str] = []

    def open(self, url: str) -> Page:
        if self._context is None:
            # UTC, so the banner's HH:MM:SS can be checked against data-deadline;
            # light scheme and a fixed viewport, so screenshots look the same everywhere.
            self._context = self._chromium.get().new_context(
                timezone_id="UTC", color_scheme="light", viewport={"width": 1000, "height": 640})
            self._context.set_default_timeout(STEP_TIMEOUT * 1000)
        page = self._context.new_page()
        name = f"tab{len(self._context.pages)}"
        page.on("console", lambda msg: self.errors.append(f"{name}: {msg.text}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: uncaught {exc}"))
        page.goto(url)
        return page

    def assert_no_console_errors(self, allow_refused: bool = False) -> None:
        unexpected = [e for e in self.errors
                      if not (allow_refused and REFUSED_RE.match(e.split(": ", 1)[1]))]
        assert not unexpected, "console errors:\n" + "\n".join(unexpected)

    def close(self) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None


@pytest.fixture
def tabs(chromium: LazyChromium) -> Iterator[Tabs]:
    t = Tabs(chromium)
    yield t
    t.close()


# -- page helpers -----------------------------------------------------------------

def frames(page: Page, frame_type: str | None = None) -> list[str]:
    """The text of the received-frames rows, optionally only those of one data-type."""
    selector = "#frames > .frame" + (f'[data-type="{frame_type}"]' if frame_type else "")
    texts: list[str] = page.eval_on_selector_all(
        selector, "els => els.map(e => e.dataset.type + ' | ' + e.textContent)")
    return texts


def describe(page: Page) -> str:
    state = page.evaluate("document.body.dataset.state")
    return (f"body state={state!r} #state={page.text_content('#state')!r} "
            f"#last-event={page.text_content('#last-event')!r}\nframes:\n  "
            + "\n  ".join(frames(page)))


def wait_js(page: Page, what: str, expression: str, arg: Any = None,
            timeout: float = STEP_TIMEOUT) -> None:
    """Wait (bounded) for a JS predicate; on timeout fail with the page's state."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        # Timer polling: rAF may be throttled in a tab that is not in front.
        page.wait_for_function(expression, arg=arg, timeout=timeout * 1000, polling=50)
    except PlaywrightTimeout:
        raise AssertionError(f"{what}: not within {timeout}s; {describe(page)}") from None


def wait_welcomed(page: Page, count: int = 1, timeout: float = STEP_TIMEOUT) -> None:
    wait_js(page, f"connected with {count} welcome frame(s)",
            "n => document.body.dataset.state === 'connected' &&"
            " document.querySelectorAll('#frames > [data-type=welcome]').length >= n",
            arg=count, timeout=timeout)


def wait_frame(page: Page, frame_type: str, text: str = "",
               timeout: float = STEP_TIMEOUT) -> None:
    wait_js(page, f"a {frame_type} frame containing {text!r}",
            "([type, text]) => [...document.querySelectorAll("
            "`#frames > [data-type=\"${type}\"]`)].some(e => e.textContent.includes(text))",
            arg=[frame_type, text], timeout=timeout)


def send(page: Page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def wait_banner(page: Page) -> float:
    """Wait for the drain banner; check its deadline text; return data-deadline."""
    page.wait_for_selector("#drain-banner", state="visible", timeout=STEP_TIMEOUT * 1000)
    raw = page.get_attribute("#drain-deadline", "data-deadline")
    assert raw is not None, describe(page)
    deadline = float(raw)
    # The context runs in UTC, so the text is the deadline's UTC wall-clock time.
    assert page.text_content("#drain-deadline") == time.strftime(
        "%H:%M:%S", time.gmtime(deadline))
    assert frames(page, "shutdown"), describe(page)
    return deadline


# -- the tests --------------------------------------------------------------------

def test_page_connects_and_shows_the_welcome(spawn: Callable[..., Any], tabs: Tabs) -> None:
    d = spawn(*FAST, env=QUIET)
    page = tabs.open(page_url(d.ws_url))
    wait_welcomed(page)
    assert page.text_content("#state") == "connected"
    client_id = page.text_content("#client-id") or ""
    assert client_id and client_id != "\u2014", describe(page)
    server_id = page.text_content("#server-id") or ""
    assert server_id and server_id != "\u2014", describe(page)
    assert page.text_content("#connections") == "1"
    welcome = frames(page, "welcome")
    assert len(welcome) == 1 and client_id in welcome[0] and server_id in welcome[0], welcome
    assert page.is_hidden("#drain-banner")
    tabs.assert_no_console_errors()


def test_message_typed_in_one_tab_appears_in_another(spawn: Callable[..., Any],
                                                     tabs: Tabs) -> None:
    d = spawn(*FAST, env=QUIET)
    one = tabs.open(page_url(d.ws_url))
    two = tabs.open(page_url(d.ws_url))
    wait_welcomed(one)
    wait_welcomed(two)
    sender = one.text_content("#client-id")
    send(one, "hello from tab one")
    wait_frame(two, "message", "hello from tab one")
    (row,) = frames(two, "message")
    assert f"{sender}: hello from tab one" in row, row
    # echo_to_sender is on by default: the sender sees its own message, marked as its own
    wait_frame(one, "message", "hello from tab one")
    assert one.eval_on_selector_all("#frames > .frame.mine", "els => els.length") == 1
    assert one.input_value("#message-input") == ""
    tabs.assert_no_console_errors()


def test_periodic_frames_show(spawn: Callable[..., Any], tabs: Tabs) -> None:
    d = spawn(*FAST, env={"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "200ms"})
    page = tabs.open(page_url(d.ws_url))
    wait_welcomed(page)
    wait_js(page, "two periodic frames",
            "document.querySelectorAll('#frames > [data-type=periodic]').length >= 2", timeout=5)
    first, second = frames(page, "periodic")[:2]
    assert "periodic update" in first and "(1 connections)" in first, first
    seq = [int(re.search(r"#(\d+) ", row).group(1))  # type: ignore[union-attr]
           for row in (first, second)]
    assert seq[1] > seq[0], (first, second)
    assert page.text_content("#connections") == "1"
    tabs.assert_no_console_errors()


def test_sigterm_shows_the_drain_banner_and_the_daemon_exits_when_pages_close(
        spawn: Callable[..., Any], tabs: Tabs) -> None:
    d = spawn(*FAST, "--drain-timeout", "60s",
              env={**QUIET, "EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "200ms"})
    one = tabs.open(page_url(d.ws_url))
    two = tabs.open(page_url(d.ws_url))
    wait_welcomed(one)
    wait_welcomed(two)
    assert one.is_hidden("#drain-banner") and two.is_hidden("#drain-banner")
    signalled = time.time()
    d.signal(signal.SIGTERM)
    for page in (one, two):
        deadline = wait_banner(page)
        assert signalled + 58 <= deadline <= time.time() + 62, (deadline - signalled)
        assert "left)" in (page.text_content("#drain-countdown") or "")
    # existing clients keep being served during the drain
    send(two, "still here during the drain")
    wait_frame(one, "message", "still here during the drain")
    assert one.evaluate("document.body.dataset.state") == "connected"
    assert d.proc.poll() is None, "the daemon exited while clients were connected"
    # the pages try to move after reconnect_after_ms: nothing else listens on the port
    tabs.assert_no_console_errors(allow_refused=True)
    mark = len(d.lines)
    one.close()
    # a progress tick after the first page left: the drain went on with one client
    d.wait_for_log(r"draining: 1 connections remain", start=mark)
    assert d.proc.poll() is None, "the daemon exited with a client still connected"
    two.close()  # the last client leaves: the drain is over
    assert d.wait_exit(STEP_TIMEOUT) == 0, d.log_text()


def test_drain_screenshot(spawn: Callable[..., Any], tabs: Tabs, tmp_path: Path) -> None:
    d = spawn(*FAST, "--drain-timeout", "5m", env=QUIET)
    other = tabs.open(page_url(d.ws_url) + "?client_id=bob")
    wait_welcomed(other)
    page = tabs.open(page_url(d.ws_url) + "?client_id=alice")  # its welcome counts 2
    wait_welcomed(page)
    assert page.text_content("#connections") == "2"
    send(page, "hello everyone")
    wait_frame(other, "message", "hello everyone")
    send(other, "hi alice")
    wait_frame(page, "message", "hi alice")
    d.signal(signal.SIGTERM)
    wait_banner(page)
    send(other, "the server is draining, but chat still works")
    wait_frame(page, "message", "chat still works")
    box = page.locator("#drain-banner").bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 640, box
    shot = tmp_path / "screenshot-drain.png"
    page.screenshot(path=str(shot), animations="disabled", caret="hide")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("EBBCAST_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    tabs.assert_no_console_errors(allow_refused=True)
    tabs.close()
    assert d.wait_exit(STEP_TIMEOUT) == 0, d.log_text()


def test_page_reconnects_to_a_new_daemon_on_the_same_port(spawn: Callable[..., Any],
                                                          tabs: Tabs) -> None:
    first = serve_on_a_port_of_its_own(spawn, "--admin-port", "0", "--drain-timeout", "60s",
                                       env=QUIET)
    port = first.ws_url.rsplit(":", 1)[1].split("/")[0]  # the second daemon takes it over
    page = tabs.open(page_url(first.ws_url))
    wait_welcomed(page)
    first_id = page.text_content("#client-id")
    # Record every state the page passes through, however briefly.
    page.evaluate("""() => {
        window.__states = [document.body.dataset.state];
        new MutationObserver(() => window.__states.push(document.body.dataset.state))
            .observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
    }""")
    first.signal(signal.SIGTERM)
    wait_banner(page)
    first.signal(signal.SIGTERM)  # the second one: close the clients now and exit
    assert first.wait_exit(STEP_TIMEOUT) == 0, first.log_text()
    wait_js(page, "reconnecting after the daemon went away",
            "window.__states.includes('reconnecting')")
    second = spawn("--port", port, "--admin-port", "0", env=QUIET)
    assert second.ws_url == first.ws_url
    # The first retry waits the shutdown frame's reconnect_after_ms (<= 5 s), then
    # jittered backoff from 0.5 s while the port is closed: well within 20 s.
    wait_welcomed(page, count=2, timeout=20)
    states: list[str] = page.evaluate("window.__states")
    assert states[0] == "connected" and states[-1] == "connected", states
    assert "reconnecting" in states[1:-1], states
    assert page.is_hidden("#drain-banner"), "the new welcome should hide the old drain banner"
    new_id = page.text_content("#client-id")
    assert new_id not in ("", "\u2014", None) and new_id != first_id, (first_id, new_id)
    assert new_id in frames(page, "welcome")[-1]
    tabs.assert_no_console_errors(allow_refused=True)


def test_pages_move_to_the_new_generation_make_before_break(spawn: Callable[..., Any],
                                                            tabs: Tabs, tmp_path: Path) -> None:
    d = spawn(*FAST, "--drain-timeout", "5m",
              env={**QUIET, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "4s"})
    alice = tabs.open(page_url(d.ws_url) + "?client_id=alice")
    bob = tabs.open(page_url(d.ws_url) + "?client_id=bob")
    for page in (alice, bob):
        wait_welcomed(page)
        page.evaluate("""() => {
            window.__states = [document.body.dataset.state];
            new MutationObserver(() => window.__states.push(document.body.dataset.state))
                .observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
            window.__banners = [];  // each banner shown, however briefly
            const banner = document.getElementById("drain-banner");
            new MutationObserver(() => { if (!banner.hidden) window.__banners.push(
                document.getElementById("drain-what").textContent); })
                .observe(banner, {attributes: true, attributeFilter: ["hidden"]});
        }""")
    first_server = alice.text_content("#server-id")
    d.signal(signal.SIGUSR2)
    wait_js(alice, "the upgrade banner", "window.__banners.length > 0")
    assert alice.evaluate("window.__banners") == ["Server is being upgraded"]
    assert "shutdownupgrade" in frames(alice, "shutdown")[-1]
    send(bob, "chat goes on while the pages move")
    wait_frame(alice, "message", "chat goes on while the pages move")
    shot = tmp_path / "screenshot-upgrade.png"
    alice.screenshot(path=str(shot), animations="disabled", caret="hide")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("EBBCAST_UPDATE_SCREENSHOT") == "1":
        assert alice.is_visible("#drain-banner"), "moved before the screenshot: run it again"
        shutil.copyfile(shot, UPGRADE_SCREENSHOT)
    for page in (alice, bob):  # within upgrade_spread (4 s) each opens a new connection
        wait_welcomed(page, count=2)
        assert page.text_content("#server-id") != first_server
        assert page.is_hidden("#drain-banner")
        # make before break: connected all along, never "connecting" or "reconnecting"
        assert set(page.evaluate("window.__states")) == {"connected"}
    d.wait_for_log("generation 1 has finished")  # both old connections were closed
    send(alice, "hello from the new generation")
    wait_frame(bob, "message", "hello from the new generation")
    tabs.assert_no_console_errors()
    tabs.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(STEP_TIMEOUT) == 0, d.log_text()


class CuttableProxy:
    """A TCP proxy between the browser and the daemon whose ``cut()`` resets every
    connection it carries (from the browser's side, the server closed the socket
    without a close frame), as a network that drops a connection would."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                browser, _ = self._server.accept()
            except OSError:
                return
            daemon = socket.create_connection(self._target)
            with self._lock:
                self._pairs.append((browser, daemon))
            for src, dst in ((browser, daemon), (daemon, browser)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        """Both sides end at once, without a WebSocket close frame; the browser's
        side with a reset (SO_LINGER 0), once the pumps let go of the sockets."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for browser, daemon in pairs:
            browser.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for sock in (browser, daemon):  # wakes the pumps blocked in recv()
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()
        self.cut()


def test_page_resumes_after_its_connection_is_cut_and_shows_every_message_once(
        spawn: Callable[..., Any], tabs: Tabs, tmp_path: Path) -> None:
    from websockets.sync.client import connect

    d = spawn(*FAST, env={**QUIET, "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0"})
    proxy = CuttableProxy(int(d.ws_url.rsplit(":", 1)[1].split("/")[0]))
    stop = threading.Event()
    sent: list[int] = []

    def publish() -> None:  # numbered messages, without pause, straight to the daemon
        with connect(d.ws_url, max_queue=None) as ws:  # never reads: never blocks
            while not stop.is_set():
                ws.send(str(len(sent)))
                sent.append(len(sent))
                time.sleep(0.01)

    try:
        page = tabs.open(f"http://127.0.0.1:{proxy.port}/")
        wait_welcomed(page)
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        count = "n => document.querySelectorAll('#frames > [data-type=message]').length >= n"
        wait_js(page, "messages before the cut", count, arg=20)
        proxy.cut()
        wait_welcomed(page, count=2)  # reconnected through the proxy, resumed
        shown = page.eval_on_selector_all("#frames > [data-type=message]", "e => e.length")
        wait_js(page, "messages after the cut", count, arg=shown + 20)
        stop.set()
        publisher.join(STEP_TIMEOUT)
        wait_frame(page, "message", f": {sent[-1]}")
        assert page.evaluate("document.body.dataset.state") == "connected"
        page.evaluate("document.querySelectorAll('#frames > [data-type=welcome]')[1]"
                      ".scrollIntoView({block: 'center'})")
        shot = tmp_path / "screenshot-resume.png"
        page.screenshot(path=str(shot), animations="disabled", caret="hide")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EBBCAST_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, RESUME_SCREENSHOT)
    finally:
        stop.set()
        proxy.close()
    welcomes = frames(page, "welcome")
    assert "resumed" in welcomes[1] and "resumed" not in welcomes[0], welcomes
    rows = page.eval_on_selector_all(
        "#frames > [data-type=message]",
        "els => els.map(e => [e.textContent.split(': ').pop(), Number(e.dataset.offset)])")
    numbers = [int(text) for text, _ in rows]
    assert numbers == list(range(len(sent))), describe(page)  # every message, once, in order
    offsets = [offset for _, offset in rows]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    tabs.assert_no_console_errors()


def test_page_sends_the_token_from_its_field_and_shows_a_read_only_refusal(
        spawn: Callable[..., Any], tabs: Tabs) -> None:
    key = "browser-test-key-of-at-least-32-bytes"
    d = spawn(*FAST, env={**QUIET, "EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_KEY": key})
    from ebbcast.serving.auth import mint

    token = mint(key, "alice", 60, read_only=True)
    # the fragment fills the token field and never reaches the server's logs
    page = tabs.open(page_url(d.ws_url) + "#token=" + token)
    wait_welcomed(page)
    assert page.input_value("#token-input") == token
    assert page.text_content("#client-id") == "alice"
    send(page, "may I?")
    wait_frame(page, "error", "read_only")
    assert not frames(page, "message")
    tabs.assert_no_console_errors()


def test_pages_join_a_channel_see_presence_and_keep_it_through_an_upgrade(
        spawn: Callable[..., Any], tabs: Tabs) -> None:
    d = spawn(*FAST, "--drain-timeout", "5m",
              env={**QUIET, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "1s"})
    ann = tabs.open(page_url(d.ws_url) + "?client_id=ann")
    ben = tabs.open(page_url(d.ws_url) + "?client_id=ben")
    outsider = tabs.open(page_url(d.ws_url) + "?client_id=cal")
    for page in (ann, ben, outsider):
        wait_welcomed(page)
    for page in (ann, ben):
        page.fill("#channel-input", "room")
        page.click("#join")
        wait_frame(page, "subscribed", "joined room at offset")
    wait_js(ann, "presence lists both", "() => document.querySelector("
            "'#joined [data-channel=room]').textContent === 'room \\u00b7 ann, ben'")
    assert ben.input_value("#target") == "room"  # a message now goes to the channel
    send(ben, "in the room")
    wait_frame(ann, "message", "ben in room: in the room")
    ben.select_option("#target", "")
    send(ben, "to everyone")
    wait_frame(outsider, "message", "ben: to everyone")
    assert not frames(outsider, "subscribed") and \
        not any("in the room" in row for row in frames(outsider, "message"))
    d.signal(signal.SIGUSR2)  # the pages move and join the channel again, resumed
    for page in (ann, ben):
        wait_welcomed(page, 2, timeout=STEP_TIMEOUT * 2)
        wait_frame(page, "subscribed", "resumed, 0 missed")
    ben.select_option("#target", "room")
    send(ben, "after the move")
    wait_frame(ann, "message", "ben in room: after the move")
    assert sum("in the room" in row for row in frames(ann, "message")) == 1  # not twice
    ben.fill("#channel-input", "room")
    ben.click("#leave")
    wait_frame(ann, "leave", "ben left room")
    wait_js(ann, "presence lists ann alone", "() => document.querySelector("
            "'#joined [data-channel=room]').textContent === 'room \\u00b7 ann'")
    tabs.assert_no_console_errors()
