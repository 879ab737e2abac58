"""A throwaway single-node SLURM cluster on localhost (Debian ``slurm-wlm`` + ``munge``), for tests.

Everything lives in one temporary folder: its own munge key and socket, ``slurm.conf`` on free
ports, state, spool and logs; clients find it through ``SLURM_CONF``. It needs root (slurmd runs
jobs as their owner). Stopping cancels every job, then ends exactly the daemons it started.

    sudo python tests/slurm_cluster.py      # start one, print the SLURM_CONF to export; Ctrl-C stops it
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)] + [
        name for name in CLIENTS if shutil.which(name) is None
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return int(total_kb / 1024 * 0.8)  # below the real size, or slurmd drains the node


def slurm_conf(root: Path, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=vampnet-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Job:
    """A job as ``scontrol show job`` sees it."""

    id: str
    fields: dict = field(default_factory=dict)

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", 0))

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "")


class LocalSlurm:
    """Start with :meth:`start` (or as a context manager); every client call goes through :meth:`run`."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="vampnet-slurm-"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, cpus: int | None = None, timeout: float = 60.0) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise ClusterError("a local SLURM cluster needs root (slurmd)")
        if missing := missing_binaries():
            raise ClusterError(f"missing {', '.join(missing)}: apt-get install slurm-wlm munge")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", "-F", "--force", f"--key-file={key}", f"--socket={self.root}/munge.sock",
                    f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                    f"--seed-file={self.root}/munged.seed")
        self._wait(lambda: (self.root / "munge.sock").exists(), 10, "munged did not create its socket")
        self.conf.write_text(slurm_conf(self.root, cpus or os.cpu_count() or 2, _memory_mb(), _free_port(), _free_port()))
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", "localhost")
        try:
            self._wait(lambda: self.node_state() == "idle", timeout, "the node never became idle")
        except ClusterError:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.stdout", "ab")
        self.processes[name] = subprocess.Popen([DAEMONS[name], *args], stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ClusterError(f"{name} exited with {process.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"{message} within {timeout:.0f} s:\n{self.logs()}")

    def run(self, *args: str, check: bool = True, env: dict | None = None, timeout: float = 60) -> str:
        merged = {**os.environ, **(env or {}), **self.env}
        done = subprocess.run(args, capture_output=True, text=True, env=merged, timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(args)} -> {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-N", "-o", "%t", timeout=10).strip()
        except (ClusterError, subprocess.TimeoutExpired):
            return ""

    def job(self, job_id: str) -> Job:
        jobs = self.jobs(job_id)
        return jobs[0] if jobs else Job(job_id)

    def jobs(self, job_id: str) -> list[Job]:
        """The job, or every task of an array job."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [Job(f["JobId"], f) for f in (dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()) if f]

    def wait(self, job_id: str, timeout: float, states: set[str] = FINAL_STATES) -> list[Job]:
        """Poll until the job (every task of an array) is in one of ``states``; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if jobs and all(j.state in states for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
                                   f"{[(j.id, j.state) for j in jobs]}\n{self.logs()}")
            time.sleep(1)

    def wait_for_restart(self, job_id: str, restarts: int, timeout: float) -> Job:
        """Wait until a requeued job runs again. Slurm holds a requeued job for about two minutes
        before it may start (its BeginTime); this cluster lets it start at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.restarts >= restarts and job.state == "PENDING" and job.fields.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if job.restarts >= restarts and job.state in {"RUNNING", *FINAL_STATES}:
                return job
            time.sleep(1)
        raise ClusterError(f"job {job_id} did not restart {restarts} time(s) within {timeout:.0f} s: "
                           f"{self.job(job_id).fields}")

    def task_pids(self, job_id: str, command: str) -> dict[int, int]:
        """{SLURM_PROCID: pid} of the job's processes on this node whose command line contains ``command``."""
        pids = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if command not in cmdline:
                    continue
                variables = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            except OSError:
                continue
            if variables.get("SLURM_JOB_ID") == job_id and "SLURM_PROCID" in variables:
                pids[int(variables["SLURM_PROCID"])] = int(proc.name)
        return pids

    def cancel_all(self, timeout: float = 60) -> None:
        self.run("scancel", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
            time.sleep(1)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (ClusterError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with LocalSlurm() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
