"""The tables shipped in configs/: well-formed, named the way vLLM looks them up, each with a
provenance sidecar that describes the same problem and GPU, and found by the runtime lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetune import lookup
from moetune.tables import load_table, parse_table_filename, sidecar_path

CONFIGS = Path(__file__).parents[1] / "configs"
TABLES = sorted(p for p in CONFIGS.glob("*.json") if not p.name.endswith(".provenance.json"))
VLLM_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]


def test_configs_ships_tables():
    assert len(TABLES) >= 13


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_shipped_table_is_complete_and_matches_its_provenance(path: Path):
    name = parse_table_filename(path.name)
    assert name.filename == path.name
    table = load_table(path)
    assert list(table.entries) == VLLM_BATCH_SIZES

    side = sidecar_path(path)
    assert side.is_file(), f"{path.name} ships without provenance"
    assert _tuned_batch_sizes(json.loads(side.read_text()), name) == set(VLLM_BATCH_SIZES)
    if name.block_shape:  # a K tile never straddles two weight-scale blocks
        for e in table.entries.values():
            assert name.block_shape[1] % e["BLOCK_SIZE_K"] == 0


def _tuned_batch_sizes(provenance: dict, name) -> set[int]:
    """The batch sizes a sidecar's sweeps tuned for this table: its own sweep's, or for a table
    re-tuned at some batch sizes (``export-configs --merge``) those and the kept entries of the
    sidecar it replaced. Every sweep must be of this table's problem and GPU."""
    sweep = provenance["sweep"]
    prob = sweep["problem"]
    assert (prob["E"], prob["N"]) == (name.E, name.N)
    assert sweep["device_name"] == name.device_name
    assert sweep["interpreter"] is False  # tuned on a GPU, not in Triton's interpreter
    quant = prob["quant"] if prob["quant"] not in (None, "none") else None
    assert name.dtype == quant
    assert name.block_shape == (tuple(prob["block_shape"]) if prob["block_shape"] else None)
    merged = provenance.get("merged")
    if merged is None:
        return set(sweep["batch_sizes"])
    assert set(merged["from_journals"]) <= set(sweep["batch_sizes"])
    previous = merged["previous_sidecar"]
    assert previous is not None, "a merged table must keep the provenance of its kept entries"
    before = previous["sweep"]["problem"]
    assert all(before.get(k) == v for k, v in prob.items() if k in before), "another problem"
    assert set(merged["kept"]) <= _tuned_batch_sizes(previous, name)
    return set(merged["from_journals"]) | set(merged["kept"])


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_runtime_lookup_finds_each_shipped_table(path: Path, monkeypatch):
    for var in lookup.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    name = parse_table_filename(path.name)
    found = lookup.find_table(name.E, name.N, dtype=name.dtype, block_shape=name.block_shape,
                              device_name=name.device_name, gemm=name.gemm)  # fmt: skip
    assert found is not None and found.path.resolve() == path.resolve()
