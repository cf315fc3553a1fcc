"""Energy KD in a PyTorch Lightning module: a LightningModule whose training_step adds a KD term
at each sample's temperature, looked up from an energytools score table by sample id.

    python examples/lightning_energy_kd.py OUT_DIR

The teacher is a scikit-learn logistic regression on the 8x8 digits and its logits are computed
once; in a real run they come from your teacher on the batch. Any dataset works the same way if
its batches carry each sample's id (its row in the score table).
"""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, TensorDataset

import energytools as et

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lightning-energy-kd")
out.mkdir(parents=True, exist_ok=True)
digits = load_digits()
teacher_logits = LogisticRegression(C=0.05, max_iter=2000).fit(digits.data, digits.target).decision_function(digits.data)
# the score table: energies, groups and a temperature per sample (low energy: T 6, high: T 2)
table = et.write_score_table(out / "scores.parquet", teacher_logits, digits.target)
temperatures = et.TableTemperatures(table)
sample_ids = torch.arange(len(digits.target))
temperatures.check(sample_ids)  # once, on the host: every id the loader yields is in the table

dataset = TensorDataset(torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target), sample_ids,
                        torch.tensor(teacher_logits, dtype=torch.float32))


class EnergyKDStudent(pl.LightningModule):
    def __init__(self, temperatures: et.TableTemperatures, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.temperatures, self.ce_weight, self.kd_weight = temperatures, ce_weight, kd_weight

    def training_step(self, batch, batch_index):
        images, labels, ids, teacher = batch
        logits = self.net(images)
        t = self.temperatures(ids)  # (B,) on the batch's device, without a wait for it
        loss = self.ce_weight * F.cross_entropy(logits, labels) + self.kd_weight * et.kd_loss(logits, teacher, t)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


torch.manual_seed(0)
student = EnergyKDStudent(temperatures)
trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
trainer.fit(student, DataLoader(dataset, batch_size=64, shuffle=True))
with torch.no_grad():
    accuracy = (student.net(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).float().mean().item()
print(f"Lightning student after {trainer.global_step} steps of Energy KD: train accuracy {100 * accuracy:.1f}%")
