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


def test_distill_with_augmentation_runs_teacher_live(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("distill")(teacher=str(model_files["pickle"]), teacher_trusted=True, feature_loss="none",
                            train={**FAST, "max_steps": 3})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    assert res.metrics["teacher_cached"] is False and res.metrics["train"]["steps"] == 3


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
