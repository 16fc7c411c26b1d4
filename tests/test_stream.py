"""The pretraining shard stream (``rsdiff.train.stream.ShardStream``) on real WebDataset shards:
unreadable shards and malformed samples are skipped and counted; too large a share of damaged
shards, no readable shard at all, or a store that cannot be used are one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rsdiff import storage
from rsdiff.config import load_config
from rsdiff.data.normalize import Normalizer
from rsdiff.data.shards import Sample, ShardWriter
from rsdiff.errors import DataError
from rsdiff.storage import AccessError
from rsdiff.train.config import PretrainConfig, TrainPlan
from rsdiff.train.rank_data import RankData, stop_loader
from rsdiff.train.shuffle import ShardIndex, locate
from rsdiff.train.stream import ShardStream

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
NORM = Normalizer((100.0,) * 4, (10.0,) * 4)


def _shard(folder, prefix: str, n: int, bad_sample: bool = False, small_tile: bool = False) -> str:
    rng = np.random.default_rng(len(prefix))
    with ShardWriter(str(folder), prefix, 1 << 30) as w:
        for i in range(n):
            tile = rng.integers(50, 150, (4, 16, 16), dtype=np.uint16)
            if bad_sample and i == 1:
                tile = tile[0]  # a 2-D tile: malformed
            if small_tile and i == 2:
                tile = tile[:, :12, :]  # smaller than the crop: would not stack into a batch
            w.write(Sample(f"s/{prefix}_{i}", tile, None, {}))
    return w.shards[0].uri


def _loader(stream: ShardStream, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=4, num_workers=workers)


def test_a_slot_whose_shard_is_corrupt_reads_another(tmp_path):
    good = _shard(tmp_path, "good", 12)
    corrupt = tmp_path / "corrupt-00000.tar"
    corrupt.write_bytes(np.random.default_rng(0).bytes(30_000))
    # Two loader slots, two shards: one slot's whole share (and its resample) is the corrupt one.
    for seed in range(4):
        stream = ShardStream(
            [good, str(corrupt)],
            0,
            1,
            NORM,
            16,
            shuffle_buffer=0,
            augment=False,
            seed=seed,
            max_bad_fraction=0.5,
        )
        batches = iter(_loader(stream, workers=2))
        for _ in range(12):
            assert next(batches)["x"].shape == (4, 4, 16, 16)
        assert stream.errors >= 1


def test_a_tile_smaller_than_the_crop_is_skipped_and_counted_not_fatal_in_a_batch(tmp_path):
    shard = _shard(tmp_path, "small", 9, small_tile=True)
    stream = ShardStream([shard], 0, 1, NORM, 16, shuffle_buffer=0, augment=False)
    batches = iter(_loader(stream, workers=0))
    for _ in range(4):  # two epochs of the 8 good tiles
        assert next(batches)["x"].shape == (4, 4, 16, 16)
    assert stream.errors == 2  # once per epoch


def test_malformed_samples_are_skipped_and_counted(tmp_path):
    shard = _shard(tmp_path, "mixed", 9, bad_sample=True)
    stream = ShardStream([shard], 0, 1, NORM, 16, shuffle_buffer=0, augment=False)
    batches = iter(_loader(stream, workers=0))
    got = [next(batches) for _ in range(4)]  # 8 good samples per pass, 16 needed: two passes
    assert all(b["x"].shape == (4, 4, 16, 16) for b in got)
    assert stream.errors == 2


def test_no_readable_shard_is_one_clear_error(tmp_path):
    bad = [tmp_path / f"bad-{i}.tar" for i in range(2)]
    for i, b in enumerate(bad):
        b.write_bytes(np.random.default_rng(i).bytes(5000))
    stream = ShardStream([str(b) for b in bad], 0, 1, NORM, 16, shuffle_buffer=0, max_bad_fraction=1.0)
    with pytest.raises(DataError, match=r"none of the 2 shards .* gave a readable sample"):
        next(iter(_loader(stream, workers=0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_more_damaged_shards_than_the_limit_fail_the_stream_naming_them(tmp_path, workers):
    """10 shards, rank 0 of 2 reading a share of 5 per epoch: one damaged shard is within
    ``max_bad_fraction=0.2`` (skipped and counted, however often it is met); two are not, whichever
    loader worker met them, and the error names the limit, a shard and the first error."""
    good = [_shard(tmp_path, f"g{i}", 4) for i in range(9)]
    for name in ("bad-a", "bad-b"):
        (tmp_path / f"{name}-00000.tar").write_bytes(np.random.default_rng(1).bytes(3000))
    bad = [str(tmp_path / f"{name}-00000.tar") for name in ("bad-a", "bad-b")]
    one_bad = ShardStream([*good, bad[0]], 0, 2, NORM, 16, shuffle_buffer=0, max_bad_fraction=0.2)
    batches = iter(_loader(one_bad, workers))
    for _ in range(60):  # about 12 epochs of the rank's share: the damaged shard is met often
        next(batches)
    assert one_bad.errors >= 2
    two_bad = ShardStream([*good[:8], *bad], 0, 2, NORM, 16, shuffle_buffer=0, max_bad_fraction=0.2)
    batches = iter(_loader(two_bad, workers))
    with pytest.raises(DataError, match=r"2 damaged shards among the 5 that rank 0 reads \(more than "
                       r"data\.max_bad_shard_fraction=0\.2\), e\.g\. .*bad-.-00000\.tar"):  # fmt: skip
        for _ in range(60):
            next(batches)
    stop_loader(batches)  # else the failed loader's workers linger until a garbage collection


def test_a_rank_whose_stream_fails_has_stopped_its_loader_workers_when_the_error_arrives(tmp_path):
    """A training rank's loader workers are gone by the time its stream error reaches the training
    loop, not when a later garbage collection frees the loader (torch then waits 5 s per worker)."""
    import psutil

    good = [_shard(tmp_path, f"g{i}", 4) for i in range(3)]
    for name in ("bad-a", "bad-b"):
        (tmp_path / f"{name}-00000.tar").write_bytes(np.random.default_rng(1).bytes(3000))
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny.yaml", [
        "data.num_workers=2", "data.batch_size=4", "data.shuffle_buffer=0", "data.max_bad_shard_fraction=0",
    ])  # fmt: skip
    plan = TrainPlan(
        model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim, data=cfg.data, perf=cfg.perf,
        tracking=cfg.tracking, checkpoint=cfg.checkpoint, seed=cfg.seed, run_dir=str(tmp_path), meta={},
        shards=[*good, *(str(tmp_path / f"{n}-00000.tar") for n in ("bad-a", "bad-b"))], in_channels=4,
        image_size=16, normalizer=NORM,
    )  # fmt: skip
    before = set(psutil.Process().children())
    data = RankData(plan, 0, 1, None, 0, 0, pin=False)
    workers = [p for p in psutil.Process().children() if p not in before]
    assert len(workers) == 2
    with pytest.raises(DataError, match="damaged shards"):
        for _ in range(60):
            data.next_batch()
    assert [p.pid for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def test_a_store_that_cannot_be_used_fails_the_stream_at_once_not_as_a_bad_shard(tmp_path, s3_endpoint):
    good = _shard(tmp_path, "good", 8)
    stream = ShardStream([good, "s3://no-such-bucket-rsdiff/x-00000.tar"], 0, 1, NORM, 16, shuffle_buffer=0,
                         max_bad_fraction=1.0)  # fmt: skip
    batches = iter(_loader(stream, workers=0))
    with pytest.raises(AccessError, match="bucket 'no-such-bucket-rsdiff' does not exist"):
        for _ in range(4):  # two epochs
            next(batches)
    assert stream.errors == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_at_the_exact_sample(tmp_path, workers):
    """Consume part of a shuffled, augmented stream, then start a new one from the recorded
    positions: it yields exactly what the first stream would have yielded next, across an
    epoch boundary, with the loader's workers resuming their round-robin at the right slot."""
    shards = [_shard(tmp_path, f"p{i}", 7) for i in range(3)]
    tile = 12  # random 12 px crops of the 16 px tiles
    make = lambda **kw: ShardStream(shards, 0, 1, NORM, tile, shuffle_buffer=5, seed=3, **kw)  # noqa: E731
    straight = iter(_loader(make(), workers))
    expected = [next(straight) for _ in range(14)]  # 56 samples: several epochs of every slot
    for cut in (1, 3, 6):
        positions = {}
        for batch in expected[:cut]:
            positions = ShardStream.positions_after(positions, batch)
        resumed = iter(_loader(make(resume=positions, first_slot=cut % max(1, workers)), workers))
        for want in expected[cut:]:
            got = next(resumed)
            assert torch.equal(got["x"], want["x"]) and torch.equal(got["index"], want["index"])
    assert len({int(e) for b in expected for e in b["epoch"]}) >= 3


def _indexed(tmp_path, n_shards: int, per_shard: int, bad_shard: int | None = None):
    """``n_shards`` shards of ``per_shard`` 16 px tiles and their index (``bad_shard`` holds a
    malformed sample: the index still claims ``per_shard`` tiles)."""
    shards = [_shard(tmp_path, f"q{i:02d}", per_shard, bad_sample=i == bad_shard) for i in range(n_shards)]
    return shards, ShardIndex({u: per_shard for u in shards}, (4, 16, 16))


def _stream(shards, index, **kw) -> ShardStream:
    return ShardStream(
        shards, 0, 1, NORM, 12, shuffle_buffer=5, seed=3, index=index, max_bad_fraction=1.0, **kw
    )


def _positions(batches) -> dict:
    positions: dict = {}
    for batch in batches:
        positions = ShardStream.positions_after(positions, batch)
    return positions


@pytest.mark.parametrize("workers", [0, 2])
def test_an_indexed_resume_replays_the_draws_and_continues_at_the_exact_sample(tmp_path, workers):
    """With the shards' sample counts, a resume replays the shuffle and augmentation draws without
    reading the skipped samples and yields exactly what the straight stream yields next: mid-epoch,
    in the buffer's final drain, and at an epoch boundary."""
    shards, index = _indexed(tmp_path, 30, 6)
    straight = iter(_loader(_stream(shards, index), workers))
    expected = [next(straight) for _ in range(52)]  # 208 samples: past the first epoch of each slot
    for cut in (1, 20, 44, 45, 50) if workers == 0 else (1, 9, 22, 23, 30):
        positions = _positions(expected[:cut])
        assert all(p.replayable for p in positions.values())
        resumed = iter(
            _loader(_stream(shards, index, resume=positions, first_slot=cut % max(1, workers)), workers)
        )
        for want in expected[cut : cut + 6]:
            got = next(resumed)
            assert torch.equal(got["x"], want["x"]) and torch.equal(got["index"], want["index"]), cut


def test_an_indexed_resume_reads_only_the_buffered_shards_not_the_epoch(tmp_path, monkeypatch):
    """Resuming 80 samples into a 180-sample epoch opens the shards that hold the buffered tiles
    and the one it stands in, not the 14 shards read before it (an unindexed resume re-reads them)."""
    shards, index = _indexed(tmp_path, 30, 6)
    straight = iter(_loader(_stream(shards, index), 0))
    expected = [next(straight) for _ in range(21)]
    positions = _positions(expected[:20])
    opened: list[str] = []
    real_open = storage.open_stream
    monkeypatch.setattr(storage, "open_stream", lambda uri: opened.append(uri) or real_open(uri))
    for with_index, most in ((index, 3), (None, 30)):
        opened.clear()
        resumed = iter(_loader(_stream(shards, with_index, resume=positions), 0))
        assert torch.equal(next(resumed)["x"], expected[20]["x"])
        assert len(set(opened)) <= most, (with_index is not None, len(set(opened)))
        if with_index is None:
            assert len(set(opened)) >= 14


@pytest.mark.parametrize("damage", ["malformed sample", "miscounted shard"])
def test_a_resume_after_damage_or_a_wrong_count_re_reads_the_epoch_and_stays_exact(tmp_path, damage):
    """An epoch that met a malformed sample, or a shard holding other than the index says, is not
    replayable: its positions say so and the resume re-reads the epoch, still at the exact sample."""
    shards, index = _indexed(tmp_path, 30, 6, bad_shard=4 if damage == "malformed sample" else None)
    if damage == "miscounted shard":
        index = ShardIndex({**index.samples, shards[4]: 7}, index.tile_shape)
    straight = iter(_loader(_stream(shards, index), 0))
    expected = [next(straight) for _ in range(48)]
    positions = _positions(expected[:43])  # the epoch's last samples: every shard was read
    assert not positions[0].replayable
    resumed = iter(_loader(_stream(shards, index, resume=positions), 0))
    for want in expected[43:]:
        assert torch.equal(next(resumed)["x"], want["x"])


def test_a_resume_whose_buffered_shard_became_unreadable_re_reads_and_counts_it(tmp_path, caplog):
    """A shard holding buffered tiles that is now corrupt: the replay is abandoned with a warning,
    the epoch re-read, and the damaged shard counted, not a crash."""
    shards, index = _indexed(tmp_path, 30, 6)
    straight = iter(_loader(_stream(shards, index), 0))
    positions = _positions([next(straight) for _ in range(20)])
    head_shard = _stream(shards, index).shard_order(0)[80 // 6]
    Path(head_shard).write_bytes(np.random.default_rng(1).bytes(20_000))
    with caplog.at_level("WARNING", logger="rsdiff.train.stream"):
        resumed = _stream(shards, index, resume=positions)
        batches = iter(_loader(resumed, 0))
        assert next(batches)["x"].shape == (4, 4, 12, 12)
    assert "re-reading the epoch to resume" in caplog.text
    assert resumed.errors >= 1


def test_sample_ids_map_to_shards_past_empty_ones_and_a_fresh_epoch_reads_every_shard(tmp_path):
    """``locate`` skips shards the index calls empty; a fresh epoch still reads every shard (one
    the index wrongly calls empty is read, and makes the epoch not replayable)."""
    assert locate([0, 3, 0, 2], [0, 2, 3, 4, 5]) == [(1, 0), (1, 2), (3, 0), (3, 1), (4, 0)]
    shards, index = _indexed(tmp_path, 2, 6)
    first = _stream(shards, index).shard_order(0)[0]
    stream = _stream(shards, ShardIndex({u: 0 if u == first else 6 for u in shards}, index.tile_shape))
    items = [item for _, item in zip(range(12), iter(stream), strict=False)]
    assert sorted(int(i["index"]) for i in items) == list(range(12)) and not items[-1]["replayable"]
