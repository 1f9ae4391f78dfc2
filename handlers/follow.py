"""``qaflow follow add|remove|list``: copy-trade follower rules in MongoDB.

A running router picks a change up on its next order (rules carry a version number in
``meta``), no restart needed. Examples::

    qaflow follow add --leader acc1 --follower acc2 --ratio 0.5 --reverse --symbols rb2512
    qaflow follow add --leader acc1 --follower acc3 --equity --max-volume 10
    qaflow follow list
    qaflow follow remove r-1a2b3c4d

Exit codes: 0 ok, 1 no such rule, 2 usage / invalid rule, 3 MongoDB unreachable.
"""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Manage copy-trade follower rules (stored in MongoDB, live on a running router)."
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    a = sub.add_parser("add", help="add a follower rule; prints its rule id",
                       description="Add a rule: orders to LEADER are copied to FOLLOWER, sized by one rule.")
    a.add_argument("--leader", required=True, help="routing key followed (account or group)")
    a.add_argument("--follower", required=True, help="follower account")
    size = a.add_mutually_exclusive_group(required=True)
    size.add_argument("--ratio", type=float, help="follower volume = leader volume * RATIO (rounded down to lots)")
    size.add_argument("--fixed", type=int, help="follower volume = N")
    size.add_argument("--equity", action="store_true",
                      help="volume * equity(follower) / equity(leader) (from the accounts collection)")
    a.add_argument("--equity-ratio", type=float, default=1.0, help="extra factor with --equity (default 1)")
    a.add_argument("--reverse", action="store_true", help="trade the opposite direction")
    a.add_argument("--symbols", nargs="+", default=None, metavar="SYMBOL",
                   help="only these instruments (rb2512 or SHFE.rb2512)")
    a.add_argument("--max-volume", type=int, default=None)
    a.add_argument("--rule-id", default=None, help="rule id (default: a new one)")
    r = sub.add_parser("remove", help="remove a rule by id")
    r.add_argument("rule_id")
    sub.add_parser("list", help="list the rules")


def _store() -> object:

    from handlers.cli import CannotConnect
    from qaorder.store import OrderStore
    from qapubsub.settings import Settings, mongo_client, redact_url

    settings = Settings.from_env()
    client = mongo_client(settings, server_selection_ms=3000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB at {redact_url(settings.mongo_url)}: {exc}") from None
    return OrderStore(client[settings.mongo_db], create_indexes=False)


def run(args: argparse.Namespace) -> int:
    from qaorder.routing import FollowerRule, Sizing
    from qaorder.store import new_rule_id

    if args.action == "add":
        try:
            if args.fixed is not None:
                sizing, extra = Sizing.FIXED, {"fixed_volume": args.fixed}
            elif args.equity:
                sizing, extra = Sizing.EQUITY, {"ratio": args.equity_ratio}
            else:
                sizing, extra = Sizing.RATIO, {"ratio": args.ratio}
            rule = FollowerRule(rule_id=args.rule_id or new_rule_id(), leader=args.leader, follower=args.follower,
                                sizing=sizing, reverse=args.reverse, max_volume=args.max_volume,
                                symbols=frozenset(args.symbols) if args.symbols else None, **extra)
        except ValueError as exc:
            print(f"qaflow follow: invalid rule: {exc}", file=sys.stderr)
            return 2
        store = _store()
        from pymongo.errors import DuplicateKeyError

        try:
            store.add_rule(rule)  # type: ignore[attr-defined]
        except DuplicateKeyError:
            print(f"qaflow follow: rule {rule.rule_id} exists already", file=sys.stderr)
            return 1
        print(rule.rule_id)
        return 0
    store = _store()
    if args.action == "remove":
        if not store.remove_rule(args.rule_id):  # type: ignore[attr-defined]
            print(f"qaflow follow: no rule {args.rule_id}", file=sys.stderr)
            return 1
        print(f"removed {args.rule_id}")
        return 0
    rules = store.load_rules()  # type: ignore[attr-defined]
    rows = [("RULE", "LEADER", "FOLLOWER", "SIZING", "REVERSE", "SYMBOLS", "MAX", "ENABLED")]
    for r in rules:
        size = f"fixed {r.fixed_volume}" if r.sizing.value == "FIXED" else f"{r.sizing.value.lower()} x{r.ratio:g}"
        rows.append((r.rule_id, r.leader, r.follower, size, "yes" if r.reverse else "no",
                     ",".join(sorted(r.symbols)) if r.symbols else "*", str(r.max_volume or "-"),
                     "yes" if r.enabled else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if not rules:
        print("(no rules)")
    return 0


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow follow"))
