"""The activation kernel against the PyTorch ops it replaces, NaN propagation included."""

import pytest
import torch

from moetune.activation import apply_activation, apply_activation_torch


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize(("T", "N"), [(1, 16), (37, 96), (5, 1500)])  # N > one block of columns
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_matches_torch_ops(activation, T, N, dtype, device):
    x = (torch.randn(T, 2 * N, device=device) * 6).to(dtype)  # past the swiglu clamp at 7
    got = apply_activation(x, activation)
    want = apply_activation_torch(x, activation)
    assert got.dtype == dtype and got.shape == (T, N)
    # GPUs evaluate exp() to within a few ulp, not correctly rounded: one ulp of the output
    # dtype (fp16: 2**-10) may differ; the interpreter (NumPy) matches PyTorch exactly.
    rtol = 2**-10 if dtype == torch.float16 and device == "cuda" else 1e-5
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_nan_poison_survives_the_clamps(activation, device):
    """An unwritten GEMM1 row is NaN; the activation must not turn it into finite values."""
    x = torch.randn(4, 64, device=device, dtype=torch.float16)
    x[1] = float("nan")
    x[2, 3] = float("nan")
    out = apply_activation(x, activation)
    assert out[1].isnan().all()
    assert out[2].isnan().any()
    assert not out[[0, 3]].isnan().any()


def test_unknown_activation_is_refused(device):
    with pytest.raises(ValueError, match="activation must be one of"):
        apply_activation(torch.zeros(2, 8, device=device), "gelu")


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_the_kernel_does_not_fall_back_to_torch_ops(activation, monkeypatch, device):
    """Equal results alone would also pass a wrapper around the PyTorch version: forbid it."""
    from moetune import activation as act_mod

    x = torch.randn(6, 64, device=device, dtype=torch.float16)
    want = apply_activation_torch(x, activation)

    def forbidden(*args, **kwargs):
        raise AssertionError("the activation fell back to PyTorch")

    monkeypatch.setattr(act_mod, "apply_activation_torch", forbidden)
    monkeypatch.setattr(torch.nn.functional, "silu", forbidden)
    monkeypatch.setattr(torch, "sigmoid", forbidden)
    torch.testing.assert_close(apply_activation(x, activation).float(), want.float())


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_quantization_gives_the_bits_of_the_two_steps(
    activation, per_row, dtype, monkeypatch, device
):
    """Activation + static-scale fp8 in one launch = the activation kernel, then the fp8
    quantization kernel, bit for bit (the activation rounded to its dtype first); a NaN row
    stays NaN, and values past ±448 clamp."""
    from moetune.activation import apply_activation_quantized
    from moetune.quant_kernel import quantize_activation_fast

    T, N = 37, 1500  # N past one block of columns
    x = (torch.randn(T, 2 * N, device=device) * 6).to(dtype)
    x[4] = float("nan")
    scale = (
        torch.rand(T, 1, device=device) * 0.05 + 1e-3
        if per_row
        else torch.tensor([0.004], device=device)
    )
    fp8 = torch.float8_e4m3fn
    want, want_s = quantize_activation_fast(apply_activation(x, activation), fp8, scale=scale)
    from moetune import activation as act_mod
    from moetune import quant_kernel

    def forbidden(*args, **kwargs):  # equal bits alone would also pass the two steps in a row
        raise AssertionError("the fused path ran the two steps")

    monkeypatch.setattr(act_mod, "apply_activation", forbidden)
    monkeypatch.setattr(quant_kernel, "quantize_activation_fast", forbidden)
    monkeypatch.setattr(quant_kernel, "_quant_tensor_kernel", None)
    got, got_s = apply_activation_quantized(x, activation, fp8, scale)
    assert got.dtype == fp8 and got.shape == (T, N)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_s, want_s)
    assert not got[[0, 5]].float().isnan().any()
    if device == "cuda":  # the interpreter casts NaN to fp8 as 384; Triton on a GPU keeps NaN
        assert got[4].float().isnan().all()
    assert got[[0, 5]].float().abs().max() == 448.0  # the small scale clamps some values


def test_fused_quantization_refuses_int8(device):
    from moetune.activation import apply_activation_quantized

    with pytest.raises(ValueError, match="fp8 only"):
        apply_activation_quantized(torch.zeros(2, 8, device=device), "silu", torch.int8,
                                   torch.ones(1, device=device))  # fmt: skip


TILES = [(1, 1024, 4, False), (4, 256, 4, True), (8, 128, 8, False), (2, 512, 8, True)]


def test_the_default_block_narrows_where_it_fits_better(monkeypatch):
    """Mixtral-8x7B's 3,584 columns take 7 blocks of 512, not 4 of 1,024 (one half empty);
    gpt-oss's 2,880 keep 1,024 (3 blocks of 1,024 waste what 6 of 512 do). A tile asked for,
    or FIT_BLOCK off, keeps its block."""
    from moetune import activation
    from moetune.activation import TILE, tile_for

    assert [tile_for(64, n).block for n in (3584, 2880, 7168, 384, 24)] == [
        512,
        1024,
        1024,
        512,
        32,
    ]
    assert tile_for(64, 3584, TILE).block == TILE.block
    monkeypatch.setattr(activation, "FIT_BLOCK", False)
    assert tile_for(64, 3584).block == TILE.block


@pytest.mark.parametrize("tile", TILES[1:], ids=lambda t: "x".join(map(str, t)))
def test_the_tile_reaches_the_launch(tile, monkeypatch, device):
    """The bit-equality test below would pass if the tile were ignored: here the launch's grid
    and constants are those of the tile asked for (fitted to the shape by tile_for)."""
    from moetune import activation
    from moetune.activation import Tile, tile_for

    launches = []
    kernel = activation._activation_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((grid, kwargs))
                return kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(activation, "_activation_kernel", Spy())
    t = Tile(*tile)
    assert tile_for(37, 700, t) == t  # rows and block already fit 37 x 700
    assert tile_for(3, 100, t) == t._replace(rows=min(t.rows, 4), block=128)
    x = torch.randn(37, 1400, device=device).to(torch.float16)
    apply_activation(x, "swigluoai", tile=t)
    ((grid, kw),) = launches
    assert grid == (-(-37 // t.rows), -(-700 // t.block))
    assert (kw["ROWS"], kw["BLOCK"], kw["num_warps"], kw["PAIR_LOAD"]) == tuple(t)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("per_row", [None, False, True])
def test_every_tile_gives_the_same_bits(activation, tile, per_row, device):
    """Programs of several rows (T not a multiple of them), narrower blocks and the paired
    (gate, up) load compute the bits of the default tile, plain (per_row None) and with the
    fp8 step; a NaN row stays NaN."""
    from moetune.activation import Tile, apply_activation_quantized

    T, N = 37, 700  # N past the narrower blocks, not a multiple of them
    x = (torch.randn(T, 2 * N, device=device) * 6).to(torch.float16)
    x[9] = float("nan")
    t = Tile(*tile)
    if per_row is None:
        want, got = apply_activation(x, activation), apply_activation(x, activation, tile=t)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert got[9].isnan().all() and not got[[0, 36]].isnan().any()
        return
    g = torch.Generator(device="cpu").manual_seed(1)
    scale = (torch.rand(T, 1, generator=g) * 0.05 + 1e-3) if per_row else torch.tensor([0.004])
    scale = scale.to(device)
    fp8 = torch.float8_e4m3fn
    want, _ = apply_activation_quantized(x, activation, fp8, scale)
    got, _ = apply_activation_quantized(x, activation, fp8, scale, tile=t)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got[[0, 36]].float().abs().max() > 0
