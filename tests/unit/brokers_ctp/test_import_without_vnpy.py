"""``brokers`` and ``brokers.ctp`` import without vn.py (vn.py is imported only when the feed starts)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_importing_brokers_ctp_does_not_import_vnpy() -> None:
    code = (
        "import sys\n"
        "import brokers, brokers.ctp, brokers.ctp.settings, brokers.ctp.mapping, brokers.ctp.md\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vnpy', 'vnpy_ctp', 'talib', 'PySide6'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_vnpy_missing_names_the_install_command(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import builtins

    from brokers.ctp import vnpy_compat

    real_import = builtins.__import__

    def no_vnpy(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in ("vnpy", "vnpy_ctp"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vnpy)
    monkeypatch.setattr(vnpy_compat, "_LOADED", {})
    try:
        vnpy_compat.load()
    except vnpy_compat.VnpyMissing as exc:
        assert "qaflow[ctp]" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("VnpyMissing not raised")
