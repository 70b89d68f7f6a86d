"""A real S3-compatible object store: SeaweedFS started by `make object-store`.

    with ObjectStore(tmp_path / "store", host=a) as store:
        store.endpoint              # "http://10.214.7.1:8333": the S3 endpoint, on A's address
        store.env(base)             # base + the team's key pair (AWS_ACCESS_KEY_ID/..._SECRET...)
        store.reader                # a key pair that may read and list, never write
        store.kill()                # SIGKILL, mid-transfer if the test likes; store.start() again

The store runs on a test host (testbed/hosts.py), bound to that host's address,
with the Makefile's flags (so the tests start what a user starts), telemetry off, and the
bucket `mnist`. Keys are made up per store and live only in the tests' environments.
Its data persists in `root` across kill and start, as a real server's would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from testbed.hosts import Host

ROOT = Path(__file__).resolve().parents[1]
PORT = 8333
BUCKET = "mnist"

# Inside the host: is the bucket there, through an S3 client signing with the team's key?
READY = """
import sys, botocore.session
client = botocore.session.get_session().create_client(
    "s3", endpoint_url=sys.argv[1], region_name="us-east-1")
client.head_bucket(Bucket=sys.argv[2])
"""


class ObjectStore:
    def __init__(self, root: Path, host: Host):
        self.root, self.host = Path(root), host
        self.root.mkdir(parents=True, exist_ok=True)
        self.data, self.log = self.root / "data", self.root / "weed.log"
        self.endpoint = f"http://{host.address}:{PORT}"
        self.key, self.secret = f"team-{secrets.token_hex(4)}", secrets.token_hex(16)
        self.reader = (f"reader-{secrets.token_hex(4)}", secrets.token_hex(16))
        identities = self.root / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "reader", "actions": ["Read", "List"],
            "credentials": [{"accessKey": self.reader[0], "secretKey": self.reader[1]}]}]}))
        self.flags = [f"-s3.config={identities}"]
        self.proc: subprocess.Popen | None = None

    def env(self, base: dict, key: str | None = None, secret: str | None = None) -> dict:
        """base with a key pair (the team's by default) in the S3 client's variables."""
        return base | {"AWS_ACCESS_KEY_ID": key or self.key,
                       "AWS_SECRET_ACCESS_KEY": secret or self.secret}

    def start(self, timeout: float = 60) -> ObjectStore:
        env = self.env(dict(os.environ))
        self.proc = self.host.popen(
            ["make", "-s", "-C", str(ROOT), "object-store", f"OBJECT_STORE_DIR={self.data}",
             f"OBJECT_STORE_ADDRESS={self.host.address}",
             f"OBJECT_STORE_FLAGS={' '.join(self.flags)}"],
            env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the object store exited {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            ready = self.host.run(["python", "-c", READY, self.endpoint, BUCKET], env=env,
                                  timeout=30)
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"no bucket {BUCKET} at {self.endpoint} in {timeout}s:\n"
                                   + ready.stderr[-2000:] + self.log.read_text()[-3000:])
            time.sleep(0.3)

    def _signal(self, sig: int, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # make and the weed it started
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Stopped dead, as a crashed server or a pulled plug: no goodbye to any client."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def __enter__(self) -> ObjectStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
