"""The CUDA scans' segment rule (csrc/segments.h), through
``_C.segment_chunks``: host code, so it is checked on any machine."""
import pytest

from mmvmamba.ops import _ext

pytestmark = pytest.mark.skipif(
    not _ext.ext_status()[0], reason='needs mmvmamba._C')

# An H200's 132 SMs; the fused kernel's blocks per SM: 5 forward, 4
# backward (3 where it keeps decays), 32 channels a block, 4 directions.
SMS = 132
FWD_WAVE, BWD_WAVE = SMS * 5, SMS * 4


def plan(chunks, blocks, wave, backward, forced=-1):
    """(chunks per segment, segments)."""
    from mmvmamba import _C
    seg = _C.segment_chunks(chunks, blocks, wave, backward, forced)
    return seg, -(-chunks // seg)


def blocks_of(batch, channels):
    return batch * 4 * -(-channels // 32)


@pytest.mark.parametrize('backward', [False, True])
def test_batch_128_at_224_is_never_split(backward):
    """VMamba-T's stages at 224 x 224, batch 128: enough blocks already."""
    wave = BWD_WAVE if backward else FWD_WAVE
    for side, channels in [(56, 192), (28, 384), (14, 768), (7, 1536)]:
        chunks = -(-side * side // 64)
        assert plan(chunks, blocks_of(128, channels), wave,
                    backward) == (chunks, 1)


def test_forward_at_1024_splits_only_the_first_two_stages():
    """VMamba-T at 1024 x 1024, batch 6: the forward splits where its blocks
    fill less than half a wave, into about two waves."""
    got = [
        plan(side * side // 64, blocks_of(6, channels), FWD_WAVE, False)[1]
        for side, channels in [(256, 192), (128, 384), (64, 768), (32, 1536)]
    ]
    assert got == [10, 5, 1, 1]


def test_backward_at_1024_splits_below_four_waves():
    got = [
        plan(side * side // 64, blocks_of(6, channels), BWD_WAVE, True)[1]
        for side, channels in [(256, 192), (128, 384), (64, 768), (32, 1536)]
    ]
    assert got == [15, 8, 4, 2]


def test_the_forward_threshold_is_half_a_wave():
    assert plan(64, FWD_WAVE // 2, FWD_WAVE, False) == (64, 1)
    assert plan(64, FWD_WAVE // 2 - 1, FWD_WAVE, False)[1] > 1
    # the backward still splits there, and up to four waves
    assert plan(64, FWD_WAVE // 2, BWD_WAVE, True)[1] > 1
    assert plan(64, 4 * BWD_WAVE, BWD_WAVE, True) == (64, 1)


def test_short_sequences_and_the_minimum_segment():
    # fewer than 2 x 4 chunks: one segment; else segments of at least 4
    assert plan(7, 1, FWD_WAVE, False) == (7, 1)
    assert plan(10, 8, FWD_WAVE, False) == (4, 3)
    assert plan(10, 8, BWD_WAVE, True) == (4, 3)


def test_forced_lengths():
    assert plan(100, 1, FWD_WAVE, False, forced=0) == (100, 1)
    assert plan(100, 1, FWD_WAVE, True, forced=16) == (16, 7)
    assert plan(100, 10**6, FWD_WAVE, False, forced=16) == (16, 7)
    assert plan(100, 1, FWD_WAVE, False, forced=500) == (100, 1)
    # never more than 65535 segments
    assert plan(200_000, 1, FWD_WAVE, False, forced=1) == (4, 50_000)


@pytest.mark.parametrize('args', [(0, 1, 1, False, -1), (1, 0, 1, True, -1),
                                  (1, 1, 0, False, -1), (1, 1, 1, False, -2)])
def test_bad_arguments_raise(args):
    from mmvmamba import _C
    with pytest.raises(ValueError, match='segment_chunks: need chunks, '
                       'blocks and wave >= 1 and forced >= -1'):
        _C.segment_chunks(*args)
