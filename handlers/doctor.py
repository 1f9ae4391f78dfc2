"""``qaflow doctor``: is everything QAFlow needs there, and if not, what to do about it.

Checks, in order: settings; broker reachable and credentials accepted; the management API
(for exchange types); every declared exchange exists with the right type and durability;
the plugins the topology needs; the risk-desk user; the platform queues and their
consumers; MongoDB reachable. Each line says OK, WARN or FAIL and, when not OK, how to
fix it. Exit 0 when nothing FAILs, 1 otherwise, 3 when the broker cannot be reached.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

from qapubsub.settings import Settings, mongo_client, redact_url
from qapubsub.topology import Topology

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    status: str
    what: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status:4}] {self.what}"
        return text + (f"\n       fix: {self.fix}" if self.fix else "")


def check_exchanges(topo: Topology, found: dict[str, dict[str, Any]]) -> list[Check]:
    """Compare the topology with the exchanges the broker has (pure: testable without a broker)."""
    out = []
    for ex in topo.exchanges:
        have = found.get(ex.name)
        if have is None:
            out.append(Check(FAIL, f"exchange {ex.name!r} ({ex.type}) does not exist",
                             "run `qaflow declare` (every daemon also declares it at start)"))
        elif have.get("type") != ex.type:
            out.append(Check(FAIL, f"exchange {ex.name!r} is {have.get('type')!r} but QAFlow needs {ex.type!r}",
                             f"delete it (rabbitmqctl delete_exchange {ex.name}) and run `qaflow declare`; "
                             "check first that no other system relies on it"))
        elif bool(have.get("durable")) != ex.durable:
            want = "durable" if ex.durable else "non-durable"
            out.append(Check(FAIL, f"exchange {ex.name!r} has the wrong durability (QAFlow needs {want})",
                             f"delete it (rabbitmqctl delete_exchange {ex.name}) and run `qaflow declare`"))
        else:
            out.append(Check(OK, f"exchange {ex.name!r} is {ex.type}{'' if ex.durable else ', non-durable'}"))
    return out


def check_queues(topo: Topology, found: dict[str, dict[str, Any]]) -> list[Check]:
    out = []
    for q in topo.platform_queues:
        have = found.get(q.name)
        if have is None:
            out.append(Check(WARN, f"queue {q.name!r} does not exist yet: messages for it would go unroutable",
                             "run `qaflow declare`"))
            continue
        kind = have.get("type", "classic")
        if q.quorum and kind != "quorum":
            out.append(Check(FAIL, f"queue {q.name!r} is {kind} but QAFlow needs a quorum queue",
                             f"drain and delete it (rabbitmqctl delete_queue {q.name}), then `qaflow declare`"))
            continue
        leader = f", leader {have['leader']}, members {len(have.get('members') or [])}" if have.get("leader") else ""
        out.append(Check(OK, f"queue {q.name!r}: {have.get('messages', 0)} messages, "
                             f"{have.get('consumers', 0)} consumers{leader}"))
    return out


def check_cluster(topo: Topology, nodes: list[dict[str, Any]], found: dict[str, dict[str, Any]],
                  consumers: list[dict[str, Any]] | None = None) -> list[Check]:
    """The cluster section (pure): nodes, quorum queue leaders and replicas, tick shards and their consumers.

    Only when the broker is a cluster (more than one node). A quorum queue with fewer online
    members than nodes, or whose leader is down, is a WARN; a tick shard without a consumer is
    a WARN (its ticks wait), one whose classic queue lives on a stopped node is a FAIL (a quorum
    shard whose leader is down is a WARN: it elects another); a classic qa.dead / qa.unroutable on
    a stopped node is a WARN."""
    if len(nodes) < 2:
        return []
    running = sorted(n["name"] for n in nodes if n.get("running"))
    down = sorted(n["name"] for n in nodes if not n.get("running"))
    out = [Check(WARN if down else OK, f"cluster: {len(nodes)} nodes, up {', '.join(running)}"
                 + (f"; down {', '.join(down)}" if down else ""),
                 "start the stopped nodes (make cluster-up, or rabbitmqctl -n NODE start_app)" if down else "")]
    quorum = [q for name, q in sorted(found.items()) if q.get("type") == "quorum" and name.startswith(topo.namespace)]
    for q in quorum:
        members, online = q.get("members") or [], q.get("online") or []
        leader = q.get("leader")
        bad = leader not in running or len(online) < len(members) or len(members) < min(3, len(nodes))
        out.append(Check(WARN if bad else OK,
                         f"quorum queue {q['name']!r}: leader {leader}, members {len(online)}/{len(members)} online "
                         f"({', '.join(sorted(members))}), {q.get('messages', 0)} messages, {q.get('consumers', 0)} consumers",
                         "a replica is down: the queue works while a majority is up; start the node" if bad else ""))
    active: dict[str, list[str]] = {}
    for c in consumers or []:
        qname = (c.get("queue") or {}).get("name", "")
        who = (c.get("channel_details") or {}).get("connection_name", "?")
        state = "active" if c.get("active", True) else "standby"
        active.setdefault(qname, []).append(f"{who} {state}")
    prefix = topo.name("qa.tickhandler.")
    shards = sorted((int(n[len(prefix):]), q) for n, q in found.items()
                    if n.startswith(prefix) and n[len(prefix):].isdigit())
    for i, q in shards:
        quorum_shard = q.get("type") == "quorum"
        node = q.get("leader") if quorum_shard else (q.get("node") or q.get("leader"))
        who = active.get(q["name"], [])
        if node not in running:
            # a classic shard waits for its one node (ticks routed to it meanwhile are lost); a quorum
            # shard only needs a majority of its replicas and elects another leader
            status = WARN if quorum_shard else FAIL
        else:
            status = WARN if not q.get("consumers") else OK
        hint = (f"leader {node} is down: a new leader is elected while a majority of replicas is up"
                if quorum_shard else
                f"its node {node} is down: the shard waits for it (classic queue; ticks routed to it are lost); "
                "start the node, and redeclare the shard queues as quorum queues (docs/scaling.md)")
        if node in running:
            hint = f"start a tickhandler: qaflow tickhandler --shard {i} --shards {len(shards)}" if status == WARN else ""
        kind = "quorum" if quorum_shard else "classic"
        out.append(Check(status, f"tick shard {i} ({q['name']!r}, {kind}) on {node}: {q.get('consumers', 0)} consumers"
                                 + (f" [{'; '.join(who)}]" if who else "") + f", {q.get('messages', 0)} ticks waiting",
                         hint))
    # classic platform queues (dead letters, unroutable orders) live on one node each
    for base in ("qa.dead", "qa.unroutable"):
        q = found.get(topo.name(base))
        if q and q.get("type") != "quorum" and q.get("node") and q["node"] not in running:
            out.append(Check(WARN, f"{q['name']!r} (classic) is on {q['node']}, which is down",
                             "dead letters / unroutable orders routed there meanwhile are not kept; start the node"))
    return out


def _mongo_check(settings: Settings) -> Check:
    try:
        client = mongo_client(settings, server_selection_ms=2500)
        try:
            client.admin.command("ping")
            info = client.admin.command("buildInfo")
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return Check(FAIL, f"MongoDB at {redact_url(settings.mongo_url)} not reachable: {type(exc).__name__}: {exc}",
                     "start MongoDB (or `make run`, which starts nx-27017) and set QA_MONGO_URL")
    return Check(OK, f"MongoDB at {redact_url(settings.mongo_url)} answers (version {info.get('version', '?')})")


def gather(settings: Settings, topo: Topology) -> list[Check]:
    import pika
    import pika.exceptions

    from qapubsub.management import Management, ManagementError

    checks: list[Check] = []
    url = settings.amqp_url
    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 3
        pika.BlockingConnection(params).close()
        checks.append(Check(OK, f"RabbitMQ at {redact_url(url)} accepts our credentials"))
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError) as exc:
        checks.append(Check(FAIL, f"RabbitMQ at {redact_url(url)} refused the credentials ({exc})",
                            "check the user and password in QA_AMQP_URL (rabbitmqctl list_users)"))
        return checks
    except pika.exceptions.ProbableAccessDeniedError as exc:
        checks.append(Check(FAIL, f"RabbitMQ at {redact_url(url)} denied access to the vhost ({exc})",
                            "rabbitmqctl set_permissions -p <vhost> <user> '.*' '.*' '.*'"))
        return checks
    except Exception as exc:  # noqa: BLE001
        checks.append(Check(FAIL, f"RabbitMQ at {redact_url(url)} is not reachable: {type(exc).__name__}: {exc}",
                            "start it (`rabbitmq-server -detached`, or `make run`) or set QA_AMQP_URL"))
        return checks

    mgmt = Management(url)
    try:
        exchanges = mgmt.exchanges()
        queues = mgmt.queues()
        overview = mgmt.get("/api/overview")
        nodes = mgmt.nodes()
    except ManagementError as exc:
        checks.append(Check(WARN, f"management API not usable ({exc}); exchange types cannot be checked",
                            "rabbitmq-plugins enable rabbitmq_management (and give the user the 'monitoring' tag)"))
        checks.append(_mongo_check(settings))
        return checks
    running = [n["name"] for n in nodes if n.get("running")]
    down = [n["name"] for n in nodes if not n.get("running")]
    checks.append(Check(FAIL if down else OK,
                        f"RabbitMQ {overview.get('rabbitmq_version', '?')}: nodes up {', '.join(running)}"
                        + (f"; DOWN: {', '.join(down)}" if down else ""),
                        "start the stopped nodes (rabbitmqctl -n NODE start_app)" if down else ""))
    types = {t["name"] for t in overview.get("exchange_types", [])}
    if "x-consistent-hash" not in types:
        checks.append(Check(WARN, "plugin rabbitmq_consistent_hash_exchange is not enabled (needed to shard ticks)",
                            "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"))
    else:
        checks.append(Check(OK, "plugin rabbitmq_consistent_hash_exchange enabled"))
    checks += check_exchanges(topo, exchanges)
    checks += check_queues(topo, queues)
    if len(nodes) > 1:
        try:
            consumers = list(mgmt.get(f"/api/consumers/{mgmt._vh()}"))  # noqa: SLF001
        except ManagementError:
            consumers = []
        checks += check_cluster(topo, nodes, queues, consumers)
    try:
        mgmt.get(f"/api/users/{settings.risk_user}")
        checks.append(Check(OK, f"risk-desk user {settings.risk_user!r} exists (force-closes must carry user_id={settings.risk_user})"))
    except ManagementError as exc:
        if "404" in str(exc):
            checks.append(Check(FAIL, f"risk-desk user {settings.risk_user!r} does not exist: no force-close can be accepted",
                                f"rabbitmqctl add_user {settings.risk_user} <password>; rabbitmqctl set_permissions "
                                f"{settings.risk_user} '.*' '.*' '.*' (or set QA_RISK_USER)"))
        else:
            checks.append(Check(WARN, f"cannot check the risk-desk user ({exc})", "use an administrator user for doctor"))
    checks.append(_mongo_check(settings))
    return checks


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix to check (default QA_NAMESPACE or none)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # doctor reports failures in its own words
    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    checks = gather(settings, topo)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if c.status == FAIL]
    if checks and checks[0].status == FAIL and "RabbitMQ" in checks[0].what:
        print("doctor: the broker cannot be used; nothing else was checked", file=sys.stderr)
        return 3
    print(f"doctor: {len(failed)} problem(s)" if failed else "doctor: all good")
    return 1 if failed else 0


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow doctor"))
