"""Make sure a RabbitMQ broker and a MongoDB-wire server are reachable; start local ones if not.

Used by ``make run`` / ``make test`` / ``make bench``. Order of preference:

RabbitMQ: ``QA_AMQP_URL`` if set; else a broker on 127.0.0.1:5672; else install Debian's
``rabbitmq-server`` (loopback-only config) and start it with ``rabbitmq-server -detached``.
MongoDB: ``QA_MONGO_URL`` if set; else a mongod on 127.0.0.1:27017; else start ``nx-27017``
(the MongoDB-wire server over SQLite) on a free loopback port, data under ``.qaflow/``.

It prints what it found and what it started, and writes the URLs to an env file that the
Makefile sources. Exit codes: 0 ready, 3 a server could not be reached or started.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".qaflow"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
PLUGINS = ("rabbitmq_management", "rabbitmq_consistent_hash_exchange")
RISK_USER = "qarisk"
RABBIT_CONF = """# written by QAFlow's set-up: loopback only
listeners.tcp.default = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
loopback_users.guest = true
"""
RABBIT_ENV = """NODENAME=rabbit@localhost
NODE_IP_ADDRESS=127.0.0.1
ERL_EPMD_ADDRESS=127.0.0.1
"""


def say(msg: str) -> None:
    print(f"[servers] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[servers] ERROR: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(3)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def amqp_ok(url: str) -> str | None:
    """None when an AMQP connection opens, else the reason."""
    import pika

    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 3
        params.blocked_connection_timeout = 3
        pika.BlockingConnection(params).close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure is reported in words
        return f"{type(exc).__name__}: {exc}"


def wait_amqp(url: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    why = amqp_ok(url)
    while why and time.monotonic() < deadline:
        time.sleep(0.5)
        why = amqp_ok(url)
    return why


def mongo_ok(url: str) -> str | None:
    import pymongo

    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)
        try:
            client.admin.command("ping")
        finally:
            client.close()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


# RabbitMQ -------------------------------------------------------------------------------
def ensure_rabbitmq() -> tuple[str, bool]:
    """Returns (url, local) where local means we may manage it with rabbitmqctl."""
    url = os.environ.get("QA_AMQP_URL", "").split(",")[0].strip()
    if url:
        why = amqp_ok(url)
        if why:
            fail(f"QA_AMQP_URL is set but the broker does not answer: {why}")
        parts = urllib.parse.urlsplit(url)
        local = parts.hostname in ("127.0.0.1", "localhost") and (parts.port or 5672) == 5672
        say("RabbitMQ: using QA_AMQP_URL (found, not started)")
        return os.environ["QA_AMQP_URL"], local
    if port_open("127.0.0.1", 5672):
        why = wait_amqp(DEFAULT_AMQP, 30)
        if why:
            fail(f"something listens on 127.0.0.1:5672 but guest/guest cannot connect: {why}. "
                 "Set QA_AMQP_URL to a broker and credentials that work.")
        say("RabbitMQ: found a broker on 127.0.0.1:5672")
        return DEFAULT_AMQP, True
    if not shutil.which("rabbitmq-server"):
        if os.geteuid() != 0:
            fail("no RabbitMQ on 127.0.0.1:5672 and rabbitmq-server is not installed; run as root "
                 "(apt-get install rabbitmq-server) or set QA_AMQP_URL")
        say("RabbitMQ: installing Debian's rabbitmq-server (about 20 s) ...")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "rabbitmq-server"]):
            r = run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if r.returncode:
                fail(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    etc = Path("/etc/rabbitmq")
    if os.geteuid() == 0:
        etc.mkdir(parents=True, exist_ok=True)
        if not (etc / "rabbitmq.conf").exists():
            (etc / "rabbitmq.conf").write_text(RABBIT_CONF)
        if not (etc / "rabbitmq-env.conf").exists():
            (etc / "rabbitmq-env.conf").write_text(RABBIT_ENV)
    say("RabbitMQ: starting rabbitmq-server -detached ...")
    r = run(["rabbitmq-server", "-detached"])
    if r.returncode:
        fail(f"rabbitmq-server -detached failed: {r.stderr or r.stdout}")
    why = wait_amqp(DEFAULT_AMQP, 90)
    if why:
        fail(f"started rabbitmq-server but it did not accept AMQP connections within 90 s: {why}. "
             "See /var/log/rabbitmq/ for its log.")
    say("RabbitMQ: started on 127.0.0.1:5672")
    return DEFAULT_AMQP, True


def ensure_plugins_and_users(state: Path) -> dict[str, str]:
    """Enable the plugins the topology needs and create the risk identity (local broker only)."""
    out: dict[str, str] = {}
    if not shutil.which("rabbitmqctl"):
        say("RabbitMQ: rabbitmqctl not found; cannot check plugins or users (doctor will tell)")
        return out
    r = run(["rabbitmq-plugins", "list", "-e", "-m", "-q"])
    enabled = set(r.stdout.split()) if r.returncode == 0 else set()
    missing = [p for p in PLUGINS if p not in enabled]
    if missing:
        r = run(["rabbitmq-plugins", "enable", *missing])
        if r.returncode:
            fail(f"rabbitmq-plugins enable {' '.join(missing)} failed: {r.stderr or r.stdout}")
        say(f"RabbitMQ: enabled plugins {', '.join(missing)}")
    else:
        say(f"RabbitMQ: plugins already enabled ({', '.join(PLUGINS)})")
    # The risk desk's identity: force-closes are accepted only with user_id = this user.
    # One secret per machine user, not per checkout: the broker user is shared by every clone.
    secret_dir = Path(os.environ.get("QA_SECRETS_DIR", Path.home() / ".qaflow"))
    secret_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_file = secret_dir / "risk.secret"
    if secret_file.exists():
        password = secret_file.read_text().strip()
    else:
        password = os.urandom(12).hex()
        secret_file.write_text(password)
        secret_file.chmod(0o600)
    users = run(["rabbitmqctl", "list_users", "-q", "--formatter", "json"]).stdout
    if f'"{RISK_USER}"' not in users:
        r = run(["rabbitmqctl", "add_user", RISK_USER, password])
        if r.returncode:
            fail(f"could not create the risk user {RISK_USER}: {r.stderr or r.stdout}")
        say(f"RabbitMQ: created the risk-desk user {RISK_USER!r} (password in {secret_file})")
    else:
        run(["rabbitmqctl", "change_password", RISK_USER, password])
    run(["rabbitmqctl", "set_permissions", "-p", "/", RISK_USER, ".*", ".*", ".*"])
    out["QA_RISK_USER"] = RISK_USER
    out["QA_RISK_AMQP_URL"] = f"amqp://{RISK_USER}:{password}@127.0.0.1:5672/%2F"
    return out


# MongoDB --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_mongo(state: Path) -> str:
    url = os.environ.get("QA_MONGO_URL", "")
    if url:
        why = mongo_ok(url)
        if why:
            fail(f"QA_MONGO_URL is set but the server does not answer: {why}")
        say("MongoDB: using QA_MONGO_URL (found, not started)")
        return url
    local = "mongodb://127.0.0.1:27017/?directConnection=true"
    if port_open("127.0.0.1", 27017) and not mongo_ok(local):
        say("MongoDB: found a server on 127.0.0.1:27017")
        return local
    nx_state = state / "nx-27017.port"
    pid_file = state / "nx-27017.pid"
    if nx_state.exists() and pid_file.exists():
        url = f"mongodb://127.0.0.1:{nx_state.read_text().strip()}/?directConnection=true"
        if not mongo_ok(url):
            say(f"MongoDB: reusing nx-27017 started earlier (pid {pid_file.read_text().strip()}) at {url}")
            return url
    exe = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or shutil.which("nx-27017")
    if not exe:
        fail("nx-27017 is not installed in the virtualenv (pip install -c constraints.txt -e .[test])")
    port = free_port()
    data = state / "mongo-data"
    data.mkdir(parents=True, exist_ok=True)
    log = state / "nx-27017.log"
    say(f"MongoDB: starting nx-27017 on 127.0.0.1:{port} (data in {data}) ...")
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [exe, "--host", "127.0.0.1", "-p", str(port), "--data-dir", str(data), "--log-file", str(log),
             "--pid-file", str(state / "nx-27017.daemon.pid")],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    deadline = time.monotonic() + 30
    why = mongo_ok(url)
    while why and time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"nx-27017 exited with code {proc.returncode}; see {log}")
        time.sleep(0.3)
        why = mongo_ok(url)
    if why:
        fail(f"nx-27017 did not answer within 30 s: {why}; see {log}")
    pid_file.write_text(str(proc.pid))
    nx_state.write_text(str(port))
    say(f"MongoDB: started nx-27017 (pid {proc.pid}) at {url}")
    return url


def stop_started(state: Path) -> None:
    """Stop the nx-27017 this script started (by its PID); never touches other processes."""
    pid_file = state / "nx-27017.pid"
    if not pid_file.exists():
        say("nothing to stop")
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.kill(pid, 15)
        say(f"stopped nx-27017 (pid {pid})")
    except ProcessLookupError:
        say(f"nx-27017 (pid {pid}) was not running")
    pid_file.unlink()
    (state / "nx-27017.port").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env-file", default=str(STATE / "servers.env"), help="where to write QA_AMQP_URL / QA_MONGO_URL")
    ap.add_argument("--stop", action="store_true", help="stop the MongoDB-wire server this script started")
    args = ap.parse_args(argv)
    STATE.mkdir(exist_ok=True)
    if args.stop:
        stop_started(STATE)
        return 0
    amqp, local = ensure_rabbitmq()
    extra = ensure_plugins_and_users(STATE) if local else {}
    mongo = ensure_mongo(STATE)
    env = {"QA_AMQP_URL": amqp, "QA_MONGO_URL": mongo, **extra}
    path = Path(args.env_file)
    path.write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
    path.chmod(0o600)
    say(f"ready: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
