"""The training loop of `rl-safety classifier`: one loop, one loss per method, accelerate for processes/devices.

Per step: `_compute_loss` builds the method's training points (DyART: closest boundary points; PGD-AT and TRADES:
PGD points) with the model in eval mode, then runs clean and training points through the model in ONE forward (DDP
allows one forward per backward), clips the gradient norm, steps SGD + OneCycle and updates the weight average.

Logged metrics (metrics.jsonl, every `logging_steps`): `loss`, `ce`, `grad_norm`, `learning_rate`, `epoch`; DyART
adds `margin_loss` (the mean of −w·φ(x̂) before λ), `frac_boundary` (share of the batch whose boundary point passed
the success and closest-point filters), `frac_success`, `radius_mean` (mean ‖x̂ − x‖∞ of the kept points, in
1/255), `phi_boundary_mean`; TRADES adds `kl`. After each epoch: `eval_clean_accuracy` of the averaged weights.

Checkpoints (`checkpoint.py`) every `save_steps` steps, or after every epoch, and after the last step. A resumed run
restores them and skips the batches of the current epoch the checkpoint had trained on (the epoch's shuffle comes
from the restored generator), so it ends with the weights, and the metrics, of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..command import loading
from ..outputs import METRICS_NAME
from .baselines import pgd_at_loss, pgd_attack, trades_loss
from .checkpoint import restore_rng_states, rng_states, write_checkpoint
from .config import ClassifierConfig
from .data import ImageData
from .dyart import closest_boundary_point, closest_point_filter, dyart_loss, margin_and_input_gradient, margin_weights
from .evaluate import accuracy
from .models import HeadSelect


def _heads(out, heads: list[str | None]) -> list[torch.Tensor]:
    return [out if head is None else out[head] for head in heads]


class ClassifierTrainer:
    """Trains `model` on `data` with `config.method`; `train()` returns the weight-averaged model."""

    def __init__(self, model: torch.nn.Module, config: ClassifierConfig, data: ImageData, accelerator: Accelerator):
        self.config, self.data, self.accelerator = config, data, accelerator
        self.heads = data.heads
        # Each epoch's shuffle is drawn from this generator when the epoch starts: a checkpoint keeps its state then.
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        dataset = TensorDataset(data.train.x, data.train.y)
        loader = DataLoader(
            dataset, batch_size=config.per_device_train_batch_size, shuffle=True, generator=self.shuffle_generator
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
        steps_per_epoch = math.ceil(len(dataset) / (config.per_device_train_batch_size * accelerator.num_processes))
        self.total_steps = steps_per_epoch * config.num_train_epochs
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=self.total_steps
        )
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self.raw = accelerator.unwrap_model(self.model)
        self.ema = None
        if config.ema_decay > 0:
            # use_buffers: batch-norm statistics are averaged too, so the averaged model is usable as it is.
            self.ema = AveragedModel(self.raw, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        self.search_generator = torch.Generator().manual_seed(config.seed + 1)
        self.output_dir = Path(config.output_dir)
        self.metrics_file = self.output_dir / METRICS_NAME
        # Where the loop stands: the epoch, the batches of it already trained on, and the shuffle state it began with.
        self.global_step, self.epoch, self.batches_done = 0, 0, 0
        self.epoch_shuffle_state = self.shuffle_generator.get_state()
        self.stats: dict[str, list[float]] = {}  # the current logging window
        self.log_history: list[dict] = []
        self.trained_with: dict = {}  # the settings a checkpoint records (`checkpoint.trained_with`)
        self.seconds_before = 0.0  # training time of the attempts before a resume
        self.started = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        """Training time so far, over every attempt of this run."""
        return self.seconds_before + time.perf_counter() - self.started

    # -- the methods' losses ------------------------------------------------------------------------------------
    def _dyart(self, x: torch.Tensor, y: torch.Tensor, stats: dict) -> torch.Tensor:
        c = self.config
        boundary, weights = [], []
        self.raw.eval()
        robust = [h for h in self.heads if c.dyart_heads is None or h in c.dyart_heads]
        for index, head in enumerate(self.heads):
            labels = y if y.dim() == 1 else y[:, index]
            if head not in robust:  # cross-entropy only: a zero weight drops the margin term
                boundary.append(x)
                weights.append(torch.zeros(len(x), device=x.device))
                continue
            model = HeadSelect(self.raw, head)
            search = closest_boundary_point(
                model,
                x,
                labels,
                beta=c.dyart_beta,
                steps=c.dyart_search_steps,
                overshoot=c.dyart_overshoot,
                start_radius=c.start_radius,
                generator=self.search_generator,
            )
            _, grad = margin_and_input_gradient(model, search.points, labels, c.dyart_beta)
            keep = closest_point_filter(x, search, grad, min_phi=c.dyart_min_phi)
            w = margin_weights(search.radius, grad, c.alpha, c.r0) * keep
            boundary.append(search.points)
            weights.append(w)
            stats.setdefault("frac_success", []).append(search.success.float().mean().item())
            stats.setdefault("frac_boundary", []).append(keep.float().mean().item())
            if keep.any():
                stats.setdefault("radius_mean", []).append(search.radius[keep].mean().item() * 255)
                stats.setdefault("phi_boundary_mean", []).append(search.phi[keep].mean().item())
        self.model.train()
        # One forward for clean and every head's boundary points (DDP allows one forward per backward).
        out = self.model(torch.cat([x, *boundary]))
        total = 0.0
        for index, logits in enumerate(_heads(out, self.heads)):
            labels = y if y.dim() == 1 else y[:, index]
            clean, rest = logits[: len(x)], logits[len(x) :]
            on_boundary = rest[index * len(x) : (index + 1) * len(x)]
            loss, ce, margin = dyart_loss(clean, on_boundary, labels, weights[index], c.dyart_beta, c.dyart_lambda)
            stats.setdefault("ce", []).append(ce.item())
            stats.setdefault("margin_loss", []).append(margin.item())
            total = total + loss
        return total

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor, stats: dict) -> torch.Tensor:
        c = self.config
        self.raw.eval()
        points = []
        for index, head in enumerate(self.heads):
            labels = y if y.dim() == 1 else y[:, index]
            kind = "kl" if c.method == "trades" else "ce"
            points.append(
                pgd_attack(
                    HeadSelect(self.raw, head),
                    x,
                    labels,
                    c.epsilon,
                    c.step_size,
                    c.pgd_steps,
                    kind,
                    self.search_generator,
                )
            )
        self.model.train()
        out = self.model(torch.cat([x, *points]))
        total = 0.0
        for index, logits in enumerate(_heads(out, self.heads)):
            labels = y if y.dim() == 1 else y[:, index]
            clean = logits[: len(x)]
            adv = logits[len(x) :][index * len(x) : (index + 1) * len(x)]
            if c.method == "trades":
                loss, ce, kl = trades_loss(clean, adv, labels, c.trades_beta)
                stats.setdefault("kl", []).append(kl.item())
            else:
                loss = ce = pgd_at_loss(adv, labels)
            stats.setdefault("ce", []).append(ce.item())
            total = total + loss
        return total

    def _clean(self, x: torch.Tensor, y: torch.Tensor, stats: dict) -> torch.Tensor:
        self.model.train()
        total = 0.0
        for index, logits in enumerate(_heads(self.model(x), self.heads)):
            loss = F.cross_entropy(logits, y if y.dim() == 1 else y[:, index])
            stats.setdefault("ce", []).append(loss.item())
            total = total + loss
        return total

    def _compute_loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int, stats: dict) -> torch.Tensor:
        # Every robust method starts from the same clean burn-in, so they differ only in the robust term.
        method = self.config.method
        if method == "standard" or epoch < self.config.burn_in_epochs:
            return self._clean(x, y, stats)
        if method == "dyart":
            return self._dyart(x, y, stats)
        return self._adversarial(x, y, stats)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """Everything `write_checkpoint` saves. Every process holds the same weights, optimizer and generators (they
        start from the same seeds and draw alike), so the main process's copy serves them all."""
        return {
            "model": self.raw.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states({"search": self.search_generator}) | {"generator_shuffle": self.epoch_shuffle_state},
            "state": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "stats": self.stats,
                "log_history": self.log_history,
                "trained_with": self.trained_with,
                "train_seconds": self.train_seconds,
            },
        }

    def restore(self, parts: dict, folder: Path) -> None:
        """Continue from a checkpoint's `parts` (see `checkpoint.read_checkpoint`)."""
        with loading("resume_from_checkpoint", str(folder)):
            self.raw.load_state_dict(parts["model"])
            if self.ema is not None:
                if parts["ema"] is None:
                    raise ValueError("it holds no weight average (ema.safetensors) to continue")
                self.ema.load_state_dict(parts["ema"])
            self.optimizer.load_state_dict(parts["optimizer"])
            self.scheduler.load_state_dict(parts["scheduler"])
            restore_rng_states(parts["rng"], {"search": self.search_generator})
            self.epoch_shuffle_state = parts["rng"]["generator_shuffle"]
            state = parts["state"]
            self.global_step, self.epoch = state["global_step"], state["epoch"]
            self.batches_done = state["batches_done"]
            self.stats, self.log_history = state["stats"], state["log_history"]
            self.seconds_before = state["train_seconds"]

    def save(self) -> None:
        """A complete checkpoint of this step (main process writes, every process waits for it)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_checkpoint(self.output_dir, self.global_step, self.checkpoint_parts(), self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    # -- the loop ---------------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (main process only); checkpoints keep the lines logged so far."""
        self.log_history.append(record)
        if self.accelerator.is_main_process:
            with open(self.metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def averaged(self) -> torch.nn.Module:
        """The weight-averaged model (the trained one when ema_decay is 0), in eval mode."""
        return (self.ema.module if self.ema is not None else self.raw).eval()

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> dict | None:
        """One optimizer step; returns the metrics record when this step logs one."""
        c = self.config
        loss = self._compute_loss(xb.float().div(255), yb, self.epoch, self.stats)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        grad_norm = None
        if c.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.raw)
        self.global_step += 1
        self.stats.setdefault("loss", []).append(loss.item())
        if grad_norm is not None:
            self.stats.setdefault("grad_norm", []).append(float(grad_norm))
        if self.global_step % c.logging_steps == 0:
            record = {k: sum(v) / len(v) for k, v in self.stats.items()}
            record.update(step=self.global_step, epoch=self.epoch + 1, learning_rate=self.scheduler.get_last_lr()[0])
            self.log(record)
            self.stats = {}
            return record
        return None

    def train(self) -> torch.nn.Module:
        """Train from where the loop stands (step 0, or a restored checkpoint) to the last epoch."""
        c = self.config
        self.started = time.perf_counter()
        eval_x = self.data.eval.x[: c.eval_samples or None].float().div(255).to(self.accelerator.device)
        eval_y = self.data.eval.y[: c.eval_samples or None].to(self.accelerator.device)
        progress = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc=c.method,
            disable=not self.accelerator.is_main_process,
        )
        while self.epoch < c.num_train_epochs:
            self.shuffle_generator.set_state(self.epoch_shuffle_state)
            last_batch = len(self.loader) - 1
            for index, (xb, yb) in enumerate(self.loader):
                if index < self.batches_done:
                    continue  # trained on before the checkpoint this run resumed from
                record = self._step(xb, yb)
                self.batches_done = index + 1
                progress.update()
                if record is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                # A checkpoint due on an epoch's last batch waits for the epoch's evaluation below.
                if c.save_steps and self.global_step % c.save_steps == 0 and index < last_batch:
                    self.save()
            if self.accelerator.is_main_process:
                clean = 0.0
                for index, head in enumerate(self.heads):
                    labels = eval_y if eval_y.dim() == 1 else eval_y[:, index]
                    clean += accuracy(HeadSelect(self.averaged(), head), eval_x, labels) / len(self.heads)
                self.log({"step": self.global_step, "epoch": self.epoch + 1, "eval_clean_accuracy": clean})
            self.epoch, self.batches_done = self.epoch + 1, 0
            self.epoch_shuffle_state = self.shuffle_generator.get_state()
            last = self.epoch == c.num_train_epochs
            if last or not c.save_steps or self.global_step % c.save_steps == 0:
                self.save()
        progress.close()
        return self.averaged()
