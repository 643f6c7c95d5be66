"""The shipped toy pipeline is in the layout transformers 4 and 5 both read (the layout of SD checkpoints on the Hub):
`text_model.`-prefixed text-encoder weights, and the slow tokenizer's `vocab.json` + `merges.txt`."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import regex
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from rl_safety.prompts import read_prompt_file
from rl_safety.toyworld import ASSETS
from rl_safety.toyworld.pretrain import TEXT_MODEL_PREFIX, _bpe, write_portable_layout

from .conftest import REPO

PIPELINE = ASSETS / "pipeline"
GOLDEN = REPO / "tests" / "fixtures" / "toy_pipeline_golden.safetensors"
# The slow CLIPTokenizer's split (transformers 4, tokenization_clip.py): special tokens, contractions, letters, digits.
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def toy_prompts() -> list[str]:
    prompts = []
    for path in sorted((REPO / "prompts" / "toyworld").rglob("*.txt")):
        prompts += read_prompt_file(path)[0]
    assert len(prompts) > 1000
    return prompts + ["", "a red circle", "Crimson  TRIANGLE!", "a white cat, 123"]


@lru_cache
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def golden_prompts() -> list[str]:
    with safe_open(str(GOLDEN), "pt") as f:
        return f.metadata()["prompts"].split("|")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable bytes stand for themselves, the rest for 256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def slow_ids(folder: Path, texts: list[str], max_length: int = 16) -> list[list[int]]:
    """What transformers 4's Python `CLIPTokenizer` does with vocab.json and merges.txt alone (ASCII text)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    byte_encoder = bytes_to_unicode()
    out = []
    for text in texts:
        ids = [vocab["<|startoftext|>"]]
        for word in PATTERN.findall(" ".join(text.split()).lower()):
            chars = "".join(byte_encoder[b] for b in word.encode("utf-8"))
            ids += [vocab[t] for t in _bpe(list(chars[:-1]) + [chars[-1] + "</w>"], ranks)]
        ids = ids[: max_length - 1] + [vocab["<|endoftext|>"]]
        out.append(ids + [vocab["<|endoftext|>"]] * (max_length - len(ids)))
    return out


def test_text_encoder_weights_carry_the_text_model_prefix_and_all_load():
    file = load_file(str(PIPELINE / "text_encoder" / "model.safetensors"))
    assert file and all(key.startswith(TEXT_MODEL_PREFIX) for key in file)
    model, info = CLIPTextModel.from_pretrained(PIPELINE / "text_encoder", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    # transformers 4 names the parameters text_model.*; 5 drops the prefix in state_dict (and accepts it on load).
    state = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    assert set(state) == set(file)
    for key, tensor in file.items():
        assert torch.equal(state[key], tensor), key
    ids = golden()["ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], golden()["emb"], rtol=0, atol=1e-6)


def test_slow_tokenizer_files_give_the_fast_tokenizer_ids(tmp_path):
    folder = PIPELINE / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), name
    prompts = toy_prompts()
    encode = dict(padding="max_length", max_length=16, truncation=True)
    fast = CLIPTokenizer.from_pretrained(folder)  # transformers 5: tokenizer.json; 4: the slow class, these files
    ids = fast(prompts, **encode).input_ids
    assert ids == slow_ids(folder, prompts)
    # The vocabulary files alone (no tokenizer.json) make the same tokenizer.
    only_slow = tmp_path / "tokenizer"
    only_slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(folder / name, only_slow / name)
    assert CLIPTokenizer.from_pretrained(only_slow)(prompts, **encode).input_ids == ids
    assert torch.equal(fast(golden_prompts(), return_tensors="pt", **encode).input_ids, golden()["ids"])


def test_pipeline_images_unchanged():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        golden_prompts()[:2], num_inference_steps=4, guidance_scale=4.0, generator=generator, output_type="pt"
    ).images
    torch.testing.assert_close(images, golden()["img"], rtol=0, atol=1e-4)


def test_write_portable_layout_is_idempotent_and_keeps_tensors(tmp_path):
    """What `save_pipeline` runs on a freshly saved pipeline: an unprefixed file gains the prefix, nothing else."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(PIPELINE, pipeline, ignore=shutil.ignore_patterns("unet", "vae"))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (pipeline / "tokenizer" / name).unlink()
    path = pipeline / "text_encoder" / "model.safetensors"
    shipped = load_file(str(path))
    from safetensors.torch import save_file

    save_file({k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in shipped.items()}, str(path))  # transformers 5's
    write_portable_layout(pipeline)
    write_portable_layout(pipeline)
    rewritten = load_file(str(path))
    assert set(rewritten) == set(shipped) and all(torch.equal(rewritten[k], shipped[k]) for k in shipped)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (pipeline / "tokenizer" / name).read_bytes() == (PIPELINE / "tokenizer" / name).read_bytes()
