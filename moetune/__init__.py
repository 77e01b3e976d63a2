"""moetune: an autotuner for the fused MoE Triton kernel that checks every candidate."""

from moetune.check import CheckResult, check_close
from moetune.ops import fused_experts, fused_moe
from moetune.reference import fused_experts_reference

__version__ = "0.1.0"
__all__ = ["CheckResult", "check_close", "fused_experts", "fused_experts_reference", "fused_moe"]
