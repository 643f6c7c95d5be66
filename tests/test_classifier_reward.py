"""ClassifierReward: checkpoint loading, values against a hand computation, gradients, heads and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rl_safety.rewards import RewardError, RewardStack
from rl_safety.rewards.classifier import ClassifierReward

COLOURS = ["red", "green", "blue"]
SHAPES = ["circle", "square"]
ARCH = "tests.test_classifier_reward:TwoHeadNet"
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


class TwoHeadNet(torch.nn.Module):
    """A tiny CNN with a colour head and a shape head, the shape of the toy world's judge."""

    def __init__(self, width: int = 4, num_colours: int = 3, num_shapes: int = 2, as_tuple: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.colour = torch.nn.Linear(width, num_colours)
        self.shape = torch.nn.Linear(width, num_shapes)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.conv(x)).mean(dim=(2, 3))
        colour, shape = self.colour(features), self.shape(features)
        return (colour, shape) if self.as_tuple else {"colour": colour, "shape": shape}


class SingleLogitNet(torch.nn.Module):
    """A sigmoid (one-logit) classifier: logit = mean red − mean blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] - x[:, 2]).mean(dim=(1, 2))[:, None] * 4


def images(batch: int = 3, size: int = 20) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def net() -> TwoHeadNet:
    torch.manual_seed(0)
    return TwoHeadNet()


@pytest.fixture
def checkpoint(tmp_path, net) -> str:
    path = tmp_path / "judge.safetensors"
    save_file(net.state_dict(), str(path))
    return str(path)


def by_hand(net: TwoHeadNet, x: torch.Tensor, head: str, index: int, size: int = 16) -> torch.Tensor:
    """log p(index) computed step by step: antialiased resize, normalise, logits, log_softmax."""
    resized = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    normalised = (resized - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.log_softmax(net(normalised)[head], dim=1)[:, index]


def test_safetensors_checkpoint_matches_hand_computation(net, checkpoint):
    reward = ClassifierReward(
        checkpoint=checkpoint,
        architecture=ARCH,
        architecture_args={"width": 4},
        head="colour",
        target_class="blue",
        class_names=COLOURS,
        input_size=16,
        mean=MEAN,
        std=STD,
    )
    x = images()
    expected = by_hand(net, x, "colour", 2)
    value = reward(x, ["p"] * 3)
    assert value.shape == (3,) and value.dtype == torch.float32
    torch.testing.assert_close(value, expected)
    assert (value < 0).all()  # a log-probability

    prob_penalty = ClassifierReward(
        model=net, head="colour", target_class=2, output="prob", negate=True, input_size=16, mean=MEAN, std=STD
    )
    torch.testing.assert_close(prob_penalty(x, ["p"] * 3), -expected.exp())


def test_gradient_reaches_the_image(net):
    reward = ClassifierReward(model=net, head="shape", target_class="square", class_names=SHAPES, input_size=16)
    assert reward.differentiable
    x = images().requires_grad_(True)
    reward(x, ["p"] * 3).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # the judge itself is frozen


def test_bf16_judge_gets_bf16_pixels_and_returns_float32(net):
    reward = ClassifierReward(model=net.to(torch.bfloat16), head="colour", target_class=1, input_size=16)
    x = images().requires_grad_(True)
    value = reward(x, ["p"] * 3)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    value.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_heads_dict_and_tuple(net):
    x = images()
    colour = ClassifierReward(model=net, head="colour", target_class=0, input_size=16)(x, ["p"] * 3)
    shape = ClassifierReward(model=net, head="shape", target_class=0, input_size=16)(x, ["p"] * 3)
    assert not torch.allclose(colour, shape)
    tuple_net = TwoHeadNet(as_tuple=True)
    tuple_net.load_state_dict(net.state_dict())
    torch.testing.assert_close(
        ClassifierReward(model=tuple_net, head=1, target_class=0, input_size=16)(x, ["p"] * 3), shape
    )


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated in torch 2.14
def test_torchscript_and_torch_state_dict(tmp_path, net):
    x = images()
    expected = ClassifierReward(model=net, head="shape", target_class=1)(x, ["p"] * 3)
    scripted = tmp_path / "judge.pt"
    traced_net = TwoHeadNet(as_tuple=True)
    traced_net.load_state_dict(net.state_dict())
    torch.jit.trace(traced_net.eval(), x[:1]).save(str(scripted))
    torch.testing.assert_close(ClassifierReward(checkpoint=scripted, head=1, target_class=1)(x, ["p"] * 3), expected)
    weights = tmp_path / "judge.pth"
    torch.save({"state_dict": net.state_dict()}, weights)
    from_pth = ClassifierReward(checkpoint=weights, architecture=ARCH, head="shape", target_class=1)
    torch.testing.assert_close(from_pth(x, ["p"] * 3), expected)


def test_single_logit_is_a_sigmoid():
    x = images()
    z = SingleLogitNet()(x)[:, 0]
    torch.testing.assert_close(ClassifierReward(model=SingleLogitNet(), target_class=1)(x, ["p"] * 3), F.logsigmoid(z))
    torch.testing.assert_close(
        ClassifierReward(model=SingleLogitNet(), target_class=0, output="prob")(x, ["p"] * 3), torch.sigmoid(-z)
    )


def test_built_from_recipe_entry_and_kept_in_eval(checkpoint):
    stack = RewardStack.from_config(
        [
            {
                "name": "rl_safety.rewards.classifier:ClassifierReward",
                "alias": "unsafe_colour",
                "weight": 2.0,
                "args": {
                    "checkpoint": checkpoint,
                    "architecture": ARCH,
                    "head": "colour",
                    "target_class": "red",
                    "class_names": COLOURS,
                    "negate": True,
                    "input_size": [16, 16],
                },
            }
        ]
    )
    stack.train()
    assert not stack.modules_["unsafe_colour"].model.training
    out = stack(images(), ["p"] * 3)
    assert (out.components["unsafe_colour"] > 0).all()  # −log p > 0
    torch.testing.assert_close(out.total, 2.0 * out.components["unsafe_colour"])


def one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(RewardError, match=match) as info:
        ClassifierReward(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_config_errors_are_one_line_and_name_the_arg(tmp_path, net, checkpoint):
    message = one_line_error(
        "checkpoint=", checkpoint=tmp_path / "nope.safetensors", architecture=ARCH, target_class=0
    )
    assert "no such file" in message
    one_line_error("architecture", checkpoint=checkpoint, target_class=0)
    one_line_error("architecture='tests.nowhere:Net'", checkpoint=checkpoint, architecture="tests.nowhere:Net")
    message = one_line_error(
        "does not fit", checkpoint=checkpoint, architecture=ARCH, architecture_args={"width": 5}, target_class=0
    )
    assert "size mismatch" in message
    message = one_line_error(
        "target_class='purple'", model=net, head="colour", target_class="purple", class_names=COLOURS
    )
    assert "red, green, blue" in message
    one_line_error("target_class=3: out of range; valid: 0..2", model=net, target_class=3, class_names=COLOURS)
    one_line_error(
        "target_class=5: out of range; head 'colour' has 3 classes",
        model=net,
        head="colour",
        target_class=5,
        input_size=8,
    )
    one_line_error("class_names", model=net, target_class="red")
    one_line_error("target_class is required", model=net)
    message = one_line_error("head='size'", model=net, head="size", target_class=0, input_size=8)
    assert "valid: colour, shape" in message
    one_line_error("head=None.*valid: colour, shape", model=net, target_class=0, input_size=8)
    one_line_error("valid: 0..1", model=TwoHeadNet(as_tuple=True), head=2, target_class=0, input_size=8)
    one_line_error("output='logit'", model=net, head="colour", target_class=0, output="logit")
    one_line_error("exactly one of model", model=net, checkpoint=checkpoint, target_class=0)
    one_line_error("go with checkpoint", model=net, architecture=ARCH, target_class=0)
    one_line_error("mean and std", model=net, head="colour", target_class=0, mean=MEAN)
    one_line_error(
        "class_names has 2 names", model=net, head="colour", target_class=0, class_names=SHAPES, input_size=8
    )


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_unreadable_or_unsafe_checkpoints(tmp_path, net):
    state_dict = tmp_path / "weights.pth"
    torch.save(net.state_dict(), state_dict)
    one_line_error("not a TorchScript archive.*architecture", checkpoint=state_dict, target_class=0)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": Pickled()}, pickled)
    one_line_error("weights_only=True", checkpoint=pickled, architecture=ARCH, target_class=0)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    one_line_error("garbage.safetensors.*cannot read", checkpoint=garbage, architecture=ARCH, target_class=0)


class Pickled:
    """An object that torch.load(weights_only=True) must refuse to unpickle."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_head_error_without_input_size_surfaces_at_first_call(net):
    reward = ClassifierReward(model=net, head="size", target_class=0)  # no probe without input_size
    with pytest.raises(RewardError, match="head='size'.*valid: colour, shape"):
        reward(images(), ["p"] * 3)
