"""Bad input (issue 22 point 7): every mistake a user can make on the command line, in a config file,
a data folder, a task folder or a -resume target ends with exactly one line on stderr,
``pfedsim: error: <message naming the field or file and the fix>``, exit status 2, and nothing
written (the -outputPath folder stays as it was: absent or empty for a new one).

``CASES`` holds one row per bad input. Most rows call ``e2e_trainer.main`` in this process (fast);
the rows marked ``proc`` run ``python e2e_trainer.py`` from the repository root as a user would, to
prove the exit status and the single stderr line end to end. The synthetic task needs no data; only
the CIFAR rows read the real copy (through a damaged copy made of links to its batch files).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pytest
import yaml

import e2e_trainer
from testing.conftest import REPO, SMALL_CV

SECONDS_PER_CASE = 60  # a bad input fails at once; this only stops a case that would start training forever

# The synthetic task's config with one round: a bad input that is accepted by mistake finishes quickly.
SYNTHETIC = """\
model_config: {model_type: MLP}
server_config: {max_iteration: 1, num_clients_per_iteration: 5, val_freq: 1, ckpt_freq: 1}
client_config: {local_epochs: 1, batch_size: 16, optimizer_config: {type: sgd, lr: 0.1}, augment: false}
data_config: {num_clients: 20, partition: dirichlet, alpha: 0.5}
personalization: {method: fedper, local_layers: [linear]}
device: cpu
"""
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MODEL_PY = (REPO / "experiments" / "synthetic" / "model.py").read_text()
DATASET_PY = (REPO / "experiments" / "synthetic" / "dataloaders" / "dataset.py").read_text()
LOADER_PY = (REPO / "experiments" / "synthetic" / "dataloaders" / "dataloader.py").read_text()
NO_WANDB = "raise ImportError('No module named wandb (a stand-in for a missing package)')\n"


class Env:
    """What one case works in: ``tmp`` (also the current folder), ``out`` (its -outputPath) and
    ``watch`` (the folder that must stay as it was), plus makers of bad files."""

    def __init__(self, tmp: Path, request, monkeypatch):
        self.tmp, self.out, self.request, self.monkeypatch = tmp, tmp / "out", request, monkeypatch
        self.watch = self.out
        self.env: dict = {}
        self.base = self.file("base.yaml", SYNTHETIC)

    def file(self, name: str, content: Union[str, bytes]) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def task(self, model: Union[str, bytes] = MODEL_PY, dataset: Optional[str] = DATASET_PY,
             loader: Optional[str] = LOADER_PY, name: Optional[str] = None) -> Path:
        """A task folder (synthetic's files unless replaced; None leaves a file out), named uniquely
        so that no two cases share an imported package."""
        folder = self.tmp / (name or f"task_{self.tmp.name.replace('-', '_').replace('.', '_')}")
        self.file(f"{folder.name}/model.py", model)
        for rel, text in (("dataloaders/dataset.py", dataset), ("dataloaders/dataloader.py", loader)):
            if text is not None:
                self.file(f"{folder.name}/{rel}", text)
        return folder

    def cifar(self, **damage) -> Path:
        """A CIFAR-10 folder whose batch files link to the real ones, except ``name=content``
        (a dict is pickled, bytes are written, None leaves the file out)."""
        real = self.request.getfixturevalue("cifar_path") / "cifar-10-batches-py"
        folder = self.tmp / "data" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in CIFAR_FILES:
            if name not in damage:
                (folder / name).symlink_to(real / name)
            elif damage[name] is not None:
                content = damage[name]
                (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
        return folder.parent

    def checkpoint(self) -> Path:
        return self.request.getfixturevalue("finished_run") / "checkpoints" / "latest.pt"


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list]
    needle: Union[str, Callable[[Env], str]]
    proc: bool = False  # run as a real process from the repository root
    setup: Optional[Callable[[Env], None]] = None
    root_skip: bool = False  # meaningless as root (chmod 000 does not stop root reading)
    marks: list = field(default_factory=list)


def syn(env: Env, *extra, config: Optional[Path] = None) -> list:
    """Argv of a synthetic-task run into ``env.out``, with ``extra`` arguments."""
    return ["-dataPath", "unused", "-config", str(config or env.base), "-task", "synthetic",
            "-outputPath", str(env.out), *extra]


def S(id: str, *assignments: str, needle: Optional[str] = None, **kw) -> Case:
    """One or more ``--set`` overrides on the synthetic task; the needle is the last key by default."""
    sets = [a for assignment in assignments for a in ("--set", assignment)]
    return Case(f"set-{id}", lambda env: syn(env, *sets), needle or assignments[-1].partition("=")[0], **kw)


def Y(id: str, text: Union[str, bytes], needle, **kw) -> Case:
    """A config file with ``text`` (bytes as they are, text after the synthetic base when it starts with '+')."""
    if isinstance(text, str) and text.startswith("+"):
        text = SYNTHETIC + text[1:]
    return Case(f"yaml-{id}", lambda env: syn(env, config=env.file("bad.yaml", text)), needle, **kw)


def C(id: str, extra: Callable[[Env], list], needle, **kw) -> Case:
    """Command-line flags after the synthetic task's (argparse keeps the last of a repeated flag)."""
    return Case(f"cli-{id}", lambda env: syn(env, *extra(env)), needle, **kw)


def T(id: str, needle, **task) -> Case:
    """A broken task folder made in tmp."""
    def argv(env):
        folder = env.task(**task)
        return syn(env, "-task", str(folder))
    return Case(f"task-{id}", argv, needle)


def cv_argv(env: Env, data: Path, *extra) -> list:
    config = env.file("cv.yaml", yaml.safe_dump({**SMALL_CV, "data_config": {**SMALL_CV["data_config"]}}))
    return ["-dataPath", str(data), "-config", str(config), "-task", "cv", "-outputPath", str(env.out), *extra]


def D(id: str, needle, proc: bool = False, **damage) -> Case:
    """A damaged CIFAR-10 copy (see :meth:`Env.cifar`)."""
    return Case(f"cifar-{id}", lambda env: cv_argv(env, env.cifar(**damage)), needle, proc=proc)


def R(id: str, extra: Callable[[Env], list], needle) -> Case:
    """A -resume target (the finished run's checkpoint is ``env.checkpoint()``)."""
    return Case(f"resume-{id}", lambda env: syn(env, "-run_name", "r", *extra(env)), needle)


def batch(labels=None, data=None, n: int = 100, **extra) -> dict:
    """A CIFAR-10 batch dict of ``n`` images, labels 0..9 unless given."""
    return {"data": np.zeros((n, 3072), np.uint8) if data is None else data,
            "labels": [i % 10 for i in range(n)] if labels is None else labels, **extra}


def _no_wandb_dir(env: Env) -> None:
    env.file("shim/wandb.py", NO_WANDB)
    env.env["PYTHONPATH"] = os.pathsep.join([str(env.tmp / "shim"), str(REPO)])


def _no_wandb(env: Env) -> None:
    env.monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed


def _results_there(env: Env) -> None:
    run = env.out / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"round": 1}\n')


def _unreadable(env: Env) -> None:
    env.file("bad.yaml", SYNTHETIC).chmod(0)


BIG = "10000000000000000000000000"  # 10**25
OPT = "client_config.optimizer_config"
SOPT = "server_config.optimizer_config"
ADAM, SADAM = f"{OPT}.type=adam", f"{SOPT}.type=adam"

CASES = [
    # --- server_config ---------------------------------------------------------------------------
    S("rounds-zero", "server_config.max_iteration=0"),
    S("rounds-negative", "server_config.max_iteration=-3"),
    S("rounds-1e25", f"server_config.max_iteration={BIG}"),
    S("rounds-1e25-float", "server_config.max_iteration=1.0e+25"),
    S("rounds-over-bound", "server_config.max_iteration=20000000"),
    S("rounds-bool", "server_config.max_iteration=true"),
    S("rounds-fraction", "server_config.max_iteration=2.5"),
    S("rounds-integral-float", "server_config.max_iteration=2.0"),
    S("rounds-quoted", "server_config.max_iteration='3'"),
    S("rounds-word", "server_config.max_iteration=ten"),
    S("rounds-inf", "server_config.max_iteration=.inf"),
    S("rounds-nan", "server_config.max_iteration=.nan"),
    S("rounds-list", "server_config.max_iteration=[1]"),
    S("rounds-null", "server_config.max_iteration=null"),
    S("cohort-zero", "server_config.num_clients_per_iteration=0"),
    S("cohort-negative", "server_config.num_clients_per_iteration=-1"),
    S("cohort-reversed-range", "server_config.num_clients_per_iteration='5,2'"),
    S("cohort-words", "server_config.num_clients_per_iteration='a,b'"),
    S("cohort-three-parts", "server_config.num_clients_per_iteration='1,2,3'"),
    S("cohort-bool", "server_config.num_clients_per_iteration=true"),
    S("cohort-fraction", "server_config.num_clients_per_iteration=2.5"),
    S("cohort-list", "server_config.num_clients_per_iteration=[5]"),
    S("cohort-over-clients", "server_config.num_clients_per_iteration=50"),
    S("valfreq-zero", "server_config.val_freq=0"),
    S("valfreq-bool", "server_config.val_freq=true"),
    S("valfreq-inf", "server_config.val_freq=.inf"),
    S("valfreq-1e25", f"server_config.val_freq={BIG}"),
    S("ckptfreq-negative", "server_config.ckpt_freq=-1"),
    S("ckptfreq-bool", "server_config.ckpt_freq=false"),
    S("ckptfreq-fraction", "server_config.ckpt_freq=1.5"),
    S("evalbatch-zero", "server_config.eval_batch_size=0"),
    S("evalbatch-bool", "server_config.eval_batch_size=true"),
    S("evalbatch-1e25", f"server_config.eval_batch_size={BIG}"),
    S("timeout-zero", "server_config.timeout_s=0"),
    S("timeout-negative", "server_config.timeout_s=-5"),
    S("timeout-inf", "server_config.timeout_s=.inf"),
    S("timeout-nan", "server_config.timeout_s=.nan"),
    S("timeout-1e300", "server_config.timeout_s=1.0e+300"),
    S("timeout-word", "server_config.timeout_s=soon"),
    S("timeout-bool", "server_config.timeout_s=true"),
    S("store-zero", "server_config.client_store_memory_mb=0"),
    S("store-negative", "server_config.client_store_memory_mb=-1"),
    S("store-inf", "server_config.client_store_memory_mb=.inf"),
    S("store-nan", "server_config.client_store_memory_mb=.nan"),
    S("resumefrom-int", "server_config.resume_from_checkpoint=5"),
    S("resumefrom-list", "server_config.resume_from_checkpoint=[a]"),
    S("server-unknown-key", "server_config.rounds=5"),
    S("server-not-section", "server_config=5", needle="server_config"),
    S("server-list-section", "server_config=[1, 2]", needle="server_config"),
    # --- server optimizer --------------------------------------------------------------------------
    S("sopt-type", f"{SOPT}.type=rmsprop"),
    S("sopt-lr-zero", f"{SOPT}.lr=0"),
    S("sopt-lr-inf", f"{SOPT}.lr=.inf"),
    S("sopt-lr-nan", f"{SOPT}.lr=.nan"),
    S("sopt-lr-bool", f"{SOPT}.lr=true"),
    S("sopt-momentum-one", f"{SOPT}.momentum=1.0"),
    S("sopt-momentum-negative", f"{SOPT}.momentum=-0.1"),
    S("sopt-wd-negative", f"{SOPT}.weight_decay=-1"),
    S("sopt-wd-inf", f"{SOPT}.weight_decay=.inf"),
    S("sopt-nesterov-word", f"{SOPT}.nesterov=maybe"),
    S("sopt-nesterov-int", f"{SOPT}.nesterov=1"),
    S("sopt-adam-beta2-one", SADAM, f"{SOPT}.betas=[0.5, 1.0]"),
    S("sopt-yogi-beta1-one", f"{SOPT}.type=yogi", f"{SOPT}.betas=[1.0, 0.99]"),
    S("sopt-betas-one", f"{SOPT}.betas=[0.9]"),
    S("sopt-betas-three", f"{SOPT}.betas=[0.9, 0.99, 0.999]"),
    S("sopt-betas-scalar", f"{SOPT}.betas=0.9"),
    S("sopt-eps-zero", f"{SOPT}.eps=0"),
    S("sopt-eps-inf", f"{SOPT}.eps=.inf"),
    S("sopt-unknown-key", f"{SOPT}.beta1=0.9"),
    S("sopt-not-section", f"{SOPT}=sgd"),
    S("sopt-form-unknown", SADAM, f"{SOPT}.server_form=paper"),
    S("sopt-form-bool", SADAM, f"{SOPT}.server_form=true"),
    S("copt-server-form", f"{OPT}.server_form=torch", needle=f"{OPT}: server_form 'torch' applies to the server"),
    # --- client_config -----------------------------------------------------------------------------
    S("epochs-bool", "client_config.local_epochs=true"),
    S("epochs-zero", "client_config.local_epochs=0"),
    S("epochs-fraction", "client_config.local_epochs=1.5"),
    S("epochs-integral-float", "client_config.local_epochs=2.0"),
    S("epochs-quoted", "client_config.local_epochs='2'"),
    S("epochs-inf", "client_config.local_epochs=.inf"),
    S("epochs-1e25", f"client_config.local_epochs={BIG}"),
    S("batch-zero", "client_config.batch_size=0"),
    S("batch-negative", "client_config.batch_size=-5"),
    S("batch-bool", "client_config.batch_size=true"),
    S("batch-1e25", f"client_config.batch_size={BIG}"),
    S("batch-list", "client_config.batch_size=[16]"),
    S("copt-adam-betas-2-3", ADAM, f"{OPT}.betas=[2, 3]"),
    S("copt-adam-beta2-1.5", ADAM, f"{OPT}.betas=[0.9, 1.5]"),
    S("copt-adamw-beta-negative", f"{OPT}.type=adamw", f"{OPT}.betas=[-0.1, 0.9]"),
    S("copt-adam-beta-nan", ADAM, f"{OPT}.betas=[.nan, 0.9]"),
    S("copt-adam-beta-inf", ADAM, f"{OPT}.betas=[0.9, .inf]"),
    S("copt-adam-betas-words", ADAM, f"{OPT}.betas=[a, b]"),
    S("copt-lr-inf", f"{OPT}.lr=.inf"),
    S("copt-lr-negative", f"{OPT}.lr=-0.1"),
    S("copt-lr-nan", f"{OPT}.lr=.nan"),
    S("copt-lr-word", f"{OPT}.lr=fast"),
    S("copt-momentum-nan", f"{OPT}.momentum=.nan"),
    S("copt-wd-nan", f"{OPT}.weight_decay=.nan"),
    S("copt-eps-nan", f"{OPT}.eps=.nan"),
    S("copt-adam-eps-zero", ADAM, f"{OPT}.eps=0"),
    S("copt-type-number", f"{OPT}.type=1"),
    S("augment-int", "client_config.augment=1"),
    S("augment-word", "client_config.augment=maybe"),
    S("precision", "client_config.precision=fp16"),
    S("channels-last-zero", "client_config.channels_last=0"),
    S("channels-last-two", "client_config.channels_last=2"),
    S("vectorize-int", "client_config.vectorize=5"),
    S("vectorize-chunk-zero", "client_config.vectorize_chunk=0"),
    S("vectorize-chunk-bool", "client_config.vectorize_chunk=true"),
    S("compile-int", "client_config.compile=1"),
    S("compile-mode", "client_config.compile_mode=fast"),
    S("client-unknown-key", "client_config.epochs=2"),
    S("client-not-section", "client_config=5", needle="client_config"),
    # --- data_config -------------------------------------------------------------------------------
    S("clients-zero", "data_config.num_clients=0"),
    S("clients-bool", "data_config.num_clients=true"),
    S("clients-1e25", f"data_config.num_clients={BIG}"),
    S("clients-fraction", "data_config.num_clients=20.5"),
    S("partition-name", "data_config.partition=random"),
    S("partition-number", "data_config.partition=5"),
    S("alpha-zero", "data_config.alpha=0"),
    S("alpha-negative", "data_config.alpha=-1"),
    S("alpha-inf", "data_config.alpha=.inf"),
    S("alpha-nan", "data_config.alpha=.nan"),
    S("alpha-bool", "data_config.alpha=true"),
    S("alpha-word", "data_config.alpha=lots"),
    S("classes-per-client-zero", "data_config.classes_per_client=0"),
    S("classes-per-client-bool", "data_config.classes_per_client=true"),
    S("min-samples-zero", "data_config.min_samples=0"),
    S("min-samples-bool", "data_config.min_samples=true"),
    S("download-int", "data_config.download=1"),
    S("normalize-int", "data_config.normalize=0"),
    S("pad-mode", "data_config.pad_mode=edge"),
    S("data-unknown-key", "data_config.partitions=iid"),
    S("val-fraction-negative", "data_config.val_fraction=-0.1"),
    S("val-fraction-large", "data_config.val_fraction=0.9"),
    S("val-fraction-bool", "data_config.val_fraction=true"),
    S("best-metric-name", "server_config.best_metric=test_acc"),
    S("best-metric-personalized-without-method", "personalization.method=none", "personalization.local_layers=[]",
      "server_config.best_metric=val_personalized_acc", needle="server_config.best_metric"),
    # --- strategy ----------------------------------------------------------------------------------
    S("strategy-name", "strategy=fedsgd"),
    S("strategy-number", "strategy=5"),
    S("strategy-list", "strategy=[fedavg]"),
    S("scaffold-adam", "strategy=scaffold", ADAM, needle="client_config.optimizer_config.type: sgd"),
    S("weighting", "strategy_config.client_weighting=equal"),
    S("mu-negative", "strategy_config.mu=-1"),
    S("mu-inf", "strategy_config.mu=.inf"),
    S("mu-nan", "strategy_config.mu=.nan"),
    S("softmax-beta-inf", "strategy_config.softmax_beta=.inf"),
    S("softmax-beta-bool", "strategy_config.softmax_beta=true"),
    # --- personalization ---------------------------------------------------------------------------
    S("method-name", "personalization.method=pfedhn"),
    S("layers-text", "personalization.local_layers=linear"),
    S("layers-numbers", "personalization.local_layers=[1]"),
    S("layers-empty", "personalization.local_layers=[]", needle="local_layers"),
    S("layers-with-none", "personalization.method=none", needle="local_layers"),
    S("layers-unknown-module", "personalization.local_layers=[head]", needle="personalization.local_layers"),
    S("head-epochs-negative", "personalization.head_epochs=-1"),
    S("head-epochs-bool", "personalization.head_epochs=true"),
    S("finetune-epochs-negative", "personalization.finetune_epochs=-1"),
    S("ditto-lambda-inf", "personalization.ditto_lambda=.inf"),
    S("ditto-lambda-negative", "personalization.ditto_lambda=-1"),
    S("ditto-epochs-zero", "personalization.ditto_epochs=0"),
    S("apfl-alpha-high", "personalization.apfl_alpha=1.5"),
    S("apfl-alpha-nan", "personalization.apfl_alpha=.nan"),
    S("apfl-alpha-lr-inf", "personalization.apfl_alpha_lr=.inf"),
    S("apfl-alpha-lr-negative", "personalization.apfl_alpha_lr=-1"),
    S("new-client-epochs-bool", "personalization.new_client_epochs=true"),
    # --- logging_config ----------------------------------------------------------------------------
    S("wandb-int", "logging_config.wandb=1"),
    S("wandb-word", "logging_config.wandb=maybe"),
    S("wandb-project-number", "logging_config.wandb_project=5"),
    S("wandb-mode", "logging_config.wandb_mode=disabled"),
    S("wandb-entity-list", "logging_config.wandb_entity=[a]"),
    S("wandb-missing", "logging_config.wandb=true", needle="pip install wandb", setup=_no_wandb),
    S("wandb-missing-process", "logging_config.wandb=true", needle="pip install wandb", setup=_no_wandb_dir,
      proc=True),
    # --- model_config ------------------------------------------------------------------------------
    S("model-type-unknown", "model_config.model_type=Nope"),
    S("model-type-number", "model_config.model_type=5"),
    S("num-classes-one", "model_config.num_classes=1"),
    S("num-classes-bool", "model_config.num_classes=true"),
    S("num-classes-fraction", "model_config.num_classes=2.5"),
    S("num-classes-inf", "model_config.num_classes=.inf"),
    S("num-classes-too-few", "model_config.num_classes=5", needle="model_config.num_classes"),
    S("options-number", "model_config.options=5"),
    S("options-unknown", "model_config.options={width: 2}", needle="model_config.options"),
    S("data-options-number", "data_config.options=5"),
    S("data-options-unknown", "data_config.options={seq_len: 80}", needle="data_config.options"),
    S("model-not-section", "model_config=MLP", needle="model_config"),
    # --- top level ---------------------------------------------------------------------------------
    S("seed-negative", "seed=-1"),
    S("seed-2-70", f"seed={2 ** 70}"),
    S("seed-2-64", f"seed={2 ** 64}"),
    S("seed-bool", "seed=true"),
    S("seed-fraction", "seed=1.5"),
    S("seed-nan", "seed=.nan"),
    S("seed-word", "seed=abc"),
    S("device", "device=tpu"),
    S("top-unknown-key", "bogus=1"),
    S("top-rounds-misplaced", "max_iteration=5"),
    S("top-optimizer-misplaced", "optimizer_config.lr=0.1", needle="optimizer_config"),
    # --- --set syntax ------------------------------------------------------------------------------
    S("syntax-no-equals", "server_config.max_iteration", needle="expected key.path=value"),
    S("syntax-empty-key", "=5", needle="expected key.path=value"),
    S("syntax-empty-part", "server_config..max_iteration=3", needle="server_config..max_iteration"),
    S("syntax-bad-yaml", "server_config.max_iteration=[1", needle="not valid YAML"),
    S("syntax-value-not-section", "seed.x=1", needle="seed"),
    S("syntax-list-not-section", "personalization.local_layers.x=1", needle="'local_layers' is a value"),
    S("syntax-python-tag", "seed=!!python/object/apply:os.system [echo]", needle="not valid YAML"),
    S("syntax-undefined-alias", "seed=*anchor", needle="not valid YAML"),
    S("syntax-nested-colon", "seed=a: b: c", needle="not valid YAML"),
    C("set-without-value", lambda env: ["--set"], "--set"),
    # --- command-line flags ------------------------------------------------------------------------
    C("seed-word", lambda env: ["-seed", "abc"], "-seed"),
    C("seed-fraction", lambda env: ["-seed", "1.5"], "-seed"),
    C("seed-negative", lambda env: ["-seed", "-1"], "seed"),
    C("seed-2-70", lambda env: ["-seed", str(2 ** 70)], "seed"),
    C("backend", lambda env: ["-backend", "mpi"], "-backend"),
    C("unknown-flag", lambda env: ["--bogus"], "--bogus"),
    C("single-dash-set", lambda env: ["-set", "seed=1"], "-set"),
    Case("cli-missing-config", lambda env: ["-dataPath", "x", "-task", "synthetic", "-outputPath", str(env.out)],
         "-config"),
    Case("cli-missing-task", lambda env: ["-dataPath", "x", "-config", str(env.base), "-outputPath", str(env.out)],
         "-task"),
    Case("cli-missing-output", lambda env: ["-dataPath", "x", "-config", str(env.base), "-task", "synthetic"],
         "-outputPath"),
    Case("cli-missing-data", lambda env: cv_argv(env, env.tmp / "unused")[2:], "-dataPath"),  # cv reads files
    C("empty-output", lambda env: ["-outputPath", ""], "-outputPath",
      setup=lambda env: setattr(env, "watch", env.tmp)),
    C("blank-output", lambda env: ["-outputPath", "  "], "-outputPath",
      setup=lambda env: setattr(env, "watch", env.tmp)),
    C("empty-run-name", lambda env: ["-run_name", ""], "-run_name"),
    C("blank-run-name", lambda env: ["-run_name", "   "], "-run_name"),
    C("empty-run-name-process", lambda env: ["-run_name", ""], "-run_name", proc=True),
    C("run-name-dotdot", lambda env: ["-run_name", ".."], "-run_name"),
    C("run-name-dot", lambda env: ["-run_name", "."], "-run_name"),
    C("run-name-path", lambda env: ["-run_name", "a/b"], "-run_name"),
    C("run-name-absolute", lambda env: ["-run_name", "/tmp/x"], "-run_name"),
    C("output-is-file", lambda env: ["-outputPath", str(env.file("afile", "keep"))], "-outputPath",
      setup=lambda env: setattr(env, "watch", env.tmp)),
    C("output-under-file", lambda env: ["-outputPath", str(env.file("afile", "keep") / "runs")], "-outputPath",
      setup=lambda env: setattr(env, "watch", env.tmp)),
    C("resume-bare-without-name", lambda env: ["-resume"], "-resume"),
    C("results-there", lambda env: ["-run_name", "r"], "already holds results", setup=_results_there),
    # --- config files ------------------------------------------------------------------------------
    C("config-missing", lambda env: ["-config", str(env.tmp / "nope.yaml")], "nope.yaml"),
    C("config-folder", lambda env: ["-config", str(env.tmp)], "-config"),
    C("config-empty-name", lambda env: ["-config", ""], "-config"),
    Y("latin1", "+# caf\xe9 config\n".encode("latin-1"), "bad.yaml"),
    Y("latin1-process", "+# caf\xe9 config\n".encode("latin-1"), "bad.yaml", proc=True),
    Y("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "bad.yaml"),
    Y("utf16", SYNTHETIC.encode("utf-16"), "bad.yaml"),
    Case("yaml-unreadable", lambda env: syn(env, config=env.tmp / "bad.yaml"), "bad.yaml", setup=_unreadable,
         root_skip=True),
    Y("unclosed-brace", "server_config: {max_iteration: 3\n", "not valid YAML"),
    Y("tab-indent", "server_config:\n\tmax_iteration: 3\n", "line 2"),
    Y("top-list", "- server_config\n- client_config\n", "mapping"),
    Y("top-scalar", "just words\n", "mapping"),
    Y("two-documents", "+---\nseed: 2\n", "not valid YAML"),
    Y("duplicate-top", "+seed: 1\nseed: 2\n", "'seed'"),
    Y("duplicate-section", "+server_config: {max_iteration: 2}\n", "'server_config'"),
    Y("duplicate-nested", "server_config:\n  max_iteration: 1\n  val_freq: 1\n  max_iteration: 5\n",
      "'server_config.max_iteration'"),
    Y("duplicate-flow", "server_config: {max_iteration: 1, max_iteration: 2}\n", "'server_config.max_iteration'"),
    Y("duplicate-deep", "client_config:\n  optimizer_config:\n    lr: 0.1\n    lr: 0.2\n",
      "'client_config.optimizer_config.lr'"),
    Y("python-tag", "seed: !!python/object/apply:os.system [echo]\n", "not valid YAML"),
    Y("unhashable-key", "? [a, b]\n: 1\n", "not valid YAML"),
    Y("int-key", "+1: 2\n", "1: Keys should be strings"),
    Y("null-key", "+~: 2\n", "None: Keys should be strings"),
    Y("section-list", "server_config: [max_iteration, 3]\n", "server_config"),
    Y("optimizer-list", "+client_config: {optimizer_config: [sgd]}\n", "client_config"),
    Y("date-seed", "+seed: 2024-01-01\n", "seed"),
    Y("anchor-loop", "a: &a [*a]\n", "bad.yaml"),
    # --- task folders ------------------------------------------------------------------------------
    C("task-unknown", lambda env: ["-task", "nlp_missing"], "-task nlp_missing"),
    C("task-empty", lambda env: ["-task", ""], "-task"),
    C("task-empty-folder", lambda env: ["-task", str(env.tmp)], "-task"),
    C("task-is-file", lambda env: ["-task", str(env.task() / "model.py")], "model.py"),
    T("model-syntax-error", "model.py", model="class Broken(:\n    pass\n"),
    Case("task-model-syntax-error-process", lambda env: syn(env, "-task", str(env.task(model="def f(:\n"))),
         "model.py", proc=True),
    T("model-missing-module", "model.py", model="import no_such_module_xyz\n" + MODEL_PY),
    T("model-missing-name", "model.py", model="from core.model import NoSuchThing\n" + MODEL_PY),
    T("model-name-error", "model.py", model=MODEL_PY + "undefined_name + 1\n"),
    T("model-raises", "model.py", model=MODEL_PY + "raise RuntimeError('cannot build\\nat all')\n"),
    T("model-latin1", "model.py", model='NAME = "caf\xe9"\n'.encode("latin-1") + MODEL_PY.encode()),
    T("model-indentation", "model.py", model=MODEL_PY + "  x = 1\n"),
    T("model-no-class", "model.py", model="X = 1\n"),
    T("model-exits", "model.py", model="import sys\nsys.exit(3)\n"),
    T("dataset-missing", "dataset.py", dataset=None),
    T("loader-missing", "dataloader.py", loader=None),
    T("dataset-syntax-error", "dataset.py", dataset=DATASET_PY + "def (\n"),
    T("dataset-import-error", "dataset.py", dataset="from core.dataset import Missing\n" + DATASET_PY),
    T("dataset-two-classes", "BaseDataset", dataset=DATASET_PY + "\nclass Other(GaussianClusters):\n    pass\n"),
    T("dataset-no-class", "BaseDataset", dataset="X = 1\n"),
    T("loader-no-class", "BaseDataLoader", loader="X = 1\n"),
    T("loader-import-error", "dataloader.py", loader="import no_such_module_abc\n" + LOADER_PY),
    T("dotted-name", "bad.name", name="bad.name"),
    # load_split returning numpy arrays (issue 26 point 3): one line naming the task's dataset file
    T("dataset-numpy-inputs", "dataset.py: GaussianClusters.load_split('train') returned inputs as numpy.ndarray",
      dataset=DATASET_PY.replace("return means[labels] + 1.5 * torch.randn(SIZES[split], 32, generator=gen)",
                                 "return (means[labels] + 1.5 * torch.randn(SIZES[split], 32, generator=gen)).numpy()")),
    T("dataset-numpy-labels", "returned labels as numpy.ndarray; return torch tensors",
      dataset=DATASET_PY.replace("generator=gen), labels", "generator=gen), labels.numpy()")),
    T("dataset-labels-2d", "labels must have shape (N,)",
      dataset=DATASET_PY.replace("generator=gen), labels", "generator=gen), labels[:, None]")),
    T("dataset-one-value", "return (inputs, labels)",
      dataset=DATASET_PY.replace("return means[labels] +", "return 0 * means[labels] +").replace(
          "generator=gen), labels", "generator=gen)")),
    # --- data (CIFAR-10) ---------------------------------------------------------------------------
    D("labels-negative", "data_batch_1", data_batch_1=batch(labels=[-3] * 100)),
    D("labels-negative-process", "data_batch_1", proc=True, data_batch_1=batch(labels=[-3] * 100)),
    D("labels-too-high", "data_batch_2", data_batch_2=batch(labels=[12] * 100)),
    D("labels-fraction", "data_batch_1", data_batch_1=batch(labels=[0.5] * 100)),
    D("labels-none", "data_batch_1", data_batch_1=batch(labels=None, n=0) | {"labels": None}),
    D("labels-words", "data_batch_1", data_batch_1=batch(labels=["cat"] * 100)),
    D("labels-short", "data_batch_1", data_batch_1=batch(labels=[1] * 50)),
    D("pixels-over-255", "data_batch_1", data_batch_1=batch(data=np.full((100, 3072), 300, np.int64))),
    D("pixels-negative", "data_batch_1", data_batch_1=batch(data=np.full((100, 3072), -1, np.int64))),
    D("pixels-shape", "data_batch_1", data_batch_1=batch(data=np.zeros((100, 1024), np.uint8))),
    D("not-a-dict", "data_batch_1", data_batch_1=[1, 2, 3]),
    D("no-labels-key", "data_batch_1", data_batch_1={"data": np.zeros((1, 3072), np.uint8)}),
    D("truncated", "data_batch_3", data_batch_3=pickle.dumps(batch())[:200]),
    D("text-file", "data_batch_1", data_batch_1=b"not a pickle\n"),
    D("test-missing", "test_batch", test_batch=None),
    Case("cifar-data-is-file", lambda env: cv_argv(env, env.file("afile", "x"), "--set", "data_config.download=false"),
         "-dataPath"),
    Case("cifar-data-missing", lambda env: cv_argv(env, env.tmp / "nowhere"), "cifar-10-batches-py"),
    Case("cifar-data-wrong-folder", lambda env: cv_argv(env, env.file("data/other.txt", "x").parent),
         "cifar-10-batches-py"),
    # --- -resume targets ---------------------------------------------------------------------------
    R("missing-file", lambda env: ["-resume", str(env.tmp / "nope.pt")], "nope.pt"),
    R("folder-without-checkpoints", lambda env: ["-resume", str(env.file("empty/x", "").parent)], "empty"),
    R("text-file", lambda env: ["-resume", str(env.file("notes.pt", "hello"))], "notes.pt"),
    R("truncated", lambda env: ["-resume", str(env.file("cut.pt", env.checkpoint().read_bytes()[:300]))], "cut.pt"),
    R("other-config", lambda env: ["-resume", str(env.checkpoint()), "--set", "data_config.alpha=0.9"],
      "data_config.alpha"),
    R("past-last-round", lambda env: ["-resume", str(env.checkpoint()), "--set", "server_config.max_iteration=1"],
      "server_config.max_iteration"),
    R("bare-no-run", lambda env: ["-resume"], "not found"),
    R("config-names-missing", lambda env: ["--set", f"server_config.resume_from_checkpoint={env.tmp / 'gone.pt'}"],
      "gone.pt"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round synthetic run with a checkpoint at round 2, for the -resume rows."""
    out = tmp_path_factory.mktemp("finished")
    config = out / "config.yaml"
    config.write_text(SYNTHETIC)
    assert e2e_trainer.main(["-dataPath", "unused", "-config", str(config), "-task", "synthetic", "-outputPath",
                             str(out), "-run_name", "done", "--set", "server_config.max_iteration=2"]) == 0
    return out / "done"


def _snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for a folder); {} for an absent or empty folder."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _in_process(argv: list) -> int:
    def stop(signum, frame):
        raise TimeoutError(f"still running after {SECONDS_PER_CASE} s: the bad input was accepted")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(SECONDS_PER_CASE)
    try:
        return e2e_trainer.main(argv)
    except SystemExit as exc:  # argparse's mistakes stop with SystemExit, as in a real process
        return exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _process(argv: list, env: dict) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", **env)
    return subprocess.run([sys.executable, "e2e_trainer.py", *argv], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=SECONDS_PER_CASE)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, request, monkeypatch):
    if case.root_skip and os.geteuid() == 0:
        pytest.skip("running as root, which reads a file of mode 000 anyway")
    env = Env(tmp_path, request, monkeypatch)
    monkeypatch.chdir(tmp_path)  # a run that writes into the current folder by mistake stays in tmp
    monkeypatch.setattr(sys, "path", list(sys.path))  # a task folder given as a path joins sys.path
    if case.setup:
        case.setup(env)
    argv = case.argv(env)
    before = _snapshot(env.watch)
    if case.proc:
        proc = _process(argv, env.env)
        code, err = proc.returncode, proc.stderr
    else:
        code = _in_process(argv)
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    needle = case.needle(env) if callable(case.needle) else case.needle
    assert code == 2, f"exit status {code}, stderr:\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("pfedsim: error: "), f"not one error line:\n{err[-3000:]}"
    assert needle in lines[0], f"{needle!r} not named in: {lines[0]}"
    assert _snapshot(env.watch) == before, f"{env.watch} changed: {sorted(_snapshot(env.watch))}"


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 150 and len(set(ids)) == len(ids)
