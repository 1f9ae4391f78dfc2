"""CTP (China futures) adapters built on vn.py's ``vnpy_ctp`` gateway -- optional extra ``ctp``.

* :mod:`brokers.ctp.settings` -- settings from the environment (``QA_CTP_*``), the vnpy_ctp
  setting dict, symbol parsing. Pure, importable without vn.py.
* :mod:`brokers.ctp.mapping` -- vn.py ``TickData`` -> :class:`qamarket.models.Tick`
  (enums by ``.name``, exchange-local epoch ms, CTP's DBL_MAX "unset" -> 0). Duck-typed,
  importable without vn.py.
* :mod:`brokers.ctp.md` -- the market-data process (:class:`~brokers.ctp.md.CtpMarketData`,
  ``main(argv)``). vn.py is imported only when the process starts.
* :mod:`brokers.ctp.vnpy_compat` -- the only module that imports ``vnpy`` / ``vnpy_ctp``, and the
  vnpy_ctp log texts the process reacts to.

Nothing here imports vn.py at import time: ``import brokers.ctp`` works without the extra.
"""
from __future__ import annotations

from .settings import CtpSettings, SettingsError, parse_symbols

__all__ = ["CtpSettings", "SettingsError", "parse_symbols"]
