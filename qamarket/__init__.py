"""qamarket: market-data core — tick/bar models, instrument specs, sessions, cleaning, aggregation, indicators.

Pure: nothing here does I/O. ``handlers/tickhandler.py`` wires it to RabbitMQ and MongoDB.
"""
from __future__ import annotations

from .aggregation import Aggregator, BarAggregator
from .cleaning import REASONS, TickCleaner
from .indicators import ATR, BOLL, EMA, MA, MACD, RSI
from .models import (
    DEFAULT_REGISTRY, EXCHANGES, UNSET_PRICE, Bar, InstrumentRegistry, InstrumentSpec, Tick, TickBatch,
    UnknownInstrument, product_of, spec_for,
)
from .sessions import (
    FREQS, TEMPLATES, Calendar, Phase, SessionTemplate, bar_close_time, bar_end, bar_label, from_ms, is_trading,
    ms_of, phase, to_ms, trading_day,
)

__all__ = [
    "ATR", "BOLL", "DEFAULT_REGISTRY", "EMA", "EXCHANGES", "FREQS", "MA", "MACD", "REASONS", "RSI", "TEMPLATES",
    "UNSET_PRICE", "Aggregator", "Bar", "BarAggregator", "Calendar", "InstrumentRegistry", "InstrumentSpec", "Phase",
    "SessionTemplate", "Tick", "TickBatch", "TickCleaner", "UnknownInstrument", "bar_close_time", "bar_end",
    "bar_label", "from_ms", "is_trading", "ms_of", "phase", "product_of", "spec_for", "to_ms", "trading_day",
]
