"""Download faults against real HTTP servers on 127.0.0.1: clear errors, nothing half-written.

Every server here is a real http.server in a thread on an ephemeral loopback port; faults
are injected by the handler (status codes, dropped connections, stalls, redirect loops).
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE, FIXTURE_SHA256, dvc, make_project, sh
from stages import download as dl
from stages.common import save_npz

FIXTURE_BYTES = FIXTURE.read_bytes()
HTML = b"<!DOCTYPE html>\n<html><body><h1>Please log in</h1></body></html>\n"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Loopback only: never let a proxy from the environment see these requests."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class FaultServer:
    """A real HTTP server whose routes play scripted behaviours, one per request.

    routes: path -> list of behaviours; the last one repeats. A behaviour is one of
      ("ok", body) | ("status", code) | ("drop", body, claimed_length)
      ("stall", head_bytes) -> send headers and some bytes, then go silent
      ("silent",) -> never answer at all
      ("redirect", location)
    Every request is appended to `log` as (name, path), shared across servers.
    """

    def __init__(self, name: str, routes: dict, log: list):
        self.name, self.routes, self.log = name, routes, log
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.log.append((server.name, self.path))
                plan = server.routes.get(self.path, [("status", 404)])
                seen = sum(1 for n, p in server.log if n == server.name and p == self.path)
                kind, *args = plan[min(seen, len(plan)) - 1]
                if kind == "ok":
                    self._send(200, args[0])
                elif kind == "status":
                    self._send(args[0], b"fault injected\n")
                elif kind == "drop":
                    body, claimed = args
                    self.send_response(200)
                    self.send_header("Content-Length", str(claimed))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif kind == "stall":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(FIXTURE_BYTES)))
                    self.end_headers()
                    self.wfile.write(FIXTURE_BYTES[: args[0]])
                    self.wfile.flush()
                    server.release.wait(10)  # silent far longer than download.timeout
                    self.close_connection = True
                elif kind == "silent":  # accept, read the request, never answer
                    server.release.wait(10)
                    self.close_connection = True
                elif kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", args[0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Type", "text/html" if body.startswith(b"<")
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requests(self, path: str | None = None) -> list:
        return [p for n, p in self.log if n == self.name and (path is None or p == path)]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    """Factory of fault servers sharing one request log; all shut down afterwards."""
    made, log = [], []

    def make(routes: dict, name: str | None = None) -> FaultServer:
        server = FaultServer(name or f"s{len(made)}", routes, log)
        made.append(server)
        return server

    make.log = log
    yield make
    for server in made:
        server.close()


def cfg_for(*sources, sha256=FIXTURE_SHA256, retries=0, timeout=5.0, backoff=0.0):
    """A validated download config, through the stage's own validate()."""
    first, *mirrors = sources
    return dl.validate({"url": first, "sha256": sha256, "mirrors": list(mirrors),
                        "format": "npz", "timeout": timeout, "retries": retries,
                        "backoff": backoff})


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


def leftovers(folder: Path) -> list[str]:
    """Anything in the output folder besides the output itself: temporaries, partials."""
    return sorted(p.name for p in folder.iterdir() if p.name != "mnist.npz") \
        if folder.exists() else []


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "data" / "raw" / "mnist.npz"


def fails(cfg, out, match=None, exc=dl.DownloadError) -> str:
    with pytest.raises(exc) as info:
        dl.download(cfg, output=out)
    message = str(info.value)
    assert "\n" not in message
    if match:
        assert match in message, message
    return message


# --- unreachable hosts ---------------------------------------------------------------


def test_unresolvable_host_is_retried_then_named_in_the_error(out, capsys):
    url = "http://nonexistent.invalid/mnist.npz"
    message = fails(cfg_for(url, retries=2), out, match=url)
    cause = message.split(url + ": ", 1)[1].lower()
    assert any(word in cause for word in ("name", "resolution", "not known", "resolve"))
    assert len(warnings_in(capsys.readouterr().err)) == 2  # two retries announced
    assert not out.exists() and leftovers(out.parent) == []


def test_connection_refused_is_retried_then_named(out, capsys):
    url = f"http://127.0.0.1:{closed_port()}/mnist.npz"
    message = fails(cfg_for(url, retries=1), out, match=url)
    assert "refused" in message.lower()
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 1 and "retrying in 0s (1/1)" in err
    assert not out.exists() and leftovers(out.parent) == []


# --- HTTP status faults --------------------------------------------------------------


def test_404_is_not_retried(servers, out, capsys):
    s = servers({})
    url = s.url("/mnist.npz")
    message = fails(cfg_for(url, retries=3), out, match=url, exc=dl.PermanentError)
    assert "HTTP 404" in message
    assert s.requests() == ["/mnist.npz"]  # exactly one request: retrying cannot help
    assert warnings_in(capsys.readouterr().err) == []
    assert not out.exists() and leftovers(out.parent) == []


def test_500_is_retried_with_backoff_then_reported(servers, out, capsys):
    s = servers({"/m": [("status", 500)]})
    started = time.perf_counter()
    message = fails(cfg_for(s.url("/m"), retries=2, backoff=0.1), out, match=s.url("/m"))
    elapsed = time.perf_counter() - started
    assert "HTTP 500" in message
    assert s.requests() == ["/m"] * 3  # the first try and two retries
    assert elapsed >= 0.1 + 0.2  # backoff doubles: 0.1s, then 0.2s
    warnings = warnings_in(capsys.readouterr().err)
    assert [w.split("retrying in ")[1] for w in warnings] == ["0.1s (1/2)", "0.2s (2/2)"]
    assert not out.exists() and leftovers(out.parent) == []


def test_500_that_recovers_on_retry_succeeds(servers, out, capsys):
    s = servers({"/m": [("status", 500), ("status", 503), ("ok", FIXTURE_BYTES)]})
    assert dl.download(cfg_for(s.url("/m"), retries=3), output=out) == s.url("/m")
    assert s.requests() == ["/m"] * 3
    assert len(warnings_in(capsys.readouterr().err)) == 2
    assert out.read_bytes() == FIXTURE_BYTES and leftovers(out.parent) == []


# --- broken transfers ----------------------------------------------------------------


def test_connection_dropped_mid_body_is_retried_and_nothing_is_kept(servers, out):
    half = FIXTURE_BYTES[: len(FIXTURE_BYTES) // 2]
    s = servers({"/m": [("drop", half, len(FIXTURE_BYTES))]})
    message = fails(cfg_for(s.url("/m"), retries=1), out, match=s.url("/m"))
    assert "connection dropped" in message
    assert s.requests() == ["/m"] * 2
    assert not out.exists() and leftovers(out.parent) == []


def test_dropped_body_recovers_on_retry(servers, out):
    s = servers({"/m": [("drop", FIXTURE_BYTES[:1000], len(FIXTURE_BYTES)),
                        ("ok", FIXTURE_BYTES)]})
    dl.download(cfg_for(s.url("/m"), retries=1), output=out)
    assert out.read_bytes() == FIXTURE_BYTES and s.requests() == ["/m"] * 2


@pytest.mark.parametrize("behaviour", [("stall", 5000), ("silent",)])
def test_server_slower_than_the_timeout(servers, out, capsys, behaviour):
    s = servers({"/m": [behaviour]})
    started = time.perf_counter()
    message = fails(cfg_for(s.url("/m"), retries=1, timeout=0.3), out, match=s.url("/m"))
    assert "timed out: no data for 0.3s (download.timeout)" in message
    assert time.perf_counter() - started < 3  # two stalled attempts of ~0.3s, not 10s
    assert s.requests() == ["/m"] * 2
    assert len(warnings_in(capsys.readouterr().err)) == 1
    assert not out.exists() and leftovers(out.parent) == []


# --- wrong content -------------------------------------------------------------------


def test_html_error_page_with_status_200_is_refused_once(servers, out):
    s = servers({"/m": [("ok", HTML)]})
    message = fails(cfg_for(s.url("/m"), retries=3), out, match=s.url("/m"),
                    exc=dl.PermanentError)
    assert "does not match expected" in message and "web page" in message
    assert s.requests() == ["/m"]
    assert not out.exists() and leftovers(out.parent) == []


def test_html_page_without_a_known_hash_is_refused_by_content(servers, out, capsys):
    s = servers({"/m": [("ok", HTML)]})
    message = fails(cfg_for(s.url("/m"), sha256=None, retries=3), out,
                    exc=dl.PermanentError)
    assert "not MNIST" in message and "web page" in message
    assert s.requests() == ["/m"]
    assert "warning: sha256 is null" in capsys.readouterr().err
    assert not out.exists() and leftovers(out.parent) == []


def test_wrong_hash_is_not_retried(servers, out):
    s = servers({"/m": [("ok", FIXTURE_BYTES)]})
    wrong = "0" * 64
    message = fails(cfg_for(s.url("/m"), sha256=wrong, retries=3), out,
                    match=s.url("/m"), exc=dl.PermanentError)
    assert f"sha256 {FIXTURE_SHA256} does not match expected {wrong}" in message
    assert "web page" not in message
    assert s.requests() == ["/m"]
    assert not out.exists() and leftovers(out.parent) == []


@pytest.mark.parametrize("sha256, expect", [
    (FIXTURE_SHA256, "does not match expected"),
    (None, "not MNIST: damaged or truncated zip archive"),
])
def test_truncated_local_file_is_refused(tmp_path, out, sha256, expect):
    source = tmp_path / "truncated.npz"
    source.write_bytes(FIXTURE_BYTES[: len(FIXTURE_BYTES) * 2 // 3])
    message = fails(cfg_for(str(source), sha256=sha256, retries=2), out,
                    match=str(source), exc=dl.PermanentError)
    assert expect in message
    assert not out.exists() and leftovers(out.parent) == []


def test_missing_local_file_is_named(tmp_path, out):
    message = fails(cfg_for(str(tmp_path / "nope.npz")), out, exc=dl.PermanentError)
    assert message == f"{tmp_path / 'nope.npz'}: no such file"


def test_redirect_loop_is_reported_and_not_retried(servers, out, capsys):
    s = servers({"/loop": [("redirect", "/loop")]})
    message = fails(cfg_for(s.url("/loop"), retries=3), out, match=s.url("/loop"),
                    exc=dl.PermanentError)
    assert "redirect loop" in message
    # urllib follows a loop a few times before giving up; one attempt, no retries.
    assert 2 <= len(s.requests()) <= 11
    assert warnings_in(capsys.readouterr().err) == []
    assert not out.exists() and leftovers(out.parent) == []


# --- mirrors -------------------------------------------------------------------------


def test_each_mirror_is_tried_in_order(servers, out, capsys):
    a = servers({}, "A")  # everything 404
    b = servers({"/flaky": [("status", 500)], "/good": [("ok", FIXTURE_BYTES)]}, "B")
    sources = [a.url("/missing"), b.url("/flaky"), b.url("/good"), a.url("/never")]
    used = dl.download(cfg_for(*sources, retries=1), output=out)
    assert used == b.url("/good")
    assert servers.log == [("A", "/missing"), ("B", "/flaky"), ("B", "/flaky"),
                           ("B", "/good")]  # the 500 retried once; /never never asked
    err = capsys.readouterr().err
    assert [w.endswith("trying the next source") for w in warnings_in(err)] == \
        [True, False, True]
    assert out.read_bytes() == FIXTURE_BYTES and leftovers(out.parent) == []


def test_all_mirrors_failing_names_every_url_and_cause(servers, out):
    a = servers({}, "A")
    b = servers({"/m": [("status", 502)]}, "B")
    message = fails(cfg_for(a.url("/x"), b.url("/m"), "http://nonexistent.invalid/m"),
                    out)
    assert message.startswith("all 3 sources failed: ")
    parts = message.split(" | ")
    assert parts[0].endswith(f"{a.url('/x')}: HTTP 404 Not Found")
    assert parts[1] == f"{b.url('/m')}: HTTP 502 Bad Gateway"
    assert parts[2].startswith("http://nonexistent.invalid/m: ")


def test_mirror_with_its_own_hash(servers, out, tmp_path):
    """A {url, sha256} mirror is verified against its own hash, not the main one."""
    data = dict(np.load(FIXTURE))
    other = tmp_path / "rebuilt.npz"
    save_npz(other, **data)  # same arrays, another zip container
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert digest != FIXTURE_SHA256
    s = servers({})
    cfg = dl.validate({"url": s.url("/gone"), "sha256": FIXTURE_SHA256,
                       "mirrors": [{"url": str(other), "sha256": digest}], "format": "npz",
                       "timeout": 5, "retries": 0, "backoff": 0})
    assert dl.download(cfg, output=out) == str(other)
    assert out.read_bytes() == other.read_bytes()


# --- the original idx layout (format: idx) -------------------------------------------


def idx_routes(prefix: str, data: dict, bad: str | None = None) -> dict:
    import gzip
    import struct

    from stages.common import IDX_FILES

    routes = {}
    for key, name in IDX_FILES.items():
        array = data[key]
        magic = 0x800 + array.ndim if name != bad else 0x0D03  # 0x0D: float, not uint8
        raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
        routes[f"{prefix}/{name}"] = [("ok", gzip.compress(raw))]
    return routes


def idx_cfg(url: str) -> dict:
    return dl.validate({"url": url, "sha256": None, "mirrors": [], "format": "idx",
                        "timeout": 5, "retries": 2, "backoff": 0})


def test_idx_folder_over_http(servers, out):
    data = {k: v[:50] for k, v in np.load(FIXTURE).items()}
    s = servers(idx_routes("/mnist", data))
    dl.download(idx_cfg(s.url("/mnist/")), output=out)
    with np.load(out) as got:
        assert all(np.array_equal(got[k], data[k]) for k in data)
    assert len(s.requests()) == 4 and leftovers(out.parent) == []


def test_idx_file_with_a_wrong_magic_number_is_refused_once(servers, out):
    data = {k: v[:50] for k, v in np.load(FIXTURE).items()}
    s = servers(idx_routes("/mnist", data, bad="t10k-images-idx3-ubyte.gz"))
    message = fails(idx_cfg(s.url("/mnist")), out, exc=dl.PermanentError)
    assert message.startswith(s.url("/mnist/t10k-images-idx3-ubyte.gz") + ": bad idx magic")
    assert s.requests().count("/mnist/t10k-images-idx3-ubyte.gz") == 1
    assert not out.exists() and leftovers(out.parent) == []  # temp folder gone too


# --- what is already at the output path ----------------------------------------------


def test_valid_file_at_output_is_reused_without_a_request(servers, out):
    out.parent.mkdir(parents=True)
    out.write_bytes(FIXTURE_BYTES)
    s = servers({"/m": [("ok", FIXTURE_BYTES)]})
    assert dl.download(cfg_for(s.url("/m")), output=out) == s.url("/m")
    assert s.requests() == []


@pytest.mark.parametrize("stale", ["garbage", "truncated", "tampered"])
def test_stale_or_tampered_output_is_reverified_and_replaced(servers, out, stale):
    out.parent.mkdir(parents=True)
    if stale == "garbage":
        out.write_bytes(b"not an npz at all")
    elif stale == "truncated":
        out.write_bytes(FIXTURE_BYTES[:-100])
    else:  # a well-formed MNIST file whose arrays were changed: only the hash can tell
        data = dict(np.load(FIXTURE))
        data["y_train"] = (data["y_train"] + 1) % 10
        np.savez(out, **data)
    s = servers({"/m": [("ok", FIXTURE_BYTES)]})
    dl.download(cfg_for(s.url("/m")), output=out)
    assert s.requests() == ["/m"]
    assert out.read_bytes() == FIXTURE_BYTES and leftovers(out.parent) == []


def test_failed_download_leaves_the_existing_output_unchanged(servers, out):
    out.parent.mkdir(parents=True)
    out.write_bytes(b"previous bytes")
    s = servers({"/m": [("drop", FIXTURE_BYTES[:5000], len(FIXTURE_BYTES))]})
    fails(cfg_for(s.url("/m"), retries=1), out)
    assert out.read_bytes() == b"previous bytes" and leftovers(out.parent) == []


# --- through the real command line ---------------------------------------------------


def stage_dir(tmp_path: Path, **download) -> Path:
    """Just what `python -m stages.download` needs: the stages package and params.yaml."""
    import yaml

    from conftest import ROOT

    repo = tmp_path / "proj"
    shutil.copytree(ROOT / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(download)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def assert_one_error_line(stderr: str, *must_contain: str) -> str:
    """Retry notices are 'warning:' lines; the failure is exactly one last 'error:' line."""
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    assert all(line.startswith(("warning: ", "error: ")) for line in lines), stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], stderr
    for text in must_contain:
        assert text in errors[0], stderr
    return errors[0]


@pytest.mark.slow
def test_cli_failure_is_one_error_line_and_writes_nothing(servers, tmp_path):
    s = servers({"/m": [("status", 500)]})
    repo = stage_dir(tmp_path, url=s.url("/m"), sha256=FIXTURE_SHA256, mirrors=[],
                     retries=2, backoff=0.0)
    proc = sh(repo, sys.executable, "-m", "stages.download", check=False, timeout=120)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, s.url("/m"), "HTTP 500")
    assert len(warnings_in(proc.stderr)) == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert s.requests() == ["/m"] * 3
    assert not (repo / "data/raw").exists() or list((repo / "data/raw").iterdir()) == []


@pytest.mark.slow
def test_cli_failure_keeps_the_previous_output(servers, tmp_path):
    s = servers({"/m": [("ok", HTML)]})
    repo = stage_dir(tmp_path, url=s.url("/m"), sha256=FIXTURE_SHA256, mirrors=[],
                     retries=2, backoff=0.0)
    raw = repo / "data/raw/mnist.npz"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"tampered")
    proc = sh(repo, sys.executable, "-m", "stages.download", check=False, timeout=120)
    assert proc.returncode == 1
    line = assert_one_error_line(proc.stderr, s.url("/m"), "web page")
    assert line == proc.stderr.strip()  # not retried: no warnings at all
    assert raw.read_bytes() == b"tampered" and leftovers(raw.parent) == []


@pytest.mark.slow
def test_dvc_repro_download_failure(servers, tmp_path):
    s = servers({})
    repo = make_project(tmp_path / "p", download={"url": s.url("/404"), "retries": 2,
                                                  "backoff": 0.0})
    proc = dvc(repo, "repro", "download", check=False, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"error: {s.url('/404')}: HTTP 404 Not Found" in output
    assert "failed to reproduce 'download'" in output
    assert "Traceback" not in output
    assert s.requests() == ["/404"]
    assert not (repo / "data/raw/mnist.npz").exists()
    assert not (repo / "dvc.lock").exists()  # nothing recorded for a failed stage
