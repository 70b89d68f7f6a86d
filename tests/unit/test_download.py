"""stages/download.py: fetching and verifying MNIST, against real HTTP servers on 127.0.0.1.

Every server here is a real http.server in a thread on an ephemeral loopback port; faults
are injected by the handler (status codes, dropped connections, stalls, redirect loops).
Whatever fails, the error is clear and nothing half-written is left behind.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stages import download as dl
from stages.data import idx
from stages.runtime import params
from stages.runtime.outputs import save_npz
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import gz_idx, small_mnist
from tests.hostile import probe, refused_in_bounds
from tests.paths import FIXTURE, FIXTURE_SHA256
from tests.projects import dvc, make_project, set_params

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
    """A checked download config, through params.py's own check."""
    first, *mirrors = sources
    return params.download({"url": first, "sha256": sha256, "mirrors": list(mirrors),
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
    cfg = params.download({"url": s.url("/gone"), "sha256": FIXTURE_SHA256,
                           "mirrors": [{"url": str(other), "sha256": digest}],
                           "format": "npz", "timeout": 5, "retries": 0, "backoff": 0})
    assert dl.download(cfg, output=out) == str(other)
    assert out.read_bytes() == other.read_bytes()


# --- the original idx layout (format: idx) -------------------------------------------


def fixture_head(n: int = 50) -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return {k: f[k][:n] for k in f.files}


def idx_files(data: dict) -> dict[str, bytes]:
    """The four gzip-compressed idx files holding data, by their original names."""
    return {name: gz_idx(data[key]) for key, name in dl.IDX_FILES.items()}


def idx_routes(prefix: str, data: dict, bad: str | None = None) -> dict:
    files = idx_files(data)
    if bad:  # float32 values: type code 0x0D, not uint8
        key = next(k for k, name in dl.IDX_FILES.items() if name == bad)
        files[bad] = gz_idx(data[key].astype(np.float32))
    return {f"{prefix}/{name}": [("ok", raw)] for name, raw in files.items()}


def idx_hashes(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}


def idx_cfg(url: str, sha256=None) -> dict:
    return params.download({"url": url, "sha256": sha256, "mirrors": [], "format": "idx",
                            "timeout": 5, "retries": 2, "backoff": 0})


def test_idx_folder_over_http(servers, out):
    data = fixture_head()
    s = servers(idx_routes("/mnist", data))
    dl.download(idx_cfg(s.url("/mnist/")), output=out)
    with np.load(out) as got:
        assert set(got.files) == set(data)
        assert all(np.array_equal(got[k], data[k]) for k in data)
    assert len(s.requests()) == 4 and leftovers(out.parent) == []


def test_idx_file_with_a_wrong_magic_number_is_refused_once(servers, out):
    s = servers(idx_routes("/mnist", fixture_head(), bad="t10k-images-idx3-ubyte.gz"))
    message = fails(idx_cfg(s.url("/mnist")), out, exc=dl.PermanentError)
    assert message.startswith(s.url("/mnist/t10k-images-idx3-ubyte.gz") + ": bad idx magic")
    assert s.requests().count("/mnist/t10k-images-idx3-ubyte.gz") == 1
    assert not out.exists() and leftovers(out.parent) == []  # temp folder gone too


def test_idx_files_are_verified_against_their_own_hashes(servers, out):
    files = idx_files(fixture_head())
    hashes = idx_hashes(files)
    s = servers({f"/mnist/{name}": [("ok", raw)] for name, raw in files.items()})
    dl.download(idx_cfg(s.url("/mnist"), sha256=hashes), output=out)
    assert load_arrays(out) == load_arrays_of(fixture_head())
    wrong = dict(hashes, **{"train-labels-idx1-ubyte.gz": "0" * 64})
    out.unlink()
    message = fails(idx_cfg(s.url("/mnist"), sha256=wrong), out, exc=dl.PermanentError)
    assert message.startswith(s.url("/mnist/train-labels-idx1-ubyte.gz") + ": sha256 ")
    assert f"does not match expected {'0' * 64}" in message
    assert not out.exists() and leftovers(out.parent) == []


def test_an_npz_url_can_fall_back_to_an_idx_mirror(servers, out):
    """Each source carries its own format and hash."""
    files = idx_files(fixture_head())
    s = servers({f"/idx/{name}": [("ok", raw)] for name, raw in files.items()})
    cfg = params.download({"url": s.url("/gone.npz"), "sha256": FIXTURE_SHA256,
                           "format": "npz", "timeout": 5, "retries": 0, "backoff": 0,
                           "mirrors": [{"url": s.url("/idx"), "format": "idx",
                                        "sha256": idx_hashes(files)}]})
    assert dl.download(cfg, output=out) == s.url("/idx")
    assert s.requests()[0] == "/gone.npz" and len(s.requests()) == 5
    assert load_arrays(out) == load_arrays_of(fixture_head())


def load_arrays(path) -> dict:
    with np.load(path) as f:
        return load_arrays_of({k: f[k] for k in f.files})


def load_arrays_of(data: dict) -> dict:
    """Arrays as comparable values: {key: (dtype, shape, bytes)}."""
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in data.items()}


def idx_folder(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in idx_files(data).items():
        (folder / name).write_bytes(raw)
    return folder


def local_idx(folder: Path) -> dict:
    return idx_cfg(str(folder))


def test_idx_folder_on_disk_round_trips(tmp_path, out):
    data = small_mnist()
    dl.download(local_idx(idx_folder(tmp_path / "idx", data)), output=out)
    assert load_arrays(out) == load_arrays_of(data)


@pytest.mark.parametrize("name, content, match", [
    ("t10k-images-idx3-ubyte.gz", lambda d: gz_idx(d["x_test"].reshape(-1)),
     "t10k-images-idx3-ubyte.gz: bad idx magic number 0x00000801, expected 0x00000803"),
    ("train-labels-idx1-ubyte.gz", lambda d: gzip.compress(idx.encode(d["y_train"])[:-1]),
     "train-labels-idx1-ubyte.gz: header says 12 = 12 bytes, file holds 11"),
    ("t10k-labels-idx1-ubyte.gz", lambda d: gz_idx(d["y_test"][:4]),
     "5 x_test images but 4 y_test labels"),
    ("train-labels-idx1-ubyte.gz", lambda d: gz_idx(np.full(12, 10, np.uint8)),
     "y_train has label 10; allowed 0..9"),
    ("train-images-idx3-ubyte.gz", lambda d: b"not gzip",
     "train-images-idx3-ubyte.gz: not a valid gzip file"),
    ("t10k-labels-idx1-ubyte.gz", None, "t10k-labels-idx1-ubyte.gz: no such file"),
], ids=["wrong-magic", "short-body", "count-mismatch", "label-10", "not-gzip", "missing"])
def test_bad_idx_folder_is_refused_and_nothing_is_written(tmp_path, out, name, content,
                                                          match):
    data = small_mnist()
    folder = idx_folder(tmp_path / "idx", data)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content(data))
    message = fails(local_idx(folder), out, match=match, exc=dl.PermanentError)
    assert message.startswith(str(folder))
    assert not out.exists() and leftovers(out.parent) == []


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

RAW = dvc_vars()["raw"]


def stage_dir(tmp_path: Path, **download) -> Path:
    """The pipeline's files in a scratch folder, params.yaml's download section changed."""
    repo = copy_pipeline(tmp_path / "proj")
    set_params(repo, download=download)
    return repo


def run_stage(repo: Path):
    return sh(repo, *stage_command("download", repo), check=False, timeout=120)


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
def test_cli_downloads_then_reuses_the_verified_file(tmp_path):
    repo = stage_dir(tmp_path, url=FIXTURE.as_uri(), sha256=FIXTURE_SHA256, format="npz",
                     mirrors=[], retries=0)
    first = run_stage(repo)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"download: {RAW} from {FIXTURE.as_uri()} in ")
    assert (repo / RAW).read_bytes() == FIXTURE.read_bytes()
    again = run_stage(repo)
    assert again.returncode == 0, again.stderr
    assert "already holds verified data" in again.stdout
    assert leftovers((repo / RAW).parent) == []


@pytest.mark.slow
def test_cli_failure_is_one_error_line_and_writes_nothing(servers, tmp_path):
    s = servers({"/m": [("status", 500)]})
    repo = stage_dir(tmp_path, url=s.url("/m"), sha256=FIXTURE_SHA256, mirrors=[],
                     retries=2, backoff=0.0)
    proc = run_stage(repo)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, s.url("/m"), "HTTP 500")
    assert len(warnings_in(proc.stderr)) == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert s.requests() == ["/m"] * 3
    raw_dir = (repo / RAW).parent
    assert not raw_dir.exists() or list(raw_dir.iterdir()) == []


@pytest.mark.slow
def test_cli_failure_keeps_the_previous_output(servers, tmp_path):
    s = servers({"/m": [("ok", HTML)]})
    repo = stage_dir(tmp_path, url=s.url("/m"), sha256=FIXTURE_SHA256, mirrors=[],
                     retries=2, backoff=0.0)
    raw = repo / RAW
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"tampered")
    proc = run_stage(repo)
    assert proc.returncode == 1
    line = assert_one_error_line(proc.stderr, s.url("/m"), "web page")
    assert line == proc.stderr.strip()  # not retried: no warnings at all
    assert raw.read_bytes() == b"tampered" and leftovers(raw.parent) == []


@pytest.mark.slow
def test_cli_without_its_output_argument_is_a_usage_error(tmp_path):
    repo = stage_dir(tmp_path)
    proc = sh(repo, sys.executable, "-m", "stages.download", check=False, timeout=120)
    assert proc.returncode == 2 and "--out" in proc.stderr
    assert not (repo / RAW).parent.exists()


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
    assert not (repo / RAW).exists()
    assert not (repo / "dvc.lock").exists()  # nothing recorded for a failed stage


# --- sources that never end, or declare too much: refused at a cap ------------------------
# Each check that could exhaust memory runs in a child interpreter (tests.hostile.probe) that
# reports its own peak RSS and time.


class EndlessServer:
    """A real HTTP server on 127.0.0.1 whose every answer is zeros that never end.

    /huge... also declares a 10 GiB Content-Length; /trickle... sends one byte every 20 ms,
    always inside any silence timeout; anything else declares none (HTTP/1.0: the body
    lasts until the connection closes, which this server never does first).
    Counts requests and the bytes it managed to send.
    """

    def __init__(self):
        self.requests, self.sent = [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if self.path.startswith("/huge"):
                    self.send_header("Content-Length", str(10 << 30))
                self.end_headers()
                trickle = self.path.startswith("/trickle")
                block = bytes(1 if trickle else 1 << 16)
                try:
                    while True:
                        self.wfile.write(block)
                        server.sent += len(block)
                        if trickle:
                            self.wfile.flush()
                            time.sleep(0.02)
                except OSError:  # the client hung up: what a refusal looks like here
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endless():
    server = EndlessServer()
    yield server
    server.close()


DOWNLOAD = ("import json\nfrom pathlib import Path\nfrom stages import download\n"
            "result = download.download(json.loads(args[0]), Path(args[1]))")


def run_download(url: str, out: Path, fmt: str = "npz") -> dict:
    cfg = {"sources": [{"url": url, "sha256": None, "format": fmt}], "timeout": 5.0,
           "retries": 3, "backoff": 0.0}
    return probe(DOWNLOAD, json.dumps(cfg), out)


def nothing_left(out: Path) -> bool:
    """No output and no temporary beside it."""
    return not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


@pytest.mark.slow
def test_http_source_that_never_ends_is_refused_at_the_cap_and_not_retried(tmp_path,
                                                                            endless):
    out = tmp_path / "raw" / "mnist.npz"
    url = endless.url("/mnist.npz")
    outcome = run_download(url, out)
    refused_in_bounds(outcome, "PermanentError", url,
                      rf": more than {dl.MAX_NPZ_BYTES} bytes received, over the cap of "
                      r"256 MiB for one downloaded file; refused")
    assert endless.requests == ["/mnist.npz"]  # retries: 3, yet one attempt
    assert endless.sent > dl.MAX_NPZ_BYTES  # it really streamed up to the cap
    assert nothing_left(out)


@pytest.mark.slow
def test_http_content_length_over_the_cap_is_refused_before_the_body(tmp_path, endless):
    out = tmp_path / "raw" / "mnist.npz"
    url = endless.url("/huge/mnist.npz")
    outcome = run_download(url, out)
    refused_in_bounds(outcome, "PermanentError", url,
                      rf": Content-Length declares {10 << 30} bytes, over the cap of 256 MiB")
    assert endless.requests == ["/huge/mnist.npz"]
    assert outcome["seconds"] < 5
    assert nothing_left(out)


@pytest.mark.slow
def test_endless_idx_file_is_refused_at_the_per_file_cap(tmp_path, endless):
    out = tmp_path / "raw" / "mnist.npz"
    base = endless.url("/mnist")
    outcome = run_download(base, out, fmt="idx")
    refused_in_bounds(outcome, "PermanentError", base + "/train-images-idx3-ubyte.gz",
                      rf": more than {dl.MAX_IDX_BYTES} bytes received, over the cap of "
                      r"64 MiB for one downloaded file")
    assert endless.requests == ["/mnist/train-images-idx3-ubyte.gz"]
    assert nothing_left(out)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["/dev/zero", "file:///dev/zero"])
def test_dev_zero_as_a_local_source_is_refused_at_the_cap(tmp_path, source):
    out = tmp_path / "raw" / "mnist.npz"
    outcome = run_download(source, out)
    refused_in_bounds(outcome, "PermanentError", source,
                      rf"^{source}: more than {dl.MAX_NPZ_BYTES} bytes received, over "
                      r"the cap of 256 MiB")
    assert nothing_left(out)


def test_huge_local_file_is_refused_from_its_size_without_reading_it(tmp_path):
    source = tmp_path / "huge.npz"
    with open(source, "wb") as f:  # sparse: 8 GiB declared, nothing written
        f.truncate(8 << 30)
    out = tmp_path / "raw" / "mnist.npz"
    started = time.perf_counter()
    with pytest.raises(dl.PermanentError) as info:
        dl.download({"sources": [{"url": str(source), "sha256": None, "format": "npz"}],
                     "timeout": 5.0, "retries": 3, "backoff": 0.0}, out)
    assert str(info.value) == (
        f"{source}: {8 << 30} bytes, over the cap of 256 MiB for one downloaded file; refused "
        "(not the dataset, or a source that never ends)")
    assert time.perf_counter() - started < 2
    assert nothing_left(out)


def test_a_local_source_at_the_cap_is_still_copied(tmp_path):
    """The cap is a ceiling, not an off-by-one: exactly `limit` bytes pass."""
    source = tmp_path / "exact.bin"
    source.write_bytes(bytes(range(256)) * 4)
    dest = tmp_path / "copy.bin"
    dl.fetch_once(str(source), dest, 5.0, limit=1024)
    assert dest.read_bytes() == source.read_bytes()
    source.write_bytes(bytes(1025))
    with pytest.raises(dl.PermanentError, match="1025 bytes, over the cap of 1024 bytes"):
        dl.fetch_once(str(source), dest, 5.0, limit=1024)


def test_caps_fit_mnist_with_headroom():
    """The download caps against MNIST's real sizes: the full data pass, gigabytes do not."""
    assert 2 * (47_040_128 + 7_840_128) < dl.MAX_NPZ_BYTES < 1 << 30
    assert 4 * 9_912_422 < dl.MAX_IDX_BYTES  # train-images-idx3-ubyte.gz
    assert os.path.getsize(FIXTURE) < dl.MAX_NPZ_BYTES


def test_a_source_trickling_inside_the_timeout_is_given_up_at_the_deadline(tmp_path, endless):
    # Never silent for `timeout`, never over the size cap: only the deadline ends it.
    started = time.monotonic()
    with pytest.raises(dl.DownloadError, match="too slow") as info:
        dl.fetch_once(endless.url("/trickle.npz"), tmp_path / "out", timeout=5.0, deadline=1.0)
    elapsed = time.monotonic() - started
    assert not isinstance(info.value, dl.PermanentError)  # slow can pass: retried
    assert 1.0 <= elapsed < 5.0
    assert "\n" not in str(info.value) and "/trickle.npz" in str(info.value)
    assert 0 < endless.sent < 1000
