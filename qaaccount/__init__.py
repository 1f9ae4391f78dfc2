"""qaaccount: QIFI-compatible accounts (cash, margin, fees, positions, settlement, T+1). Pure."""
from qaaccount.account import (
    Account, AccountError, Bucket, InsufficientFunds, InsufficientPosition, InvalidOrder, Position,
    UnknownOrderError,
)
from qaaccount.instruments import (
    FeeKind, Instrument, Instruments, ProductClass, UnknownInstrument, future, product_root, round_down_to_lot, stock,
)

__all__ = [
    "Account", "AccountError", "Bucket", "FeeKind", "InsufficientFunds", "InsufficientPosition", "Instrument",
    "Instruments", "InvalidOrder", "Position", "ProductClass", "UnknownInstrument", "UnknownOrderError", "future",
    "product_root", "round_down_to_lot", "stock",
]
