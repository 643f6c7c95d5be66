"""Differentiable reward from any torch image classifier: the log-probability (or probability) of one class.

The classifier is a module passed in-process, a state dict (safetensors, or a torch file loaded with
`weights_only=True`) plus an `architecture: "package.module:callable"`, or a TorchScript file. Resizing and
normalisation are done in torch, so gradients flow from the score back to the image.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rl_safety.resources import resolve_path, tried

from .base import Reward, RewardError

# log(1 - p) is the useful penalty on a concept the base model shows with p ~ 1: p saturates, log(1 - p) still ranks
# "very red" below "red" (computed as a logsumexp over the other classes, so it does not round to log 0).
OUTPUTS = ("log_prob", "prob", "log_one_minus_prob")


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (load_state_dict's lists keys over several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def import_callable(path: str, arg: str = "architecture") -> Callable[..., Any]:
    """The object at `package.module:attr`; a one-line `RewardError` naming `arg` if it cannot be imported."""
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{arg}={path!r}: expected 'package.module:callable'")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"{arg}={path!r}: cannot import ({_one_line(err)})") from err
    if not callable(target):
        raise RewardError(f"{arg}={path!r}: not callable")
    return target


def load_classifier(
    checkpoint: str | os.PathLike,
    architecture: str | None = None,
    architecture_args: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A classifier on the CPU: `architecture(**architecture_args)` with the state dict in `checkpoint`, or, with no
    architecture, the TorchScript module in `checkpoint`."""
    path = Path(resolve_path(checkpoint, "file")).expanduser()  # as given, or a shipped file (rl_safety/resources.py)
    if not path.is_file():
        raise RewardError(f"checkpoint={str(checkpoint)!r}: no such file{tried(checkpoint)}")
    if architecture is None:
        if path.suffix == ".safetensors":
            raise RewardError(
                f"checkpoint={str(checkpoint)!r} is a state dict: also give architecture: 'package.module:callable'"
            )
        try:
            # TorchScript archives are read by TorchScript's own restricted unpickler: no arbitrary Python runs.
            # (torch 2.14 deprecates TorchScript with a FutureWarning; a state dict + architecture is preferred.)
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise RewardError(
                f"checkpoint={str(checkpoint)!r}: not a TorchScript archive; "
                "for a state dict also give architecture: 'package.module:callable'"
            ) from err
    factory = import_callable(architecture, "architecture")
    try:
        model = factory(**dict(architecture_args or {}))
    except TypeError as err:
        raise RewardError(f"architecture_args={dict(architecture_args or {})!r}: {_one_line(err)}") from err
    if not isinstance(model, torch.nn.Module):
        raise RewardError(f"architecture={architecture!r} returned {type(model).__name__}, not a torch.nn.Module")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only refuses pickled code, so a downloaded checkpoint cannot run anything on load.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RewardError(
            f"checkpoint={str(checkpoint)!r}: refused by torch.load(weights_only=True), it pickles more than "
            "tensors; save model.state_dict() (safetensors preferred)"
        ) from err
    except Exception as err:  # each format fails its own way (SafetensorError, zip errors, ...): report them alike
        kind = "safetensors" if path.suffix == ".safetensors" else "torch.load"
        problem = f"cannot read with {kind} ({type(err).__name__}: {_one_line(err)})"
        raise RewardError(f"checkpoint={str(checkpoint)!r}: {problem}") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # Lightning-style checkpoints nest the weights
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise RewardError(
            f"checkpoint={str(checkpoint)!r} does not fit architecture={architecture!r} ({_one_line(err)})"
        ) from err
    return model


def _channel_stats(value: float | Sequence[float], name: str) -> torch.Tensor:
    """`mean` / `std` as a (1, 3, 1, 1) tensor; one number applies to every channel."""
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise RewardError(f"{name}={value!r}: expected one number or three (R, G, B)")
    if name == "std" and any(v == 0 for v in values):
        raise RewardError(f"std={value!r}: must be non-zero")
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


class ClassifierReward(Reward):
    """log p(target_class | image) (or p) from a torch classifier; `negate: true` turns it into a penalty."""

    differentiable = True

    def __init__(
        self,
        target_class: int | str | None = None,
        model: torch.nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
        architecture: str | None = None,
        architecture_args: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        head: str | int | None = None,
        output: str = "log_prob",
        negate: bool = False,
        input_size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ):
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise RewardError("give exactly one of model (a torch.nn.Module) or checkpoint (a file path)")
        if model is None:
            model = load_classifier(checkpoint, architecture, architecture_args)
        elif not isinstance(model, torch.nn.Module):
            raise RewardError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        elif architecture is not None or architecture_args is not None:
            raise RewardError("architecture / architecture_args go with checkpoint, not with model")
        if output not in OUTPUTS:
            raise RewardError(f"output={output!r}: expected one of {', '.join(OUTPUTS)}")
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.target_index = self._target_index(target_class)
        self.target_class = target_class
        self.head = head
        self.output = output
        self.negate = bool(negate)
        if input_size is None:
            self.input_size = None
        else:
            size = [input_size] * 2 if isinstance(input_size, int) else list(input_size)
            if len(size) != 2 or any(int(s) < 1 for s in size):
                raise RewardError(f"input_size={input_size!r}: expected a positive int or [height, width]")
            self.input_size = (int(size[0]), int(size[1]))
        if (mean is None) != (std is None):
            raise RewardError("give both mean and std, or neither")
        self.normalise = mean is not None
        # Buffers follow the reward stack's .to(device); a (1, 3, 1, 1) identity when there is no normalisation.
        self.register_buffer("mean", _channel_stats(0.0 if mean is None else mean, "mean"), persistent=False)
        self.register_buffer("std", _channel_stats(1.0 if std is None else std, "std"), persistent=False)
        # The classifier is a fixed judge: gradients go to the image only, and dropout / batch norm stay in eval.
        self.model = model.eval()
        for parameter in model.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        if self.input_size is not None:
            # One probe pass, so a bad head or target_class fails when the recipe is read, not at the first rollout.
            with torch.no_grad():
                self._logits(torch.zeros(1, 3, *self.input_size, device=self._device(), dtype=self._dtype()))

    def _target_index(self, target_class: int | str | None) -> int:
        """`target_class` as an index, looked up in `class_names` when it is a name."""
        names = self.class_names
        if target_class is None:
            raise RewardError("target_class is required: a class index, or a name listed in class_names")
        if isinstance(target_class, bool) or not isinstance(target_class, (int, str)):
            raise RewardError(f"target_class={target_class!r}: expected a class index or a name")
        if isinstance(target_class, str):
            if names is None:
                raise RewardError(f"target_class={target_class!r} is a name: also give class_names (index order)")
            if target_class not in names:
                raise RewardError(f"target_class={target_class!r}: not in class_names; valid: {', '.join(names)}")
            return names.index(target_class)
        if target_class < 0 or (names is not None and target_class >= len(names)):
            valid = f"0..{len(names) - 1} or one of {', '.join(names)}" if names else "an index >= 0"
            raise RewardError(f"target_class={target_class}: out of range; valid: {valid}")
        return target_class

    def _device(self) -> torch.device:
        tensor = next(iter(self.model.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.model.buffers()), self.mean)
        return tensor.device

    def _dtype(self) -> torch.dtype:
        # Inputs follow the classifier's precision (a bf16 / fp16 judge gets bf16 / fp16 pixels).
        for tensor in self.model.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def train(self, mode: bool = True) -> ClassifierReward:
        """Keep the classifier in eval mode whatever mode the stack is put in."""
        super().train(mode)
        self.model.eval()
        return self

    def _select_head(self, out: Any) -> torch.Tensor:
        """The logits tensor of `head` in a model output that is a tensor, a dict or a tuple."""
        if isinstance(out, Mapping):
            choices = list(out)
            if self.head is None and len(choices) == 1:
                return out[choices[0]]
            if self.head not in out:
                raise RewardError(
                    f"head={self.head!r}: the model returns a dict; valid: {', '.join(map(str, choices))}"
                )
            return out[self.head]
        if isinstance(out, (tuple, list)):
            if self.head is None and len(out) == 1:
                return out[0]
            if isinstance(self.head, bool) or not isinstance(self.head, int) or not 0 <= self.head < len(out):
                raise RewardError(f"head={self.head!r}: the model returns a tuple; valid: 0..{len(out) - 1}")
            return out[self.head]
        if self.head is not None:
            raise RewardError(f"head={self.head!r}: the model returns a single tensor; remove head")
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 logits of the chosen head; a single logit (binary) becomes [0, z], i.e. C = 2."""
        logits = self._select_head(self.model(x))
        where = f"head {self.head!r}" if self.head is not None else "the model"
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise RewardError(f"{where} returned {shape}; expected logits of shape ({x.shape[0]}, num_classes)")
        logits = logits.float()
        if logits.shape[1] == 1:
            # log_softmax([0, z]) = [log σ(−z), log σ(z)]: class 1 is the positive one of a sigmoid classifier.
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        num_classes = logits.shape[1]
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise RewardError(f"class_names has {len(self.class_names)} names; {where} has {num_classes} classes")
        if self.target_index >= num_classes:
            raise RewardError(f"target_class={self.target_class!r}: out of range; {where} has {num_classes} classes")
        return logits

    def forward(self, images: torch.Tensor, prompts: Sequence[str], **context: Any) -> torch.Tensor:
        """(B,) log p, p or log(1 - p) of target_class, negated when `negate`; differentiable in `images`."""
        x = images
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            # Antialiased like PIL / torchvision's resize, so a 512 px image is not aliased down to 224 px.
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        if self.normalise:
            x = (x - self.mean) / self.std
        log_probs = F.log_softmax(self._logits(x.to(self._dtype())), dim=1)
        if self.output == "log_one_minus_prob":
            score = log_probs.index_fill(1, torch.tensor([self.target_index], device=x.device), float("-inf"))
            score = score.logsumexp(dim=1)
        else:
            score = log_probs[:, self.target_index]
            score = score if self.output == "log_prob" else score.exp()
        return (-score if self.negate else score).to(images.device)
