"""A small "cloud" on this machine for Ray's cluster launcher: `ray up` with Ray's `local` node provider.

Each node is an SSH server on its own loopback address (127.x.y.z, port 22 as Ray's SSH needs) that runs in its
own PID and mount namespace: `ray stop` on one node then sees only that node's processes, as on a separate
machine (and never anyone else's Ray on this machine), and stopping the node's namespace stops everything the
node started, as terminating an instance does. A node's "machine image" is its home folder: a `~/.bashrc` (Ray's
SSH commands source it) that puts a node virtual environment first on PATH and sets what an instance would get
from its cloud (the S3 endpoint and credentials, its address). The node virtual environment sees the packages of
the interpreter running the tests (a ``.pth`` file), as a deep-learning image has torch preinstalled; the setup
commands of ray_cluster.yaml install the project into it from a git snapshot of this working tree.

`derive_config` turns ray_cluster.yaml into the config for these nodes: same setup and start commands, with the
provider, node addresses, ports, repository URL and bucket substituted (see its docstring).
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_CONFIG = REPO / "ray_cluster.yaml"
REPO_URL = "git+https://github.com/CHANGE-ME/supervit-pipeline.git@main"
BUCKET_URI = "s3://CHANGE-ME-bucket"
HEAD_ADDRESS = "$(hostname -I | awk '{print $1}')"  # how ray_cluster.yaml finds the head's private address
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "dashboard", "monitor", "log_monitor", "ray::")
SNAPSHOT_LIMIT = 256 * 2**20  # the project's own files come to a few MB


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def loopback_addresses(n: int) -> list[str]:
    """``n`` random loopback addresses 127.a.b.c on which port 22 is free (other test runs pick others)."""
    rng = random.Random()
    while True:
        a, b = rng.randrange(100, 250), rng.randrange(1, 250)
        ips = [f"127.{a}.{b}.{10 + i}" for i in range(n)]
        if all(_port_is_free(ip, 22) for ip in ips):
            return ips


def proc_table() -> list[tuple[int, str, int, str]]:
    """(pid, PID namespace, pid inside that namespace, command line) of every live process on this machine
    (zombies left out), from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            ns = os.readlink(f"/proc/{entry.name}/ns/pid")
            with open(f"/proc/{entry.name}/status") as f:
                ns_pid = next(int(line.split()[-1]) for line in f if line.startswith("NSpid:"))
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, StopIteration, ValueError):
            continue
        out.append((int(entry.name), ns, ns_pid, cmd))
    return out


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_status(url: str, headers: dict | None = None, timeout: float = 5.0) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


# ------------------------------------------------------------------------------------------ the derived config


def derive_config(
    source: dict,
    *,
    cluster_name: str,
    head_ip: str,
    worker_ips: list[str],
    ssh_user: str,
    ssh_private_key: str,
    repo_url: str,
    bucket: str,
    gcs_port: int,
    dashboard_port: int,
    client_port: int,
    mlflow_port: int,
) -> dict:
    """The cluster config for the local nodes, from ray_cluster.yaml (``source``), substituting only:

    - the provider (``local`` with these addresses), the SSH login, the cluster name (unique: Ray keys its SSH
      control sockets and state files by it) and the node types (the local provider has one node type; the head
      type's ``resources`` go to the head's ``ray start`` through ``RAY_OVERRIDE_RESOURCES``, which is how Ray's
      cloud providers apply them, so the head still trains nothing);
    - the repository URL (a git snapshot of this working tree) and the bucket (the local S3 server);
    - ports (6379, 8265, 10001, 5000 would clash with other Ray and MLflow instances on this machine) and node
      addresses: the head's address is ``$NODE_IP`` instead of the first address of ``hostname -I``, and every
      ``ray start`` gets ``--node-ip-address=$NODE_IP`` and its own dashboard-agent port, since all nodes share
      one network stack here (Ray would otherwise pick the machine's address for every node).

    Every other line, setup and start commands included, is the source's. A substitution that no longer
    matches raises, so a changed ray_cluster.yaml cannot silently drift from what this test runs.
    """
    cfg = copy.deepcopy(source)
    head_type = cfg.pop("head_node_type")
    types = cfg.pop("available_node_types")
    head_resources = types[head_type].get("resources") or {}
    cfg["cluster_name"] = cluster_name
    cfg["provider"] = {"type": "local", "head_ip": head_ip, "worker_ips": list(worker_ips)}
    cfg["auth"] = {"ssh_user": ssh_user, "ssh_private_key": ssh_private_key}
    cfg["max_workers"] = len(worker_ips)

    def sub(key: str, old: str, new: str, count: int | None = None) -> None:
        cmds = cfg[key]
        found = sum(c.count(old) for c in cmds)
        if not found or (count is not None and found != count):
            raise ValueError(f"ray_cluster.yaml changed: {old!r} found {found}x in {key}, expected {count or '>0'}")
        cfg[key] = [c.replace(old, new) for c in cmds]

    sub("setup_commands", REPO_URL, repo_url, 1)
    head_flags = (
        f" --node-ip-address=$NODE_IP --dashboard-agent-listen-port=$NODE_AGENT_PORT"
        f" --dashboard-port={dashboard_port} --ray-client-server-port={client_port}"
    )
    override = f"RAY_OVERRIDE_RESOURCES='{json.dumps(head_resources)}' " if head_resources else ""
    sub("head_start_ray_commands", "--port=6379", f"--port={gcs_port}", 1)
    sub("head_start_ray_commands", "ray start --head", f"{override}ray start --head{head_flags}", 1)
    sub("head_start_ray_commands", HEAD_ADDRESS, "$NODE_IP")
    sub("head_start_ray_commands", ":5000", f":{mlflow_port}")
    sub("head_start_ray_commands", "--port 5000", f"--port {mlflow_port}", 1)
    sub("head_start_ray_commands", BUCKET_URI, bucket, 1)
    sub("worker_start_ray_commands", ":6379", f":{gcs_port}", 1)
    sub("worker_start_ray_commands", ":5000", f":{mlflow_port}", 1)
    sub(
        "worker_start_ray_commands",
        "ray start --address=",
        "ray start --node-ip-address=$NODE_IP --dashboard-agent-listen-port=$NODE_AGENT_PORT --address=",
        1,
    )
    return cfg


# ------------------------------------------------------------------------------------------------- the nodes


@dataclass
class Node:
    """One SSH-reachable "machine": an sshd in its own PID + mount namespace, with its own home folder."""

    name: str
    ip: str
    dir: Path
    agent_port: int
    proc: subprocess.Popen | None = None
    ns: str = ""  # the PID namespace, as /proc/<pid>/ns/pid reads

    @property
    def home(self) -> Path:
        return self.dir / "home"

    def init_pid(self) -> int | None:
        """The namespace's PID 1 (the sshd), as this machine numbers it."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def processes(self) -> list[tuple[int, int, str]]:
        """(pid, pid as the node sees it, command line) of every live process of the node, its sshd included."""
        return [(pid, ns_pid, cmd) for pid, ns, ns_pid, cmd in proc_table() if ns == self.ns]

    def stop(self) -> None:
        """Terminate the machine: killing ``unshare`` kills the namespace's PID 1, and with it every process of
        the namespace (the kernel does that when a PID namespace's init dies)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)  # unshare ignores SIGTERM; --kill-child passes SIGKILL on
        self.proc.wait(timeout=30)
        wait_until(lambda: not self.processes(), 30, f"the processes of node {self.name} to end", 0.2)


@dataclass
class LocalCloud:
    """The nodes, the S3 server, the SSH key and the client side (``HOME`` with the two secrets) of one test."""

    n_workers: int = 1
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="svt-", dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    moto: subprocess.Popen | None = None
    started: list[subprocess.Popen] = field(default_factory=list)
    mlflow_user: str = "admin"
    mlflow_password: str = field(default_factory=lambda: os.urandom(16).hex())

    def __post_init__(self) -> None:
        # Short paths: Ray's Unix sockets live under each node's TMPDIR and must stay under 108 characters.
        self.cluster_name = f"svt-{self.base.name.removeprefix('svt-')}"
        self.bucket = "supervit-test"
        self.key = self.base / "id_ed25519"
        self.client_home = self.base / "client"
        self.s3_port = free_port()
        self.gcs_port, self.dashboard_port, self.client_port, self.mlflow_port = (free_port() for _ in range(4))

    # ------------------------------------------------------------------------------------------ start / stop

    def start(self) -> LocalCloud:
        """SSH key, S3 server with the bucket, client home with the secrets, git snapshot, and the nodes."""
        missing = [t for t in ("/usr/sbin/sshd", shutil.which("rsync"), shutil.which("unshare")) if not t]
        if missing or not Path("/usr/sbin/sshd").exists():
            raise RuntimeError(
                "the cluster test needs openssh-server, rsync and unshare (apt-get install "
                "openssh-server rsync); .ci/run installs them"
            )
        if os.geteuid() != 0:
            raise RuntimeError("the cluster test runs its nodes in PID namespaces: run it as root (as CI does)")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self._start_s3()
        self._client_secrets()
        self.repo_url = self._snapshot()
        self.ips = loopback_addresses(1 + self.n_workers)
        for i, ip in enumerate(self.ips):
            self.nodes.append(self._start_node("head" if i == 0 else f"w{i}", ip))
        return self

    def stop(self) -> None:
        """Stop every node and the S3 server by pid; remove every file this cloud wrote."""
        for node in self.nodes:
            node.stop()
        for proc in [*self.started, self.moto]:
            if proc is not None and proc.poll() is None:
                _kill_group(proc)
        # The SSH control sockets of this cluster (Ray keys their folder by user and cluster name).
        user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        cluster_hash = hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10]
        shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Processes on this machine that this cloud started and that still run (none, after `stop`)."""
        mine = {p.pid for p in [*self.started, self.moto] if p is not None}
        namespaces = {n.ns for n in self.nodes if n.ns}
        return [
            f"{pid} {cmd[:160]}"
            for pid, ns, _, cmd in proc_table()
            if pid in mine or ns in namespaces or str(self.base) in cmd
        ]

    def _start_s3(self) -> None:
        """moto's S3 server on 127.0.0.1 (the bucket's stand-in) with the bucket created."""
        log = open(self.base / "s3.log", "w")  # noqa: SIM115 - the server writes it until stopped
        self.moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: http_status(self.s3_url) == 200, 60, "the S3 server", 0.2)
        self.s3().create_bucket(Bucket=self.bucket)

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def s3(self):
        """A boto3 S3 client of the local S3 server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def _client_secrets(self) -> None:
        """The client's HOME: Ray's token (``ray get-auth-token --generate``) and ~/.supervit/mlflow.env."""
        (self.client_home / "tmp").mkdir(parents=True)
        self.ray_cli("get-auth-token", "--generate", check=True)
        env_file = self.client_home / ".supervit" / "mlflow.env"
        env_file.parent.mkdir()
        env_file.write_text(
            f"MLFLOW_TRACKING_USERNAME={self.mlflow_user}\nMLFLOW_TRACKING_PASSWORD={self.mlflow_password}\n"
        )
        env_file.chmod(0o600)
        self.ray_token = (self.client_home / ".ray" / "auth_token").read_text().strip()

    def _snapshot(self) -> str:
        """A git repository holding this working tree as it is (committed or not) on branch ``main``."""
        snap = self.base / "repo"
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.split(b"\0")
        # A virtual environment or run outputs that .gitignore misses would be copied, committed and cloned by every
        # node (a 9 GB venv held `ray up` for half an hour): stop at once and say what to ignore.
        sizes = {}
        for f in filter(None, files):
            try:
                st = (REPO / f.decode()).stat()
            except (FileNotFoundError, NotADirectoryError):  # listed, then gone (a run's output being rewritten)
                continue
            if stat.S_ISREG(st.st_mode):
                sizes[f.decode()] = st.st_size
        if sum(sizes.values()) > SNAPSHOT_LIMIT:
            tops: dict[str, int] = {}
            for p, n in sizes.items():
                tops[p.split("/")[0]] = tops.get(p.split("/")[0], 0) + n
            big = ", ".join(f"{t} ({n / 2**20:.0f} MB)" for t, n in sorted(tops.items(), key=lambda kv: -kv[1])[:3])
            raise RuntimeError(
                f"the working tree's files that git does not ignore come to {sum(sizes.values()) / 2**20:.0f} MB "
                f"(largest: {big}): add what is not the project to .gitignore"
            )
        for f in sizes:
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, snap / f)
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "-q"], cwd=snap, check=True)
        subprocess.run([*git, "add", "-A"], cwd=snap, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=snap, check=True)
        # pip's URL parser wants a host in a git+file URL; git reads file://localhost/... as the local path.
        return f"git+file://localhost{snap}@main"

    def _node_image(self, node: Node) -> None:
        """The node's home (``~/.bashrc``) and its virtual environment."""
        venv = node.dir / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        base_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        (site / "_base_image.pth").write_text("".join(f"{p}\n" for p in base_paths))
        # Console scripts of the preinstalled packages (ray, mlflow, ...), run by the node's interpreter, so that
        # Ray's workers (which use the interpreter of `ray start`) import the project installed on the node.
        scripts = Path(sysconfig.get_paths()["scripts"])
        for script in scripts.iterdir():
            target = venv / "bin" / script.name
            if target.exists() or not script.is_file():
                continue
            try:
                first, rest = script.read_bytes().split(b"\n", 1)
            except (OSError, ValueError):
                continue
            if first.startswith(b"#!") and b"python" in first:
                target.write_bytes(b"#!" + str(venv / "bin" / "python").encode() + b"\n" + rest)
                target.chmod(0o755)
        tmp = node.home / "tmp"
        tmp.mkdir(parents=True)
        env = {
            "PATH": f"{venv / 'bin'}:$PATH",
            "NODE_IP": node.ip,  # the instance's private address
            "NODE_AGENT_PORT": str(node.agent_port),
            "TMPDIR": str(tmp),  # Ray's session folders, per node
            # What an instance profile and the region give a cloud node: S3 access, here to the local server.
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            # MLflow's default Host allow-list covers localhost and private ranges (a VPC), not 127.a.b.c.
            "MLFLOW_SERVER_ALLOWED_HOSTS": f"{self.ips[0]}:{self.mlflow_port},localhost:*",
            # The image has every dependency: pip must not reach out for any (nor for build tools).
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INDEX": "1",
            "PIP_NO_BUILD_ISOLATION": "0",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # Nothing leaves this machine.
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        (node.home / ".bashrc").write_text("".join(f'export {k}="{v}"\n' for k, v in env.items()))

    def _start_node(self, name: str, ip: str) -> Node:
        node = Node(name=name, ip=ip, dir=self.base / name, agent_port=free_port())
        node.dir.mkdir()
        self._node_image(node)
        host_key = node.dir / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        (node.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        conf = node.dir / "sshd_config"
        conf.write_text(
            f"ListenAddress {ip}:22\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {node.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nPrintMotd no\nAllowTcpForwarding yes\n"
            "MaxSessions 50\nMaxStartups 50\n"
        )
        # The node's own home for this user: a copy of /etc/passwd naming it, bind-mounted over /etc/passwd inside
        # the node's mount namespace only. sshd sets HOME from it, and ssh expands `-i ~/ray_bootstrap_key.pem`
        # (how the head's autoscaler reaches the workers) with it, not with $HOME.
        uid = os.getuid()
        lines = Path("/etc/passwd").read_text().splitlines()
        for i, line in enumerate(lines):
            parts = line.split(":")
            if len(parts) == 7 and parts[2] == str(uid):
                parts[5] = str(node.home)
                lines[i] = ":".join(parts)
        (node.dir / "passwd").write_text("\n".join(lines) + "\n")
        # /run/sshd (sshd's privilege-separation folder) on a tmpfs private to the node's mount namespace.
        init = (
            f"mount --bind {node.dir / 'passwd'} /etc/passwd && mount -t tmpfs -o mode=755 tmpfs /run && "
            f"mkdir -m 755 /run/sshd && exec /usr/sbin/sshd -D -e -f {conf}"
        )
        node.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "bash", "-c", init],
            stdout=open(node.dir / "sshd.log", "w"),  # noqa: SIM115 - sshd writes it until stopped
            stderr=subprocess.STDOUT,
        )
        pid = wait_until(node.init_pid, 10, f"node {name}'s namespace", 0.05)
        node.ns = os.readlink(f"/proc/{pid}/ns/pid")
        wait_until(lambda: not _port_is_free(ip, 22), 10, f"sshd on {ip}", 0.05)
        return node

    # ------------------------------------------------------------------------------------------- the client

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.head.ip}:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """The environment of the machine that runs `ray up`: its own HOME (the secrets) and temp folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update(
            HOME=str(self.client_home),
            TMPDIR=str(self.client_home / "tmp"),
            RAY_AUTH_MODE="token",
            # Ray 2.60's autoscaler v2 (the default of `ray up` since 2.50) never launches the workers of a
            # `local` provider (it logs "Adding 1 node(s)" forever and loses the head, whose state file only the
            # v1 autoscaler records); cloud providers are unaffected. The v1 autoscaler runs the same commands.
            RAY_UP_enable_autoscaler_v2="0",
            RAY_USAGE_STATS_ENABLED="0",
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
        )
        return env

    def ray_cli(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """`ray ARGS` on the client side, output captured."""
        ray = Path(sys.executable).parent / "ray"
        res = subprocess.run(
            [str(ray), *args],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({res.returncode}):\n{tail(res)}")
        return res

    def ray_cli_background(self, *args: str, log: str) -> subprocess.Popen:
        """`ray ARGS` left running (in its own process group, stopped with the cloud)."""
        return self.start_process([str(Path(sys.executable).parent / "ray"), *args], log=log)

    def start_process(self, cmd: list[str], log: str) -> subprocess.Popen:
        """A client-side command left running (in its own process group, stopped by pid with the cloud)."""
        proc = subprocess.Popen(
            cmd,
            env=self.client_env(),
            stdout=open(self.base / log, "w"),  # noqa: SIM115 - the process writes it until stopped
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def head_log(self, relative: str, lines: int = 40) -> str:
        """The last lines of a file in the head's home (e.g. ``tmp/ray/session_latest/logs/monitor.log``)."""
        path = self.head.home / relative
        if not path.exists():
            return f"({relative}: no such file)"
        return f"--- {relative}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def tail(res: subprocess.CompletedProcess, lines: int = 60) -> str:
    """The last lines of a finished command's output."""
    text = (res.stdout or "") + (res.stderr or "")
    return "\n".join(text.splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with its children, by pid."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
