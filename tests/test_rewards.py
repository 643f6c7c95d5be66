import sys
import textwrap

import pytest
import torch

from rl_safety.rewards import (
    JpegCompressibility,
    JpegIncompressibility,
    RewardError,
    RewardStack,
    available_rewards,
    default_reward_name,
    jpeg_kilobytes,
    resolve_reward,
)
from rl_safety.train import parse_args


def smooth_and_noisy():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=g)])


def test_jpeg_sizes_order_smooth_below_noise():
    sizes = jpeg_kilobytes(smooth_and_noisy())
    assert sizes[0] < 0.5 * sizes[1]
    torch.testing.assert_close(JpegCompressibility()(smooth_and_noisy(), ["a", "b"]), -sizes)
    torch.testing.assert_close(JpegIncompressibility()(smooth_and_noisy(), ["a", "b"]), sizes)


def test_jpeg_size_matches_pil(tmp_path):
    from PIL import Image

    image = smooth_and_noisy()[1]
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=95)
    pil_kb = (tmp_path / "x.jpg").stat().st_size / 1000
    assert abs(jpeg_kilobytes(image[None])[0].item() - pil_kb) / pil_kb < 0.05  # same codec, header bytes differ


def test_stack_weights_and_components():
    images = smooth_and_noisy()
    stack = RewardStack.from_config(
        [{"name": "jpeg_incompressibility", "weight": 2.0}, {"name": "jpeg_compressibility", "weight": 0.5}]
    )
    out = stack(images, ["a", "b"])
    sizes = jpeg_kilobytes(images)
    torch.testing.assert_close(out.components["jpeg_incompressibility"], sizes)
    torch.testing.assert_close(out.total, 2.0 * sizes - 0.5 * sizes)
    overridden = RewardStack.from_config(
        [{"name": "jpeg_incompressibility", "weight": 2.0}, {"name": "jpeg_compressibility"}], weights=[1.0, 1.0]
    )
    torch.testing.assert_close(overridden(images, ["a", "b"]).total, torch.zeros(2), atol=1e-6, rtol=0)


def test_nan_reward_names_reward_and_prompt(tmp_path, monkeypatch):
    (tmp_path / "nanmod.py").write_text(
        "import torch\ndef bad(images, prompts, **context):\n    return torch.tensor([1.0, float('nan')])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    stack = RewardStack.from_config([{"name": "nanmod:bad"}])
    with pytest.raises(RewardError, match="reward 'nanmod:bad' returned nan for prompt 'second'"):
        stack(smooth_and_noisy(), ["first", "second"])


def test_unknown_reward_lists_valid_names():
    with pytest.raises(RewardError, match="jpeg_compressibility, jpeg_incompressibility"):
        resolve_reward("jpeg_size")


def test_bad_entries():
    with pytest.raises(RewardError, match=r"rewards\[0\]: unknown keys \['wieght'\]"):
        RewardStack.from_config([{"name": "jpeg_compressibility", "wieght": 1}])
    with pytest.raises(RewardError, match="appears twice"):
        RewardStack.from_config([{"name": "jpeg_compressibility"}, {"name": "jpeg_compressibility"}])
    with pytest.raises(RewardError, match="bad args"):
        RewardStack.from_config([{"name": "jpeg_compressibility", "args": {"qualty": 3}}])


def test_import_path_rewards_get_clean_metric_names(tmp_path, monkeypatch):
    """A `package.module:attr` reward is logged under its attribute's name, snake_cased (no ':' or '.' in metric
    names); an alias wins; two rewards that would share a name are one line asking for an alias."""
    assert default_reward_name("pkg.mod:Cls") == "cls"
    assert default_reward_name("my_rewards.brightness:brightness") == "brightness"
    assert default_reward_name("pkg.mod:JpegIncompressibility") == "jpeg_incompressibility"
    assert default_reward_name("pkg.mod:CLIPScore") == "clip_score"
    assert default_reward_name("jpeg_compressibility") == "jpeg_compressibility"  # built-ins and entry points as is
    (tmp_path / "pathmod.py").write_text(
        "import torch\n"
        "class MeanBrightness(torch.nn.Module):\n"
        "    def forward(self, images, prompts, **context):\n"
        "        return images.mean(dim=(1, 2, 3))\n"
        "def brightness(images, prompts, **context):\n"
        "    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    stack = RewardStack.from_config(
        [
            {"name": "pathmod:MeanBrightness"},
            {"name": "pathmod:brightness", "alias": "bright"},
            {"name": "jpeg_compressibility"},
        ]
    )
    assert stack.names == ["mean_brightness", "bright", "jpeg_compressibility"]
    assert set(stack(smooth_and_noisy(), ["a", "b"]).components) == set(stack.names)
    with pytest.raises(RewardError) as err:
        RewardStack.from_config([{"name": "pathmod:brightness"}, {"name": "pathmod:brightness", "weight": 2}])
    assert str(err.value) == "rewards[1]: 'brightness' appears twice; give one of them an 'alias'"
    with pytest.raises(RewardError) as err:
        RewardStack.from_config(
            [{"name": "jpeg_compressibility"}, {"name": "rl_safety.rewards.jpeg:JpegCompressibility"}]
        )
    assert str(err.value) == (
        "rewards[1]: 'rl_safety.rewards.jpeg:JpegCompressibility' is logged as 'jpeg_compressibility', the name of "
        "rewards[0] ('jpeg_compressibility'); give one of them an 'alias'"
    )


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A package installed with an entry point in group rl_safety.rewards is found by name."""
    (tmp_path / "myplugin.py").write_text(
        textwrap.dedent(
            """
            import torch
            def make(offset=0.0):
                def reward(images, prompts, **context):
                    return images.mean(dim=(1, 2, 3)) + offset
                return reward
            """
        )
    )
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rl_safety.rewards]\nbrightness = myplugin:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myplugin", None)
    assert "brightness" in available_rewards()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rewards:\n  - name: brightness\n    weight: 2.0\n    args: {offset: 1.0}\n")
    *_, config = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    stack = RewardStack.from_config(config.rewards, config.reward_weights)
    images = smooth_and_noisy()
    torch.testing.assert_close(stack(images, ["a", "b"]).total, 2.0 * (images.mean(dim=(1, 2, 3)) + 1.0))
