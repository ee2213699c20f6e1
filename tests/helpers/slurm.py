"""A one-node SLURM cluster on localhost, owned by the test process: ``munged``, ``slurmctld``, ``slurmd``.

Everything lives under one temporary folder (config, munge key/socket, state and spool dirs, logs, the job
completion log); the daemons run in the foreground as child processes and are stopped by pid in
:meth:`LocalSlurm.stop` (also when a test fails), after which the folder is deleted.

Accounting: no ``slurmdbd`` (it needs a MySQL server). ``JobCompType=jobcomp/filetxt`` writes one line per
finished (or requeued) job to a text file, and ``sacct --completion`` (``-c``) reads that file, so
:meth:`LocalSlurm.sacct` answers with the job's final state, exit code and elapsed time.

Usage::

    with LocalSlurm() as slurm:
        job = slurm.sbatch(["experiments/slurm/x.sbatch"], cwd=ROOT, env=...)
        slurm.wait(job)
        print(slurm.sacct(job))
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.system import SLURM_BINARIES, ensure_binaries

#: job states after which a job does not run again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlurmError(RuntimeError):
    """The local cluster did not come up or a command failed; the message carries the daemon logs."""


class LocalSlurm:
    """One-node SLURM (``munged`` + ``slurmctld`` + ``slurmd``) under a private temporary folder.

    Args:
        cpus: CPUs the node advertises (``SlurmdParameters=config_overrides``: more than the machine has
            is fine, so a 2-task job fits on a 1-core runner).
        kill_wait: seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
    """

    def __init__(self, cpus: int = 4, kill_wait: int = 5) -> None:
        ensure_binaries(SLURM_BINARIES)
        self.cpus = cpus
        self.kill_wait = kill_wait
        self.root = Path(tempfile.mkdtemp(prefix="ppd-slurm-"))  # short: unix socket paths <= 108 bytes
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.log"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # -- environment of every client call (and of the jobs: sbatch exports it) ----------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LocalSlurm:
        try:
            self._start_munge()
            self._write_conf()
            for d in ("state", "spool", "log"):
                (self.root / d).mkdir()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=ppdtest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    f"KillWait={self.kill_wait}",
                    "MinJobAge=600",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/filetxt",
                    f"JobCompLoc={self.jobcomp}",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = proc.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmError(f"node not idle after {timeout:.0f} s (state {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM every daemon (then SIGKILL after 10 s), by pid; delete the folder."""
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> list[int]:
        """Pids of the daemons still running."""
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess:
        env = kw.pop("env", None)
        proc = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); {} once purged."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if proc.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for tok in proc.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: str, timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; returns its last ``scontrol`` record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}\n{self.logs()}")

    def sacct(self, job_id: str | None) -> list[dict[str, str]]:
        """Job completion records of a job (``sacct --completion``), one dict per record, oldest first.

        ``None``: every record. Slurm 22.05's ``sacct --completion`` does not parse the array fields of
        ``jobcomp/filetxt`` ("Unknown type ArrayJobId"): array tasks show up under their own job ids.
        """
        fmt = "JobID,JobName,Partition,NCPUS,NNodes,State,ExitCode,Elapsed,Start,End"
        sel = ["-j", job_id] if job_id is not None else []
        proc = self.run(["sacct", "--completion", *sel, "-P", "-n", "--format", fmt])
        keys = fmt.split(",")
        return [dict(zip(keys, line.split("|"), strict=False)) for line in proc.stdout.splitlines() if line]

    def sacct_text(self, job_id: str | None) -> str:
        """Human-readable ``sacct --completion`` table of a job (``None``: all jobs; for reports)."""
        fmt = "JobID,JobName,NCPUS,State,ExitCode,Elapsed"
        sel = ["-j", job_id] if job_id is not None else []
        return self.run(["sacct", "--completion", *sel, "--format", fmt]).stdout

    def logs(self, tail: int = 3000) -> str:
        """The tails of the daemon logs (for error messages)."""
        parts = []
        for f in sorted(self.root.rglob("*.log")) + sorted(self.root.glob("*.stdout")):
            if f.is_file() and f != self.jobcomp:
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
