"""A real OpenSSH server on 127.0.0.1 for tests: throwaway keys, ephemeral port, no root config.

    with SSHServer(tmp_path / "sshd") as server:
        server.port, server.user, server.client_key  # what `dvc remote modify --local` needs
        server.env(os.environ)                       # the environment for the client

Everything lives in one temp folder: a generated host key, a client key pair and its
authorized_keys, the sshd_config and sshd's log; the system's sshd_config and host keys are
not used. The server runs in the foreground (`sshd -D -e`) as a child of the test and is
stopped on exit.

`server.env(base)` is the environment for SSH clients (dvc-ssh/asyncssh): HOME points at a
temp home whose ~/.ssh/known_hosts trusts exactly this server's host key, so host keys
are checked for real and the user's own ~/.ssh is neither read nor written.

No sshd on the machine is an error, never a skip: `make test` installs openssh-server.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from testbed.processes import free_port

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str:
    path = shutil.which("sshd") or next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError("sshd not found: install openssh-server "
                           "(`make test` does: apt-get install openssh-server)")
    return os.path.abspath(path)  # sshd refuses to run unless started by its absolute path


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dvc-test",
                    "-f", str(path)], check=True, capture_output=True, timeout=60)
    return path.with_suffix(".pub").read_text().strip()


class SSHServer:
    def __init__(self, root: Path, user: str | None = None):
        self.root = Path(root)
        self.user = user or getpass.getuser()
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "sshd.log"

    # --- setup ---------------------------------------------------------------------

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.host_key = self.root / "host_ed25519"
        self.client_key = self.root / "client_ed25519"
        host_pub = _keygen(self.host_key)
        client_pub = _keygen(self.client_key)
        self.authorized_keys = self.root / "authorized_keys"
        self.authorized_keys.write_text(client_pub + "\n")
        self.home = self.root / "home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        self._host_pub = host_pub
        if os.geteuid() == 0:
            # Privilege separation needs this empty root-owned folder; systemd normally
            # creates it when the service starts, and a container may not have it.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _config(self) -> Path:
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "AuthenticationMethods publickey",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            # The temp folders are world-readable under /tmp; sshd would refuse the keys.
            "StrictModes no",
            "Subsystem sftp internal-sftp",
            "MaxSessions 32",
            "MaxStartups 32:30:64",
            "LogLevel VERBOSE",
            "",
        ]))
        return config

    def start(self) -> SSHServer:
        sshd = find_sshd()
        self._prepare()
        last = ""
        for _ in range(5):  # another process may grab the free port before sshd binds it
            self.port = free_port()
            config = self._config()
            check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True,
                                   text=True, timeout=30)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t rejected {config}: {check.stderr.strip()}")
            log = open(self.log, "w")
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            if self._wait_ready(20):
                break
            last = self.log.read_text()
            self.stop()
        else:
            raise RuntimeError(f"sshd did not start on 127.0.0.1:\n{last}")
        known_hosts = self.home / ".ssh" / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{self.port} {self._host_pub}\n")
        return self

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # sshd's listener; session children exit with it
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what a client needs -------------------------------------------------------

    def env(self, base: dict) -> dict:
        """`base` with HOME at the temp home whose known_hosts trusts this server only."""
        env = dict(base)
        env["HOME"] = str(self.home)
        env.pop("SSH_AUTH_SOCK", None)  # no agent keys: only the configured keyfile
        return env

    def url(self, path: Path) -> str:
        return f"ssh://127.0.0.1{Path(path).resolve()}"

    def ssh(self, *command: str) -> subprocess.CompletedProcess:
        """Run a command over a real `ssh` login (checks the server end to end)."""
        return subprocess.run(
            ["ssh", "-p", str(self.port), "-i", str(self.client_key),
             "-o", f"UserKnownHostsFile={self.home / '.ssh' / 'known_hosts'}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
             "-o", "IdentitiesOnly=yes", "-F", "/dev/null",
             f"{self.user}@127.0.0.1", *command],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
