import pytest
import torch

from gptqlab.quant.pack import codes_per_run, pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 7), (96, 64), (256, 33)])
def test_round_trip_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0] * bits // 32, shape[1])
    assert torch.equal(unpack_rows(packed, bits), codes)
    packed_c = pack_cols(codes.t().contiguous(), bits)
    assert packed_c.shape == (shape[1], shape[0] * bits // 32)
    assert torch.equal(unpack_cols(packed_c, bits), codes.t())


def test_layout_lowest_index_in_lowest_bits():
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)  # inputs 0..7 of one output
    assert pack_rows(codes, 4).item() == 0x76543210
    codes8 = torch.tensor([[0x11], [0x22], [0x33], [0x44]], dtype=torch.int32)
    assert pack_rows(codes8, 8).item() == 0x44332211


def test_symmetric_zero_points_pack_to_known_words():
    # v2 stores z = 8 for symmetric 4-bit; v1 stores z - 1 = 7 (docs/FORMAT.md).
    assert pack_cols(torch.full((1, 8), 8), 4).item() & 0xFFFFFFFF == 0x88888888
    assert pack_cols(torch.full((1, 8), 7), 4).item() == 0x77777777
    assert pack_cols(torch.full((1, 4), 127), 8).item() == 0x7F7F7F7F


def test_three_bit_codes_straddle_words():
    # 32 codes → 3 words; code 10 sits at stream bits 30..32, code 21 at bits 63..65.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b111
    w = pack_rows(codes, 3)[:, 0].tolist()
    assert [x & 0xFFFFFFFF for x in w] == [0xC0000000, 0x1, 0x0]
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[21] = 0b111
    w = pack_rows(codes, 3)[:, 0].tolist()
    assert [x & 0xFFFFFFFF for x in w] == [0x0, 0x80000000, 0x3]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one of"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        packed_rows(48, 3)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_rows(torch.full((8, 1), 16), 4)


def test_codes_per_run_is_the_packing_multiple():
    assert [codes_per_run(b) for b in (2, 3, 4, 8)] == [16, 32, 8, 4]
    for bits in (2, 3, 4, 8):
        m = codes_per_run(bits)
        assert packed_rows(m, bits) * 32 == m * bits
        with pytest.raises(ValueError, match=f"multiple of {m}"):
            packed_rows(m + m // 2, bits)
