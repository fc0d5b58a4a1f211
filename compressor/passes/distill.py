"""distill: knowledge distillation from a teacher model file into the current model or into a
fresh student architecture (e.g. ``torchvision:mobilenet_v2``).

Loss: a logit term (Hinton KD, decoupled KD or DIST, ``loss``) weighted by ``alpha`` against
cross-entropy on the labels (alpha 0: the cross-entropy control), plus a feature loss on the
penultimate embeddings (the classifier's input; FitNets-style, through a learned linear projection
when widths differ). The teacher runs in inference mode; its outputs are computed once: on the
training images without augmentation, or on ``teacher_views`` stored augmented views of each,
kept in the pass cache and replayed (:mod:`compressor.teacher_cache`). The report shows teacher,
student-before and student-after top-1.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..artifact import Form, ModelArtifact
from ..errors import CompressorError, ConfigError
from ..intake import build_arch, load_model
from ..pass_base import Pass, PassConfig, PassContext, PassResult
from ..registry import register_pass
from ..training import TrainConfig, TrainData, evaluate_top1, train, training_data
from ..training.losses import LogitLoss, logit_loss

log = logging.getLogger(__name__)


class DistillConfig(PassConfig, LogitLoss):
    teacher: str | None = None
    """teacher model file (any form the intake reads; a model.json beside it is used);
    omitted: the current model teaches a new ``student``"""
    teacher_trusted: bool = False
    """allow the teacher to be a pickled nn.Module (loading runs code from the file)"""
    teacher_arch: str | None = None
    """architecture of a state-dict teacher, e.g. torchvision:resnet50"""
    student: str | None = None
    """the student: torchvision:NAME (fresh weights) or a model file (its trained weights);
    omitted: distill into the current model"""
    student_trusted: bool = False
    """allow a student model file that is a pickled nn.Module"""
    alpha: float = Field(default=0.7, ge=0, le=1)
    """weight of the distillation term; 1 - alpha weighs cross-entropy on the labels"""
    feature_loss: Literal["none", "penultimate"] = "penultimate"
    """feature-based loss on the embeddings that enter the classifier"""
    feature_weight: float = Field(default=1.0, ge=0)
    cache_teacher: bool = True
    """compute the teacher's outputs once: without augmentation on the training images; with it on
    teacher_views stored augmented views of each, replayed to the student (shared by later runs)"""
    teacher_views: int = Field(default=4, ge=1, le=64)
    """augmented views of each training image whose teacher outputs are stored (image i is shown
    view (epoch + i) mod teacher_views)"""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1.0))

    @model_validator(mode="after")
    def _someone_teaches(self) -> DistillConfig:
        if self.teacher is None and self.student is None:
            raise ValueError("give a teacher (a model file), or a student for the current model to teach")
        return self

    @field_validator("student")
    @classmethod
    def _known_student(cls, value: str | None) -> str | None:
        if value is None or not value.startswith("torchvision:"):
            return value  # a model file, checked before training
        provider, _, name = value.partition(":")
        if not name:
            raise ValueError(f"unknown student architecture {value!r}: expected torchvision:NAME")
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown student architecture {value!r}: torchvision has no such classification model")
        return value


def _classifier(model: Any) -> Any:
    import torch

    if isinstance(model, torch.jit.ScriptModule):  # its submodules run inside the script: no hooks
        raise ValueError("a TorchScript model gives no penultimate features (set feature_loss: none, or give "
                         "an nn.Module)")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear classifier to take penultimate features from")
    return linears[-1]


class _Features:
    """Captures the input of a model's classifier on every forward."""

    def __init__(self, model: Any) -> None:
        self.value = None
        self.handle = _classifier(model).register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        self.value = inputs[0]

    def remove(self) -> None:
        self.handle.remove()


@register_pass
class Distill(Pass):
    name = "distill"
    summary = "knowledge distillation from a teacher (Hinton KD + penultimate feature loss)"
    Config = DistillConfig
    consumes = frozenset({Form.TORCH})
    produces = Form.TORCH
    needs_data = True

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._teacher: ModelArtifact | None = None
        self._student_file: ModelArtifact | None = None

    def fingerprint(self) -> str | None:
        import hashlib

        h = hashlib.sha256()
        for spec in (self.config.teacher, self.config.student):
            if spec and not spec.startswith("torchvision:") and Path(spec).is_file():
                st = Path(spec).stat()
                h.update(f"{Path(spec).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ checks before training
    def teacher(self, artifact: ModelArtifact | None) -> ModelArtifact | None:
        """The teacher: the configured file, or else the current model (None if not known yet)."""
        if self.config.teacher is None:
            return artifact
        if self._teacher is None:
            try:  # a teacher file that names no input shape takes the student's
                self._teacher = load_model(Path(self.config.teacher), arch=self.config.teacher_arch,
                                           trust=self.config.teacher_trusted, fallback_source="student",
                                           fallback_shape=artifact.input_spec.shape if artifact else None)
            except CompressorError as exc:
                raise ConfigError(f"{self.step}.teacher: {exc}") from None
        return self._teacher

    def _student(self, artifact: ModelArtifact) -> Any:
        spec = self.config.student
        if spec is None:
            return copy.deepcopy(artifact.torch_module())
        if spec.startswith("torchvision:"):
            import torch

            width = artifact.meta.get("num_outputs") or len(artifact.classes or [])
            with torch.random.fork_rng():  # the same initial student in every run, whatever ran before
                torch.manual_seed(self.config.train.seed)
                return build_arch(spec, width or None)
        if self._student_file is None:
            try:  # a student file that names no input shape takes the current model's
                self._student_file = load_model(Path(spec), trust=self.config.student_trusted,
                                                fallback_shape=artifact.input_spec.shape, fallback_source="teacher")
            except CompressorError as exc:
                raise ConfigError(f"{self.step}.student: {exc}") from None
            import torch

            form = self._student_file.form
            if form is not Form.TORCH or isinstance(self._student_file.model, torch.jit.ScriptModule):
                got = "TorchScript" if form is Form.TORCH else form.value
                self._student_file = None
                raise ConfigError(f"{self.step}.student: a student must be a trainable torch model (an nn.Module), "
                                  f"got {got}")
        return copy.deepcopy(self._student_file.torch_module())

    def preflight(self, artifact: ModelArtifact | None, data: Any) -> None:
        import torch

        if self.config.student is not None and artifact is not None:
            self._student(artifact)  # a bad student file fails here, before any training
        if self.config.student is None and artifact is not None and isinstance(artifact.model, torch.jit.ScriptModule):
            raise ConfigError(f"{self.step}: the input model is the student, and a TorchScript model cannot be "
                              "trained; give it as an nn.Module (a pickled module, or a state dict with --arch)")
        teacher = self.teacher(artifact)
        if teacher is None:
            return
        width = teacher.meta["num_outputs"]
        classes = data.classes if data is not None else None
        if classes is not None and width != len(classes):
            raise ConfigError(f"{self.step}.teacher: the teacher has {width} outputs but the data has "
                              f"{len(classes)} classes")
        if artifact is not None:
            student_width = artifact.meta.get("num_outputs")
            if student_width is not None and student_width != width:
                raise ConfigError(f"{self.step}.teacher: the teacher has {width} outputs, the student "
                                  f"{student_width}")
            if teacher.classes and artifact.classes and list(teacher.classes) != list(artifact.classes):
                raise ConfigError(f"{self.step}.teacher: the teacher's classes {teacher.classes} differ from the "
                                  f"student's {artifact.classes}")
            if teacher.input_spec.shape[1:] != artifact.input_spec.shape[1:]:
                raise ConfigError(f"{self.step}.teacher: the teacher takes input {teacher.input_spec.shape}, "
                                  f"the student {artifact.input_spec.shape}")
            if self.config.feature_loss != "none":
                try:
                    _classifier(teacher.torch_module())
                    _classifier(self._student(artifact))
                except ValueError as exc:
                    raise ConfigError(f"{self.step}.feature_loss: {exc}") from None

    def preview(self, artifact: ModelArtifact) -> ModelArtifact | None:
        if self.config.student is None:
            return artifact
        return artifact.derive(Form.TORCH, model=self._student(artifact))

    # ------------------------------------------------------------------ training
    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        import torch

        cfg = self.config
        assert ctx.data is not None
        self.preflight(artifact, ctx.data)
        teacher_art = self.teacher(artifact)
        assert teacher_art is not None
        teacher = teacher_art.torch_module().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = self._student(artifact).train()
        tdata = training_data(artifact, ctx.data, cfg.train)
        x_test, y_test = _evaluation_images(artifact, ctx)

        top1_teacher = evaluate_top1(teacher, x_test, y_test, tdata)
        top1_before = evaluate_top1(student, x_test, y_test, tdata)

        t_feat = _Features(teacher) if (cfg.feature_loss != "none" and cfg.feature_weight > 0) else None
        s_feat = _Features(student) if t_feat is not None else None
        projector = None
        if t_feat is not None and s_feat is not None:
            with torch.inference_mode():
                probe = tdata.normalise(torch.from_numpy(tdata.x_train[:2]))
                teacher(probe)
                student.eval()
                student(probe)
                student.train()
            ds, dt = s_feat.value.shape[1], t_feat.value.shape[1]
            with torch.random.fork_rng():  # the same projector in every run, whatever ran before
                torch.manual_seed(cfg.train.seed)
                projector = torch.nn.Linear(ds, dt, bias=False)

        cached, views, augment_fn = None, None, None
        state = {"epoch": 0}
        # alpha 0 and no feature loss: the cross-entropy control of a distillation, the teacher never runs
        uses_teacher = cfg.alpha > 0 or projector is not None
        if uses_teacher and cfg.cache_teacher and not cfg.train.augment:
            cached = _teacher_outputs(teacher, t_feat, tdata)
        elif cfg.cache_teacher and cfg.train.augment:
            from ..teacher_cache import TeacherViews

            root = (ctx.cache_dir if ctx.cache_dir is not None else ctx.work_dir) / "teacher-outputs"
            shown = TeacherViews(root, teacher_art.content_hash(), tdata, cfg.teacher_views, cfg.train.seed,
                                 features=t_feat is not None)
            if uses_teacher:
                views = shown.build(teacher, t_feat, tdata)

            def augment_fn(images: Any, ix: np.ndarray, epoch: int) -> Any:
                # the stored views; the control (alpha 0) sees the very same images, with no teacher
                state["epoch"] = epoch  # the loss of this batch reads the same views' teacher outputs
                return shown.images(images, ix, epoch)
        temp, alpha = cfg.temperature, cfg.alpha

        def loss_fn(net: Any, x: Any, y: Any, idx: Any) -> tuple[Any, Any]:
            import torch.nn.functional as F

            logits = net(x)
            if not uses_teacher:
                return F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing), logits
            if views is not None:
                t_logits, t_features = views.outputs(idx.numpy(), state["epoch"])
                t_logits = t_logits.to(logits.device)
                t_features = t_features.to(logits.device) if t_features is not None else None
            elif cached is not None:
                t_logits = cached[0][idx].to(logits.device, torch.float32)
                t_features = cached[1][idx].to(logits.device, torch.float32) if cached[1] is not None else None
            else:
                with torch.inference_mode():
                    t_logits = teacher(x).float()
                    t_features = t_feat.value.float() if t_feat is not None else None
                t_logits = t_logits.clone()
                t_features = t_features.clone() if t_features is not None else None
            ce = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
            loss = (1 - alpha) * ce
            if alpha > 0:
                loss = loss + alpha * logit_loss(cfg, logits.float(), t_logits.float(), y)
            if projector is not None and t_features is not None:
                s = F.normalize(projector(s_feat.value.float()), dim=1)
                t = F.normalize(t_features.float(), dim=1)
                loss = loss + cfg.feature_weight * (s - t).pow(2).sum(1).mean()
            return loss, logits

        # the projector trains with the student (one module, so DDP synchronises it too)
        result = train(_WithProjector(student, projector), tdata, cfg.train, loss_fn=loss_fn, description="distill",
                       augment_fn=augment_fn, progress=ctx.progress)
        for hook in (t_feat, s_feat):
            if hook is not None:
                hook.remove()
        top1_after = evaluate_top1(student, x_test, y_test, tdata)
        metrics = {
            "teacher": cfg.teacher or "the input model",
            "student": cfg.student or "current model",
            "evaluation_images": len(y_test),
            "teacher_top1": top1_teacher,
            "student_top1_before": top1_before,
            "student_top1_after": top1_after,
            "temperature": temp,
            "alpha": alpha,
            "feature_loss": cfg.feature_loss,
            "loss": cfg.loss,
            "teacher_cached": cached is not None or views is not None,
            **({"teacher_views": views.describe()} if views is not None else {}),
            "train": result.to_json(),
        }
        log.info("distill: teacher %.2f%%, student %.2f%% -> %.2f%%", top1_teacher, top1_before, top1_after)
        meta = {"distilled_from": cfg.teacher or artifact.meta.get("source_file", "input model")}
        if cfg.student:
            meta["student"] = cfg.student
            meta["num_outputs"] = artifact.meta.get("num_outputs")
        return PassResult(artifact.derive(Form.TORCH, model=student.eval(), **meta), metrics)


def _with_projector_type() -> Any:
    import torch

    class WithProjector(torch.nn.Module):
        def __init__(self, student: Any, projector: Any) -> None:
            super().__init__()
            self.student = student
            self.projector = projector

        def forward(self, x: Any) -> Any:
            return self.student(x)

    return WithProjector


def _WithProjector(student: Any, projector: Any) -> Any:  # noqa: N802 - reads as a class
    if projector is None:
        return student
    return _with_projector_type()(student, projector)


def _evaluation_images(artifact: ModelArtifact, ctx: PassContext) -> tuple[Any, np.ndarray]:
    """The evaluation split's uint8 images (streamed: :class:`compressor.streaming.ImageSet`) and labels."""
    assert ctx.data is not None
    size = tuple(artifact.input_spec.sample_shape[1:])
    images = ctx.data.evaluation_images(size, artifact.preprocessing)  # type: ignore[arg-type]
    return images, images.labels


def _teacher_outputs(teacher: Any, feats: _Features | None, data: TrainData, batch: int = 256) -> tuple[Any, Any]:
    """Teacher logits (and penultimate features, as float16) for every training image, in order."""
    import torch

    from ..streaming import consecutive

    logits, features = [], []
    with torch.inference_mode():
        for images in consecutive(data.x_train, batch):
            x = data.normalise(torch.from_numpy(images))
            logits.append(teacher(x).float())
            if feats is not None:
                features.append(feats.value.to(torch.float16))
    return torch.cat(logits), (torch.cat(features) if features else None)
