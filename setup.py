"""QAFlow: a RabbitMQ-routed event platform for quantitative trading."""
from setuptools import find_packages, setup

PACKAGES = ["qapubsub", "qamarket", "qaorder", "qaaccount", "qarisk", "handlers", "brokers"]

setup(
    name="qaflow",
    version="0.1.0",
    description="RabbitMQ-routed event platform for quant trading (QUANTAXIS / vn.py style)",
    python_requires=">=3.11",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, name + ".*")]),
    package_data={name: ["py.typed"] for name in PACKAGES} | {"handlers": ["py.typed", "static/*"]},
    install_requires=[
        "pika>=1.3,<2",
        "aio-pika>=9.4,<11",
        "pymongo>=4.9,<5",
        "motor>=3.6,<4",
        "msgspec>=0.18,<1",
        "zstandard>=0.22,<1",  # tick chunk payloads (qamarket.store)
        "tornado>=6.4,<7",
        "prometheus-client>=0.20,<1",
    ],
    extras_require={
        # The versions the test suite was run with live in constraints.txt.
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "nx-27017>=0.8",
            "pandas>=2.2",  # reference computations for the indicator tests
            "numpy>=1.26",
        ],
        "ctp": ["vnpy_ctp>=6.7"],
    },
    entry_points={"console_scripts": ["qaflow = handlers.cli:main"]},
)
