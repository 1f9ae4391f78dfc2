"""A three-node RabbitMQ cluster on one machine, on loopback ports, for tests and benchmarks.

    python scripts/cluster.py up        # start rabbit1..3@localhost and join them (idempotent)
    python scripts/cluster.py status    # what runs, which nodes are in the cluster
    python scripts/cluster.py down      # stop the three nodes (by their own PIDs) and remove their data
    python scripts/cluster.py stop-node rabbit2 [--kill]   # fault tests: stop (or kill -9) one node
    python scripts/cluster.py start-node rabbit2            # start it again (it rejoins from its data)
    python scripts/cluster.py node-up --name rabbitf --port 5691   # one extra standalone node
    python scripts/cluster.py node-down --name rabbitf

Node ``rabbitN@localhost`` (N = 1..3): AMQP 127.0.0.1:568N, distribution 2568N, management
1568N. A standalone node on AMQP port P uses distribution P+20000 and management P+10000.
All of them are distinct from the default node ``rabbit@localhost`` (5672/25672/15672), which
this script never touches: every node here has its own RABBITMQ_NODENAME, ports,
RABBITMQ_MNESIA_BASE, RABBITMQ_LOG_BASE, RABBITMQ_CONFIG_FILE, RABBITMQ_ENABLED_PLUGINS_FILE,
RABBITMQ_CONF_ENV_FILE (so /etc/rabbitmq/rabbitmq-env.conf is not read) and RABBITMQ_PID_FILE,
under ``.qaflow/cluster/<name>/`` (owned by the ``rabbitmq`` user). A node is stopped with
``rabbitmqctl -n NAME@localhost stop`` or, failing that, by the PID in its own pid file.

Erlang cookie: the nodes run as the ``rabbitmq`` user with HOME=/var/lib/rabbitmq and so share
that user's cookie with the default node (nodes of one cluster must share a cookie, and the
Debian ``rabbitmqctl`` wrapper always runs as that user). The cookie only lets nodes talk; no
node here is ever joined to, or pointed at, ``rabbit@localhost``. epmd (4369) is shared.

``up`` writes ``.qaflow/cluster.env`` (QA_CLUSTER_AMQP_URLS, QA_CLUSTER_MANAGEMENT_URLS,
QA_CLUSTER_NODES, and QA_TICK_QUEUE=quorum: replicated tick shards) for the tests, benchmarks and
``make cluster-test``.
Exit codes: 0 done, 3 a node could not be started or joined.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("QA_CLUSTER_DIR", ROOT / ".qaflow" / "cluster"))
ENV_FILE = ROOT / ".qaflow" / "cluster.env"
HOST = "localhost"
RABBIT_USER = "rabbitmq"
RABBIT_HOME = "/var/lib/rabbitmq"
PLUGINS = ("rabbitmq_management", "rabbitmq_consistent_hash_exchange")
CLUSTER = ("rabbit1", "rabbit2", "rabbit3")
FORBIDDEN_PORTS = {5672, 25672, 15672, 4369}
SBIN = "/usr/lib/rabbitmq/bin"


def say(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Node:
    name: str
    port: int

    @property
    def node(self) -> str:
        return f"{self.name}@{HOST}"

    @property
    def dist_port(self) -> int:
        return self.port + 20000

    @property
    def mgmt_port(self) -> int:
        return self.port + 10000

    @property
    def dir(self) -> Path:
        return BASE / self.name

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbitmq.pid"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def mgmt_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    def env(self) -> dict[str, str]:
        d = self.dir
        return {
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "HOME": RABBIT_HOME,
        }


def cluster_nodes() -> list[Node]:
    return [Node(name, 5680 + i) for i, name in enumerate(CLUSTER, start=1)]


def node_by_name(name: str) -> Node:
    for n in cluster_nodes():
        if n.name == name or n.node == name:
            return n
    state = BASE / name.split("@")[0] / "node.json"
    if state.exists():
        return Node(**json.loads(state.read_text()))
    raise ClusterError(f"unknown node {name!r} (cluster nodes: {', '.join(CLUSTER)})")


# process helpers -------------------------------------------------------------------------
def port_open(port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def amqp_ok(url: str) -> bool:
    import pika

    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 2
        params.connection_attempts = 1
        pika.BlockingConnection(params).close()
        return True
    except Exception:  # noqa: BLE001
        return False


def node_pid(n: Node) -> int | None:
    """The PID of the node's beam process (from its own pid file) if it is alive."""
    try:
        pid = int(n.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    try:  # a beam of this node (its environment names it), not a reused PID
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if b"beam" in cmd and f"RABBITMQ_NODENAME={n.node}".encode() in env else None


def ctl(n: Node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """rabbitmqctl against this node only (runs as the rabbitmq user, like Debian's wrapper)."""
    if n.node == f"rabbit@{HOST}":
        raise ClusterError("refusing to run rabbitmqctl against the default node")
    return subprocess.run([f"{SBIN}/rabbitmqctl", "-n", n.node, *args], text=True, capture_output=True,
                          timeout=timeout, env=_run_env(n), cwd=RABBIT_HOME, **_as_rabbit())


def _as_rabbit() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(RABBIT_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _run_env(n: Node) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TERM")}
    keep.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    keep.setdefault("LANG", "C.UTF-8")
    return {**keep, **n.env()}


# one node ----------------------------------------------------------------------------------
def write_files(n: Node) -> None:
    for port in (n.port, n.dist_port, n.mgmt_port):
        if port in FORBIDDEN_PORTS:
            raise ClusterError(f"port {port} belongs to the default node; pick another --port")
    d = n.dir
    for sub in (d, d / "mnesia", d / "log"):
        sub.mkdir(parents=True, exist_ok=True)
    (d / "rabbitmq.conf").write_text(
        "# written by scripts/cluster.py: loopback only, ports of this node only\n"
        f"listeners.tcp.default = 127.0.0.1:{n.port}\n"
        "management.tcp.ip = 127.0.0.1\n"
        f"management.tcp.port = {n.mgmt_port}\n"
        "loopback_users.guest = true\n"
        "cluster_partition_handling = pause_minority\n"
        "vm_memory_high_watermark.relative = 0.2\n"
        "disk_free_limit.absolute = 50MB\n"
    )
    (d / "rabbitmq-env.conf").write_text("# empty: this node takes everything from its environment\n")
    (d / "enabled_plugins").write_text("[" + ",".join(PLUGINS) + "].\n")
    (d / "node.json").write_text(json.dumps({"name": n.name, "port": n.port}))
    if os.geteuid() == 0:
        pw = pwd.getpwnam(RABBIT_USER)
        for path in [d, *d.rglob("*")]:
            os.chown(path, pw.pw_uid, pw.pw_gid)


def port_holders(port: int) -> str:
    """Who listens on 127.0.0.1:``port`` (pid and command line), for error messages; read-only."""
    try:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], text=True, capture_output=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return " | ".join(line.split()[-1] for line in out.splitlines() if line.strip()) or "nobody listening now"


def _wait_ports_free(n: Node, timeout: float) -> None:
    """A node that has just stopped can hold its ports a moment longer (its beam exiting, a half-booted
    previous attempt): wait for them rather than fail at once."""
    deadline = time.monotonic() + timeout
    while True:
        held = [p for p in (n.port, n.dist_port, n.mgmt_port) if port_open(p)]
        if not held:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"port(s) {held} still taken after {timeout:.0f} s ({port_holders(held[0])}); "
                               f"cannot start {n.node}")
        time.sleep(0.2)


def _spawn(n: Node) -> subprocess.Popen[bytes]:
    write_files(n)
    log = open(n.dir / "log" / "console.log", "ab")  # noqa: SIM115 - kept by the child
    proc = subprocess.Popen([f"{SBIN}/rabbitmq-server"], env=_run_env(n), cwd=RABBIT_HOME, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            **_as_rabbit())  # type: ignore[call-overload]
    log.close()
    say(f"{n.node}: starting (AMQP 127.0.0.1:{n.port}, dist {n.dist_port}, management {n.mgmt_port})")
    return proc


def _log_tail(n: Node, lines: int = 15) -> str:
    try:
        text = (n.dir / "log" / "console.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def start_node(n: Node, wait: float = 150) -> bool:
    """Start the node unless it runs already; True when started now. Waits for AMQP.

    Robust to what made rolling restarts fail: the ports of a node that has just stopped are waited
    for (not an immediate error); a ``rabbitmq-server`` that exits during boot (e.g. it lost the race
    for a port, or for the node name in epmd, against the exiting previous beam) is started again (3 tries).
    """
    if node_pid(n) is not None and amqp_ok(n.amqp_url):
        return False
    deadline = time.monotonic() + wait
    proc = None
    attempts = 0
    if node_pid(n) is None:
        _wait_ports_free(n, timeout=30)
        proc, attempts = _spawn(n), 1
    while not amqp_ok(n.amqp_url):
        if proc is not None and proc.poll() is not None and node_pid(n) is None:
            # rabbitmq-server exited before the node answered: a failed boot
            tail = _log_tail(n)
            if attempts >= 3:
                raise ClusterError(f"{n.node} exited during boot {attempts} times (code {proc.returncode}); "
                                   f"console log:\n{tail}")
            say(f"{n.node}: exited during boot (code {proc.returncode}); starting again")
            time.sleep(1.0)
            _wait_ports_free(n, timeout=30)
            proc, attempts = _spawn(n), attempts + 1
        if time.monotonic() > deadline:
            raise ClusterError(f"{n.node} did not accept AMQP within {wait:.0f} s (pid {node_pid(n)}); "
                               f"console log:\n{_log_tail(n)}")
        time.sleep(0.3)
    return True


def stop_node(n: Node, kill: bool = False, timeout: float = 60) -> bool:
    """Stop (or kill -9) the node by its own PID; True when it was running."""
    pid = node_pid(n)
    if pid is None:
        return False
    if kill:
        os.kill(pid, signal.SIGKILL)
        say(f"{n.node}: killed -9 (pid {pid})")
    else:
        r = ctl(n, "stop", timeout=timeout)
        if r.returncode != 0 and node_pid(n) == pid:
            os.kill(pid, signal.SIGTERM)
        say(f"{n.node}: stopped (pid {pid})")
    # Wait for the beam process itself, not for the pid file: a node stopped by rabbitmqctl deletes its
    # pid file while the VM is still shutting down and still listens on its distribution port (a start
    # in that moment failed with "port 2568N is taken": the rolling-restart failure).
    deadline = time.monotonic() + timeout
    while _beam_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                break
        time.sleep(0.1)
    while any(port_open(p) for p in (n.port, n.dist_port, n.mgmt_port)) and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    return True


def _beam_alive(pid: int) -> bool:
    """The beam.smp process ``pid`` (one we saw as a node's beam) still exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"beam" in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z"


def running_nodes(n: Node) -> list[str]:
    r = ctl(n, "cluster_status", "--formatter", "json", timeout=30)
    if r.returncode != 0:
        return []
    try:
        return list(json.loads(r.stdout).get("running_nodes", []))
    except json.JSONDecodeError:
        return []


def join(n: Node, seed: Node) -> None:
    for args in (("stop_app",), ("join_cluster", seed.node), ("start_app",)):
        r = ctl(n, *args)
        if r.returncode != 0 and not (args[0] == "join_cluster" and "already_member" in (r.stdout + r.stderr)):
            raise ClusterError(f"rabbitmqctl -n {n.node} {' '.join(args)} failed: {r.stderr or r.stdout}")
    say(f"{n.node}: joined {seed.node}")


# the cluster -------------------------------------------------------------------------------
def write_env() -> None:
    nodes = cluster_nodes()
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    ENV_FILE.write_text(
        f"export QA_CLUSTER_AMQP_URLS='{','.join(n.amqp_url for n in nodes)}'\n"
        f"export QA_CLUSTER_MANAGEMENT_URLS='{','.join(n.mgmt_url for n in nodes)}'\n"
        f"export QA_CLUSTER_NODES='{','.join(n.node for n in nodes)}'\n"
        # replicated tick shards: on a cluster they survive the loss of a node (docs/scaling.md)
        "export QA_TICK_QUEUE='quorum'\n"
    )


def up() -> None:
    nodes = cluster_nodes()
    started = []
    # start them all first (a node restarted from old data waits for its peers)
    import threading

    errors: list[BaseException] = []

    def go(n: Node) -> None:
        try:
            if start_node(n):
                started.append(n.node)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise ClusterError("; ".join(str(e) for e in errors))
    seed = nodes[0]
    for n in nodes[1:]:
        if n.node not in running_nodes(seed):
            join(n, seed)
    members = running_nodes(seed)
    missing = [n.node for n in nodes if n.node not in members]
    if missing:
        raise ClusterError(f"not in the cluster after joining: {missing}")
    wait_management(nodes)
    write_env()
    say(f"up: {', '.join(members)} (started now: {', '.join(started) or 'none'}); env in {ENV_FILE}")


def wait_management(nodes: list[Node], wait: float = 60) -> None:
    deadline = time.monotonic() + wait
    for n in nodes:
        while not port_open(n.mgmt_port):
            if time.monotonic() > deadline:
                raise ClusterError(f"management API of {n.node} not up on {n.mgmt_port}")
            time.sleep(0.3)


def down(keep_data: bool = False) -> None:
    import threading

    threads = [threading.Thread(target=stop_node, args=(n,)) for n in cluster_nodes()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not keep_data:
        for n in cluster_nodes():
            shutil.rmtree(n.dir, ignore_errors=True)
        ENV_FILE.unlink(missing_ok=True)
    say("down" + (" (data kept)" if keep_data else " (data removed)"))


def status() -> int:
    nodes = cluster_nodes()
    up_nodes = []
    for n in nodes:
        pid = node_pid(n)
        ok = pid is not None and amqp_ok(n.amqp_url)
        up_nodes.append(ok)
        say(f"{n.node}: {'up' if ok else 'down'}{f' (pid {pid})' if pid else ''}, AMQP {n.port}, mgmt {n.mgmt_port}")
    for n, ok in zip(nodes, up_nodes):
        if ok:
            say(f"running in the cluster: {', '.join(running_nodes(n))}")
            break
    return 0 if all(up_nodes) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up")
    d = sub.add_parser("down")
    d.add_argument("--keep-data", action="store_true")
    sub.add_parser("status")
    for name in ("stop-node", "start-node"):
        p = sub.add_parser(name)
        p.add_argument("name")
        if name == "stop-node":
            p.add_argument("--kill", action="store_true", help="kill -9 the node's beam process")
    for name in ("node-up", "node-down"):
        p = sub.add_parser(name, help="one extra standalone node (not clustered)")
        p.add_argument("--name", required=True)
        p.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and args.cmd != "status":
        say("note: not root; nodes run as the current user, with its own ~/.erlang.cookie")
    if not Path(f"{SBIN}/rabbitmq-server").exists():
        say("rabbitmq-server is not installed (make servers installs it)")
        return 3
    try:
        if args.cmd == "up":
            up()
        elif args.cmd == "down":
            down(args.keep_data)
        elif args.cmd == "status":
            return status()
        elif args.cmd == "stop-node":
            stop_node(node_by_name(args.name), kill=args.kill)
        elif args.cmd == "start-node":
            start_node(node_by_name(args.name))
        elif args.cmd == "node-up":
            if args.name in ("rabbit", *CLUSTER):
                raise ClusterError(f"{args.name!r} is taken; pick another name")
            if args.port is None:
                raise ClusterError("node-up needs --port")
            n = Node(args.name, args.port)
            started = start_node(n)
            say(f"{n.node}: {'started' if started else 'already up'} at {n.amqp_url} (management {n.mgmt_url})")
        elif args.cmd == "node-down":
            n = node_by_name(args.name)
            if n.name in CLUSTER:
                raise ClusterError("use stop-node / down for cluster nodes")
            stop_node(n)
            shutil.rmtree(n.dir, ignore_errors=True)
    except (ClusterError, subprocess.TimeoutExpired) as exc:
        print(f"[cluster] ERROR: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
