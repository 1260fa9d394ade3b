"""The few-shot datamodule every dataset derives from.

A dataset subclass says where its images are and what they are called (``check``, ``classnames``,
``templates``, ``pools``, ``build_eval_sets``, ``load_image``); this class does the CoOp-style few-shot
draw, the base-to-new split, extra evaluation sets, saves the drawn file list, and builds every loader.
"""
import dataclasses
import json
import logging
import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from saft.errors import ConfigError
from saft.app.results import write_json

log = logging.getLogger(__name__)
Item = Tuple[Any, int]  # (a JSON-able key such as a relative path, label)


PROTOCOLS = ("all", "base2new")


@dataclass
class EvalSet:
    """A named test set with the class names and prompt templates of its own head, and the function that
    loads its images (so sets of other datasets can join a run). ``classes``: the training label of each of its
    labels, where the datamodule knows them (ImageNet-A and -R: 200 of the 1,000); otherwise heads trained on
    classes find them by name (:func:`class_positions`)."""
    name: str
    items: List[Item]
    classnames: List[str]
    templates: Sequence[str]
    load: Callable
    classes: Optional[List[int]] = None


def class_positions(known: Sequence[str], names: Sequence[str]) -> Optional[List[int]]:
    """The position of each of ``names`` in ``known``, or None unless every name is there exactly once."""
    known = list(known)
    if list(names) == known:
        return list(range(len(known)))
    where = {}
    for i, name in enumerate(known):
        where[name] = None if name in where else i  # a name that occurs twice (ImageNet's two "missile"s) is no match
    positions = [where.get(name) for name in names]
    return None if None in positions else positions


def num_base(num_classes: int) -> int:
    """CoOp's base-to-new split: the first ceil(n/2) sorted labels are base, the rest new."""
    return math.ceil(num_classes / 2)


def key_rng(key: str) -> np.random.Generator:
    """A generator seeded by an item's key: procedural images render the same for every reader."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def base_new_split(eval_set: EvalSet) -> List[EvalSet]:
    """Base and new classes of a test set (:func:`num_base`), each relabelled from 0 with its own head."""
    m = num_base(len(eval_set.classnames))
    base = [(k, l) for k, l in eval_set.items if l < m]
    new = [(k, l - m) for k, l in eval_set.items if l >= m]
    return [EvalSet("base", base, eval_set.classnames[:m], eval_set.templates, eval_set.load, list(range(m))),
            EvalSet("new", new, eval_set.classnames[m:], eval_set.templates, eval_set.load)]


class EpochSeededSampler(DistributedSampler):
    """Yields ``(index, augmentation seed)`` pairs: a permutation per epoch and a seed per sample, both
    drawn from (seed, epoch) alone, so a resumed run sees the same images with the same random crops as
    an uninterrupted one (Lightning calls ``set_epoch``).

    Under DDP it shards by rank itself, as ``DistributedSampler`` does (a subclass, so Lightning does not
    wrap it in its ``DistributedSamplerWrapper``): the epoch's permutation is padded to a multiple of the
    world size by repeating its start, and rank r takes positions r, r + world, ... Under one process that
    is the permutation itself. ``resume_at=(epoch, n)`` skips the first n items of this rank's share of
    that epoch (the ones trained before the checkpoint), once. ``len()`` stays the full share: Lightning
    counts the epoch's batches from it and, on a mid-epoch resume, starts its count at the batches done.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 resume_at: Tuple[int, int] = (-1, 0)):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n, self.resume_at = n, resume_at

    def epoch_pairs(self) -> List[Tuple[int, int]]:
        """All ranks' pairs of the current epoch: the permutation padded to ``total_size``."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        pairs = list(zip(torch.randperm(self.n, generator=gen).tolist(),
                         torch.randint(0, 2**62, (self.n,), generator=gen).tolist()))
        padding = self.total_size - self.n
        return pairs + (pairs * math.ceil(padding / self.n))[:padding] if padding else pairs

    def __iter__(self):
        share = self.epoch_pairs()[self.rank:self.total_size:self.num_replicas]
        if self.epoch == self.resume_at[0]:
            share, self.resume_at = share[self.resume_at[1]:], (-1, 0)
        return iter(share)


class ImageItems(Dataset):
    """(key, label) items loaded with ``load`` and transformed on access (in DataLoader workers).
    An ``(index, seed)`` pair as index makes the transform's randomness a function of that seed."""

    def __init__(self, items: Sequence[Item], load: Callable, transform: Optional[Callable]):
        self.items, self.load, self.transform = list(items), load, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        i, seed = i if isinstance(i, tuple) else (i, None)
        key, label = self.items[i]
        image = self.load(key)
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageFolder:
    """Loads ``root / key`` as an RGB image; picklable, so DataLoader workers can use it."""

    def __init__(self, root):
        self.root = Path(root)

    def __call__(self, key: str) -> Image.Image:
        # One unreadable image stops the run (skipping would silently change the dataset).
        try:
            with Image.open(self.root / key) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read image {self.root / key}: {e}. Replace or remove the file "
                              f"(and its line in the split file)") from None


def list_images(folder: Path) -> List[str]:
    """Image file names in ``folder``, sorted, so a listing is the same on every machine."""
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def few_shot(items: Sequence[Item], shots: int, seed: int) -> List[Item]:
    """CoOp's draw: seed Python's ``random``, then ``random.sample(items_of_label, shots)`` per label in
    label order. A label with fewer items than ``shots`` keeps all of them (as CoOp does)."""
    rng = random.Random(seed)
    by_label: Dict[int, List[Item]] = {}
    for item in items:
        by_label.setdefault(int(item[1]), []).append(item)
    out: List[Item] = []
    short = [label for label, pool in by_label.items() if len(pool) < shots]
    if short:
        log.warning("%d classes have fewer than %d examples (e.g. label %d); all of theirs are used",
                    len(short), shots, short[0])
    for label in sorted(by_label):
        pool = by_label[label]
        out.extend(rng.sample(pool, shots) if len(pool) > shots else pool)
    return out


class FewShotDataModule(pl.LightningDataModule):
    """Base class. Subclasses implement the methods marked *dataset* below.

    ``protocol=base2new`` trains on the first half of the classes and evaluates the ID test set split
    into ``base`` and ``new``; ``add_eval_sets`` adds other datasets' test sets (cross-dataset transfer).
    """

    def __init__(self, shots: int = 16, seed: int = 1, batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers: int = 0, split_file: Optional[str] = None, protocol: str = "all"):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"dataset protocol {protocol!r} is not one of {PROTOCOLS}")
        self.shots, self.seed, self.protocol = shots, seed, protocol
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.split_file = split_file
        self.train_transform = self.eval_transform = None
        self._split: Optional[Dict[str, List[Item]]] = None
        self._eval_sets: Optional[List[EvalSet]] = None
        self._extra_sets: List[EvalSet] = []
        self._resume_at: Optional[Dict[str, int]] = None  # the checkpoint's position in the data

    # --- dataset -----------------------------------------------------------------------------------
    def check(self) -> None:
        """Stop with a ``ConfigError`` naming the dataset, the path, the expected layout and where the
        data comes from, if the files are missing or malformed. Cheap: runs before the model loads."""

    def all_classnames(self) -> List[str]:
        """Class names of the training label space, index = label."""
        raise NotImplementedError

    def templates(self) -> Sequence[str]:
        """Prompt templates (``"a photo of a {}."`` or callables) of this dataset's evaluation heads."""
        raise NotImplementedError

    def train_templates(self) -> Sequence[str]:
        """Templates of the training head, re-encoded every step while the text tower trains."""
        return self.templates()[:1]

    def pools(self) -> Dict[str, List[Item]]:
        """``{"train": items}`` and optionally ``"val"``; without a val pool, validation examples are
        drawn from the training items left after the few-shot draw."""
        raise NotImplementedError

    def build_eval_sets(self) -> List[EvalSet]:
        """Test sets, the in-distribution one first."""
        raise NotImplementedError

    def load_image(self, key):
        """The PIL image of one item."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------
    def classnames(self) -> List[str]:
        """Training class names (the base half under ``base2new``)."""
        names = self.all_classnames()
        return names[: num_base(len(names))] if self.protocol == "base2new" else names

    def eval_sets(self) -> List[EvalSet]:
        if self._eval_sets is None:
            own = self.build_eval_sets()
            for s in own:  # a set of exactly the training classes (the ID set) is theirs by position
                if s.classes is None and self.protocol == "all" and list(s.classnames) == self.classnames():
                    s.classes = list(range(len(s.classnames)))
            self._eval_sets = base_new_split(own[0]) if self.protocol == "base2new" else own
        return self._eval_sets + self._extra_sets

    def add_eval_sets(self, sets: Sequence[EvalSet]) -> None:
        """Evaluate on other datasets' test sets too (their own heads and loaders). Their ``classes`` name labels of
        their own dataset, not of this one: they are dropped (a head trained here finds their classes by name)."""
        taken = {s.name for s in self.eval_sets()}
        clash = [s.name for s in sets if s.name in taken]
        if clash:
            raise ConfigError(f"eval set names {clash} are already used in this run; list each dataset once")
        self._extra_sets.extend(dataclasses.replace(s, classes=None) for s in sets)

    @property
    def id_name(self) -> str:
        return self.eval_sets()[0].name

    @property
    def ood_names(self) -> List[str]:
        return [s.name for s in self.eval_sets()[1:]]

    def set_transforms(self, train_transform: Callable, eval_transform: Callable) -> None:
        """The model decides image size and normalisation, so its transforms are handed in."""
        self.train_transform, self.eval_transform = train_transform, eval_transform

    @property
    def split(self) -> Dict[str, List[Item]]:
        """The few-shot train and val items: drawn with the seed, or read from ``split_file``."""
        if self._split is None:
            if self.split_file:
                self._split = self._load_saved_split()
            else:
                pools = self.pools()
                if self.protocol == "base2new":
                    m = len(self.classnames())
                    pools = {k: [i for i in v if i[1] < m] for k, v in pools.items()}
                train = few_shot(pools["train"], self.shots, self.seed)
                if "val" in pools:
                    val_pool = pools["val"]
                else:
                    chosen = {key for key, _ in train}
                    val_pool = [i for i in pools["train"] if i[0] not in chosen]
                self._split = {"train": train, "val": few_shot(val_pool, min(self.shots, 4), self.seed)}
        return self._split

    def _load_saved_split(self) -> Dict[str, List[Item]]:
        path = Path(self.split_file)
        try:
            saved = json.loads(path.read_text())
            split = {k: [(key, int(label)) for key, label in saved[k]] for k in ("train", "val")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"split_file={path} is not a split.json written by a run ({e}); "
                              f"use <run dir>/split.json") from None
        per_class = max(Counter(label for _, label in split["train"]).values(), default=0)
        if per_class != self.shots:
            raise ConfigError(f"split_file={path} holds {per_class} training examples per class but "
                              f"shots={self.shots}; set shots={per_class}")
        return split

    def save_split(self, path) -> None:
        """Write the drawn items so the run can be repeated exactly (``split_file=<path>``)."""
        write_json(path, {k: [list(i) for i in v] for k, v in self.split.items()})

    def _loader(self, items, transform, batch_size, shard=False, load=None, sampler=None):
        data = ImageItems(items, load or self.load_image, transform)
        world = self.trainer.world_size if shard and self.trainer else 1
        if world > 1:
            sampler = UnrepeatedDistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank,
                                                   shuffle=False)
        return DataLoader(data, batch_size=batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _world(self) -> Tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def train_dataloader(self):
        """The training set in :class:`EpochSeededSampler` order, this rank's share; after a mid-epoch
        resume, without the samples this rank trained on before the checkpoint."""
        world, rank = self._world()
        sampler = EpochSeededSampler(len(self.split["train"]), self.seed, world, rank)
        if self._resume_at is not None:
            self._resume_from(sampler, **self._resume_at)
            self._resume_at = None
        return self._loader(self.split["train"], self.train_transform, self.batch_size, sampler=sampler)

    def _resume_from(self, sampler: EpochSeededSampler, epoch: int, batches: int,
                     world_size: Optional[int] = None, batch_size: Optional[int] = None) -> None:
        # The epoch is set here too, not only by Lightning's set_epoch: with DataLoader workers the sampler
        # is iterated when Lightning creates the loader's iterator, before its set_epoch, and on a resume
        # Lightning keeps that iterator for the epoch it resumes.
        if epoch < 0:
            return
        if batches * self.batch_size >= len(sampler):  # the epoch was complete: the next one starts afresh
            sampler.set_epoch(epoch + 1)
            return
        ran_with = (world_size, batch_size)
        if batches and world_size is not None and ran_with != (sampler.num_replicas, self.batch_size):
            raise ConfigError(f"the checkpoint stopped inside an epoch with {world_size} process(es) x batch_size="
                              f"{batch_size}; this run has {sampler.num_replicas} x {self.batch_size}, so the "
                              f"samples trained before it cannot be skipped. Resume with the run's own "
                              f"trainer.devices / num_nodes and batch_size, or from a checkpoint at an epoch end")
        sampler.set_epoch(epoch)
        sampler.resume_at = (epoch, batches * self.batch_size)

    # Mid-epoch resume. Lightning restores its loops from the checkpoint and, on a resume inside an epoch,
    # sets the sampler's epoch to it and counts that epoch's batches from those done; the sampler must skip
    # exactly those samples. Both come from Lightning's own counters, read when the checkpoint is written:
    # ``current_epoch`` (the fit loop's completed epochs) and the epoch loop's ``batch_progress.current
    # .processed`` (the batches of this epoch that training_step has run on, on this rank). No transfer hook
    # counts batches: ``batch_to_device`` also moves batches that are not trained (the mask's scoring pass).
    # At ModelCheckpoint's saves in ``on_train_batch_end`` and ``on_validation_end`` they are (e, b) of the
    # running epoch; at ``on_train_epoch_end`` (e, all batches); after fit has returned, ``current_epoch``
    # has already moved past the last epoch, but no training follows such a checkpoint (max_steps or
    # max_epochs is reached; another length is refused), so its position is never used.
    def state_dict(self):
        if self.trainer is None:
            return {}
        world, _ = self._world()
        return {"epoch": self.trainer.current_epoch,
                "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "world_size": world, "batch_size": self.batch_size}

    def load_state_dict(self, state) -> None:
        self._resume_at = dict(state) if state else None

    def mask_dataloader(self, rank: int = 0, world_size: int = 1):
        """The whole training set with evaluation transforms, in a fixed order, this rank's share."""
        return self._loader(self.split["train"][rank::world_size], self.eval_transform, self.eval_batch_size)

    def split_dataloader(self, name: str):
        """All of one split (``train`` or ``val``) with evaluation transforms, in a fixed order, on every rank."""
        return self._loader(self.split[name], self.eval_transform, self.eval_batch_size)

    def val_dataloader(self):
        return self._loader(self.split["val"], self.eval_transform, self.eval_batch_size, shard=True)

    def test_dataloader(self):
        """One loader per eval set; under DDP each rank takes a disjoint share (no padded repeats, so
        the example counts are exact)."""
        return [self._loader(s.items, self.eval_transform, self.eval_batch_size, shard=True, load=s.load)
                for s in self.eval_sets()]
