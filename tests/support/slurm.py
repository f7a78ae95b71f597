"""A one-node Slurm cluster on this machine (Debian's ``slurm-wlm`` and ``munge``): munged, slurmctld and slurmd on
127.0.0.1 and free ports, every file in a temp folder, clients pointed at it through ``SLURM_CONF``. Root only:
slurmd starts jobs as their user."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support.servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def missing() -> str | None:
    """Why no cluster can run here (one line), or None."""
    if absent := [d for d in DAEMONS if not shutil.which(d) and not Path(f"/usr/sbin/{d}").exists()]:
        return f"no Slurm here ({', '.join(absent)} missing: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a one-node Slurm cluster needs root (slurmd starts jobs as their user)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[Path] = []

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""ClusterName=ablate-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
""")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        self._run([_which("munged"), "--force", f"--socket={r}/munge.sock", f"--key-file={key}",
                   f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge.seed"])
        self.pids.append(r / "munged.pid")
        self._run([_which("slurmctld"), "-i"])
        self.pids.append(r / "slurmctld.pid")
        self._run([_which("slurmd")])
        self.pids.append(r / "slurmd.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise AssertionError(f"Slurm not up in {timeout} s: {self.logs()}")

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{cmd[0]}: {done.stdout}{done.stderr}"

    def run(self, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout}{done.stderr}"
        return done.stdout

    def states(self, job: str) -> dict[str, str]:
        """Each task of ``job`` still known to slurmctld: its state (PENDING, RUNNING, COMPLETING ...)."""
        out = self.run("squeue", "-h", "-r", "-j", job, "-o", "%i %T")
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        """Every job cancelled and gone (its processes with it), then the daemons."""
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        deadline = time.time() + 45  # KillWait (30 s) for a job that ignores SIGTERM
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(1)
        for pid_file in reversed(self.pids):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        time.sleep(1)
