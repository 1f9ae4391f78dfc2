"""Parts of docs/ generated from the code, kept equal to it by tests (``python -m handlers.docgen`` rewrites them)."""
from __future__ import annotations

import importlib
import typing
from pathlib import Path

import msgspec

from qapubsub.messages import Message
from qapubsub.topology import markdown_tables

ROOT = Path(__file__).resolve().parents[1]
#: modules whose Message subclasses are documented in docs/messages.md
MESSAGE_MODULES = ("qamarket.models", "qaorder.models")


def _type_name(t: object) -> str:
    """A readable type: ``str (1-64 chars, pattern ...)``, ``int (> 0)``, ``Direction``, ``list[Tick]``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated:
        base, *metas = args
        notes = []
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                if meta.min_length is not None or meta.max_length is not None:
                    notes.append(f"{meta.min_length or 0}-{meta.max_length or '...'} chars")
                if meta.pattern:
                    notes.append(f"pattern `{meta.pattern}`")
                for op, v in ((">", meta.gt), (">=", meta.ge), ("<", meta.lt), ("<=", meta.le)):
                    if v is not None:
                        notes.append(f"{op} {v}")
        return _type_name(base) + (f" ({', '.join(notes)})" if notes else "")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if t is type(None):
        return "null"
    return getattr(t, "__name__", repr(t))


def _same_schema_as_base(cls: type) -> bool:
    """A subclass with its base's tag is a decoding variant (``CheckedTick``), not a schema of its own."""
    tag = cls.__struct_config__.tag  # type: ignore[attr-defined]
    return any(b is not Message and issubclass(b, Message) and b.__struct_config__.tag == tag for b in cls.__mro__[1:])


def message_tables() -> str:
    out: list[str] = []
    for mod in MESSAGE_MODULES:
        m = importlib.import_module(mod)
        classes = [c for c in vars(m).values() if isinstance(c, type) and issubclass(c, Message) and c is not Message
                   and c.__module__ == mod and not _same_schema_as_base(c)]
        for cls in classes:
            cfg = cls.__struct_config__
            strict = " (strict: unknown fields are an error)" if cfg.forbid_unknown_fields else ""
            out.append(f"### `{cfg.tag}` — `{mod}.{cls.__name__}`{strict}\n")
            doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            if doc:
                out.append(doc + "\n")
            out.append("| field | type | required / default |\n|---|---|---|")
            for f in msgspec.structs.fields(cls):
                if f.name in ("version", "id", "ts"):
                    continue
                if f.required:
                    req = "required"
                elif f.default is not msgspec.NODEFAULT:
                    req = f"default `{f.default!r}`"
                else:
                    req = "default: made for you"
                out.append(f"| `{f.name}` | {_type_name(f.type)} | {req} |")
            out.append("")
    out.append("### Enumerations (values on the wire)\n")
    out.append("| enum | values |\n|---|---|")
    from qaorder import models as om

    for e in (om.Exchange, om.Direction, om.Offset, om.PriceType, om.OrderStatus):
        out.append(f"| `{e.__name__}` | {', '.join(f'`{m.value}`' for m in e)} |")
    out.append("")
    return "\n".join(out)


BLOCKS = {
    "docs/topology.md": ("topology", markdown_tables),
    "docs/messages.md": ("messages", message_tables),
}


def block_of(text: str, name: str) -> str:
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    return text.split(begin, 1)[1].split(end, 1)[0]


def write_all() -> list[str]:
    changed = []
    for rel, (name, make) in BLOCKS.items():
        path = ROOT / rel
        text = path.read_text()
        old = block_of(text, name)
        new = make()
        if old != new:
            path.write_text(text.replace(f"<!-- {name}:begin -->\n{old}", f"<!-- {name}:begin -->\n{new}", 1))
            changed.append(rel)
    return changed


if __name__ == "__main__":
    print("\n".join(write_all()) or "docs are up to date")
