"""What a worker's processes (the shim, its agent, ``hermes``) get of the runner's
environment: an allowlist, never the runner's secrets."""

from __future__ import annotations

import os

from sparkops import PACKAGE_ROOT
from sparkops.config import CONFIG_ENV, Settings, child_environment


def shim_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """What a shim, its agent or ``hermes`` gets of the runner's environment (an
    allowlist, :func:`sparkops.config.child_environment`, with the agent's own
    ``dispatch.agent_env_pass``), plus an absolute SPARKOPS_CONFIG."""
    env = child_environment(base, passed=settings["dispatch.agent_env_pass"])
    if settings.source is not None:
        env[CONFIG_ENV] = str(settings.source.resolve())
    return env


def shim_env(settings: Settings) -> dict[str, str]:
    """The shim's environment: the runner's without secrets, and the package on
    PYTHONPATH so ``python -m sparkops.engine.shim`` works without an install."""
    env = shim_environment(settings)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env
