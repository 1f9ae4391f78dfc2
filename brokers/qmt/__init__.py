"""MiniQMT (xtquant) A-share executor -- Windows only; ``xtquant`` is not on PyPI.

* :mod:`brokers.qmt.codes` -- ``600000.SH`` <-> (``SSE``, ``600000``), lots, xtconstant values. Pure.
* :mod:`brokers.qmt.executor` -- :class:`~brokers.qmt.executor.QmtExecutor` and ``qaflow broker qmt``.

``import brokers.qmt`` never imports xtquant; the executor imports it when it starts and
raises :class:`~brokers.qmt.codes.XtquantMissing` with a clear message where it is absent.
"""
from __future__ import annotations

from .codes import XtquantMissing, from_xt_code, to_xt_code

__all__ = ["XtquantMissing", "from_xt_code", "to_xt_code"]
