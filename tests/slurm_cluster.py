"""A one-node SLURM for the tests: Debian's slurm-wlm + munge, started here when none answers.

`ensure_cluster(workdir)` returns a `Cluster`. When `sinfo` already answers (a cluster, or one
left by an earlier session), that one is used and nothing is started or stopped. Otherwise the
packages are installed when missing (apt-get), munged is started as the munge user, a slurm.conf
for this host is written under `workdir`, and slurmctld + slurmd are started; `Cluster.stop()`
ends exactly those daemons, by the process ids in their pidfiles.

The node is `NodeName=<hostname -s> CPUs=<nproc>` with `Gres=gpu:8` declared by count only (no
device files): enough for slurmctld to accept and place `--gpus-per-node=8` in `--test-only`
checks of the GPU scripts, never used to run anything on a GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
FAKE_GPUS = 8


class Unavailable(RuntimeError):
    """SLURM cannot be set up here (no apt to install it with): the tests skip with this."""


@dataclass
class Cluster:
    env: dict[str, str]
    conf: Path | None = None  # None: a pre-existing cluster's own configuration
    started: list[tuple[str, Path]] = field(default_factory=list)  # (daemon, pidfile)

    def run(self, *args: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster; `env` adds to the cluster's."""
        done = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd,
                              env={**self.env, **(env or {})}, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def stop(self) -> None:
        """Stop the daemons this module started (newest first), by pid; wait for them to go."""
        for _daemon, pidfile in reversed(self.started):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours would still answer kill(0): read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _answers(env: dict[str, str]) -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%N %t"], capture_output=True, text=True,
                              env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def install_packages() -> None:
    """apt-get install slurm-wlm munge when a binary is missing (about a minute)."""
    needed = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol", "sinfo")
    if all(shutil.which(tool) for tool in needed):
        return
    if shutil.which("apt-get") is None:
        raise Unavailable("SLURM is not installed and there is no apt-get to install "
                          "slurm-wlm and munge with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
    install = subprocess.run(["apt-get", "install", "-y", *PACKAGES],
                             capture_output=True, text=True, env=env)
    if install.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n"
                          f"{update.stderr[-1500:]}\n{install.stderr[-3000:]}")


def _munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def start_munged(cluster: Cluster) -> None:
    """munged as the munge user, with a key that only munge can read."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey"):
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        else:
            key.write_bytes(os.urandom(1024))
    for folder, mode in (("/etc/munge", 0o700), ("/run/munge", 0o755), ("/var/lib/munge", 0o711),
                         ("/var/log/munge", 0o700)):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
        Path(folder).chmod(mode)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)  # munged refuses a key that others can read
    pidfile = Path("/run/munge/munged.pid")
    subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
    cluster.started.append(("munged", pidfile))
    deadline = time.time() + 20
    while time.time() < deadline and not _munge_works():
        time.sleep(0.2)
    if not _munge_works():
        raise AssertionError("munged started but `munge -n | unmunge` does not work")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def write_conf(workdir: Path) -> Path:
    """slurm.conf + gres.conf for this host. Ports of its own, so that a cluster already on the
    default ports (one `sinfo` cannot find a configuration for) is never talked to."""
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "slurm.conf"
    conf.write_text(f"""\
ClusterName=tests
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (60 s / 30 s by default): a requeued job restarts soon.
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds (120 by default) before it may start again.
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=600
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory=4000 Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    # The gpu plugin counts device files: empty files stand in for /dev/nvidia*.
    devices = workdir / "dev"
    devices.mkdir(exist_ok=True)
    for index in range(FAKE_GPUS):
        (devices / f"gpu{index}").touch()
    (workdir / "gres.conf").write_text(
        f"NodeName={host} Name=gpu File={devices}/gpu[0-{FAKE_GPUS - 1}]\n")
    return conf


def _check_running(daemon: str, pidfile: Path, logfile: Path) -> None:
    """The daemons fork into the background before they can fail: look for them a while."""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if _alive(int(pidfile.read_text().split()[0])):
                time.sleep(1)  # a bad port or config stops it within a moment of starting
                if _alive(int(pidfile.read_text().split()[0])):
                    return
                break
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    log = logfile.read_text()[-2000:] if logfile.exists() else "(no log)"
    raise AssertionError(f"{daemon} did not keep running:\n{log}")


def ensure_cluster(workdir: Path) -> Cluster:
    """A cluster that answers `sinfo` with an idle node; see the module docstring."""
    if _answers(dict(os.environ)):
        return Cluster(env=dict(os.environ))
    install_packages()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = write_conf(workdir)
    cluster = Cluster(env=dict(os.environ, SLURM_CONF=str(conf)), conf=conf)
    try:
        start_munged(cluster)
        for daemon, pidfile in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            # -c: a clean state, so no job of an earlier session comes back.
            args = [daemon, "-f", str(conf)] + (["-c"] if daemon == "slurmctld" else [])
            subprocess.run(args, check=True, env=cluster.env, capture_output=True, timeout=60)
            cluster.started.append((daemon, workdir / pidfile))
            _check_running(daemon, workdir / pidfile, workdir / f"{daemon}.log")
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            done = cluster.run("sinfo", "-h", "-o", "%t", check=False)
            state = done.stdout.strip()
            if state.startswith("idle"):
                return cluster
            time.sleep(0.5)
        log = (workdir / "slurmd.log").read_text()[-2000:] if (workdir / "slurmd.log").exists() \
            else ""
        raise AssertionError(f"the node did not become idle (sinfo: {state!r}):\n{log}")
    except BaseException:
        cluster.stop()
        raise
