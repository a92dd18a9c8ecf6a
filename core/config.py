"""Typed, validated experiment configuration (pydantic v2).

The YAML layout follows FLUTE's section names (``model_config``, ``strategy``, ``server_config``,
``client_config``) plus ``data_config`` and ``personalization``. Every key has a default; unknown
keys are errors. :func:`load_config` turns any mistake into a one-line :class:`UserError`.

Values are read as written, never coerced: a count (``int``) must be a whole number, not ``true``,
``2.0`` or ``'2'``; a flag (``bool``) must be ``true`` or ``false``, not ``1``; a ``float`` may be
written as an int (or as text such as ``1e-3``, which YAML reads as a string) but never as
``true``/``false``, and must be finite (no ``.inf`` or ``.nan``). Counts have generous upper bounds
that only catch typos: :data:`MAX_ROUNDS` for round counts, :data:`MAX_EPOCHS` for epoch counts,
:data:`MAX_COUNT` for every other count, :data:`MAX_SEED` for the seed, :data:`MAX_TIMEOUT_S` for
``server_config.timeout_s``. A config file must be UTF-8 text and may not write a key twice in one
mapping.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from core.errors import UserError
from core.personalization import METHODS
from core.sections import (MAX_COUNT, MAX_EPOCHS, MAX_ROUNDS, MAX_SEED, MAX_TIMEOUT_S, Section, _is_section,
                           merged_section)
from core.strategy import STRATEGIES


FEDOPT_BETAS, FEDOPT_TAU = (0.9, 0.99), 1e-3  # Reddi et al. 2021's betas and tau (yogi; adaptive server types)


class OptimizerConfig(Section):
    """A torch optimizer: ``type`` is ``sgd``, ``adam``, ``adamw``, ``adagrad`` or ``yogi``; ``lr`` is the step size.

    In ``server_config`` the adaptive types follow Reddi et al. 2021 (arXiv:2003.00295), Algorithm 2
    (``server_form: fedopt``, see :class:`core.optim.FedOpt`) with its betas (0.9, 0.99) and tau
    1e-3 unless set; ``server_form: torch`` builds torch's optimizers with torch's defaults instead.
    ``client_config`` always builds torch's optimizers and refuses ``server_form``.
    """

    type: Literal["sgd", "adam", "adamw", "adagrad", "yogi"] = Field(
        "sgd", description="optimizer class (adagrad/yogi: for the server, FedAdagrad/FedYogi)")
    lr: float = Field(0.05, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (server SGD momentum = FedAvgM)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (adamw: decoupled)")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD with momentum > 0)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW/Yogi betas (server FedAdagrad: betas[0] is its "
                                                                 "momentum); yogi, and the server's adaptive types with "
                                                                 "server_form fedopt, default to Reddi et al.'s (0.9, 0.99)")
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW/Adagrad epsilon (FedOpt's tau); yogi, and the server's "
                                               "adaptive types with server_form fedopt, default to Reddi et al.'s "
                                               "tau 1e-3")
    server_form: Optional[Literal["fedopt", "torch"]] = Field(
        None, description="server_config only (null here in client_config): fedopt (default) steps adam/adamw/yogi/"
                          "adagrad as Reddi et al. 2021, Algorithm 2 (no bias correction, v from tau^2); torch: "
                          "torch's Adam/AdamW/Adagrad (yogi is the same either way; sgd ignores it)")

    @model_validator(mode="before")
    @classmethod
    def _yogi_defaults(cls, data):
        """FedYogi's defaults for what a ``yogi`` section leaves unset (Reddi et al. 2021, arXiv:2003.00295)."""
        if isinstance(data, dict) and data.get("type") == "yogi":
            return {"betas": FEDOPT_BETAS, "eps": FEDOPT_TAU, **data}
        return data

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_are_numbers(cls, value):
        if isinstance(value, (list, tuple)) and any(isinstance(beta, bool) for beta in value):
            raise ValueError("expected two numbers, e.g. [0.9, 0.999] (not true/false)")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value):
        """torch's Adam, AdamW and our Yogi need 0 <= beta < 1 (beta 1 never forgets, above 1 diverges)."""
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("each beta must be at least 0 and below 1, e.g. [0.9, 0.999]")
        return value


class ModelSection(Section):
    """Which model class of the task's ``model.py`` to build, and its options."""

    model_type: str = Field("ResNet18", description="class name in the task's model.py")
    num_classes: int = Field(10, ge=2, le=MAX_COUNT, description="output classes")
    options: dict[str, Any] = Field(
        default_factory=dict, description="options the task's model reads (keys its class lists in OPTIONS; any other "
                                          "key is an error)")


class ServerConfig(Section):
    """Round loop. ``max_iteration`` rounds; ``num_clients_per_iteration`` clients per cohort.

    ``optimizer_config`` is the server optimizer applied to the pseudo-gradient (SGD lr 1.0 is
    FedAvg). Evaluation every ``val_freq`` rounds and at the last round; a checkpoint every
    ``ckpt_freq`` rounds (0: only at the end).
    """

    max_iteration: int = Field(50, ge=1, le=MAX_ROUNDS, description="number of rounds")
    num_clients_per_iteration: Union[int, str] = Field(
        10, description="cohort size (clients per round), or 'a,b' for a size drawn per round in [a, b]")
    val_freq: int = Field(5, ge=1, le=MAX_ROUNDS, description="evaluate every this many rounds (and at the last)")
    ckpt_freq: int = Field(10, ge=0, le=MAX_ROUNDS, description="checkpoint every this many rounds; 0: only at the end")
    optimizer_config: OptimizerConfig = Field(OptimizerConfig(type="sgd", lr=1.0, server_form="fedopt"),
                                              description="server optimizer on the pseudo-gradient")
    eval_batch_size: int = Field(1000, ge=1, le=MAX_COUNT, description="batch size of evaluation passes")
    best_metric: Literal["val_global_acc", "val_personalized_acc", "val_global_loss", "val_personalized_loss"] = Field(
        "val_global_acc", description="what chooses checkpoints/best.pt, on the clients' validation splits "
                                      "(data_config.val_fraction); with val_fraction 0, best is the highest global "
                                      "test accuracy, and the results say so")
    resume_from_checkpoint: Optional[str] = Field(None, description="checkpoint file or run folder to continue")
    timeout_s: float = Field(600.0, gt=0, le=MAX_TIMEOUT_S, description="process-group timeout in seconds (a dead peer is reported by then)")
    client_store_memory_mb: float = Field(
        4096.0, gt=0, description="client store (personal state of trained clients) held in host memory up to this "
                                  "many MiB; beyond, it moves to a memory-mapped file OUT/RUN/client_store.f32")

    @field_validator("optimizer_config", mode="before")
    @classmethod
    def _fedopt_defaults(cls, value):
        """``server_form`` fedopt unless set (null counts as unset); under fedopt, Reddi et al.'s betas
        (0.9, 0.99) and tau 1e-3 for what an adam, adamw or adagrad section leaves unset (yogi takes
        them in any section). A default that differs from the client's must be set here, since
        both sections share :class:`OptimizerConfig`."""
        if isinstance(value, OptimizerConfig):
            value = value.model_dump(exclude_unset=True)
        if not isinstance(value, dict):
            return value
        value = {**value, "server_form": "fedopt" if value.get("server_form") is None else value["server_form"]}
        if value["server_form"] == "fedopt" and value.get("type") in ("adam", "adamw", "adagrad"):
            value = {"betas": FEDOPT_BETAS, "eps": FEDOPT_TAU, **value}
        return value

    @field_validator("num_clients_per_iteration", mode="before")
    @classmethod
    def _cohort(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("expected a positive int or 'a,b' with 1 <= a <= b, e.g. 10 or '5,20'")
        cohort_range(value)
        return value


def cohort_range(value: Union[int, str]) -> tuple[int, int]:
    """(low, high) cohort sizes of ``num_clients_per_iteration`` (an int or ``'a,b'``).

    Raises:
        ValueError: not a positive int or ``'a,b'`` with 1 <= a <= b.
    """
    parts = [value] if isinstance(value, int) else str(value).split(",")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        low, high = 0, 0
    if not 1 <= low <= high:
        raise ValueError("expected a positive int or 'a,b' with 1 <= a <= b, e.g. 10 or '5,20'")
    return low, high


class ClientConfig(Section):
    """Local training of one client: ``local_epochs`` passes over its train split."""

    local_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="passes over the client's train split per round")
    batch_size: int = Field(32, ge=1, le=MAX_COUNT, description="client batch size (samples)")
    optimizer_config: OptimizerConfig = Field(OptimizerConfig(type="sgd", lr=0.05, momentum=0.9),
                                              description="client optimizer (state reset every round)")
    augment: bool = Field(True, description="task's train-time augmentation (cv: random crop + flip)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: client forward/backward under bfloat16 autocast")
    channels_last: bool = Field(False, description="model and 4-D inputs in channels_last memory format (whether it is faster depends on the model and device: benchmarks/RESULTS.md)")
    vectorize: bool = Field(False, description="train a worker's clients together with torch.func vmap (SGD, no BatchNorm; "
                                               "dropout masks are drawn per group, so with dropout results depend on "
                                               "the grouping and process count)")
    vectorize_chunk: int = Field(64, ge=1, le=MAX_COUNT, description="clients per vectorized group (memory grows with it; the fastest size depends on the device: benchmarks/RESULTS.md)")
    compile: bool = Field(False, description="torch.compile the client's training loss (forward and backward; "
                                             "the first steps of a run compile it, which takes seconds to minutes)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compile is on (reduce-overhead: CUDA graphs on a GPU, "
                               "for launch-bound small batches)")

    @field_validator("optimizer_config")
    @classmethod
    def _no_server_form(cls, value: OptimizerConfig) -> OptimizerConfig:
        if value.server_form is not None:
            raise ValueError(f"server_form {value.server_form!r} applies to the server optimizer only; remove it here "
                             f"(client optimizers are torch's own) or set server_config.optimizer_config.server_form")
        return value


class DataConfig(Section):
    """How a task's data is split into clients (see :mod:`core.partition`), unless the task's dataset
    supplies its own split (``make_split_plan``); ``options`` are the dataset's own."""

    num_clients: int = Field(100, ge=1, le=MAX_COUNT, description="total number of clients")
    partition: Literal["iid", "dirichlet", "dirichlet_capped", "shards", "label_quantity"] = Field(
        "dirichlet", description="how labels are split (dirichlet_capped: NIID-Bench's Dirichlet with its client-size "
                                 "cap; label_quantity: NIID-Bench's #C=k classes per client)")
    alpha: float = Field(0.3, gt=0, description="Dirichlet alpha (smaller: more label skew)")
    classes_per_client: int = Field(2, ge=1, le=MAX_COUNT, description="shards: shards (about classes) per client; "
                                                         "label_quantity: classes per client")
    min_samples: int = Field(10, ge=1, le=MAX_COUNT, description="minimum train samples per client (error if impossible)")
    val_fraction: float = Field(0.0, ge=0, le=0.5, description="share of each client's train samples held out as its "
                                                              "validation split (label mix kept, seeded), on which "
                                                              "server_config.best_metric chooses best.pt; 0: none")
    download: bool = Field(True, description="try torchvision's download when the data folder is missing")
    normalize: bool = Field(True, description="image tasks: standardize each channel with the train set's mean "
                                              "and std (false: raw pixels in [0, 1], as NIID-Bench feeds them)")
    pad_mode: Literal["zeros", "reflect"] = Field("zeros", description="image tasks: how the 4-pixel border of "
                                                                        "random crops is filled (NIID-Bench: reflect)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="options the task's dataset reads (keys its class lists in OPTIONS; any "
                                          "other key is an error)")


def _method_choices(registry) -> str:
    """``name (summary), ...`` of a registry of algorithm classes, for a field's description."""
    return ", ".join(f"{name} ({cls.summary})" for name, cls in registry.items())


StrategyConfig = merged_section("StrategyConfig", "Options of the aggregation strategy (each declared by its "
                                "strategy's module in core/strategy/).", [c.Options for c in STRATEGIES.values()])
PersonalizationConfig = merged_section(
    "PersonalizationConfig", "Which personalization method runs (``method``) and its options, each declared by "
    "the method's module in core/personalization/.",
    [create_model("PersonalizationMethod", __base__=Section, method=(  # type: ignore[arg-type]
        Literal[tuple(METHODS)], Field("none", description=_method_choices(METHODS))))]
    + [c.Options for c in METHODS.values()])




class PrivacyConfig(Section):
    """Client-level differential privacy (docs/privacy.md).

    ``gaussian``: central DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963): each round's cohort is
    Poisson-sampled (each client joins with probability ``server_config.num_clients_per_iteration /
    data_config.num_clients``), each client's update of the shared parameters is clipped to L2 norm
    ``clip_norm``, Gaussian noise of std ``noise_multiplier * clip_norm`` is added to their sum on the
    server, which divides by the expected cohort. ``adaptive_gaussian``: the same with the clip norm
    adapted each round toward a quantile of the update norms (Andrew et al. 2021, arXiv:1905.03871).
    ``local_gaussian``: each client clips its update and adds noise of std ``noise_multiplier *
    clip_norm`` itself, before it leaves the client. The epsilon is reported at every evaluation.
    """

    mechanism: Literal["none", "gaussian", "adaptive_gaussian", "local_gaussian"] = Field(
        "none", description="none: no DP; gaussian: central DP-FedAvg (Poisson cohorts, clipped client updates, "
                            "Gaussian noise on their sum); adaptive_gaussian: the same with an adaptive clip norm; "
                            "local_gaussian: each client noises its own clipped update (docs/privacy.md)")
    clip_norm: Optional[float] = Field(None, gt=0, description="L2 bound of each client's update of the shared "
                                                               "parameters (required; adaptive_gaussian: round 1's)")
    noise_multiplier: Optional[float] = Field(
        None, ge=0, description="noise std over clip_norm (central: on the sum of clipped updates; local: on each "
                                "one; 0: clipping without noise, epsilon infinite); set it or target_epsilon")
    target_epsilon: Optional[float] = Field(
        None, gt=0, description="the noise multiplier is calibrated before round 1 so that "
                                "server_config.max_iteration rounds spend at most this epsilon; set it or "
                                "noise_multiplier")
    delta: float = Field(1e-6, gt=0, lt=1, description="the delta of (epsilon, delta)-DP; keep it below 1 / "
                                                       "population (a run at or above says so)")
    noise_cohort_size: Optional[int] = Field(
        None, ge=1, le=MAX_COUNT, description="central: simulate the noise of this larger cohort: the sum's noise "
                                              "std is scaled by num_clients_per_iteration / noise_cohort_size, and "
                                              "the epsilon is that of cohorts of this size (sampling rate "
                                              "noise_cohort_size / population)")
    population: Optional[int] = Field(
        None, ge=1, le=MAX_COUNT, description="central: the number of clients the epsilon assumes (null: "
                                              "data_config.num_clients)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's Renyi-DP accountant, or its "
                                                                 "privacy-loss-distribution one (tighter, slower)")
    target_unclipped_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive_gaussian: the share of client updates the clip norm should leave "
                                     "unclipped (gamma)")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive_gaussian: the clip norm's step in log space "
                                                             "(eta_C)")
    clipped_count_stddev: Optional[float] = Field(
        None, gt=0, description="adaptive_gaussian: noise std on the count of unclipped clients, in clients of the "
                                "simulated cohort (null: noise_cohort_size / 20, the paper's choice)")

    def population_of(self, num_clients: int) -> int:
        """The clients the epsilon assumes: ``population``, or ``num_clients`` (data_config's) when null."""
        return self.population if self.population is not None else num_clients

    def noise_cohort_of(self, cohort: int) -> int:
        """The cohort whose noise is simulated: ``noise_cohort_size``, or the expected ``cohort`` when null."""
        return self.noise_cohort_size if self.noise_cohort_size is not None else cohort


ADAPTIVE_KEYS = ("target_unclipped_quantile", "clip_learning_rate", "clipped_count_stddev")
CENTRAL_KEYS = ("noise_cohort_size", "population")


class LoggingConfig(Section):
    """Optional experiment trackers besides metrics.jsonl and TensorBoard (always written).

    ``wandb: true`` logs each evaluation's scalars to Weights & Biases (needs ``pip install wandb``;
    wandb is not imported when false).
    """

    wandb: bool = Field(False, description="log evaluations to Weights & Biases (needs the wandb package)")
    wandb_project: str = Field("pfedsim", description="W&B project")
    wandb_entity: Optional[str] = Field(None, description="W&B team or user (null: your default entity)")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="offline: W&B files only under the run folder (upload later with wandb sync)")


class Config(Section):
    """The whole experiment. ``seed`` drives partition, cohorts and client training."""

    model: ModelSection = Field(default_factory=ModelSection, alias="model_config")
    strategy: Literal[tuple(STRATEGIES)] = Field(  # type: ignore[valid-type]
        "fedavg", description=f"aggregation strategy: {_method_choices(STRATEGIES)}")
    strategy_config: StrategyConfig = Field(default_factory=StrategyConfig)  # type: ignore[valid-type]
    server_config: ServerConfig = Field(default_factory=ServerConfig)
    client_config: ClientConfig = Field(default_factory=ClientConfig)
    data_config: DataConfig = Field(default_factory=DataConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)  # type: ignore[valid-type]
    logging_config: LoggingConfig = Field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of partition, cohorts, initial model and client training")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the rank's GPU when present")

    @model_validator(mode="after")
    def _cohort_fits(self):
        high = cohort_range(self.server_config.num_clients_per_iteration)[1]
        if high > self.data_config.num_clients:
            raise ValueError(f"server_config.num_clients_per_iteration ({self.server_config.num_clients_per_iteration}) "
                             f"asks for more clients per round than data_config.num_clients ({self.data_config.num_clients}); "
                             f"lower it or raise num_clients")
        return self

    @model_validator(mode="after")
    def _algorithms_accept(self):
        """Each chosen algorithm's own check of the whole config (its module's ``check``)."""
        STRATEGIES[self.strategy].check(self)
        readers = " / ".join(n for n, c in METHODS.items() if c.uses_local_layers)
        METHODS[self.personalization.method].check(self, readers)
        return self

    @model_validator(mode="after")
    def _privacy_fits(self):
        """Central DP's refusals (:func:`privacy_problem`)."""
        problem = privacy_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def to_dict(self) -> dict:
        """The full effective config as plain YAML-able data (FLUTE key names)."""
        return self.model_dump(mode="json", by_alias=True)


def privacy_problem(cfg: "Config") -> str | None:
    """The first reason the ``privacy`` section cannot run with the rest of ``cfg``, as one line naming
    the fields and the fix; None when it can."""
    dp = cfg.privacy
    # values other than the defaults (a resolved config writes every key out, defaults included)
    chosen = {n for n, field in PrivacyConfig.model_fields.items() if getattr(dp, n) != field.default}
    if dp.mechanism == "none":
        set_ = [n for n in ("clip_norm", "noise_multiplier", "target_epsilon") + CENTRAL_KEYS + ADAPTIVE_KEYS
                if n in chosen]
        return (f"privacy.{set_[0]} is set but privacy.mechanism is none; set privacy.mechanism, or "
                f"remove privacy.{set_[0]}") if set_ else None
    under = f"privacy.mechanism {dp.mechanism}"
    unused = [n for n in ADAPTIVE_KEYS if n in chosen] if dp.mechanism != "adaptive_gaussian" else []
    unused += [n for n in CENTRAL_KEYS if n in chosen] if dp.mechanism == "local_gaussian" else []
    if unused:
        return f"privacy.{unused[0]}: not read under {under}; remove it, or choose the mechanism that reads it"
    if dp.clip_norm is None:
        return f"privacy.clip_norm: required with {under}; set the L2 bound of a client's update, e.g. 1.0"
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        return (f"privacy.noise_multiplier and privacy.target_epsilon: set exactly one of them with {under} "
                "(the noise directly, or the epsilon it is calibrated to)")
    return _strategy_refusal(cfg, under) or (_cohort_problem(cfg, under) if dp.mechanism != "local_gaussian" else None)


def _strategy_refusal(cfg: "Config", under: str) -> str | None:
    """Why the strategy or its client weighting cannot run under DP; None when they can."""
    refusal = STRATEGIES[cfg.strategy].dp_refusal
    if refusal is not None:
        fits = " or ".join(n for n, c in STRATEGIES.items() if c.dp_refusal is None)
        return f"strategy {cfg.strategy} cannot run under {under}: {refusal}; use {fits}"
    if getattr(cfg.strategy_config, "client_weighting", "uniform") != "uniform":
        return (f"strategy_config.client_weighting samples: under {under} a client's weight must not "
                "depend on its data (its sensitivity would be unbounded); set client_weighting: uniform")
    return None


def _cohort_problem(cfg: "Config", under: str) -> str | None:
    """Why the cohort, population or simulated cohort of a central mechanism do not fit; None when they do."""
    dp, cohort = cfg.privacy, cfg.server_config.num_clients_per_iteration
    if not isinstance(cohort, int):
        return (f"server_config.num_clients_per_iteration {cohort!r}: {under} needs one expected "
                f"cohort size (an int; the cohort is then Poisson-sampled around it)")
    population = dp.population_of(cfg.data_config.num_clients)
    if population < cfg.data_config.num_clients:
        return (f"privacy.population {population} is below data_config.num_clients "
                f"({cfg.data_config.num_clients}); set at least that many, or leave it null")
    noise_cohort = dp.noise_cohort_of(cohort)
    if not cohort <= noise_cohort <= population:
        return (f"privacy.noise_cohort_size {noise_cohort}: must be at least the cohort "
                f"(server_config.num_clients_per_iteration {cohort}) and at most privacy.population ({population})")
    return None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` override to ``raw`` in place; the value is parsed as YAML.

    Raises:
        UserError: when the text has no ``=``, an empty key, a value that is not YAML, or a path that
            crosses a non-section value.
    """
    path, sep, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise UserError(f"--set {assignment!r}: expected key.path=value, e.g. server_config.max_iteration=10")
    try:
        value = _read_yaml(text)
    except _DuplicateKey as exc:
        raise UserError(f"--set {assignment!r}: the value writes the key {exc.key!r} twice; keep one") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"--set {assignment!r}: the value is not valid YAML ({problem}); e.g. a list is [a, b], "
                        f"a text with YAML characters goes in quotes") from None
    node = raw
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or an empty section in the file (``server_config:``)
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise UserError(f"--set {path}: {key!r} is a value, not a section")
    node[keys[-1]] = value


class _DuplicateKey(Exception):
    """A mapping writes ``key`` (a dotted path) twice: at 1-based ``line``, first at ``first``."""

    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _check_unique_keys(node, prefix: str = "", seen_nodes=None) -> None:
    """Raise :class:`_DuplicateKey` for the first key written twice in one mapping of a composed YAML
    ``node`` (PyYAML would keep the last one silently). Merge keys (``<<``) are left to PyYAML."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked (anchors may even loop)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple, int] = {}
        for key_node, value_node in node.value:
            is_scalar = isinstance(key_node, yaml.ScalarNode)
            name = key_node.value if is_scalar else None
            if is_scalar and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, name) in first_line:
                    raise _DuplicateKey(f"{prefix}{name}", key_node.start_mark.line + 1,
                                        first_line[(key_node.tag, name)])
                first_line[(key_node.tag, name)] = key_node.start_mark.line + 1
            _check_unique_keys(value_node, f"{prefix}{name}." if is_scalar else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, prefix, seen_nodes)


def _read_yaml(text: str):
    """``yaml.safe_load(text)``, refusing a key written twice in one mapping.

    Raises:
        _DuplicateKey: the first repeated key.
        yaml.YAMLError: text that is not YAML (or holds more than one document).
    """
    _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None or not _is_section(field):
            return []
        model = field.annotation
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _describe(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    where = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc))
        return f"unknown key {where!r}; allowed here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a check across a whole section: its input is not one value
        return f"{where}: {message}"
    got = repr(error.get("input"))
    return f"{where}: {message} (got {got if len(got) <= 80 else got[:60] + ' ... ' + got[-15:]})"


def validate_config(raw: dict, source: str) -> Config:
    """Validate plain data into a :class:`Config`; ``source`` names the file in error messages."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(_describe(dict(e)) for e in exc.errors())
        raise UserError(f"config {source}: {details}") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Config:
    """Read a YAML file, apply ``--set`` overrides and ``seed``, and validate.

    Raises:
        UserError: a missing, unreadable or non-UTF-8 file, bad YAML, a key written twice, an unknown
            key, a wrong type, a non-finite float or an out-of-range value.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"-config {path} is a folder; pass the experiment's YAML file, e.g. experiments/cv/config.yaml")
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass -config with an existing YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config {path}: byte {exc.start} is not UTF-8 text; save the file as UTF-8 "
                        f"(a config is plain YAML text)") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                        f"check its permissions or pass another -config") from None
    try:
        raw = _read_yaml(text) or {}
    except _DuplicateKey as exc:
        raise UserError(f"config {path} line {exc.line}: key {exc.key!r} is written twice (first at line "
                        f"{exc.first}); keep one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    if seed is not None:
        raw["seed"] = seed
    return validate_config(raw, f"{path} with --set overrides" if overrides else str(path))


# Keys a resumed run may change: how long it runs, how often it reports, how it computes (not what).
RESUME_MAY_CHANGE = frozenset({
    "server_config.max_iteration", "server_config.val_freq", "server_config.ckpt_freq",
    "server_config.eval_batch_size", "server_config.resume_from_checkpoint", "server_config.timeout_s",
    "server_config.client_store_memory_mb", "client_config.vectorize", "client_config.vectorize_chunk",
    "client_config.compile", "client_config.compile_mode", "client_config.channels_last", "data_config.download",
    "logging_config", "device"})


def with_defaults(raw: dict) -> dict:
    """A stored resolved config with the defaults of keys added since it was written (so a run made
    before a new config field existed still matches); as stored when it no longer validates.

    Where a new key's default changed what a run computes, the stored config gets the value that
    reproduces the older run instead: ``server_config.optimizer_config.server_form: torch`` for an
    adam, adamw or adagrad server written before that key existed (issue 23).
    """
    server = raw.get("server_config") if isinstance(raw, dict) else None
    optimizer = server.get("optimizer_config") if isinstance(server, dict) else None
    if (isinstance(server, dict) and isinstance(optimizer, dict) and "server_form" not in optimizer
            and optimizer.get("type") in ("adam", "adamw", "adagrad")):
        raw = {**raw, "server_config": {**server, "optimizer_config": {**optimizer, "server_form": "torch"}}}
    try:
        return validate_config(raw, "stored").to_dict()
    except UserError:
        return raw


# Keys whose value changes the defaults of others: a difference there is named before theirs.
REPORTED_FIRST = ("server_config.optimizer_config.server_form",)


def config_difference(old: Any, new: Any, ignored=frozenset(), prefix: str = "") -> str | None:
    """The first dotted key where two resolved configs differ, outside the dotted keys or sections
    ``ignored``, as ``"key: OLD there, NEW now"``; None when they agree. The keys of
    :data:`REPORTED_FIRST` come first, then sorted order."""
    if prefix.rstrip(".") in ignored:
        return None
    if not prefix:
        for key in REPORTED_FIRST:
            parts = key.split(".")
            if not any(".".join(parts[:i]) in ignored for i in range(1, len(parts) + 1)):
                found = config_difference(_at(old, key), _at(new, key), ignored, key + ".")
                if found:
                    return found
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None if old == new else f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"
    for key in sorted(set(old) | set(new)):
        found = config_difference(old.get(key), new.get(key), ignored, f"{prefix}{key}.")
        if found:
            return found
    return None


def _at(config, dotted: str):
    """The value at a dotted key of a nested dict (None where a part is missing)."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config
