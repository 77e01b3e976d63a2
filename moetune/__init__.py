"""moetune: an autotuner for the fused MoE Triton kernel that checks every candidate.

The public names import lazily, so ``import moetune`` (or a submodule such as
``moetune.platform``) queries no GPU and imports no triton until the op is needed.
"""

from typing import Any

__version__ = "0.2.16"
__all__ = [
    "CheckResult",
    "check_close",
    "fused_experts",
    "fused_experts_reference",
    "fused_moe",
    "get_config",
]
_WHERE = {
    "CheckResult": "moetune.check",
    "check_close": "moetune.check",
    "fused_experts": "moetune.ops",
    "fused_moe": "moetune.ops",
    "fused_experts_reference": "moetune.reference",
    "get_config": "moetune.lookup",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moetune' has no attribute {name!r}")
