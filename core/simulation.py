"""Everything one rank needs, built identically on every rank from the config and the task."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from core.client import ClientTrainer
from core.client_store import StoreRow
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.config import Config
from core.flat import StateLayout
from core.interfaces import DataLoader, Personalization, Strategy
from core.partition import carve_validation
from core.personalization import build_personalization
from core.privacy import CENTRAL
from core.schedule import Schedule
from core.strategy import build_strategy
from core.vectorized import VectorizedTrainer
from core.seeding import derive_seed


class ClientIndex:
    """All clients' sample indices in one device tensor; ``get(i)`` is a view, ``sizes[i]`` a count."""

    def __init__(self, parts: list[np.ndarray], device: torch.device):
        self.sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.flat = torch.from_numpy(flat.astype(np.int64)).to(device)

    def get(self, client_id: int) -> torch.Tensor:
        """(sizes[client_id],) int64 sample indices of the client, a view on the device."""
        return self.flat[self.offsets[client_id]:self.offsets[client_id + 1]]

    def partitions(self, num_samples: int) -> bool:
        """Whether the clients' indices hold every sample 0..num_samples-1 exactly once."""
        if len(self.flat) != num_samples:
            return False
        return bool((torch.bincount(self.flat, minlength=num_samples) == 1).all())


@dataclass
class Simulation:
    """The pieces of one run on one rank (the model is this rank's single replica)."""

    cfg: Config
    ctx: DistContext
    transport: Transport
    schedule: Schedule
    model: torch.nn.Module
    layout: StateLayout
    personal_index: torch.Tensor
    trainer: ClientTrainer
    test_loader: DataLoader
    train_clients: ClientIndex
    test_clients: ClientIndex
    strategy: Strategy
    personalization: Personalization
    vectorized: VectorizedTrainer | None = None
    val_clients: ClientIndex | None = None  # the clients' validation splits (rows of the train split)
    val_loader: DataLoader | None = None  # batches of the train split without augmentation, for validation

    @property
    def personal_numel(self) -> int:
        """Floats of the personal layers (P) in the flat state; 0 without personal layers."""
        return int(self.personal_index.numel())

    @cached_property
    def rows(self) -> StoreRow:
        """The layout of a client-store row, from the strategy's and the method's declared state."""
        return StoreRow(self.personal_numel, self.strategy.client_state(self.layout),
                        self.personalization.model_state(self.layout), self.personalization.eval_part)

    @property
    def store_width(self) -> int:
        """Floats of a client-store row: personal layers (P), strategy state (C), separate personal model (M)."""
        return self.rows.width

    @cached_property
    def personal_params(self) -> torch.Tensor:
        """Positions of the personal parameters among the first ``layout.num_params`` entries of the
        flat state (``personal_index`` without the personal buffers); int64, on the device. Computed
        once: a boolean selection waits for the GPU, and SCAFFOLD reads this for every client."""
        return self.personal_index[self.personal_index < self.layout.num_params]


def _personal_index(layout: StateLayout, personalization, model, model_type: str, device) -> torch.Tensor:
    missing = layout.unmatched(personalization.local_layers)
    if missing:
        modules = sorted({n.split(".")[0] for n in layout.names})
        raise UserError(f"personalization.local_layers: {missing} match no module of {model_type}; "
                        f"top-level modules are {', '.join(modules)}")
    names = personalization.personal_names(layout, model)
    if personalization.has_personal_layers and not names:
        raise UserError(f"personalization.method {personalization.name}: {model_type} has no layer it keeps local "
                        f"(e.g. fedbn needs BatchNorm); choose another method or model")
    index = layout.index_of(names)
    if personalization.local_layers and int((index < layout.num_params).sum()) == layout.num_params:
        raise UserError(f"personalization.local_layers: {list(personalization.local_layers)} cover every parameter of "
                        f"{model_type}, so nothing is shared and the global model never trains; keep only some layers "
                        f"local (e.g. the head), or use method: local")
    return index.to(device)


def _check_labels(datasets, num_classes: int) -> None:
    """Integer (class) labels must stay below num_classes, or the loss fails in round 1 (negative
    ones are left alone: -100 is cross-entropy's ignore index)."""
    for ds in datasets:
        labels = torch.as_tensor(ds.labels)
        top = int(labels.max()) if labels.numel() and not labels.is_floating_point() else -1
        if top >= num_classes:
            raise UserError(f"model_config.num_classes {num_classes}: the {ds.split} labels go up to {top}; "
                            f"set num_classes to at least {top + 1}")


def _check_best_metric(cfg) -> None:
    """A personalized best_metric needs a method with personalized models."""
    metric = cfg.server_config.best_metric
    if "personalized" in metric and not build_personalization(cfg.personalization).evaluates_personalized:
        raise UserError(f"server_config.best_metric {metric}: personalization.method {cfg.personalization.method} "
                        f"has no personalized models; use val_global_acc or val_global_loss")


def init_model(task, cfg, device: torch.device) -> torch.nn.Module:
    """The initial global model: ``model_config.model_type`` with weights seeded from ``cfg.seed``."""
    torch.manual_seed(derive_seed(cfg.seed, 0x5EED))
    return task.build_model(cfg.model).to(device)


def build_simulation(cfg, task, data_path: str | None, ctx: DistContext, transport: Transport) -> Simulation:
    """Load data, partition it, build the model replica, trainer and loaders for this rank.

    Raises:
        UserError: missing data, impossible partition, unknown model or personal layer name, a
            data_config.options key the dataset does not read, a task split plan whose number of
            clients is not data_config.num_clients.
    """
    data_cfg = cfg.data_config
    _check_best_metric(cfg)
    task.check_data_path(data_path)
    task.check_data_options(data_cfg)
    train_ds = task.dataset_cls(data_path, data_cfg, split="train", seed=cfg.seed)
    if train_ds.split_plan.num_clients != data_cfg.num_clients:
        raise UserError(f"data_config.num_clients: {data_cfg.num_clients}, but task {task.name}'s split has "
                        f"{train_ds.split_plan.num_clients} clients; set data_config.num_clients: "
                        f"{train_ds.split_plan.num_clients}")
    test_ds = task.dataset_cls(data_path, data_cfg, split="test", seed=cfg.seed, split_plan=train_ds.split_plan)
    _check_labels((train_ds, test_ds), cfg.model.num_classes)
    model = init_model(task, cfg, ctx.device)
    if cfg.client_config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    layout = StateLayout(model)
    personalization = build_personalization(cfg.personalization)
    personal_index = _personal_index(layout, personalization, model, cfg.model.model_type, ctx.device)
    client_cfg = cfg.client_config
    train_loader = task.dataloader_cls(train_ds, client_cfg.batch_size, ctx.device, True, client_cfg.augment)
    test_loader = task.dataloader_cls(test_ds, cfg.server_config.eval_batch_size, ctx.device, False, False)
    strategy = build_strategy(cfg.strategy, cfg.strategy_config)
    train_parts, val_parts = train_ds.split_plan.train, train_ds.split_plan.val
    if val_parts is None and data_cfg.val_fraction > 0:
        train_parts, val_parts = carve_validation(train_parts, np.asarray(train_ds.labels), data_cfg.val_fraction,
                                                  cfg.seed)
    trainer = ClientTrainer(model, layout, train_loader, client_cfg, personal_index, cfg.seed, personalization,
                            personalization.personal_names(layout, model))
    return Simulation(cfg=cfg, ctx=ctx, transport=transport,
                      schedule=Schedule(cfg.server_config, data_cfg.num_clients, cfg.seed,
                                        poisson=cfg.privacy.mechanism in CENTRAL),
                      model=model, layout=layout, personal_index=personal_index, trainer=trainer,
                      test_loader=test_loader,
                      train_clients=ClientIndex(train_parts, ctx.device),
                      test_clients=ClientIndex(train_ds.split_plan.test, ctx.device),
                      strategy=strategy, personalization=personalization,
                      vectorized=VectorizedTrainer(model, layout, train_loader, client_cfg, cfg.seed, strategy,
                                                   personalization, trainer.shared_positions)
                      if client_cfg.vectorize else None,
                      val_clients=None if val_parts is None else ClientIndex(val_parts, ctx.device),
                      val_loader=None if val_parts is None else task.dataloader_cls(
                          train_ds, cfg.server_config.eval_batch_size, ctx.device, False, False))
