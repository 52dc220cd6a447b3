"""The sharing mode: how the generator G and the discriminator D share the word table, one object per mode.

DeBERTaV3 (He, Gao, Chen, ICLR 2023, arXiv 2111.09543, §3) compares three ways to give D its word
table E_D next to the generator's E_G:
    es    ELECTRA's embedding sharing (§3.2): one table, which both losses update (the tug-of-war)
    nes   no embedding sharing (§3.2): two tables, each updated by its own loss
    gdes  gradient-disentangled embedding sharing (§3.3): E_D = stopgrad(E_G) + E_delta, E_delta starting
          at zero: MLM alone trains E_G, RTD alone trains E_delta, and D still sees G's semantics

A mode answers every question the rest of the code asks about sharing, so nothing else compares mode
names (lab/rtd.py builds the tables through it; pre-training, snapshots, export and the analysis ask it):
    attach(model)                      at construction: which word tables exist
    discriminator_table(model)         E_D as D reads it: what is snapshotted, exported and fine-tuned
    discriminator_embeds(model, ids, tied)
                                       the rows of it that D's forward reads (tied: E_G as the RTD
                                       step reads it, lab/tied.py; None outside a step)
    rtd_table(model)                   the word-table parameter the RTD loss trains on D's side (or None)
    extra_tables(model)                tables snapshotted and exported beside E_G and E_D (GDES: E_delta)
    shares_generator_table             the RTD gradient reaches E_G (ES only; see the field)
    same_width                         G must be as wide as D (every mode whose D reads E_G)
    label, color                       how figures name and draw it

`model` is lab.rtd.RTDModel (generator, discriminator, generator_table). A new mode is one subclass and
one `register` call, from any file: tests/test_sharing.py adds a fourth one that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SharingMode:
    name: str  # what configs, run directories and tables call it (PretrainConfig.sharing)
    label: str  # what figures call it
    color: str  # its colour in every figure (a matplotlib colour)
    # D reads E_G itself, gradient and all, so one table absorbs both losses. Only a joint backward
    # (one optimizer over G and D) gives this mode: the official decoupled loop, whose D optimizer does
    # not own E_G, keeps only the MLM gradient there (lab/pretrain/loop.py `backward`).
    shares_generator_table: bool = False
    same_width: bool = True  # D's table is built from E_G, so G must be as wide as D

    def attach(self, model: nn.Module) -> None:
        """Give `model` the word tables of this mode; called once, after both encoders are built."""
        raise NotImplementedError

    def discriminator_table(self, model: nn.Module) -> torch.Tensor:
        """E_D [V, D] as D uses it."""
        raise NotImplementedError

    def discriminator_embeds(self, model: nn.Module, ids: torch.Tensor, tied=None) -> torch.Tensor:
        """E_D[ids]: ids [B, T] -> [B, T, D]. `tied` (lab.tied.Tied) is E_G as the current RTD step reads
        it, for a mode whose D reads E_G with its gradient; None outside a step."""
        return F.embedding(ids, self.discriminator_table(model))

    def rtd_table(self, model: nn.Module) -> nn.Parameter | None:
        """The word-table parameter the RTD loss trains on D's side; None when it trains none."""
        raise NotImplementedError

    def extra_tables(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tables snapshotted and exported beside "generator" and "discriminator", by name."""
        return {}


# ---------------------------------------------------------------------------------------------- the paper's three


class SharedTable(SharingMode):
    """ES: D borrows G's table. Both losses update it."""

    def attach(self, model):
        model.discriminator.word_embeddings = model.generator.word_embeddings  # one table, two users

    def discriminator_table(self, model):
        return model.discriminator.word_embeddings.weight  # E_G itself

    def discriminator_embeds(self, model, ids, tied=None):
        if tied is not None:  # this step's reading of E_G: its gradient joins the step's other two
            return tied.rows(ids)
        return model.discriminator.word_embeddings(ids)

    def rtd_table(self, model):
        return model.discriminator.word_embeddings.weight


class SeparateTables(SharingMode):
    """NES: D keeps the table its encoder was built with. Each loss updates its own."""

    def attach(self, model):
        pass

    def discriminator_table(self, model):
        return model.discriminator.word_embeddings.weight

    def discriminator_embeds(self, model, ids, tied=None):
        return model.discriminator.word_embeddings(ids)

    def rtd_table(self, model):
        return model.discriminator.word_embeddings.weight


class GradientDisentangled(SharingMode):
    """GDES: E_D = stopgrad(E_G) + E_delta, rebuilt from the current E_G on every D forward."""

    def attach(self, model):
        model.discriminator.word_embeddings = None  # D reads stopgrad(E_G) + E_delta instead
        vocab, hidden = model.generator_table.shape
        model.embedding_delta = nn.Parameter(torch.zeros(vocab, hidden))  # E_delta, zero at the start

    def discriminator_table(self, model):
        return model.generator_table.detach() + model.embedding_delta

    def discriminator_embeds(self, model, ids, tied=None):
        # the same sum, row by row: no [V, D] table built on every step
        return F.embedding(ids, model.generator_table.detach()) + F.embedding(ids, model.embedding_delta)

    def rtd_table(self, model):
        return model.embedding_delta

    def extra_tables(self, model):
        return {"delta": model.embedding_delta}


# ---------------------------------------------------------------------------------------------- the registry

REGISTRY: dict[str, SharingMode] = {}


def register(mode: SharingMode) -> SharingMode:
    """Make `mode` known by its name (to configs, RTDModel and the analysis); returns it."""
    if mode.name in REGISTRY:
        raise ValueError(f"a sharing mode named {mode.name!r} is registered already")
    REGISTRY[mode.name] = mode
    return mode


def get(name: str) -> SharingMode:
    """The registered mode called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"sharing={name!r} is not a sharing mode; choose one of {names()}")
    return REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered modes' names, in registration order."""
    return tuple(REGISTRY)


class _Names(Sequence):
    """names(), read when asked: a config field's `choices` that a mode registered later also joins."""

    def __getitem__(self, index):
        return names()[index]

    def __len__(self) -> int:
        return len(REGISTRY)


NAMES = _Names()

ES = register(SharedTable("es", "ES", "C0", shares_generator_table=True))
NES = register(SeparateTables("nes", "NES", "C1", same_width=False))
GDES = register(GradientDisentangled("gdes", "GDES", "C2"))
