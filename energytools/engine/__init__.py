"""The training engine, split as timm splits it: :mod:`.runtime` (device, precision, seeding),
:mod:`.loaders` (DataLoaders), :mod:`.evaluation` (validation, test, predictions),
:mod:`.loop` (``train_one_epoch`` and ``fit``); optimizers and schedules come from the
factories in :mod:`energytools.optim`."""
from .evaluation import TEST_PREDICTIONS, Evaluator, evaluate, predict, write_test_predictions
from .loaders import TrainLoader, default_workers, loader_options, make_loader
from .loop import TIMING_COLUMNS, Batch, FitResult, StepEvent, StepFn, fit, model_meta, train_one_epoch
from ..transfer import to_device
from .runtime import autocast, deterministic, float32_exact, resolve_device, seed_everything

__all__ = ["TEST_PREDICTIONS", "TIMING_COLUMNS", "Batch", "Evaluator", "FitResult", "StepEvent", "StepFn", "TrainLoader", "autocast",
           "default_workers", "deterministic", "evaluate", "fit", "float32_exact", "loader_options", "make_loader",
           "model_meta", "predict", "resolve_device", "seed_everything", "to_device", "train_one_epoch",
           "write_test_predictions"]
