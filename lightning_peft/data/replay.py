"""Replay on the data side: a stateful per-rank stream of old examples, mixed into each new-task batch.

:class:`ReplaySampler` draws indices of the replay set (the earlier data sets, concatenated) in a
fresh seeded permutation per pass; under DDP each pass is cut into disjoint, equal shards, one per
rank (padded like ``DistributedSampler`` when the size does not divide). :class:`ReplayBatchSampler`
appends that many drawn indices to each batch of new-task indices, so the new task's own sampler
(shuffling, ``DistributedSampler``) is untouched; :class:`ReplayLoader` iterates the mixed batches
through the new task's own ``collate_fn`` (padding stays consistent) and workers, and is what the
``Replay`` callback hands Lightning as the train loader.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, DistributedSampler, RandomSampler

__all__ = ["ReplayBatchSampler", "ReplayLoader", "ReplaySampler", "check_same_structure", "replay_count"]


def replay_count(batch_size: int, ratio: float) -> int:
    """Old examples to add to ``batch_size`` new ones so that they make ``ratio`` of the mixed batch.

    ``m = round(n · r / (1 − r))``, so ``m / (n + m) ≈ r`` (exact when it divides).

    Example:
        >>> replay_count(12, 0.25), replay_count(16, 0.5), replay_count(16, 0.0)
        (4, 16, 0)
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"Replay: ratio must be in [0, 1) (the share of old examples in each batch), got {ratio}")
    return round(batch_size * ratio / (1.0 - ratio))


def _describe(item: Any) -> str:
    if isinstance(item, Mapping):
        return f"a dict with keys {sorted(map(str, item))}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}"
    return f"a {type(item).__name__}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return isinstance(a, Mapping) and isinstance(b, Mapping) and set(a) == set(b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
    return isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor)


def check_same_structure(new: Dataset, old: Sequence[Dataset]) -> None:
    """Fail clearly when an old data set's examples cannot be collated with the new task's (other keys or arity).

    Only the first example of each is compared: dict keys, tuple length, tensor or not.
    """
    first = new[0]
    for i, dataset in enumerate(old):
        if len(dataset) == 0:
            continue
        item = dataset[0]
        if not _same(first, item):
            raise ValueError(
                f"Replay: replay data set {i} yields {_describe(item)} but the training data yields {_describe(first)}; "
                "old and new examples are collated into one batch, so they must have the same structure "
                "(map the old data set to the new one's fields, e.g. the same tokenizer and 'labels' key)."
            )


class ReplaySampler:
    """An endless, resumable stream of replay-set indices for one rank.

    Pass ``e`` over the replay set is ``randperm(size)`` from a generator seeded with ``seed + e``,
    padded by wrapping to a multiple of ``num_replicas`` and cut into ``perm[rank::num_replicas]``: the
    ranks' shards are disjoint within a pass, all ranks move to the next pass together, and over ``k``
    passes each rank sees each example of its shards once per pass. The position is ``(pass, offset)``
    (:meth:`state_dict`), so a run that reloads it draws the same indices.

    Args:
        size: examples in the replay set (``>= 1``).
        seed: seed of the permutations.
        num_replicas / rank: DDP world size and this process's rank.
    """

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if size < 1:
            raise ValueError("Replay: the replay set is empty; give at least one old example to replay.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Replay: rank {rank} is not in [0, {num_replicas})")
        self.size = size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shard_size = math.ceil(size / num_replicas)
        self.epoch = 0  # pass over the replay set
        self.offset = 0  # indices of this pass's shard drawn so far
        self._shard: list[int] | None = None

    def shard(self, epoch: int) -> list[int]:
        """This rank's indices for pass ``epoch``, in the order they are drawn."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.size, generator=generator).tolist()
        total = self.shard_size * self.num_replicas
        perm = (perm * math.ceil(total / self.size))[:total]  # wrap-pad, like DistributedSampler
        return perm[self.rank :: self.num_replicas]

    def draw(self, n: int) -> list[int]:
        """The next ``n`` indices of the stream (crossing into new passes as needed)."""
        out: list[int] = []
        while len(out) < n:
            if self._shard is None:
                self._shard = self.shard(self.epoch)
            take = min(n - len(out), self.shard_size - self.offset)
            out.extend(self._shard[self.offset : self.offset + take])
            self.offset += take
            if self.offset == self.shard_size:
                self.epoch, self.offset, self._shard = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": self.size, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "size", "num_replicas"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"Replay: the saved replay position has {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    "resume with the same replay data sets, seed and number of processes."
                )
        self.epoch, self.offset, self._shard = int(state["epoch"]), int(state["offset"]), None


class ReplayBatchSampler:
    """Each batch of the new task's ``batch_sampler`` plus replay indices (offset past the new data set).

    A batch of ``n`` new indices gets ``count`` old ones, or ``replay_count(n, ratio)``; old examples
    come last. For every batch it yields, the drawn replay indices and the stream position after them
    are queued in :attr:`pending`, for the callback to pop when the batch is trained on (loaders read
    ahead). Each pass over the new data starts from the position of the last batch trained on, so
    batches read ahead but never trained on are drawn again, exactly as a resumed run draws them.
    """

    def __init__(self, batch_sampler: Any, replay: ReplaySampler, offset: int, count: int | None = None,
                 ratio: float | None = None) -> None:
        if (count is None) == (ratio is None):
            raise ValueError("Replay: give exactly one of ratio (share of each batch) or count (old examples per batch)")
        self.batch_sampler = batch_sampler
        self.replay = replay
        self.offset = offset
        self.count = count
        self.ratio = ratio
        self.pending: deque[tuple[list[int], dict[str, int]]] = deque()
        self.trained_state: dict[str, int] = replay.state_dict()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        self.pending.clear()
        self.replay.load_state_dict(self.trained_state)
        for new in self.batch_sampler:
            new = list(new)
            m = self.count if self.count is not None else replay_count(len(new), self.ratio)
            old = self.replay.draw(m)
            self.pending.append((old, self.replay.state_dict()))
            yield new + [self.offset + j for j in old]

    def trained(self) -> list[int]:
        """Mark the oldest pending batch as trained on: returns its replay indices (into the replay set)."""
        if not self.pending:
            raise RuntimeError("Replay: a training batch arrived that the replay loader did not produce")
        old, state = self.pending.popleft()
        self.trained_state = state
        return old


def _distributed(loader: DataLoader, num_replicas: int, rank: int, shard: bool = True) -> Any:
    """The loader's batch sampler, sharded over ranks the way Lightning would shard it."""
    sampler = loader.sampler
    if num_replicas == 1 or isinstance(sampler, DistributedSampler) or not shard:
        return loader.batch_sampler
    if type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(
            f"Replay: under DDP the training DataLoader's batch sampler ({type(loader.batch_sampler).__name__}) cannot be "
            "sharded over processes; use batch_size=... (a plain BatchSampler) or your own DistributedSampler."
        )
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what Lightning's own DistributedSampler uses
    shuffle = isinstance(sampler, RandomSampler)
    sharded = DistributedSampler(loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    return BatchSampler(sharded, loader.batch_size, loader.drop_last)


class ReplayLoader:
    """The training loader with replay: the new task's DataLoader, each batch extended by old examples.

    Batches are ``collate_fn(new items + old items)`` with the new loader's own ``collate_fn``, workers
    and pinning; ``len`` is the new loader's. ``sampler`` is the new task's (``DistributedSampler`` under
    DDP), so Lightning's ``set_epoch`` reaches it.

    Args:
        loader: the new task's map-style ``DataLoader``.
        replay: the old data sets (their examples must have the new ones' structure).
        count / ratio: old examples per batch, or their share of it.
        seed: seed of the replay permutations.
        num_replicas / rank: DDP world size and rank.
        shard_new: shard the new loader over the ranks when its sampler is not a ``DistributedSampler``
            (Lightning's ``use_distributed_sampler``); the replay stream is sharded either way.
    """

    def __init__(self, loader: DataLoader, replay: Sequence[Dataset], count: int | None = None, ratio: float | None = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0, shard_new: bool = True) -> None:
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, torch.utils.data.IterableDataset):
            raise TypeError(
                f"Replay: the training loader must be a torch DataLoader over a map-style data set, got {type(loader).__name__}; "
                "replay mixes examples by index."
            )
        if len(loader.dataset) == 0:
            raise ValueError("Replay: the training data set is empty")
        check_same_structure(loader.dataset, replay)
        self.loader = loader
        self.replay_set = ConcatDataset(list(replay))
        self.batch_sampler = ReplayBatchSampler(
            _distributed(loader, num_replicas, rank, shard_new),
            ReplaySampler(len(self.replay_set), seed, num_replicas, rank),
            offset=len(loader.dataset), count=count, ratio=ratio,
        )
        self.sampler = getattr(self.batch_sampler.batch_sampler, "sampler", loader.sampler)
        kwargs: dict[str, Any] = {
            "num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory,
            "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context, "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        self._mixed = DataLoader(ConcatDataset([loader.dataset, self.replay_set]), batch_sampler=self.batch_sampler, **kwargs)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mixed)
