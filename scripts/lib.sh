# Shared set-up steps for scripts/up and scripts/test. Sourced, not run.

in_ci() { [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; }

say() { printf '==> %s\n' "$*" >&2; }

# ensure_venv DIR LOCK: create DIR and install LOCK (pinned, with hashes) into it,
# skipping the install when the lock has not changed.
ensure_venv() {
  local dir=$1 req=$2 python=${PYTHON:-python3} stamp
  if [ ! -x "$dir/bin/python" ]; then
    say "creating virtualenv $dir"
    "$python" -m venv "$dir" || {
      echo "cannot create a virtualenv with $python; on Debian: apt-get install python3-venv" >&2
      exit 2
    }
  fi
  stamp=$(cat "$req" requirements.lock | sha256sum | cut -c1-16)
  if [ "$(cat "$dir/.sparkops-installed" 2>/dev/null)" != "$req:$stamp" ]; then
    say "installing $req into $dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r "$req"
    echo "$req:$stamp" > "$dir/.sparkops-installed"
  fi
}

# ensure_hermes DIR: the real Hermes Agent CLI in its own virtualenv. Without it
# the live interop tests skip, except in CI where they must run.
HERMES_VERSION=0.19.0
ensure_hermes() {
  local dir=$1 python=${PYTHON:-python3}
  if [ -x "$dir/bin/hermes" ] && [ "$(cat "$dir/.sparkops-installed" 2>/dev/null)" = "$HERMES_VERSION" ]; then
    return 0
  fi
  say "installing hermes-agent==$HERMES_VERSION into $dir (for the interop tests)"
  if "$python" -m venv "$dir" && "$dir/bin/pip" install --quiet --disable-pip-version-check \
      "hermes-agent==$HERMES_VERSION"; then
    echo "$HERMES_VERSION" > "$dir/.sparkops-installed"
  elif in_ci; then
    echo "hermes-agent could not be installed; CI needs it for the interop tests" >&2
    exit 1
  else
    say "hermes-agent not installed: the live interop tests will be skipped"
  fi
}

# ensure_postgres: start the local cluster if it is installed and down.
ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    return 0
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do
      pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && return 0
      sleep 1
    done
  fi
  if in_ci; then
    echo "PostgreSQL is not running on 127.0.0.1:5432; CI needs it" >&2
    exit 1
  fi
  say "PostgreSQL not available: the PostgreSQL tests will be skipped"
}

# ensure_chromium: Debian's chromium for the browser tests (Playwright drives it; no
# browser download). Without it the browser tests skip, except in CI.
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    say "installing Debian's chromium (for the browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium fonts-noto-color-emoji >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-noto-color-emoji >/dev/null 2>&1; } \
      || true
  fi
  if [ ! -x /usr/bin/chromium ]; then
    if in_ci; then
      echo "chromium could not be installed; CI needs it for the browser tests" >&2
      exit 1
    fi
    say "chromium not available: the browser tests will be skipped"
  fi
}

# ensure_sshd: Debian's OpenSSH server for the remote tests (they start their own sshd
# on a free loopback port with its own keys and config; no system service is started).
ensure_sshd() {
  if [ -x /usr/sbin/sshd ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    say "installing Debian's openssh-server (for the remote tests)"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the package must not start the system's sshd on port 22
    local policy=/usr/sbin/policy-rc.d created=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
    fi
    apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssh-server openssh-client >/dev/null 2>&1; } \
      || true
    [ -n "$created" ] && rm -f "$policy"
  fi
  if [ ! -x /usr/sbin/sshd ]; then
    if in_ci; then
      echo "openssh-server could not be installed; CI needs it for the remote tests" >&2
      exit 1
    fi
    say "sshd not available: the remote tests will be skipped"
  fi
}
