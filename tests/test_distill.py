import json

import pytest
import torch

from compressor import ConfigError, Pipeline, get_pass, get_target
from compressor.data import DataConfig, open_data
from compressor.intake import load_model
from compressor.pass_base import PassContext

from .conftest import tiny_cnn

FAST = {"epochs": 1, "batch_size": 64, "lr": 3e-3, "val_samples": 100}


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}, evaluation={"limit": 200}))


def test_distill_into_fresh_student_reports_teacher_and_student(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("distill")(teacher=str(model_files["pickle"]), teacher_trusted=True,
                            student="torchvision:resnet18", train={**FAST, "augment": False})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    m = res.metrics
    assert m["teacher_top1"] > 90 and m["student_top1_before"] < 40  # a trained teacher, an untrained student
    assert m["student_top1_after"] > m["student_top1_before"] + 20
    assert m["teacher_cached"] is True  # no augmentation: teacher outputs computed once
    assert type(res.artifact.model).__name__ == "ResNet" and res.artifact.meta["student"] == "torchvision:resnet18"
    assert not hasattr(res.artifact.model, "projector")  # the feature projector is not part of the student


def test_distill_with_augmentation_runs_teacher_live_without_the_cache(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("distill")(teacher=str(model_files["pickle"]), teacher_trusted=True, feature_loss="none",
                            cache_teacher=False, train={**FAST, "max_steps": 3})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    assert res.metrics["teacher_cached"] is False and res.metrics["train"]["steps"] == 3


def test_teacher_outputs_on_augmented_views_are_stored_once_and_shared(model_files, digits, tmp_path):
    """With augmentation the teacher's outputs on 2 stored views of each image are computed by the
    first run and replayed by the second (same teacher and data), which computes none."""
    art = load_model(model_files["pickle"], trust=True)
    cfg = dict(teacher=str(model_files["pickle"]), teacher_trusted=True, teacher_views=2, loss="dkd",
               train={**FAST, "epochs": 2})
    first = get_pass("distill")(**cfg)(art, PassContext(work_dir=tmp_path / "a", data=digits, cache_dir=tmp_path / "c"))
    again = get_pass("distill")(**cfg)(art, PassContext(work_dir=tmp_path / "b", data=digits, cache_dir=tmp_path / "c"))
    v1, v2 = first.metrics["teacher_views"], again.metrics["teacher_views"]
    assert first.metrics["teacher_cached"] and v1["computed_views"] == 2 and v1["reused_views"] == 0
    assert v2["computed_views"] == 0 and v2["reused_views"] == 2 and v2["store"] == v1["store"]
    assert first.metrics["loss"] == "dkd" and first.metrics["student_top1_after"] > 50
    assert torch.equal(next(first.artifact.model.parameters()), next(again.artifact.model.parameters()))


def test_the_student_sees_exactly_the_views_whose_teacher_outputs_were_stored(model_files, digits, tmp_path):
    import numpy as np

    from compressor.teacher_cache import TeacherViews
    from compressor.training import TrainConfig, training_data

    art = load_model(model_files["pickle"], trust=True)
    teacher = art.torch_module().eval()
    tdata = training_data(art, digits, TrainConfig(val_samples=100))
    views = TeacherViews(tmp_path, art.content_hash(), tdata, 3, seed=0, features=False).build(teacher, None, tdata)
    ix = np.array([0, 5, 17, 200])
    for epoch in (0, 1, 4):
        shown = views.images(torch.from_numpy(tdata.x_train[ix]), ix, epoch)
        with torch.inference_mode():
            want = teacher(tdata.normalise(shown))
        stored, _ = views.outputs(ix, epoch)
        assert torch.allclose(stored, want, atol=1e-4)
    assert not torch.equal(views.images(torch.from_numpy(tdata.x_train[ix]), ix, 0),
                           views.images(torch.from_numpy(tdata.x_train[ix]), ix, 1))  # images cycle their views
    # a killed run: view 2 never marked done -> the next run computes that view only
    (views.dir / "done.json").write_text(json.dumps({"views": [0, 1]}))
    again = TeacherViews(tmp_path, art.content_hash(), tdata, 3, seed=0, features=False).build(teacher, None, tdata)
    assert again.computed_views == 1 and np.allclose(again.logits, views.logits)


@pytest.mark.parametrize("loss", ["kd", "dkd", "dist"])
def test_logit_losses_vanish_when_the_student_matches_and_grow_when_it_does_not(loss):
    from compressor.passes.distill import DistillConfig, logit_loss

    cfg = DistillConfig(teacher="t.pt", loss=loss)
    torch.manual_seed(0)
    t = torch.randn(16, 10)
    y = t.argmax(1)
    same = logit_loss(cfg, t.clone(), t, y)
    s = torch.randn(16, 10, requires_grad=True)
    apart = logit_loss(cfg, s, t, y)
    apart.backward()
    assert abs(float(same)) < 1e-4 and float(apart) > 0.05 and torch.isfinite(s.grad).all()


def test_input_model_teaches_a_student_file(model_files, digits, tmp_path):
    student = tmp_path / "student.pt"
    torch.manual_seed(1)
    torch.save(tiny_cnn(), student)
    student.with_suffix(".json").write_text(model_files["pickle"].with_suffix(".json").read_text())
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("distill")(student=str(student), student_trusted=True, train={**FAST, "epochs": 3, "lr": 5e-3})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    assert res.metrics["teacher"] == "the input model"
    assert res.metrics["student_top1_after"] > res.metrics["student_top1_before"]


def _three_class_teacher(tmp_path, model_files):
    path = tmp_path / "teacher3.pt"
    torch.save(tiny_cnn(num_classes=3), path)
    meta = json.loads(model_files["pickle"].with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "classes": ["a", "b", "c"]}))
    return path


@pytest.mark.parametrize("case, match", [
    ("classes", r"passes\[0\].distill.teacher: the teacher has 3 outputs but the data has 10 classes"),
    ("student", r"passes\[0\].distill.student: .*unknown student architecture"),
    ("untrusted", r"passes\[0\].distill.teacher: .*--trust-model"),
    ("nobody", r"give a teacher"),
])
def test_bad_configs_fail_before_training(case, match, model_files, digits, tmp_path):
    slow = {"epochs": 100, "batch_size": 8}  # would take many minutes if training ever started
    art = load_model(model_files["pickle"], trust=True)
    config = {
        "classes": {"teacher": str(_three_class_teacher(tmp_path, model_files)), "teacher_trusted": True},
        "student": {"teacher": str(model_files["pickle"]), "teacher_trusted": True, "student": "torchvision:nonet"},
        "untrusted": {"teacher": str(model_files["pickle"])},
        "nobody": {},
    }[case]
    with pytest.raises(ConfigError, match=match):
        p = get_pass("distill")({**config, "train": slow}, step="passes[0].distill")
        Pipeline([get_pass("prune_structured")(finetune=slow), p], [get_target("openvino")()]).run(art, data=digits)
