"""Config values that name Python functions (`reward.rule`, `judge`): `"package.module:function"`."""

from __future__ import annotations

import importlib
from typing import Callable


def import_callable(path: str, what: str = "reward.rule") -> Callable:
    """`"package.module:function"` -> the function, with an error naming the setting `what` and the fix."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"{what} {path!r}: cannot import module {module_name!r} ({err}); check the path and "
                          "that the module is installed (on every Ray node for a cluster job)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImportError(f"{what} {path!r}: module {module_name!r} has no function {attr!r}")
    return fn
