"""A real OpenSSH server for the remote tests, on a free loopback port.

Debian's ``openssh-server`` (``/usr/sbin/sshd``, installed by ``scripts/test``) runs
in the foreground with its own host key, config, authorized_keys and log under a
test directory; it listens on 127.0.0.1 only. Sessions get ``bin/`` first on their
PATH (``SetEnv``), where a test puts the fake ``nvidia-smi``.

:meth:`SshServer.kill` kills the listener and every session process at once (the
server "stops mid-upload"); :meth:`start` again brings it back on the same port with
the same key, :meth:`new_host_key` with a different one.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {home}/host_key
PidFile {home}/sshd.pid
AuthorizedKeysFile {home}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
Subsystem sftp internal-sftp
SetEnv PATH={home}/bin:/usr/local/bin:/usr/bin:/bin
LogLevel VERBOSE
MaxStartups 100
"""


def available() -> bool:
    return Path(SSHD).is_file() and Path(SSH_KEYGEN).is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str = "sparkops-test") -> Path:
    """A new ed25519 key pair at ``path`` (and ``path.pub``), no passphrase."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True)
    return path


class SshServer:
    def __init__(self, home: Path):
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        (home / "bin").mkdir(exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = keygen(home / "host_key", "sparkops-test-host")
        self.client_key = keygen(home / "client_key")
        (home / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.log = home / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def bin(self) -> Path:
        return self.home / "bin"

    def known_hosts_line(self) -> str:
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def start(self) -> SshServer:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        config = self.home / "sshd_config"
        config.write_text(CONFIG.format(port=self.port, home=self.home))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on port {self.port}: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the listener and every session (the whole server, at once)."""
        if self.proc is None:
            return
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=10)
        psutil.wait_procs(family, timeout=10)
        self.proc = None

    def new_host_key(self) -> None:
        """Another host key (the server "was reinstalled"); takes effect at the next start."""
        keygen(self.host_key, "sparkops-test-host-2")

    def stop(self) -> None:
        self.kill()
