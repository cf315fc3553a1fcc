"""`energytools distill`: train a student with a distillation method (energytools.distillers:
ce, kd, energy-kd, dkd, energy-dkd, ctkd, dtkd and the logit-standardized ls-* presets).

A run is a sequence of named steps: the score table and the training set it was computed on
(energytools.training_data), the run's temperature rule and where each sample's temperature
comes from (energytools.temperatures: the table, the stored view's energy, or the teacher's
energy on the batch), the student and its method (wrapped by online HE-DA with --he-da online,
energytools.distillers.online_heda), then the engine's fit.

Teacher logits come from the teacher run on each batch, or with --cached-logits from the
table: per stored view for a table scored with --views K (each epoch a sample trains on one of
its K views, chosen from (seed, epoch, sample_id), and the loader renders exactly that view),
or the clean and mirrored image's logits for flip-only datasets (--save-logits).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from ..config import DistillConfig, as_dict, content_of, resume_may_change_keys
from ..console import console, headline
from ..distillers import Distiller, MethodSpec, SampleInfo, method_spec
from ..distillers.online_heda import OnlineHEDA
from ..distributed import context
from ..engine import Batch, FitResult, fit, model_meta, resolve_device, seed_everything, write_test_predictions
from ..io import sha256_file, write_json
from ..lookup import OnlineTeacher
from ..models import create_model
from ..models.init import init_from
from ..models.preprocessed import StudentPreprocessed
from ..preprocessing import student_preprocessing
from ..resume import run_directory
from ..table import TableMeta, load_table, versions
from ..teacher import open_table_teacher
from ..temperatures import TemperatureSource, plan_temperatures, temperature_source
from ..trackers import fit_callbacks, steps_per_epoch, watch_run
from ..training_data import TrainingInputs, open_training_set, training_inputs


def build_student(cfg: DistillConfig, info) -> tuple:
    """The student: its initial weights from the seed, or loaded from --student-init (the report
    of loaded, re-initialised and ignored tensors), fed the weights' own normalisation with
    --student-normalization weights. Returns ``(student, init report, preprocessing)``."""
    seed_everything(cfg.train.seed)
    student = create_model(cfg.student, info.num_classes, info.in_channels, info.image_size)
    report = init_from(student, cfg.student_init, info.num_classes) if cfg.student_init else None
    preprocessing = student_preprocessing(cfg.student, cfg.student_normalization, info)
    if preprocessing is not None:  # its state dict stays the student's
        student = StudentPreprocessed(student, info, preprocessing)
    return student, report, preprocessing


def build_distiller(cfg: DistillConfig, spec: MethodSpec, student, inputs: TrainingInputs, meta: TableMeta,
                    train_set) -> Distiller:
    """The student inside the method's distiller, wrapped by online HE-DA with --he-da online."""
    distiller = spec.build(student, as_dict(cfg))
    if cfg.he_da is None:
        return distiller
    if isinstance(inputs.teacher_logits, OnlineTeacher):
        teacher = inputs.teacher_logits.model  # the one already open
    else:  # cached logits cover the batch, not the mixed images
        teacher = open_table_teacher(meta, train_set, cfg.teacher, cfg.teacher_arch, cfg.train.device,
                                     cfg.preprocessing.given()).model.eval()
    weight = cfg.he_da_weight if cfg.he_da_weight is not None else distiller.options.get("kd_weight", 0.9)
    return OnlineHEDA(distiller, teacher, weight, cfg.train.seed, context().rank)


def make_step(spec: MethodSpec, distiller: Distiller, inputs: TrainingInputs, source: TemperatureSource,
              he_da: bool, label_smoothing: float = 0.0) -> Callable:
    """The training step: the batch's per-sample values by sample_id, then the method's losses."""
    lookup, teacher_logits_of, mixed = inputs.lookup, inputs.teacher_logits, inputs.mixed
    groups = spec.per_sample_temperature or he_da  # the step reads each sample's energy group

    def step(batch: Batch, forward):
        device = batch.images.device
        positions = lookup.positions(batch.sample_ids) if (teacher_logits_of or groups or mixed) else None
        teacher_logits = teacher_logits_of(batch, positions) if teacher_logits_of else None
        temperature, high = source.values(batch, positions, teacher_logits, lookup) if groups else (None, None)
        partner, lam = ((lookup.get("partner_label", positions, device), lookup.get("lam", positions, device))
                        if mixed else (None, None))
        info = SampleInfo(batch.labels, partner, lam, temperature if spec.per_sample_temperature else None,
                          teacher_logits, batch.epoch, high=high, label_smoothing=label_smoothing)
        batch.extras["sample_info"] = info
        return distiller.forward_train(batch.images, info, forward)
    return step


def run_config(cfg: DistillConfig, distiller: Distiller, inputs: TrainingInputs, source: TemperatureSource,
               meta: TableMeta, data, train_set, init=None, preprocessing: dict | None = None) -> dict:
    """The resolved config every output of the run records (and resume compares)."""
    resolved = {"stage": "distill", **content_of(cfg), "scores_sha256": sha256_file(cfg.scores),
                "method_options": distiller.options,
                "subset": {"samples": len(train_set), **{f"{name}_sha256": sha256_file(path)
                                                         for name, path in (("exclude", cfg.exclude), ("keep", cfg.keep))
                                                         if path}},
                "temperature_plan": {**source.plan.to_dict(), **_view_thresholds(source)},
                "teacher": dataclasses.asdict(meta.teacher), "data": as_dict(data)}
    if inputs.replay is not None:
        resolved["replayed_views"] = dataclasses.asdict(meta.views)
    if init is not None:
        resolved["student_init_weights"] = init.to_dict()
    if preprocessing is not None:
        resolved["student_preprocessing"] = preprocessing
    if isinstance(distiller, OnlineHEDA):
        resolved["he_da_online"] = {**distiller.to_dict(), "high_energy_by": cfg.temperature_source}
    return resolved


def _view_thresholds(source: TemperatureSource) -> dict:
    thresholds = source.to_dict().get("view_thresholds")
    return {"view_thresholds": thresholds} if thresholds is not None else {}


def distill(cfg: DistillConfig, on_step: Callable | None = None) -> FitResult:
    """Train ``cfg.student`` on the table's dataset (plus shards) with ``cfg.method``; ``on_step``
    (an :class:`energytools.engine.StepEvent` callback) sees every step, with the step's
    :class:`SampleInfo` in ``event.batch.extras["sample_info"]``."""
    cfg.check()
    # under torchrun: join the process group for this device before anything else; rank 0 speaks
    # for the job (every rank holds the same weights and accuracies)
    main = context(cfg.train.device).is_main
    spec, out = method_spec(cfg.method), Path(cfg.out)
    table, meta = load_table(cfg.scores)  # the per-view columns are read apart (training_data.plan_views)
    meta.require_train(cfg.scores, "distill")
    data, train_set = open_training_set(cfg, meta)
    plan = plan_temperatures(table, meta, temperatures=cfg.temperatures, low_frac=cfg.low_frac,
                             high_frac=cfg.high_frac, rule=cfg.temperature_rule)
    source = temperature_source(cfg.temperature_source, plan)
    inputs = training_inputs(cfg, spec, source, table, meta, train_set, resolve_device(cfg.train.device))
    info = train_set.info
    student, init, preprocessing = build_student(cfg, info)
    distiller = build_distiller(cfg, spec, student, inputs, meta, train_set)
    step = make_step(spec, distiller, inputs, source, cfg.he_da is not None, cfg.train.label_smoothing)
    resolved = run_config(cfg, distiller, inputs, source, meta, data, train_set, init, preprocessing)
    val_set, test_set = data.build("val"), data.build("test")
    n_aug = len(inputs.training_set) - len(train_set)
    temperatures = plan.to_dict()["temperatures"]
    may_change = resume_may_change_keys(cfg) | {"student_init_weights.path"}  # its content is compared
    with run_directory(out, cfg.resume, cfg.overwrite, resolved, may_change) as writes_files:
        run_meta = {**model_meta(cfg.student, train_set, data), "method": cfg.method, "config": resolved,
                    "versions": versions(), **({"preprocessing": preprocessing} if preprocessing is not None else {})}
        if main:
            if init is not None:
                console.print(f"student init from {cfg.student_init}: {init.summary()}")
            console.print(f"distill {cfg.student} with {cfg.method} on {info.name}: {len(train_set)} samples"
                          f"{f' + {n_aug} HE-DA' if n_aug else ''}{' + online HE-DA' if cfg.he_da else ''}, "
                          f"temperatures {temperatures} ({plan.groups.rule.rule}, {cfg.temperature_source})")
        steps = steps_per_epoch(len(inputs.training_set), cfg.train.batch_size, context().world)
        with watch_run(cfg.train.log if writes_files else (), out, resolved, cfg.resume, steps, cfg.train.log_every,
                       distiller.epoch_metrics) as watcher:  # CTKD's temperature beside the step values
            result = fit(distiller.student, step, inputs.training_set, val_set, test_set, cfg.train, out, run_meta,
                         resume=cfg.resume, views=inputs.replay.schedule if inputs.replay is not None else None,
                         distiller=distiller, stateful={"he_da": distiller.draws} if isinstance(distiller, OnlineHEDA)
                         else None, **fit_callbacks(watcher, on_step))
        if writes_files:  # test predictions before summary.json: a run with one has both
            write_test_predictions(distiller.student, test_set, out, cfg.train)
            write_json(out / "summary.json", {
                "method": cfg.method, "student": cfg.student, "best_epoch": result.best_epoch,
                "best_val_acc": result.best_val_acc, "best_test_acc": result.best_test_acc,
                "last_test_acc": result.last_test_acc, "seconds": result.seconds,
                "temperatures": temperatures, "shards": list(cfg.shards), "augmented_samples": n_aug})
    if main:
        console.print(headline("done", f": {out}: {result.summary()}"))
    return result
