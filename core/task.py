"""Find a task folder (``experiments/<task>/`` or a path) and import its model, dataset and loader."""
from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from core.dataset import BaseDataLoader, BaseDataset
from core.errors import UserError
from core.model import BaseModel

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class Task:
    """A task's plug-in classes: model classes by name, its dataset and its data loader."""

    name: str
    folder: Path
    models: dict
    dataset_cls: type[BaseDataset]
    dataloader_cls: type

    def model_class(self, model_config) -> type:
        """The class of ``model_config.model_type``, once its ``options`` are checked against the
        class's ``OPTIONS``.

        Raises:
            UserError: an unknown model type (naming the known ones) or an option the model does not read.
        """
        cls = self.models.get(model_config.model_type)
        if cls is None:
            raise UserError(f"model_config.model_type: unknown model {model_config.model_type!r} for task "
                            f"{self.name}; choose one of {', '.join(sorted(self.models))}")
        unknown = sorted(set(model_config.options) - set(cls.OPTIONS))
        if unknown:
            takes = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise UserError(f"model_config.options: {cls.__name__} reads no option {unknown[0]!r} (it reads: {takes}); "
                            f"remove it, or declare it in {cls.__name__}.OPTIONS if the model reads it")
        return cls

    def check_data_options(self, data_config) -> None:
        """``data_config.options`` must hold only keys the dataset class lists in its ``OPTIONS``.

        Raises:
            UserError: an option the dataset does not read, naming the keys it reads.
        """
        cls = self.dataset_cls
        unknown = sorted(set(data_config.options) - set(cls.OPTIONS))
        if unknown:
            takes = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise UserError(f"data_config.options: {cls.__name__} reads no option {unknown[0]!r} (it reads: {takes}); "
                            f"remove it, or declare it in {cls.__name__}.OPTIONS if the dataset reads it")

    def check_data_path(self, data_path: str | None) -> None:
        """A task whose dataset reads files (``BaseDataset.READS_FILES``) needs a data folder.

        Raises:
            UserError: ``data_path`` is None and the task reads files.
        """
        if data_path is None and self.dataset_cls.READS_FILES:
            raise UserError(f"-task {self.name} reads its data from files, and no data folder was given; pass "
                            f"-dataPath FOLDER (Experiment(..., data_path=FOLDER))")

    def build_model(self, model_config) -> BaseModel:
        """Instantiate ``model_config.model_type`` (checked as :meth:`model_class` does)."""
        return self.model_class(model_config)(model_config)


def _subclasses(module, base: type) -> dict:
    return {name: obj for name, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, base) and obj is not base and obj.__module__ == module.__name__}


def _import(package: str, sub: str, folder: Path):
    """Import ``package.sub`` (the task's ``sub`` module).

    Raises:
        UserError: the file is missing, or importing it fails (a syntax error, an import of a missing
            module, any exception or exit at import time), naming the task file and line.
    """
    try:
        return importlib.import_module(f"{package}.{sub}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"{package}.{sub.split('.')[0]}"):
            raise UserError(f"task folder {folder} has no {sub.replace('.', '/')}.py; "
                            f"a task needs model.py and dataloaders/dataset.py, dataloaders/dataloader.py") from None
        raise UserError(_import_failure(exc, folder, sub)) from None
    except (Exception, SystemExit) as exc:  # the task's own code: whatever it raises is the task's mistake
        raise UserError(_import_failure(exc, folder, sub)) from None


def _import_failure(exc: BaseException, folder: Path, sub: str) -> str:
    """One line naming the task file and line where importing ``sub`` failed, what failed, and the fix."""
    file, line = folder / f"{sub.replace('.', '/')}.py", None
    if isinstance(exc, SyntaxError) and exc.filename:
        file, line = Path(exc.filename), exc.lineno
        text = exc.msg
    else:
        for frame, lineno in traceback.walk_tb(exc.__traceback__):  # the deepest frame inside the task folder
            if folder in Path(frame.f_code.co_filename).resolve().parents:
                file, line = Path(frame.f_code.co_filename), lineno
        text = str(exc)
    text = " ".join(text.split()) or "(no message)"
    where = f"{file} line {line}" if line else f"{file}"
    return (f"task file {where}: {type(exc).__name__}: {text}; fix the task's code, or install what it imports "
            f"(a task folder must import without errors)")


def _single(found: dict, what: str, folder: Path) -> type:
    if len(found) != 1:
        raise UserError(f"task folder {folder}: expected exactly one {what} subclass, found {sorted(found) or 'none'}")
    return next(iter(found.values()))


def load_task(task: str) -> Task:
    """Load ``experiments/<task>`` (a name) or a task folder given as a path.

    Raises:
        UserError: unknown task, a folder name Python cannot import, a folder missing model.py /
            dataloaders files or classes, or a task file that fails to import (naming the file and line).
    """
    folder = EXPERIMENTS_DIR / task if task and (EXPERIMENTS_DIR / task).is_dir() else Path(task)
    if not folder.is_dir() or not (folder / "model.py").is_file():
        known = sorted(p.name for p in EXPERIMENTS_DIR.iterdir() if (p / "model.py").is_file())
        raise UserError(f"-task {task}: no task folder with model.py at {folder}; known tasks: {', '.join(known)}")
    folder = folder.resolve()
    if "." in folder.name:
        raise UserError(f"-task {task}: the folder name {folder.name!r} holds a '.', which Python cannot import "
                        f"as a package; rename the folder (e.g. {folder.name.replace('.', '_')!r})")
    if folder.parent == EXPERIMENTS_DIR:
        package = f"experiments.{folder.name}"
    else:
        if str(folder.parent) not in sys.path:
            sys.path.insert(0, str(folder.parent))
        package = folder.name
    models = _subclasses(_import(package, "model", folder), BaseModel)
    if not models:
        raise UserError(f"task folder {folder}: model.py defines no BaseModel subclass")
    dataset_cls = _single(_subclasses(_import(package, "dataloaders.dataset", folder), BaseDataset),
                          "BaseDataset", folder)
    loader_cls = _single(_subclasses(_import(package, "dataloaders.dataloader", folder), BaseDataLoader),
                         "BaseDataLoader", folder)
    return Task(folder.name, folder, models, dataset_cls, loader_cls)
