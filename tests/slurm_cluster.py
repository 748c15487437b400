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
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge", "iproute2")
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
    """apt-get install slurm-wlm, munge and iproute2 (the two-host cluster's `ip`) when a binary
    is missing (about a minute)."""
    needed = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol", "sinfo", "ip")
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


def _conf_text(workdir: Path, controller: str, slurmd_files: str, extra: str = "") -> str:
    """The slurm.conf lines every test cluster shares. `slurmd_files` names slurmd's pid, log
    and spool files ("slurmd", or "slurmd-%n" for one slurmd per node on this machine)."""
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    spool = workdir / "spool" if slurmd_files == "slurmd" else workdir / "spool" / "%n"
    return f"""\
ClusterName=tests
SlurmctldHost={controller}
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
SlurmdSpoolDir={spool}
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/{slurmd_files}.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/{slurmd_files}.log
GresTypes=gpu
{extra}"""


def _fake_gpus(workdir: Path, nodes: str) -> None:
    """The gpu plugin counts device files: empty files stand in for /dev/nvidia*."""
    devices = workdir / "dev"
    devices.mkdir(exist_ok=True)
    for index in range(FAKE_GPUS):
        (devices / f"gpu{index}").touch()
    (workdir / "gres.conf").write_text(
        f"NodeName={nodes} Name=gpu File={devices}/gpu[0-{FAKE_GPUS - 1}]\n")


def write_conf(workdir: Path) -> Path:
    """slurm.conf + gres.conf for this host. Ports of its own, so that a cluster already on the
    default ports (one `sinfo` cannot find a configuration for) is never talked to."""
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = workdir / "slurm.conf"
    conf.write_text(_conf_text(workdir, host, "slurmd", f"""\
NodeName={host} CPUs={cpus} RealMemory=4000 Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""))
    _fake_gpus(workdir, host)
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


# ------------------------------------------------------------------------- two hosts, one machine
IFNAME = "tonet0"  # the node's network interface, the same name in both namespaces
HOSTS = ("node1", "node2")


@dataclass
class TwoHosts(Cluster):
    """Two SLURM hosts in network namespaces of this machine; see `start_two_hosts`."""

    run_id: str = ""
    addresses: dict[str, str] = field(default_factory=dict)  # node -> its address (NodeAddr)
    namespaces: dict[str, str] = field(default_factory=dict)  # node -> network namespace
    undo: list[list[str]] = field(default_factory=list)  # commands that remove what was made

    def start_slurmd(self, node: str) -> None:
        """slurmd of `node` in its namespace, with a UTS namespace of its own so that `hostname`
        (and everything slurmd starts: the batch shell, srun's tasks, torchrun) says `node`."""
        assert self.conf is not None
        workdir = self.conf.parent
        pidfile = workdir / f"slurmd-{node}.pid"
        (workdir / "spool" / node).mkdir(parents=True, exist_ok=True)
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup
        # filesystems slurmd needs. The node's /etc/hosts is bound in a mount namespace of its own.
        script = (f'mount --bind {workdir / "hosts"} /etc/hosts && hostname {node} && '
                  f'exec slurmd -f {self.conf} -N {node}')
        subprocess.run(["nsenter", f"--net=/run/netns/{self.namespaces[node]}", "unshare",
                        "--uts", "--mount", "--propagation", "private", "sh", "-c", script],
                       check=True, env=self.env, capture_output=True, timeout=60)
        self.started.append((f"slurmd {node}", pidfile))
        _check_running(f"slurmd {node}", pidfile, self.conf.parent / f"slurmd-{node}.log")

    def pids(self, node: str) -> list[int]:
        """Every process in the node's network namespace."""
        done = subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True,
                              text=True)
        return [int(pid) for pid in done.stdout.split()]

    def signal(self, node: str, signum: int, match: str | None = None) -> list[int]:
        """`signum` to the node's processes whose command line contains `match` (all: None)."""
        sent = []
        for pid in self.pids(node):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if match is None or match in command:
                try:
                    os.kill(pid, signum)
                    sent.append(pid)
                except ProcessLookupError:
                    pass
        return sent

    def slurmd_running(self, node: str) -> bool:
        """Whether `node`'s slurmd (the one start_slurmd started) is alive."""
        assert self.conf is not None
        try:
            pid = int((self.conf.parent / f"slurmd-{node}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _alive(pid)

    def lose(self, node: str, workers: str) -> list[int]:
        """The node is lost at once: all of its processes are stopped (so none reports anything
        to the other node or to slurmctld), its workers (command lines with `workers`) killed,
        then slurmd and the rest. Returns the workers' pids."""
        self.signal(node, signal.SIGSTOP)
        killed = self.signal(node, signal.SIGKILL, workers)
        self.signal(node, signal.SIGKILL)
        return killed

    def log(self, daemon: str) -> str:
        """The log of `slurmctld` or `slurmd-<node>`."""
        assert self.conf is not None
        return (self.conf.parent / f"{daemon}.log").read_text(errors="replace")

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            if states.split()[1::2] == ["idle"] * len(HOSTS):
                return
            time.sleep(0.5)
        assert self.conf is not None
        logs = "\n".join(_tail(self.conf.parent / f"slurmd-{n}.log") for n in HOSTS)
        raise AssertionError(f"the nodes did not become idle (sinfo: {states!r}):\n{logs}")

    def stop(self) -> None:
        """The daemons (by pid), every process left in the namespaces, then the namespaces, the
        links and the files that were made, and nothing else."""
        # SIGKILL: the daemons' state is thrown away with the cluster, and a slurmd takes seconds
        # to stop on SIGTERM.
        for node in self.namespaces:
            self.signal(node, signal.SIGKILL)
        super().stop()
        for command in reversed(self.undo):
            subprocess.run(command, capture_output=True)
        self.undo.clear()


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path.name})"


def _ip(cluster: TwoHosts, *args: str, undo: list[str] | None = None) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()} (network "
                          f"namespaces need root or CAP_NET_ADMIN)")
    if undo:
        cluster.undo.append(undo)


def _subnet() -> str:
    """A 10.x.y.0/24 that no route of this machine covers."""
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    rng = random.Random()
    for _ in range(100):
        prefix = f"10.{rng.randrange(200, 250)}.{rng.randrange(1, 250)}"
        if f"{prefix}." not in routes:
            return prefix
    raise Unavailable("no free 10.x.y.0/24 subnet for the test hosts")


def start_two_hosts(workdir: Path, munge: Cluster | None = None) -> TwoHosts:
    """Two SLURM hosts on this machine: network namespaces `tobj-<id>-node1/2`, each with a veth
    (`tonet0`, 10.x.y.2 and .3) on a bridge `tobjbr<id>` (10.x.y.1, where slurmctld listens, in
    this namespace), its own /etc/hosts (bound over the machine's in a mount namespace) and its
    own hostname (a UTS namespace), one slurmd each; munge is this machine's. Each node declares the
    machine's CPUs and 8 GPUs by count. `stop()` undoes all of it, also after a failed start;
    `Unavailable` when namespaces cannot be made (no privilege). A munged started here is left to
    `munge.stop()` when `munge` is given: another cluster of the session may use it longer."""
    install_packages()
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        raise Unavailable("`ip` (iproute2) or `unshare` is missing: no network namespaces")
    run_id = secrets.token_hex(3)
    prefix = _subnet()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = TwoHosts(env={}, conf=workdir / "slurm.conf", run_id=run_id)
    cluster.env = dict(os.environ, SLURM_CONF=str(cluster.conf))
    try:
        bridge = f"tobjbr{run_id}"
        _ip(cluster, "link", "add", bridge, "type", "bridge", undo=["ip", "link", "del", bridge])
        _ip(cluster, "addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip(cluster, "link", "set", bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{prefix}.{index + 2} {node}\n" for index, node in enumerate(HOSTS))
        (workdir / "hosts").write_text(hosts)
        for index, node in enumerate(HOSTS):
            namespace, veth = f"tobj-{run_id}-{node}", f"tobj{run_id}v{index + 1}"
            address = f"{prefix}.{index + 2}"
            _ip(cluster, "netns", "add", namespace, undo=["ip", "netns", "del", namespace])
            cluster.namespaces[node], cluster.addresses[node] = namespace, address
            _ip(cluster, "link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns",
                namespace, undo=["ip", "link", "del", veth])
            _ip(cluster, "link", "set", veth, "master", bridge, "up")
            _ip(cluster, "-n", namespace, "addr", "add", f"{address}/24", "dev", IFNAME)
            _ip(cluster, "-n", namespace, "link", "set", IFNAME, "up")
            _ip(cluster, "-n", namespace, "link", "set", "lo", "up")
        cpus = os.cpu_count() or 1
        nodes = "".join(f"NodeName={node} NodeAddr={address} NodeHostname={node} CPUs={cpus} "
                        f"RealMemory=4000 Gres=gpu:{FAKE_GPUS} State=UNKNOWN\n"
                        for node, address in cluster.addresses.items())
        host = socket.gethostname().split(".")[0]
        # A lost node is marked after SlurmdTimeout (300 s by default) without an answer.
        cluster.conf.write_text(_conf_text(workdir, f"{host}({prefix}.1)", "slurmd-%n", f"""\
SlurmdTimeout=10
{nodes}PartitionName=debug Nodes={",".join(HOSTS)} Default=YES MaxTime=INFINITE State=UP
"""))
        _fake_gpus(workdir, ",".join(HOSTS))
        start_munged(munge or cluster)
        subprocess.run(["slurmctld", "-c", "-f", str(cluster.conf)], check=True, env=cluster.env,
                       capture_output=True, timeout=60)
        cluster.started.append(("slurmctld", workdir / "slurmctld.pid"))
        _check_running("slurmctld", workdir / "slurmctld.pid", workdir / "slurmctld.log")
        for node in HOSTS:
            cluster.start_slurmd(node)
        cluster.wait_idle()
        return cluster
    except BaseException:
        cluster.stop()
        raise
