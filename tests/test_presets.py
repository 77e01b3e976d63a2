"""Model presets: HF config facts, tensor-parallel sharding, name lookup."""

import pytest

from moetune.presets import (
    DEFAULT_BATCH_SIZES,
    MODEL_PRESETS,
    ModelPreset,
    find_preset,
    preset_problem,
)
from moetune.problem import Problem

# (preset, E, K, full intermediate, topk): the public config.json values, restated here so a typo
# in the preset table fails a test.
FACTS = [
    ("Mixtral-8x7B", 8, 4096, 14336, 2),
    ("Mixtral-8x22B", 8, 6144, 16384, 2),
    ("Qwen3-30B-A3B", 128, 2048, 768, 8),
    ("Qwen3-235B-A22B", 128, 4096, 1536, 8),
    ("Qwen3-30B-A3B-FP8", 128, 2048, 768, 8),
    ("Qwen3-235B-A22B-FP8", 128, 4096, 1536, 8),
    ("DeepSeek-V3", 256, 7168, 2048, 8),
    ("gpt-oss-20b", 32, 2880, 2880, 4),
    ("gpt-oss-120b", 128, 2880, 2880, 4),
    ("OLMoE-1B-7B", 64, 2048, 1024, 8),
]


@pytest.mark.parametrize(("name", "E", "K", "inter", "topk"), FACTS)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shard_n_is_intermediate_over_tp(name, E, K, inter, topk, tp):
    block = MODEL_PRESETS[name].block_shape
    if block is not None and (inter // tp) % block[0]:
        with pytest.raises(ValueError, match="multiple of block_n"):
            preset_problem(name, tp)
        return
    p = preset_problem(name, tp)
    assert (p.E, p.K, p.topk, p.N) == (E, K, topk, inter // tp)


def test_every_preset_is_covered_by_facts():
    assert {f[0] for f in FACTS} == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_preset_is_a_valid_problem(name):
    p = preset_problem(name)
    assert isinstance(p, Problem)
    # Problem validates in __post_init__; rebuilding from its fields must not raise either.
    assert Problem(**{f: getattr(p, f) for f in p.__dataclass_fields__}) == p


def test_native_quantization_and_activation():
    ds = preset_problem("DeepSeek-V3", 8)
    assert (ds.quant, ds.block_shape, ds.N) == ("fp8_w8a8", (128, 128), 256)
    oss = preset_problem("gpt-oss-20b")
    assert (oss.dtype, oss.quant, oss.bias, oss.activation) == (
        "bfloat16",
        None,
        True,
        "swigluoai",
    )
    mix = preset_problem("Mixtral-8x7B")
    assert (mix.quant, mix.bias, mix.activation) == (None, False, "silu")


def test_quant_override_and_none():
    assert preset_problem("DeepSeek-V3", quant=None).block_shape is None
    assert preset_problem("DeepSeek-V3", quant=None).quant is None
    # An override is per-tensor: the checkpoint's block shape belongs to its own quantization.
    assert preset_problem("DeepSeek-V3", quant="int8_w8a8").block_shape is None
    assert preset_problem("Mixtral-8x7B", quant="fp8_w8a8").quant == "fp8_w8a8"
    assert preset_problem("Mixtral-8x7B", dtype="fp16").dtype == "float16"


@pytest.mark.parametrize("tp", [0, -2, 3, 7])
def test_tp_must_divide_intermediate(tp):
    """14336 = 2**11 * 7 is divisible by 7 but not by 3; 0 and negatives are not tp sizes."""
    if tp == 7:
        assert preset_problem("Mixtral-8x7B", tp).N == 2048
        return
    with pytest.raises(ValueError, match="tp"):
        preset_problem("Mixtral-8x7B", tp)


def test_fp8_checkpoint_is_its_own_preset():
    """Qwen's fp8 checkpoint name must not fall back to the bf16 preset by suffix."""
    p = preset_problem("Qwen/Qwen3-30B-A3B-FP8", 2)
    assert (p.quant, p.block_shape, p.N) == ("fp8_w8a8", (128, 128), 384)
    assert preset_problem("Qwen3-30B-A3B", 2).quant is None
    with pytest.raises(ValueError, match="block_n=128"):
        preset_problem("Qwen3-30B-A3B-FP8", 4)  # 768 / 4 = 192


def test_block_quant_shard_must_hold_whole_blocks():
    """vLLM refuses a shard whose N is not a multiple of block_n: 2048 / 32 = 64 < 128."""
    assert preset_problem("DeepSeek-V3", 16).N == 128
    with pytest.raises(ValueError, match="block_n=128"):
        preset_problem("DeepSeek-V3", 32)
    # Unquantized, the same shard is fine.
    assert preset_problem("DeepSeek-V3", 32, quant=None).N == 64


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("mixtral-8x7b", "Mixtral-8x7B"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B"),
        ("Mixtral-8x22B-v0.1", "Mixtral-8x22B"),
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen3-30B-A3B"),
        ("Qwen/Qwen3-30B-A3B-FP8", "Qwen3-30B-A3B-FP8"),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "Qwen3-235B-A22B-FP8"),
        ("Qwen/Qwen3-30B-A3B-Thinking-2507", "Qwen3-30B-A3B"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1-FP8", "Mixtral-8x7B"),
        ("deepseek-ai/DeepSeek-R1", "DeepSeek-V3"),
        ("openai/gpt-oss-120b", "gpt-oss-120b"),
        ("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B"),
    ],
)
def test_lookup_is_tolerant(query, expected):
    assert find_preset(query).name == expected


def test_lookup_prefers_the_longest_matching_name(monkeypatch):
    """A preset whose name prefixes another's must not capture the longer model's checkpoints."""
    short = ModelPreset("Qwen3-30B", "example/Qwen3-30B", 64, 2048, 512, 4)
    monkeypatch.setitem(MODEL_PRESETS, short.name, short)
    assert find_preset("Qwen/Qwen3-30B-A3B-Instruct-2507").name == "Qwen3-30B-A3B"
    assert find_preset("Qwen3-30B-Base").name == "Qwen3-30B"


@pytest.mark.parametrize("query", ["llama-3-8b", "mixtral", "Mixtral-8x7", "gpt-oss-1200b"])
def test_unknown_name_lists_known(query):
    with pytest.raises(ValueError, match="Mixtral-8x7B") as err:
        preset_problem(query)
    assert "gpt-oss-20b" in str(err.value)


def test_default_batch_sizes_match_vllm_benchmark():
    assert DEFAULT_BATCH_SIZES == (
        1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096,
    )  # fmt: skip
    assert list(DEFAULT_BATCH_SIZES) == sorted(set(DEFAULT_BATCH_SIZES))
