"""The pieces of distributed calibration that need no process group.

* the two statistics whose reduction needed a change to be exact: histograms (a value equal to the
  power-of-two range is re-binned exactly when the range grows, so split/merged histograms equal one
  stream's) and row reservoirs (per-item keys: the rows kept do not depend on the order in which, or
  the split by which, items were seen);
* sharding rules, the ``distributed=`` argument, refused inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segquant_fx.distributed import (
    DistributedContext,
    map_items,
    prompt_owner,
    resolve_distributed,
    shard_bounds,
    shard_items,
)
from segquant_fx.errors import ConfigError
from segquant_fx.passes.observers import RowReservoir, StreamingHistogram


def _fake_ctx(rank: int, world: int) -> DistributedContext:
    """A context for the pure sharding helpers (they never communicate)."""
    return DistributedContext(None, rank, world, "gloo", torch.device("cpu"))


# ------------------------------------------------------------------------------------------ histograms


def test_value_at_the_range_is_rebinned_exactly_when_the_range_grows():
    """1.0 arrives when the range is 1.0 (last bin); the range then grows to 4.0: 1.0 must end in bin
    512 of 2048 (where binning at range 4 puts it), not in the merged last bin 511 (the old behaviour)."""
    grown = StreamingHistogram(1, (), 2048)
    grown.update(torch.tensor([[1.0], [0.25]]))
    assert grown.top[0, 0] == 1  # 1.0 is at the top of range 1.0
    grown.update(torch.tensor([[3.0]]))
    direct = StreamingHistogram(1, (), 2048)
    direct.update(torch.tensor([[3.0], [1.0], [0.25]]))
    assert float(grown.range[0]) == float(direct.range[0]) == 4.0
    assert torch.equal(grown.counts, direct.counts)
    assert grown.counts[0, 0, 512] == 1 and grown.counts[0, 0, 511] == 0
    assert torch.equal(grown.top, direct.top) and float(grown.top.sum()) == 0


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 0.3, -3.0, 4.0, 7.5, -8.0, 1e-3]),
        min_size=1,
        max_size=40,
    ),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    bins=st.sampled_from([8, 64]),
)
def test_split_and_merged_histograms_equal_one_stream(values, cuts, bins):
    """Powers of two on range edges, any split into batches and histograms: the same counts."""
    if len(values) % 2:
        values = [*values, 0.0]
    x = torch.tensor(values, dtype=torch.float32).reshape(-1, 2)
    one = StreamingHistogram(2, (1, 1), bins)
    for row in x:  # one row at a time: the range grows as often as it can
        one.update(row[None])
    bounds = sorted({min(c, x.shape[0]) for c in cuts} | {0, x.shape[0]})
    parts = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        h = StreamingHistogram(2, (1, 1), bins)
        if b > a:
            h.update(x[a:b])
        parts.append(h)
    merged = StreamingHistogram.merged(parts)
    batched = StreamingHistogram(2, (1, 1), bins)
    batched.update(x)
    for h in (merged, batched):
        for name in ("counts", "zeros", "range", "maxval"):
            assert torch.equal(getattr(h, name), getattr(one, name)), name


# ------------------------------------------------------------------------------------------ reservoirs


def _feed(order: list[int], batches: list[torch.Tensor], capacity: int) -> RowReservoir:
    r = RowReservoir(3, capacity, seed=7)
    for i in order:
        r.begin_item(i)
        r.update(batches[i])
    return r


@settings(max_examples=30, deadline=None)
@given(perm_seed=st.integers(0, 1000), capacity=st.integers(1, 40), n=st.integers(1, 12))
def test_per_item_keys_keep_the_same_rows_whatever_the_order(perm_seed, capacity, n):
    """The kept (key, order, row) triples depend only on the items, not on the arrival order."""
    g = torch.Generator().manual_seed(perm_seed)
    batches = [torch.randn(1 + i % 4, 3, generator=g) for i in range(n)]
    a = _feed(list(range(n)), batches, capacity)
    perm = torch.randperm(n, generator=g).tolist()
    b = _feed(perm, batches, capacity)

    def triples(r: RowReservoir) -> list[tuple]:
        return sorted(zip(r.order.tolist(), r.keys.tolist(), map(tuple, r.rows.tolist()), strict=True))

    assert triples(a) == triples(b)
    assert torch.equal(a.order, torch.sort(a.order).values)  # in arrival (= item) order
    assert a.rows.shape[0] == min(capacity, sum(x.shape[0] for x in batches))


def test_an_item_offered_again_after_a_failure_gets_the_same_keys():
    r = RowReservoir(3, 10, seed=1)
    r.begin_item(4)
    state = r._gen.get_state()
    r.update(torch.ones(2, 3))
    again = RowReservoir(3, 10, seed=1)
    again.begin_item(4)
    assert torch.equal(again._gen.get_state(), state)


# ------------------------------------------------------------------------------------------ sharding


def test_shard_bounds_cover_everything_once():
    for n in range(0, 12):
        for world in range(1, 5):
            covered = [i for r in range(world) for i in range(*shard_bounds(n, r, world))]
            assert covered == list(range(n))
    assert [prompt_owner(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_shard_items_blocks_for_sized_and_dealt_for_unsized():
    items = list(range(10))
    assert [list(shard_items(items, _fake_ctx(r, 3))[0]) for r in range(3)] == [
        [(0, 0), (1, 1), (2, 2)],
        [(3, 3), (4, 4), (5, 5)],
        [(6, 6), (7, 7), (8, 8), (9, 9)],
    ]
    pairs, total = shard_items(iter(items), _fake_ctx(1, 3), max_items=8)
    assert total is None and list(pairs) == [(1, 1), (4, 4), (7, 7)]
    pairs, total = shard_items(items, _fake_ctx(1, 2), max_items=5)
    assert total == 5 and list(pairs) == [(2, 2), (3, 3), (4, 4)]


def test_indexable_items_are_read_only_in_the_own_block():
    class Dataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.read: list[int] = []

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> int:
            self.read.append(i)
            return i

    ds = Dataset()
    mapped = map_items(lambda v: v * 10, ds)
    pairs, total = shard_items(mapped, _fake_ctx(1, 2))
    assert total == 8 and list(pairs) == [(4, 40), (5, 50), (6, 60), (7, 70)]
    assert ds.read == [4, 5, 6, 7]


def test_shuffling_dataloader_is_refused():
    """A shuffled DataLoader gives every process another order: refused, naming the fix."""
    loader = torch.utils.data.DataLoader(list(range(4)), shuffle=True)
    with pytest.raises(ConfigError, match="shuffle=False"):
        shard_items(map_items(lambda v: v, loader), _fake_ctx(0, 2))


# ------------------------------------------------------------------------------------------ the argument


def test_distributed_argument_without_a_process_group():
    """None/False: single process; True: an error naming torchrun; anything else: an error."""
    assert resolve_distributed(None) is None and resolve_distributed(False) is None
    with pytest.raises(ConfigError, match="torchrun"):
        resolve_distributed(True)
    with pytest.raises(ConfigError, match="distributed='yes'"):
        resolve_distributed("yes")
    assert resolve_distributed(_fake_ctx(0, 1)) is None  # a group of one is a single-process run
    ctx = _fake_ctx(1, 2)
    assert resolve_distributed(ctx) is ctx


def test_quantize_refuses_distributed_true_without_a_group():
    import segquant_fx

    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="not initialized"):
        segquant_fx.quantize(m, [(torch.randn(2, 4),)], "w8a8", progress=False, distributed=True)
