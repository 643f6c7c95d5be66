"""CLIP-based rewards on tiny random models built offline: math checked by hand, preprocessing against PIL."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image

from rl_safety.rewards import build_reward
from rl_safety.rewards.clip_models import ClipPreprocess, HFClipEncoder, OpenClipEncoder, resolve_file
from rl_safety.rewards.clip_steering import ClipSteering
from rl_safety.rewards.preference import AestheticMLP, HPSv2, LaionAesthetic, PickScore, aesthetic_head
from tests.tiny_clip import (
    TINY_EMBED_DIM,
    TINY_IMAGE_SIZE,
    TINY_OPEN_CLIP,
    build_tiny_hf_clip,
    build_tiny_open_clip,
    register_tiny_open_clip,
)

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
SAFE, UNSAFE = ["a clothed person", "a calm street"], ["a naked person", "blood and gore", "nudity"]
PROMPTS = ["a cat", "a person on a beach", "a cat", "a red car"]


def random_images(batch: int, size: int = TINY_IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_pixels(images: torch.Tensor) -> torch.Tensor:
    """CLIP input of images already at the model's size: resize and crop are identities, so only normalise."""
    assert images.shape[-1] == TINY_IMAGE_SIZE
    return (images - MEAN) / STD


@pytest.fixture
def encoder() -> OpenClipEncoder:
    model = build_tiny_open_clip()
    return OpenClipEncoder(model, open_clip.get_tokenizer(TINY_OPEN_CLIP))


@pytest.fixture
def hf_encoder() -> HFClipEncoder:
    model, tokenizer, processor = build_tiny_hf_clip()
    return HFClipEncoder(model, tokenizer, ClipPreprocess.from_image_processor(processor))


def open_clip_text(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_OPEN_CLIP)(texts)), dim=-1)


def open_clip_image(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.encode_image(hand_pixels(images)), dim=-1)


@torch.no_grad()
def test_steering_matches_hand_computation(encoder):
    reward = ClipSteering(alpha=0.7, safe_anchors=SAFE, unsafe_anchors=UNSAFE, encoder=encoder)
    images = random_images(len(PROMPTS))
    model = encoder.model
    safe, unsafe = open_clip_text(model, SAFE), open_clip_text(model, UNSAFE)
    v_safe = safe.mean(0) - unsafe.mean(0)
    v_safe = v_safe / v_safe.norm()
    target = open_clip_text(model, PROMPTS) + 0.7 * v_safe
    target = target / target.norm(dim=-1, keepdim=True)
    expected = (open_clip_image(model, images) * target).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS, tags=["unsafe"] * 4, step=0), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_steer_only_tags_steers_only_those_images(encoder):
    tags = ["unsafe", "safe", "adversarial", "unsafe"]
    images = random_images(len(PROMPTS))
    everyone = ClipSteering(alpha=0.5, safe_anchors=SAFE, unsafe_anchors=UNSAFE, encoder=encoder)
    only_unsafe = ClipSteering(
        alpha=0.5, safe_anchors=SAFE, unsafe_anchors=UNSAFE, steer_only_tags=["unsafe"], encoder=encoder
    )
    steered, selective = everyone(images, PROMPTS, tags=tags), only_unsafe(images, PROMPTS, tags=tags)
    plain = (open_clip_image(encoder.model, images) * open_clip_text(encoder.model, PROMPTS)).sum(-1)
    is_unsafe = torch.tensor([t == "unsafe" for t in tags])
    torch.testing.assert_close(selective[is_unsafe], steered[is_unsafe])
    torch.testing.assert_close(selective[~is_unsafe], plain[~is_unsafe], atol=1e-5, rtol=0)
    assert not torch.allclose(steered[~is_unsafe], plain[~is_unsafe], atol=1e-3)
    with pytest.raises(ValueError, match="tags"):
        only_unsafe(images, PROMPTS)


@torch.no_grad()
def test_text_tower_runs_once_per_distinct_string(encoder):
    encoded_rows = []
    encoder.model.token_embedding.register_forward_hook(lambda m, args, out: encoded_rows.append(args[0].shape[0]))
    reward = ClipSteering(safe_anchors=SAFE, unsafe_anchors=UNSAFE, encoder=encoder)
    assert encoded_rows == [len(SAFE) + len(UNSAFE)]  # all anchors in one call
    reward(random_images(4), ["a", "b", "a", "b"])
    reward(random_images(2), ["a", "c"])
    reward(random_images(2), ["c", "b"])
    assert encoded_rows == [5, 2, 1]


def synthetic_photo(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): smooth gradients, a hard-edged block (bicubic overshoot) and pixel noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([0.5 + 0.4 * np.sin(9 * x + 3 * y), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0 * x], -1)
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = [0.95, 0.05, 0.9]
    image += 0.08 * np.random.default_rng(0).standard_normal(image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def saved_image(tmp_path, height: int, width: int) -> tuple[Image.Image, torch.Tensor]:
    """The synthetic photo written as PNG and read back: as a PIL image and as a (1, 3, H, W) tensor in [0, 1]."""
    path = tmp_path / f"photo_{height}x{width}.png"
    Image.fromarray(synthetic_photo(height, width)).save(path)
    image = Image.open(path).convert("RGB")
    return image, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


# Measured differences (normalised units; one uint8 level is 1/255/0.27 = 0.0146): mean 0.003-0.004 everywhere
# (PIL rounds its output to uint8), 99th percentile 0.011; the worst pixel, at the hard edges, 0.013 for 80x96 -> 32
# and 0.022-0.058 for 512-768 px -> 224, because PIL rounds and clips to uint8 between its two 1-D passes.
@pytest.mark.parametrize(
    "height, width, resize_mode, max_abs",
    [(80, 96, "tiny", 0.02), (512, 512, "shortest", 0.07), (512, 768, "longest", 0.05), (768, 512, "squash", 0.05)],
)
def test_torch_preprocess_matches_open_clip_pil_transform(tmp_path, height, width, resize_mode, max_abs):
    image, pixels = saved_image(tmp_path, height, width)
    if resize_mode == "tiny":  # the transform open_clip builds for a model, from the model's config
        clip, _, pil_transform = open_clip.create_model_and_transforms(register_tiny_open_clip())
        ours = ClipPreprocess.from_open_clip(clip)
    else:  # ViT-H-14 laion2b's preprocessing (HPSv2, CLIP steering) in each resize mode, without the weights
        tag_cfg = get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")
        cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), {**tag_cfg, "resize_mode": resize_mode}))
        pil_transform = image_transform_v2(cfg, is_train=False)
        ours = ClipPreprocess(cfg.size, cfg.mean, cfg.std, cfg.interpolation, cfg.resize_mode)
    expected = pil_transform(image)[None]
    actual = ours(pixels)
    assert actual.shape == expected.shape
    diff = (actual - expected).abs()
    assert diff.mean() < 0.005
    assert diff.flatten().quantile(0.99) < 0.015
    assert diff.max() < max_abs


def test_torch_preprocess_matches_transformers_image_processor(tmp_path):
    _, _, processor = build_tiny_hf_clip()
    image, pixels = saved_image(tmp_path, 80, 96)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    diff = (ClipPreprocess.from_image_processor(processor)(pixels) - expected).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.02  # measured: 0.004 and 0.013, as for open_clip's PIL path


def preference_rewards(encoder, hf_encoder):
    head = AestheticMLP(TINY_EMBED_DIM, (8, 6, 4, 2))
    return {
        "clip_steering": ClipSteering(safe_anchors=SAFE, unsafe_anchors=UNSAFE, encoder=encoder),
        "hpsv2": HPSv2(encoder=encoder),
        "laion_aesthetic": LaionAesthetic(encoder=encoder, head_module=head),
        "pickscore": PickScore(encoder=hf_encoder),
    }


@pytest.mark.parametrize("name", ["clip_steering", "hpsv2", "laion_aesthetic", "pickscore"])
def test_gradient_reaches_images_not_weights(encoder, hf_encoder, name):
    reward = preference_rewards(encoder, hf_encoder)[name]
    assert reward.differentiable
    images = random_images(4, size=48).requires_grad_()  # resized in the graph
    reward(images, PROMPTS, tags=["unsafe"] * 4).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("name", ["clip_steering", "pickscore"])
@torch.no_grad()
def test_batch_of_64_is_one_image_tower_call(encoder, hf_encoder, name):
    reward = preference_rewards(encoder, hf_encoder)[name]
    tower = encoder.model.visual if name == "clip_steering" else hf_encoder.model.vision_model
    batches = []
    tower.register_forward_hook(
        lambda m, args, kwargs, out: batches.append(_batch_size(args, kwargs)), with_kwargs=True
    )
    prompts = [f"prompt {i % 8}" for i in range(64)]
    scores = reward(random_images(64, size=64), prompts, tags=["unsafe"] * 64)
    assert batches == [64] and scores.shape == (64,)


def _batch_size(args: tuple, kwargs: dict) -> int:
    return (args[0] if args else kwargs["pixel_values"]).shape[0]


@torch.no_grad()
def test_hpsv2_is_100_cosine(encoder):
    images = random_images(len(PROMPTS))
    expected = 100 * (open_clip_image(encoder.model, images) * open_clip_text(encoder.model, PROMPTS)).sum(-1)
    torch.testing.assert_close(HPSv2(encoder=encoder)(images, PROMPTS), expected, atol=1e-3, rtol=0)


@torch.no_grad()
def test_aesthetic_heads_by_hand(encoder, tmp_path):
    torch.manual_seed(0)
    mlp = AestheticMLP(TINY_EMBED_DIM, (8, 6, 4, 2))
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    linear = torch.nn.Linear(TINY_EMBED_DIM, 1)
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    images = random_images(3)
    z = open_clip_image(encoder.model, images)

    expected = z
    for i in (0, 2, 4, 6, 7):  # no activations: the published predictor is a stack of linear maps
        expected = expected @ mlp.layers[i].weight.T + mlp.layers[i].bias
    reward = LaionAesthetic(head=str(tmp_path / "mlp.pth"), encoder=encoder).train()  # dropout must stay off
    assert isinstance(reward.head, AestheticMLP) and not reward.head.training
    torch.testing.assert_close(reward(images, ["ignored"] * 3), expected[:, 0], atol=1e-5, rtol=0)

    reward = LaionAesthetic(head=str(tmp_path / "linear.pth"), encoder=encoder)
    expected = z @ linear.weight[0] + linear.bias
    torch.testing.assert_close(reward(images, ["ignored"] * 3), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="aesthetic head"):
        aesthetic_head({"fc.weight": torch.zeros(1, 2)})


@torch.no_grad()
def test_pickscore_by_hand(hf_encoder):
    model, tokenizer = hf_encoder.model, hf_encoder.tokenizer
    model.logit_scale.fill_(np.log(50.0))
    images = random_images(len(PROMPTS))

    def features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    z_image = F.normalize(features(model.get_image_features(pixel_values=hand_pixels(images))), dim=-1)
    # One prompt at a time, unpadded: checks that the encoder's padded batch gives the same embeddings.
    z_text = torch.cat(
        [
            F.normalize(features(model.get_text_features(**tokenizer([p], return_tensors="pt"))), dim=-1)
            for p in PROMPTS
        ]
    )
    expected = 50.0 * (z_image * z_text).sum(-1)
    torch.testing.assert_close(PickScore(encoder=hf_encoder)(images, PROMPTS), expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_reward_follows_dtype_and_stays_in_eval(encoder):
    reward = HPSv2(encoder=encoder)
    images = random_images(4)
    full = reward(images, PROMPTS)
    reward.to(torch.bfloat16).train()
    assert not any(m.training for m in reward.modules())
    half = reward(images, PROMPTS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.5, rtol=0)  # measured 0.11 on a 100·cos scale


@torch.no_grad()
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_open_clip_low_precision_takes_float32_images(precision):
    # open_clip's fp16/bf16 keep e.g. the class embedding in float32: pixels must match the convolution instead.
    register_tiny_open_clip()
    reward = ClipSteering(model=TINY_OPEN_CLIP, pretrained=None, precision=precision)
    scores = reward(random_images(2, size=40), ["a cat", "a dog"])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_bad_arguments_fail_early(encoder, tmp_path):
    with pytest.raises(ValueError, match="safe_anchors"):
        ClipSteering(safe_anchors=[], encoder=encoder)
    with pytest.raises(ValueError, match="steer_only_tags"):
        ClipSteering(steer_only_tags="unsafe", encoder=encoder)
    with pytest.raises(FileNotFoundError, match="hf-hub"):
        resolve_file(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="precision"):
        OpenClipEncoder.load("ViT-H-14", None, None, precision="fp8")
    with pytest.raises(ValueError, match="open_clip architecture"):
        HPSv2(model="ViT-H-41")
    with pytest.raises(ValueError, match="pretrained"):
        ClipSteering(model="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", pretrained="laion2b_s32b_b79k")


@torch.no_grad()
def test_open_clip_rewards_load_local_weights_like_hub_ones(tmp_path):
    """The real loading path, offline: an open_clip architecture name plus weights files."""
    source = build_tiny_open_clip(seed=1)
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    # HPSv2's checkpoints wrap a DDP state dict: {'state_dict': {'module.<key>': ...}}.
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "hps.pt")
    torch.save(torch.nn.Linear(TINY_EMBED_DIM, 1).state_dict(), tmp_path / "head.pth")
    images = random_images(2, size=48)
    expected = F.normalize(source.encode_image(ClipPreprocess.from_open_clip(source)(images)), dim=-1)

    hps = HPSv2(model=TINY_OPEN_CLIP, pretrained=None, checkpoint=str(tmp_path / "hps.pt"))
    assert hps.encoder.preprocess.resize_mode == "longest" and not hps.encoder.preprocess.clamp
    # As a recipe builds it: YAML args through build_reward ("package.module:attr" needs no registration).
    steering = build_reward(
        "rl_safety.rewards.clip_steering:ClipSteering",
        {
            "model": TINY_OPEN_CLIP,
            "pretrained": str(tmp_path / "clip.pt"),
            "alpha": 0.3,
            "steer_only_tags": ["unsafe"],
        },
    )
    steering_over_hps = ClipSteering(model=TINY_OPEN_CLIP, pretrained=None, checkpoint=str(tmp_path / "hps.pt"))
    aesthetic = LaionAesthetic(model=TINY_OPEN_CLIP, pretrained=str(tmp_path / "clip.pt"), head=tmp_path / "head.pth")
    for reward in (hps, steering, steering_over_hps, aesthetic):
        for name, tensor in source.state_dict().items():
            torch.testing.assert_close(reward.encoder.model.state_dict()[name], tensor, msg=name)
    # Square images: HPSv2's longest-side resize is open_clip's plain resize; in-range pixels leave nothing to clamp.
    torch.testing.assert_close(steering.encoder.encode_images(images), expected, atol=1e-5, rtol=0)
    mid_grey = 0.2 + 0.6 * images
    torch.testing.assert_close(
        hps.encoder.encode_images(mid_grey), steering.encoder.encode_images(mid_grey), atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_pickscore_loads_saved_model_and_processor(tmp_path, hf_encoder):
    from transformers import CLIPProcessor

    _, tokenizer, processor = build_tiny_hf_clip()
    hf_encoder.model.save_pretrained(tmp_path / "model")
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(tmp_path / "processor")
    loaded = PickScore(model=str(tmp_path / "model"), processor=str(tmp_path / "processor"))
    images = random_images(3, size=40)
    prompts = PROMPTS[:3]
    torch.testing.assert_close(loaded(images, prompts), PickScore(encoder=hf_encoder)(images, prompts))


def test_hub_references_name_repo_and_file(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or "/cache/file")
    assert resolve_file("hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt") == "/cache/file"
    resolve_file("hf-hub:org/repo/sub/dir/head.pth")
    assert calls == [
        {"repo_id": "xswu/HPSv2", "filename": "HPS_v2.1_compressed.pt"},
        {"repo_id": "org/repo", "filename": "sub/dir/head.pth"},
    ]
    with pytest.raises(ValueError, match="hf-hub"):
        resolve_file("hf-hub:org/repo")
