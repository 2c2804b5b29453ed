"""Exactly-once data across a change of ranks or loader workers (vlp.data.plan.replan): the samples the old
ranks' workers consumed are known from their saved positions, the rest are planned over the new ranks and workers.
Counted by caption id over real shards, with real DataLoader worker processes."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.test_data_fixtures import IdTokenizer, cfg, preprocess, write_shards
from vlp.data.errors import DataError
from vlp.data.pipeline import build_train_loader
from vlp.data.plan import replan

N, PER_SHARD, B = 96, 12, 4   # 8 shards


def _loader(tmp_path, rank, world, workers, epoch=0, state=None, **kw):
    c = cfg(str(tmp_path / "sh" / "{00000..00007}.tar"), batch_size=B, workers=workers, shuffle_buffer=10, **kw)
    L = build_train_loader(c, preprocess(), IdTokenizer(), rank=rank, world_size=world, seed=3)
    L.set_epoch(epoch)
    if state is not None:
        L.load_state_dict(json.loads(json.dumps(state)))   # as a checkpoint stores it
    return L


def _run(L, k=None) -> tuple[list[int], dict]:
    """Ids of the next k batches (all when None) and the loader state after them."""
    ids: list[int] = []
    it = iter(L)
    for i, (_, texts) in enumerate(it):
        ids += texts[:, 0].tolist()
        if k is not None and i + 1 == k:
            break
    state = L.state_dict()
    it.close()
    return ids, state


def _stop(tmp_path, world, workers, k, states=None, epoch=0, **kw):
    """Each of `world` ranks trains `k` batches (from `states` when given): their ids and states."""
    ids, out = [], []
    for r in range(world):
        got, st = _run(_loader(tmp_path, r, world, workers, epoch, states[r] if states else None, **kw), k)
        ids += got
        out.append(st)
    return ids, out


@pytest.fixture()
def shards(tmp_path):
    write_shards(tmp_path / "sh", N, PER_SHARD)
    return tmp_path


def test_four_ranks_to_two_trains_every_sample_once(shards):
    before, states = _stop(shards, 4, 2, k=3)          # 4 ranks x 3 batches x 4 = 48 samples
    assert len(before) == 48
    after, _ = _stop(shards, 2, 3, k=None, states=[replan(states, r, 2, 3) for r in range(2)])
    counts = Counter(before + after)
    assert len(before + after) == N and set(counts) == set(range(N)) and max(counts.values()) == 1


def test_two_to_three_workers_trains_every_sample_once(shards):
    before, states = _stop(shards, 2, 2, k=5)          # batches 0-4 of each rank: both workers mid-stream
    after, _ = _stop(shards, 2, 3, k=None, states=[replan(states, r, 2, 3) for r in range(2)])
    assert sorted(before + after) == list(range(N))


def test_second_change_inside_a_replanned_epoch(shards):
    """4 ranks -> 2 ranks with 3 workers -> 3 ranks with 1 worker: still once each; the 3-rank plan leaves out
    fewer than one global batch (its remainder), as an epoch's own plan does."""
    first, states = _stop(shards, 4, 2, k=2)
    second, states = _stop(shards, 2, 3, k=2, states=[replan(states, r, 2, 3) for r in range(2)])
    third, _ = _stop(shards, 3, 1, k=None, states=[replan(states, r, 3, 1) for r in range(3)])
    seen = first + second + third
    assert len(seen) == len(set(seen))
    assert N - len(seen) < B * 3 and N - len(seen) == (N - len(first + second)) % (B * 3)


def test_replanned_epoch_resumes_bit_exactly_and_next_epoch_is_whole(shards):
    _, states = _stop(shards, 4, 2, k=3)
    new = replan(states, 1, 2, 3)
    ref, _ = _run(_loader(shards, 1, 2, 3, state=new))
    head, mid = _run(_loader(shards, 1, 2, 3, state=new), k=2)
    tail, _ = _run(_loader(shards, 1, 2, 3, state=mid))
    assert head + tail == ref
    nxt = _loader(shards, 1, 2, 3, state=new)
    nxt.set_epoch(1)
    assert nxt.batches_per_epoch == N // (B * 2)   # the next epoch is planned whole for the new ranks


def test_same_ranks_and_workers_return_the_saved_state(shards):
    _, states = _stop(shards, 2, 2, k=1)
    assert [replan(states, r, 2, 2) for r in range(2)] == states


def test_states_of_different_steps_are_refused(shards):
    _, a = _stop(shards, 2, 2, k=1)
    _, b = _stop(shards, 2, 2, k=2)
    with pytest.raises(DataError, match="not one per rank|disagree"):
        replan([a[0], a[0]], 0, 1, 2)
    # the ranks of one save always agree on their epoch; a mixed set must not be re-planned silently
    b[1]["epoch"] = 1
    with pytest.raises(DataError, match="disagree on epoch"):
        replan([a[0], b[1]], 0, 1, 2)
