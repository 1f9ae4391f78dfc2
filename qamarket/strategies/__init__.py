"""Example strategies shipped with QAFlow (run with ``qaflow strategy qamarket.strategies.<module>:<Class>``)."""
