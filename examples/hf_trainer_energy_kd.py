"""Energy KD in a Hugging Face ``transformers.Trainer``: a subclass whose ``compute_loss`` adds a KD
term at each sample's temperature, looked up from an energytools score table by sample id.

    python examples/hf_trainer_energy_kd.py OUT_DIR

The teacher is a scikit-learn logistic regression on the 8x8 digits and its logits are computed
once; in a real run they come from your teacher on the batch. Each example carries its sample id
(its row in the score table), which the collator stacks like any other field.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from transformers import Trainer, TrainingArguments

import energytools as et

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/hf-trainer-energy-kd")
out.mkdir(parents=True, exist_ok=True)
digits = load_digits()
teacher_logits = LogisticRegression(C=0.05, max_iter=2000).fit(digits.data, digits.target).decision_function(digits.data)
table = et.write_score_table(out / "scores.parquet", teacher_logits, digits.target)
temperatures = et.TableTemperatures(table)
temperatures.check(torch.arange(len(digits.target)))  # once: every id is in the table

examples = [{"pixel_values": (digits.data[i] / 16).astype(np.float32), "labels": int(digits.target[i]),
             "sample_ids": i, "teacher_logits": teacher_logits[i].astype(np.float32)}
            for i in range(len(digits.target))]


class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def forward(self, pixel_values):
        return self.net(pixel_values)


class EnergyKDTrainer(Trainer):
    """``0.1 * CE + 0.9 * KD`` with each sample's temperature from the score table."""

    def __init__(self, *args, temperatures: et.TableTemperatures, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperatures = temperatures

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, ids, teacher = inputs.pop("labels"), inputs.pop("sample_ids"), inputs.pop("teacher_logits")
        logits = model(**inputs)
        t = self.temperatures(ids)  # (B,) on the batch's device, without a wait for it
        loss = 0.1 * F.cross_entropy(logits, labels) + 0.9 * et.kd_loss(logits, teacher, t)
        return (loss, {"logits": logits}) if return_outputs else loss


torch.manual_seed(0)
student = Student()
arguments = TrainingArguments(output_dir=str(out / "trainer"), max_steps=60, per_device_train_batch_size=64,
                              learning_rate=0.2, optim="sgd", lr_scheduler_type="constant", use_cpu=True,
                              report_to="none", save_strategy="no", logging_steps=20, disable_tqdm=True,
                              remove_unused_columns=False, seed=0)
trainer = EnergyKDTrainer(model=student, args=arguments, train_dataset=examples, temperatures=temperatures)
trainer.train()
with torch.no_grad():
    images = torch.tensor(digits.data / 16, dtype=torch.float32)
    accuracy = (student(images).argmax(1) == torch.tensor(digits.target)).float().mean().item()
print(f"Trainer student after {trainer.state.global_step} steps of Energy KD: train accuracy {100 * accuracy:.1f}%")
