"""Studies of the classic claims about residual connections: `python -m resstream study NAME`.

Each module trains the models its claim needs (resstream.studies.common.Pool), measures, and
writes runs/studies/NAME/{results.json, results.csv, NAME.png, report.md}.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name on the command line -> module
STUDIES = {
    "degradation": "degradation",
    "gradient-highway": "gradient_highway",
    "warmup": "warmup",
    "deletion": "deletion",
    "stochastic-depth": "stochastic_depth",
    "depth": "depth",
    "stream": "stream",
}


def study_module(name: str) -> ModuleType:
    """The module of study `name` (a key of STUDIES); ValueError naming the studies otherwise."""
    if name not in STUDIES:
        raise ValueError(f"no study {name!r}: the studies are {', '.join(STUDIES)}")
    return importlib.import_module(f"resstream.studies.{STUDIES[name]}")
