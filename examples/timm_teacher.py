"""A timm model as the teacher: weights from a file, preprocessing from timm's pretrained_cfg.

Builds timm's tiny ``test_resnet`` with random weights (yours would be trained), saves its
state dict as .safetensors, scores scikit-learn's digits with it and distills a student. The
teacher sees its own preprocessing (mean, std, 160x160 input), recorded in the table. From
the command line the same teacher is

    energytools score --teacher teacher.safetensors --teacher-arch timm:test_resnet --dataset digits

    python examples/timm_teacher.py runs/timm-teacher
"""
import sys
from pathlib import Path

import timm
from safetensors.torch import save_file

import energytools

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/timm-teacher")
    out.mkdir(parents=True, exist_ok=True)
    # digits are 8x8 gray in 10 classes; pretrained=False: nothing is downloaded
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    save_file(teacher.state_dict(), out / "teacher.safetensors")
    table = energytools.score(out / "teacher.safetensors", out / "scores.parquet", teacher_arch="timm:test_resnet",
                              dataset="digits", limit=200, save_logits=True, overwrite=True)
    scores, meta = energytools.load_table(table)
    print(f"scored {scores.height} samples with {meta.teacher.arch}; its preprocessing: {meta.teacher.preprocessing}")
    energytools.distill(table, "cnn_tiny", out / "student", method="energy-kd", epochs=1, overwrite=True)
