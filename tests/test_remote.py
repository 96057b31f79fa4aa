"""Remote hosts against a real OpenSSH server on loopback: host keys verified, an
unknown or changed key refused, trust-host, a wrong client key, a jump host, the
remote CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import make_settings, remote_env, run_cli
from sshd import keygen

from sparkops.config import load_settings
from sparkops.core.errors import ConfigError, Refused
from sparkops.net import ssh as remote


def ssh_keygen_fingerprint(pub: Path) -> str:
    """What OpenSSH itself says the key's fingerprint is."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


def test_a_trusted_host_key_logs_in_and_runs_argv_without_a_shell(ssh_server, tmp_path):
    settings = make_settings(tmp_path, **remote_env(ssh_server, tmp_path))
    with remote.connect(settings, "vps") as conn:
        done = conn.run(["printf", "%s|", "two words", "$HOME", "; touch /tmp/x"], timeout=10)
        key = conn.transport.get_remote_server_key()
    assert done.returncode == 0
    assert done.stdout == "two words|$HOME|; touch /tmp/x|"  # each word arrived as it was
    assert remote.fingerprint(key) == ssh_keygen_fingerprint(Path(f"{ssh_server.host_key}.pub"))


def test_an_unknown_host_key_is_refused_with_its_fingerprint(ssh_server, tmp_path):
    settings = make_settings(tmp_path, **remote_env(ssh_server, tmp_path, trusted=False))
    with pytest.raises(remote.HostKeyUnknown) as refused:
        remote.connect(settings, "vps")
    expected = ssh_keygen_fingerprint(Path(f"{ssh_server.host_key}.pub"))
    assert refused.value.fingerprint == expected
    message = str(refused.value)
    assert expected in message and "remote trust-host vps" in message and "not in" in message
    assert not (tmp_path / "known_hosts").exists()  # nothing was recorded on its own
    assert "Accepted publickey" not in ssh_server.log.read_text()  # it never logged in


def test_trust_host_shows_the_fingerprint_and_records_the_key_deliberately(ssh_server, tmp_path):
    env = remote_env(ssh_server, tmp_path, trusted=False)
    expected = ssh_keygen_fingerprint(Path(f"{ssh_server.host_key}.pub"))
    known = tmp_path / "known_hosts"

    no_tty = run_cli("remote", "trust-host", "vps", cwd=tmp_path, env=env)
    assert no_tty.returncode == 2 and "--fingerprint" in no_tty.stderr and expected in no_tty.stdout
    wrong = run_cli("remote", "trust-host", "vps", "--fingerprint", "SHA256:not-it", cwd=tmp_path, env=env)
    assert wrong.returncode == 1 and "nothing was recorded" in wrong.stderr
    assert not known.exists()

    done = run_cli("remote", "trust-host", "vps", "--fingerprint", expected, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"trusted [127.0.0.1]:{ssh_server.port}: ssh-ed25519 {expected}" in done.stdout
    assert known.read_text() == ssh_server.known_hosts_line()
    assert oct(known.stat().st_mode & 0o777) == "0o600"
    again = run_cli("remote", "trust-host", "vps", "--yes", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "already trusted" in again.stdout
    assert known.read_text() == ssh_server.known_hosts_line()

    checked = run_cli("remote", "check", cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"vps: ok: {ssh_server.user}@127.0.0.1:{ssh_server.port}" in checked.stdout
    assert expected in checked.stdout


def test_a_changed_host_key_is_refused_and_replaced_only_on_purpose(ssh_server, tmp_path):
    known = tmp_path / "known_hosts"
    other = "other.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDyRL2mqkQ6RpEqf/OBSz5n6b7PE9nZb3cvuN3ek8oXQ\n"
    known.write_text("# our hosts\n" + other + ssh_server.known_hosts_line())
    env = remote_env(ssh_server, tmp_path)
    settings = make_settings(tmp_path, **env)
    old = ssh_keygen_fingerprint(Path(f"{ssh_server.host_key}.pub"))
    ssh_server.kill()
    ssh_server.new_host_key()
    ssh_server.start()
    new = ssh_keygen_fingerprint(Path(f"{ssh_server.host_key}.pub"))

    with pytest.raises(remote.HostKeyChanged) as changed:
        remote.connect(settings, "vps")
    assert (changed.value.fingerprint, changed.value.expected_fingerprint) == (new, old)
    assert "CHANGED" in str(changed.value) and "--replace" in str(changed.value)
    before = known.read_bytes()

    with pytest.raises(Refused, match="already holds another key"):
        remote.trust(settings.remote("vps"), remote.scan_key(settings, "vps"))
    refused = run_cli("remote", "trust-host", "vps", "--yes", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "--replace" in refused.stderr
    assert known.read_bytes() == before

    done = run_cli("remote", "trust-host", "vps", "--fingerprint", new, "--replace", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert known.read_text() == "# our hosts\n" + other + ssh_server.known_hosts_line()
    with remote.connect(settings, "vps") as conn:
        assert conn.run(["true"], timeout=10).returncode == 0


def test_a_wrong_client_key_is_refused_and_says_what_to_do(ssh_server, tmp_path):
    stranger = keygen(tmp_path / "stranger_key")
    settings = make_settings(tmp_path, **remote_env(ssh_server, tmp_path, key_file=str(stranger)))
    with pytest.raises(remote.AuthFailed) as refused:
        remote.connect(settings, "vps")
    assert str(stranger) in str(refused.value) and "authorized_keys" in str(refused.value)

    missing = make_settings(tmp_path, **remote_env(ssh_server, tmp_path, key_file=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="remotes.vps.key_file .* does not exist"):
        remote.connect(missing, "vps")


def test_an_unreachable_host_is_one_clear_error(tmp_path):
    from sshd import free_port

    port = free_port()  # nothing listens there
    env = {"SPARKOPS_REMOTES": f'{{"vps": {{"address": "127.0.0.1", "port": {port}, '
                               f'"known_hosts": "{tmp_path}/known_hosts"}}}}',
           "SPARKOPS_REMOTE_CONNECT_TIMEOUT_SECONDS": "2"}
    checked = run_cli("remote", "check", cwd=tmp_path, env=env)
    assert checked.returncode == 1
    assert f"vps: FAILED: cannot reach vps at 127.0.0.1:{port}: Connection refused" in checked.stdout


def test_a_jump_host_carries_the_connection(ssh_server, tmp_path):
    import json

    env = remote_env(ssh_server, tmp_path, name="jump")
    hosts = json.loads(env["SPARKOPS_REMOTES"])
    # the target is reached from the jump host's side: the same server, through a channel
    hosts["spark1"] = {**hosts["jump"], "jump": "jump"}
    settings = make_settings(tmp_path, SPARKOPS_REMOTES=json.dumps(hosts))
    with remote.connect(settings, "spark1") as conn:
        assert conn.jump is not None and conn.jump.name == "jump"
        assert conn.run(["echo", "through"], timeout=10).stdout == "through\n"
    assert not conn.active and not conn.jump.active
    assert "direct-tcpip" in ssh_server.log.read_text() or "Connection from" in ssh_server.log.read_text()


@pytest.mark.parametrize("remotes, env, message", [
    ({}, {"SPARKOPS_REMOTE_PUSH_HOST": "vps"}, "remote.push_host names the remote host 'vps', which has no"),
    ({"vps": {"port": 22}}, {}, "remotes.vps.address is required"),
    ({"vps": {"address": "h", "password": "x"}}, {}, "remotes.vps.password looks like a secret"),
    ({"vps": {"address": "h", "prot": 22}}, {}, "unknown field remotes.vps.prot"),
    ({"a": {"address": "h", "jump": "b"}, "b": {"address": "h", "jump": "a"}}, {}, "goes round in a circle"),
    ({"vps": {"address": "h", "port": 70000}}, {}, "remotes.vps.port must be an integer from 1 to 65535"),
])
def test_bad_remote_settings_are_refused_with_one_line(tmp_path, remotes, env, message):
    import json

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings(env={"SPARKOPS_REMOTES": json.dumps(remotes), **env}, cwd=tmp_path)
    done = run_cli("remote", "check", cwd=tmp_path, env={"SPARKOPS_REMOTES": json.dumps(remotes), **env})
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1


def test_the_defaults_name_no_remote_host_and_the_remote_jobs_are_off(tmp_path, sqlite_store):
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job

    settings = make_settings(tmp_path)
    assert settings.remotes == ()
    assert not settings["remote.push_host"] and not settings["remote.tunnel_host"]
    assert settings["remote.gpu_hosts"] == [] and settings["remote.tunnel_remote_address"] == "127.0.0.1"
    ctx = JobContext.create(settings, sqlite_store)
    for job in ("push", "tunnel", "remote-gpu"):
        result = run_job(ctx, job, trigger="schedule")
        assert result.ok and not result.acted and result.summary.startswith("off"), result
