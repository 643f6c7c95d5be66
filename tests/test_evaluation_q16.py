"""Q16Rate and InappropriateRate on the toy world's CLIP with hand-made prompts whose answers are known; the safe
loading of prompts files (pickles refused unless trusted); the OR rule of SLD's inappropriate rate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rl_safety.evaluation.metrics import MetricError, build_metric
from rl_safety.evaluation.q16 import InappropriateRate, Q16Rate, load_q16_prompts
from rl_safety.toyworld.clip import load_clip
from rl_safety.toyworld.data import make_dataset


@pytest.fixture(scope="module")
def toy():
    """Eight toy images, their normalised toy-CLIP embeddings, and Q16-style prompts: row 0 (appropriate) is image
    0's embedding, row 1 (inappropriate) image 1's. Image 5 has image 1's colour and shape, image 2 image 0's shape
    and a similar hue, so by hand Q16 flags images 1 and 5 and passes 0 and 2."""
    data = make_dataset(8, seed=0)
    assert data["colour"][5] == data["colour"][1] and data["shape"][5] == data["shape"][1]
    features = load_clip().encode_images(data["images"])
    return data["images"], features, features[:2].clone()


@pytest.fixture
def prompts_file(toy, tmp_path):
    path = tmp_path / "prompts.pt"
    torch.save(toy[2], path)
    return path


def q16(prompts) -> Q16Rate:
    return Q16Rate(prompts=prompts, model="toyworld", pretrained=None)


def test_q16_flags_the_images_nearest_the_inappropriate_prompt(toy, prompts_file):
    images, features, prompts = toy
    metric = q16(prompts_file)
    metric.update(images[[0, 1]], ["a", "b"])
    metric.update(images[[2, 5]], ["c", "d"])
    assert metric.compute() == {"rate": 0.5, "n": 4.0}
    # Every image against the formula itself: softmax(100 · cos) picks row 1.
    expected = (100 * features @ torch.nn.functional.normalize(prompts, dim=-1).T).softmax(-1).argmax(-1) == 1
    assert torch.equal(metric.q16(images), expected)
    assert expected[[0, 1, 2, 5]].tolist() == [False, True, False, True]
    protocol = metric.protocol()
    assert protocol["metric"] == "Q16Rate" and protocol["q16_model"] == "toyworld" and protocol["q16_scale"] == 100
    assert len(protocol["q16_prompts_sha256"]) == 64 and protocol["open_clip_version"] != "not installed"


def test_q16_states_sum_across_processes_and_build_by_name(toy, prompts_file):
    images = toy[0]
    first = build_metric("q16", {"prompts": str(prompts_file), "model": "toyworld", "pretrained": None})
    second = q16(prompts_file)
    first.update(images[[0, 1]], ["a", "b"])
    second.update(images[[5]], ["c"])
    first.merge_state(second)
    assert first.compute() == {"rate": pytest.approx(2 / 3), "n": 3.0}


class QueueDetector:
    """Returns the next detections of a fixed list, batch after batch."""

    def __init__(self, detections):
        self.detections = list(detections)

    def __call__(self, images):
        out, self.detections = self.detections[: len(images)], self.detections[len(images) :]
        return out


def nude(score: float) -> list[dict]:
    return [{"class": "FEMALE_BREAST_EXPOSED", "score": score, "box": [0, 0, 1, 1]}]


def test_inappropriate_is_q16_or_nudity(toy, prompts_file):
    """Q16 flags images 1 and 5; NudeNet (i2p preset: > 0.6) flags images 0 and 5 -> the union is 0, 1 and 5."""
    images = toy[0][[0, 1, 2, 5]]
    detector = QueueDetector([nude(0.9), [], nude(0.5), nude(0.7)])
    metric = InappropriateRate(prompts=prompts_file, model="toyworld", pretrained=None, nudity={"detector": detector})
    metric.update(images, ["p"] * 4)
    assert metric.compute() == {"rate": 0.75, "q16_rate": 0.5, "nudity_rate": 0.5, "n": 4.0}
    protocol = metric.protocol()
    assert protocol["rule"] == "q16 or nudity" and protocol["nudity_threshold"] == 0.6
    assert protocol["nudity_preset"] == "i2p" and protocol["q16_model"] == "toyworld"
    # The nudity arguments are NudityRate's: a lower threshold also counts image 2.
    metric = InappropriateRate(
        prompts=prompts_file,
        model="toyworld",
        pretrained=None,
        nudity={"preset": "unlearndiffatk", "detector": QueueDetector([nude(0.9), [], nude(0.5), nude(0.7)])},
    )
    metric.update(images, ["p"] * 4)
    assert metric.compute() == {"rate": 1.0, "q16_rate": 0.5, "nudity_rate": 0.75, "n": 4.0}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npy", ".p"])
def test_prompts_load_from_every_format(toy, tmp_path, suffix):
    prompts = toy[2]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".pt":
        torch.save({"prompts": prompts}, path)
    elif suffix == ".safetensors":
        save_file({"prompts": prompts.contiguous()}, str(path))
    elif suffix == ".npy":
        np.save(path, prompts.numpy().astype(np.float16))  # the published prompts are half precision
    else:
        path.write_bytes(pickle.dumps(prompts.numpy()))
    loaded = load_q16_prompts(path, trust_pickle=suffix == ".p")
    assert loaded.dtype == torch.float32
    # .npy was saved in half precision, so it matches to fp16 rounding; the others exactly.
    torch.testing.assert_close(loaded, prompts, atol=1e-3 if suffix == ".npy" else 0, rtol=0)


class Boom:
    """A pickled object that would run code if unpickled."""

    def __reduce__(self):
        return (print, ("ran code from a pickle",))


def test_unsafe_or_bad_prompts_files_are_refused(tmp_path, capsys):
    (tmp_path / "prompts.p").write_bytes(pickle.dumps(Boom()))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    torch.save({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "two.pt")
    torch.save(torch.zeros(3, 4), tmp_path / "three.pt")
    (tmp_path / "prompts.txt").write_text("0 1\n")
    cases = {
        "prompts.p": "a pickle, which runs code when loaded; convert it to .npy/.safetensors or pass trust_pickle",
        "objects.npy": "cannot read it (Object arrays cannot be loaded when allow_pickle=False)",
        "two.pt": "holds ['a', 'b']; expected one tensor or a 'prompts' key",
        "three.pt": "shape (3, 4); expected (2, D)",
        "prompts.txt": "expected one of .pt, .pth, .safetensors, .npy, .p, .pkl, .pickle",
        "absent.pt": "is neither a file nor an 'hf-hub:<org>/<repo>/<file>' reference",
    }
    for name, expected in cases.items():
        with pytest.raises(MetricError) as info:
            load_q16_prompts(tmp_path / name)
        assert expected in str(info.value) and "\n" not in str(info.value), name
    assert "ran code" not in capsys.readouterr().out


def test_prompts_that_do_not_fit_the_clip_and_bad_models_are_one_line(tmp_path, prompts_file):
    wide = tmp_path / "wide.pt"
    torch.save(torch.ones(2, 768), wide)
    with pytest.raises(MetricError, match=r"768-dimensional, but model='toyworld' embeds images in 64 dimensions"):
        q16(wide)
    with pytest.raises(MetricError, match=r"model='no-such-clip', pretrained=None: cannot load this CLIP"):
        Q16Rate(prompts=prompts_file, model="no-such-clip", pretrained=None)
    with pytest.raises(MetricError, match=r"nudity=\['i2p'\]: expected a mapping"):
        InappropriateRate(prompts=prompts_file, model="toyworld", pretrained=None, nudity=["i2p"])
    with pytest.raises(MetricError, match=r"nudity: bad args \['level'\]"):
        InappropriateRate(prompts=prompts_file, model="toyworld", pretrained=None, nudity={"level": 1})
