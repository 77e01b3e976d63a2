"""Built-in model presets: the MoE layer shapes of well-known checkpoints, usable offline.

Each preset records the public Hugging Face ``config.json`` facts the fused-MoE kernel depends on
(expert count, hidden size, per-expert intermediate size before tensor parallelism, top-k), plus
the checkpoint's native weight quantization, so ``moetune`` can tune a model by name without
network access or ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moetune.problem import Problem

# vLLM benchmarks/kernels/benchmark_moe.py tunes these batch sizes by default; the tables it
# writes (and vLLM ships) are keyed by them, so a moetune table covers the same points.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096,
)  # fmt: skip


@dataclass(frozen=True)
class ModelPreset:
    """One MoE model's layer shape. ``intermediate`` is the full per-expert size (before TP)."""

    name: str
    hf_id: str
    E: int
    K: int  # hidden_size
    intermediate: int  # intermediate_size / moe_intermediate_size of one expert
    topk: int
    dtype: str = "bfloat16"  # what vLLM's dtype="auto" computes in
    quant: str | None = None  # native weight quantization, as a table dtype name
    block_shape: tuple[int, int] | None = None
    bias: bool = False
    activation: str = "silu"
    aliases: tuple[str, ...] = ()
    note: str = ""


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("Mixtral-8x7B", "mistralai/Mixtral-8x7B-Instruct-v0.1", 8, 4096, 14336, 2),
        ModelPreset("Mixtral-8x22B", "mistralai/Mixtral-8x22B-Instruct-v0.1", 8, 6144, 16384, 2),
        ModelPreset("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", 128, 2048, 768, 8),
        ModelPreset("Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B", 128, 4096, 1536, 8),
        ModelPreset(
            "Qwen3-30B-A3B-FP8",
            "Qwen/Qwen3-30B-A3B-FP8",
            128,
            2048,
            768,
            8,
            quant="fp8_w8a8",
            block_shape=(128, 128),
            note="Qwen's fp8 checkpoint: e4m3 weights with 128x128 block scales",
        ),
        ModelPreset(
            "Qwen3-235B-A22B-FP8",
            "Qwen/Qwen3-235B-A22B-FP8",
            128,
            4096,
            1536,
            8,
            quant="fp8_w8a8",
            block_shape=(128, 128),
            note="Qwen's fp8 checkpoint: e4m3 weights with 128x128 block scales",
        ),
        ModelPreset(
            "DeepSeek-V3",
            "deepseek-ai/DeepSeek-V3",
            256,
            7168,
            2048,
            8,
            quant="fp8_w8a8",
            block_shape=(128, 128),
            aliases=("DeepSeek-R1",),
            note="ships fp8 e4m3 weights with 128x128 block scales (weight_block_size)",
        ),
        ModelPreset(
            "gpt-oss-20b",
            "openai/gpt-oss-20b",
            32,
            2880,
            2880,
            4,
            bias=True,
            activation="swigluoai",
            note="ships MXFP4 expert weights, which moetune does not tune; preset is bf16",
        ),
        ModelPreset(
            "gpt-oss-120b",
            "openai/gpt-oss-120b",
            128,
            2880,
            2880,
            4,
            bias=True,
            activation="swigluoai",
            note="ships MXFP4 expert weights, which moetune does not tune; preset is bf16",
        ),
        ModelPreset("OLMoE-1B-7B", "allenai/OLMoE-1B-7B-0924", 64, 2048, 1024, 8),
    )
}

# Name separators after which a longer checkpoint name still means the preset
# ("Mixtral-8x7B-Instruct-v0.1", "Qwen3-30B-A3B-Instruct-2507", "OLMoE-1B-7B-0924").
_SUFFIX_SEPARATORS = ("-", "_")


def _norm(name: str) -> str:
    return name.strip().rsplit("/", 1)[-1].lower()


def find_preset(name: str) -> ModelPreset:
    """Preset by name: case-insensitive, org prefix and checkpoint suffixes ignored.

    ``mistralai/Mixtral-8x7B-Instruct-v0.1`` finds ``Mixtral-8x7B``; the longest matching
    preset name wins, and a name ending in ``-FP8`` takes the matching ``-FP8`` preset where
    there is one. Unknown names raise ValueError listing the known ones.
    """
    wanted = _norm(name)
    best: tuple[int, ModelPreset] | None = None
    for preset in MODEL_PRESETS.values():
        for candidate in (preset.name, preset.hf_id, *preset.aliases):
            key = _norm(candidate)
            matches = wanted == key or any(wanted.startswith(key + s) for s in _SUFFIX_SEPARATORS)
            if matches and (best is None or len(key) > best[0]):
                best = (len(key), preset)
    if best is None:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}"
        )
    # "Qwen3-30B-A3B-Instruct-2507-FP8" is the fp8 checkpoint of an instruct variant: its
    # weights are those of the -FP8 preset, not the bf16 one its prefix names.
    fp8 = MODEL_PRESETS.get(best[1].name + "-FP8")
    if fp8 is not None and wanted.endswith(("-fp8", "_fp8")):
        return fp8
    return best[1]


def preset_problem(
    name: str, tp: int = 1, *, dtype: str | None = None, quant: str | None = "default"
) -> Problem:
    """The :class:`Problem` of one tensor-parallel shard of a preset's MoE layer.

    ``N = intermediate // tp`` (vLLM's table ``N``). ``quant="default"`` keeps the checkpoint's
    native quantization, ``None`` tunes unquantized, any other name overrides it; the preset's
    block shape is kept only with its own native quant (an override is per-tensor).

    Block quantization follows vLLM's weight loader, which refuses a shard whose gate/up output
    (``N``) is not a multiple of ``block_n``, and, under TP, a down-projection input (also ``N``)
    that is not a multiple of ``block_k``: a shard must hold whole scale blocks. So DeepSeek-V3
    (2048, [128, 128]) accepts tp up to 16.
    """
    preset = find_preset(name)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if preset.intermediate % tp:
        raise ValueError(
            f"{preset.name}: intermediate size {preset.intermediate} is not divisible by tp={tp}"
        )
    N = preset.intermediate // tp
    q = preset.quant if quant == "default" else quant
    block = preset.block_shape if q == preset.quant else None
    if block is not None:
        bn, bk = block
        if N % bn:
            raise ValueError(
                f"{preset.name} at tp={tp}: shard N={N} is not a multiple of block_n={bn} "
                "(vLLM cannot split a scale block across ranks)"
            )
        if tp > 1 and N % bk:
            raise ValueError(
                f"{preset.name} at tp={tp}: shard N={N} is not a multiple of block_k={bk} "
                "(the down projection's K)"
            )
    return Problem(
        E=preset.E,
        N=N,
        K=preset.K,
        topk=preset.topk,
        dtype=dtype or preset.dtype,
        quant=q,
        block_shape=block,
        bias=preset.bias,
        activation=preset.activation,
    )
