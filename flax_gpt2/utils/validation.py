"""The type checks every interface uses on user values (config fields, generate's keywords, request bodies,
pickles): Python's bool is an int, and JSON's `true` must never become `1`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
    """A finite real number (int or float, Python or numpy), not a bool: NaN and ±inf are never a setting."""
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
            and math.isfinite(x))
