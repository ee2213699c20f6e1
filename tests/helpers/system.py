"""System packages the slow tests need (Debian ``slurm-wlm``/``munge``, ``chromium``), installed on demand.

CI runs as root on Debian and ``.ci/run`` installs these itself; a test that needs them calls
:func:`ensure_binaries`, which installs the missing packages with ``apt-get`` when it can and otherwise
raises :class:`MissingSystemPackage` with a one-line reason (the test turns it into a failure, never a skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess

#: binaries of the local SLURM cluster -> Debian package providing them
SLURM_BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "sacct": "slurm-client",
    "scontrol": "slurm-client",
    "sinfo": "slurm-client",
}
CHROMIUM_BINARIES = {"chromium": "chromium"}


class MissingSystemPackage(RuntimeError):
    """A system binary is missing and could not be installed."""


def missing(binaries: dict[str, str]) -> dict[str, str]:
    """The entries of ``binaries`` (binary -> package) whose binary is not on ``PATH``."""
    return {b: p for b, p in binaries.items() if shutil.which(b) is None}


def ensure_binaries(binaries: dict[str, str], timeout: float = 900) -> None:
    """Install the Debian packages of the missing binaries with ``apt-get`` (root only).

    Raises:
        MissingSystemPackage: not root, no ``apt-get``, or the installation failed.
    """
    need = missing(binaries)
    if not need:
        return
    packages = sorted(set(need.values()))
    hint = f"install them: apt-get install {' '.join(packages)}"
    if os.geteuid() != 0:
        raise MissingSystemPackage(f"missing {sorted(need)} and not root (uid {os.geteuid()}); {hint}")
    if shutil.which("apt-get") is None:
        raise MissingSystemPackage(f"missing {sorted(need)} and no apt-get on this system; {hint}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-1500:]
            raise MissingSystemPackage(f"`{' '.join(cmd)}` failed ({proc.returncode}): {tail}")
    still = missing(binaries)
    if still:
        raise MissingSystemPackage(f"installed {packages} but {sorted(still)} still not on PATH")
