"""hf-clip and hf-blip2 on tiny random-weight models written offline: towers against transformers' own
outputs, padding, fusion, policies, errors for non-local paths, checkpoints without the weights directory and
the ONNX export's parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from cirflow.export.bundle import export_bundle
from cirflow.export.manifest import verify_bundle
from cirflow.models.backbones import hf_blip2, hf_clip
from cirflow.models.backbones.config import BackboneConfig, TowerPolicy
from cirflow.models.backbones.effnet_minilm import MissingWeightsError
from cirflow.models.backbones.registry import backbone_preprocess, backbone_tokenizer, load_arch
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.cir_model import CIRModel, ModelConfig, build_model
from cirflow.models.composers import ComposerConfig
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.text_encoder import TextEncoderConfig
from cirflow.models.tiny import fill_zero_parameters, make_checkpoint
from cirflow.models.tokenizer import encode_texts

SIZE, PROJECTION, MAX_POSITIONS, QUERIES = 32, 16, 16, 4
DIM = 16  # the joint token width
WORDS = ("a red blue green circle square triangle small large make the is same but add remove move to left right "
         "top bottom of in").split()
TEXTS = ["make the circle red", "a small blue square to the left of the green triangle"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
BACKBONES = ("hf-clip", "hf-blip2")


def word_tokenizer(specials: list[str], template: str) -> Tokenizer:
    """A word-level tokenizer over WORDS, specials first, the unknown token last of them."""
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return tok


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny CLIP and BLIP-2 retrieval models saved as transformers writes them, with tokenizer.json; the
    reference models too (eval mode)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    # eos_token_id != 2: transformers then pools at the first end-of-text id, the modern CLIP configs' way.
    clip = CLIPModel(CLIPConfig(
        text_config={**SMALL, "vocab_size": 64, "max_position_embeddings": MAX_POSITIONS, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**SMALL, "image_size": SIZE, "patch_size": 8}, projection_dim=PROJECTION)).eval()
    fill_zero_parameters(clip, 0)  # so that checkpoints made with fill_zeros keep the pretrained weights as are
    clip.save_pretrained(root / "clip")
    word_tokenizer(["<|startoftext|>", "<|endoftext|>", "!"], "<|startoftext|> $A <|endoftext|>").save(
        str(root / "clip" / "tokenizer.json"))
    blip = Blip2ForImageTextRetrieval(Blip2Config(
        # BLIP-2's default vision initializer_range (1e-10) would leave a random ViT blind to its input.
        vision_config={**SMALL, "image_size": SIZE, "patch_size": 8, "initializer_range": 0.02},
        qformer_config={**SMALL, "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 32,
                        "use_qformer_text_input": True, "cross_attention_frequency": 1},
        num_query_tokens=QUERIES, image_text_hidden_size=PROJECTION)).eval()
    fill_zero_parameters(blip, 1)
    blip.save_pretrained(root / "blip2")
    word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[CLS] $A [SEP]").save(str(root / "blip2" / "tokenizer.json"))
    return {"hf-clip": (root / "clip", clip), "hf-blip2": (root / "blip2", blip)}


def model_config(name: str, path: Path | str, embed_dim: int = PROJECTION, **policies: TowerPolicy) -> ModelConfig:
    return ModelConfig(ImageEncoderConfig(image_size=SIZE, dim=DIM, heads=2, embed_dim=embed_dim),
                       TextEncoderConfig(max_length=MAX_POSITIONS, dim=DIM, heads=2, embed_dim=embed_dim),
                       ComposerConfig(name="sum"), BackboneConfig(name=name, path=str(path), **policies))


def tokenize(name: str, path: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode_texts(backbone_tokenizer(BackboneConfig(name=name, path=str(path)), MAX_POSITIONS), texts)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def overrides(name: str, path: Path) -> list[str]:
    return [f"model.backbone.name={name}", f"model.backbone.path={path}", f"model.image.image_size={SIZE}",
            f"preprocess.size={SIZE}", f"model.image.dim={DIM}", f"model.text.dim={DIM}",
            f"model.image.embed_dim={PROJECTION}", f"model.text.embed_dim={PROJECTION}",
            f"model.text.max_length={MAX_POSITIONS}", f"tokenizer.max_length={MAX_POSITIONS}"]


def outputs(model: CIRModel, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    pixels = torch.randn(len(ids), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [model.encode_image(pixels), model.encode_text(ids, mask), model.compose(pixels, ids, mask)]


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("embed_dim", [PROJECTION, 24])  # the backbone's own projection, and a new one
def test_surfaces_are_unit_vectors_with_token_shapes(weights, capfd, name: str, embed_dim: int) -> None:
    path, _ = weights[name]
    capfd.readouterr()
    model = build_model(model_config(name, path, embed_dim)).eval()
    assert capfd.readouterr() == ("", "")  # loading is quiet
    ids, mask = tokenize(name, path, TEXTS)
    for out in outputs(model, ids, mask):
        assert out.shape == (2, embed_dim)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    f = model.features(torch.randn(2, 3, SIZE, SIZE), ids, mask)
    image_tokens = 1 + (SIZE // 8) ** 2 if name == "hf-clip" else 1 + QUERIES  # class token / mean + queries
    assert f.image_tokens.shape == (2, image_tokens, DIM) and f.text_tokens.shape == (2, ids.shape[1], DIM)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_towers_equal_clip_embeddings(weights, tmp_path: Path, pad: str) -> None:
    """CLIP's own image and text embeddings, whether the tokenizer pads with end-of-text or another token."""
    source, clip = weights["hf-clip"]
    path = tmp_path / "clip"
    shutil.copytree(source, path)
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": pad}}))
    ids, mask = tokenize("hf-clip", path, TEXTS)
    assert ids[0, -1].item() == backbone_tokenizer(BackboneConfig(name="hf-clip", path=str(path)),
                                                   MAX_POSITIONS).token_to_id(pad)
    model = build_model(model_config("hf-clip", path)).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        text = clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        image = clip.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(model.encode_text(ids, mask), F.normalize(text, dim=-1))
        torch.testing.assert_close(model.encode_image(pixels), F.normalize(image, dim=-1))


def test_blip2_towers_equal_blip2_retrieval_features(weights) -> None:
    """Text-only: BLIP-2's ITC text feature; image: the mean of its per-query features (normalised)."""
    path, blip = weights["hf-blip2"]
    ids, mask = tokenize("hf-blip2", path, TEXTS)
    model = build_model(model_config("hf-blip2", path)).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = blip(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(model.encode_text(ids, mask), ref.text_embeds)
        torch.testing.assert_close(model.encode_image(pixels), F.normalize(ref.image_embeds.mean(1), dim=-1))


@pytest.mark.parametrize("name", BACKBONES)
def test_padding_does_not_change_text_or_query(weights, name: str) -> None:
    path, _ = weights[name]
    model = build_model(model_config(name, path)).eval()
    ids, mask = tokenize(name, path, TEXTS[:1])
    pad_id = backbone_tokenizer(BackboneConfig(name=name, path=str(path)), MAX_POSITIONS).padding["pad_id"]
    padded = torch.cat([ids, torch.full((1, 4), pad_id)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)], dim=1)
    for a, b in zip(outputs(model, ids, mask), outputs(model, padded, padded_mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_blip2_query_fuses_image_and_text(weights) -> None:
    path, _ = weights["hf-blip2"]
    model = build_model(model_config("hf-blip2", path)).eval()
    assert model.fuses_image and not model.text_encoder.cacheable
    ids, mask = tokenize("hf-blip2", path, [TEXTS[0], TEXTS[0], TEXTS[1]])
    pixels = torch.randn(3, 3, SIZE, SIZE)
    pixels[1] = pixels[0] + 1.0  # same text, other image; rows 0 and 2: same image, other text
    pixels[2] = pixels[0]
    with torch.no_grad():
        q = model.compose(pixels, ids, mask)
        t = model.encode_text(ids, mask)  # the text-only baseline needs no image
    assert (q[0] - q[1]).abs().max() > 1e-4 and (q[0] - q[2]).abs().max() > 1e-4  # beyond float noise
    torch.testing.assert_close(t[0], t[1])
    # The fused text vector is not the text-only one: the queries saw the image.
    with torch.no_grad():
        fused = model.text_encoder(ids, mask, model.image_encoder.stem(pixels))[1]
        alone = model.text_encoder(ids, mask)[1]
    assert (fused - alone).abs().max() > 1e-4


def test_blip2_qformer_is_shared_once(weights) -> None:
    path, _ = weights["hf-blip2"]
    model = build_model(model_config("hf-blip2", path, image=TowerPolicy("frozen"), text=TowerPolicy("full", 0.1)))
    assert model.image_encoder.qformer is model.text_encoder.backbone
    assert not any(k.startswith("image_encoder.") and "qformer" in k for k in model.state_dict())
    ids = [id(p) for p in (*model.image_encoder.parameters(), *model.text_encoder.parameters())]
    assert len(ids) == len(set(ids))  # an optimiser would refuse duplicates
    qformer = {id(p) for p in model.text_encoder.backbone.parameters()}
    frozen = {id(p) for p in model.frozen_parameters()}
    assert frozen == {id(p) for p in model.image_encoder.backbone.parameters()}  # the ViT only
    assert set(model.lr_scales()) == qformer and model.image_encoder.cacheable


@pytest.mark.parametrize("name", BACKBONES)
def test_adapters_start_as_identity_and_alone_train(weights, name: str) -> None:
    path, _ = weights[name]
    torch.manual_seed(0)
    full = build_model(model_config(name, path)).eval()
    torch.manual_seed(0)
    adapted = build_model(model_config(name, path, image=TowerPolicy("adapter"), text=TowerPolicy("adapter"))).eval()
    ids, mask = tokenize(name, path, TEXTS)
    for a, b in zip(outputs(full, ids, mask), outputs(adapted, ids, mask)):
        torch.testing.assert_close(a, b)
    for tower in (adapted.image_encoder, adapted.text_encoder):
        names = [n for n, p in tower.backbone.named_parameters() if p.requires_grad]
        assert names and all(".down." in n or ".up." in n for n in names)


@pytest.mark.parametrize("name", BACKBONES)
def test_an_empty_path_is_a_config_error(name: str) -> None:
    with pytest.raises(ValueError, match=f"backbone {name} needs model.backbone.path.*never downloads weights"):
        BackboneConfig(name=name, path="")


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("path", ["openai/clip-vit-base-patch32", "missing", "empty"])
def test_only_local_directories_are_read(tmp_path: Path, name: str, path: str) -> None:
    (tmp_path / "empty").mkdir()
    local = str(tmp_path / path) if path in ("missing", "empty") else path
    config = BackboneConfig(name=name, path=local)
    for call in (lambda: load_arch(config), lambda: backbone_tokenizer(config, 8),
                 lambda: build_model(model_config(name, local))):
        with pytest.raises(MissingWeightsError, match="never downloads weights"):
            call()


@pytest.mark.parametrize("name", BACKBONES)
def test_preprocessing_and_limits_come_from_the_weights(weights, name: str) -> None:
    path, _ = weights[name]
    config = BackboneConfig(name=name, path=str(path))
    pre = backbone_preprocess(config, SIZE)
    assert (pre.mean, pre.std, pre.resize) == (hf_clip.CLIP_MEAN, hf_clip.CLIP_STD, "bicubic")
    assert pre.mode == ("center_crop" if name == "hf-clip" else "stretch")
    with pytest.raises(ValueError, match=rf"image_size=64 must equal the vision config's image_size={SIZE}"):
        backbone_preprocess(config, 64)
    with pytest.raises(ValueError, match=rf"image_size=64 must equal .* image_size={SIZE}"):
        build_model(ModelConfig(ImageEncoderConfig(image_size=64, dim=DIM, heads=2, embed_dim=PROJECTION),
                                TextEncoderConfig(max_length=8, dim=DIM, heads=2, embed_dim=PROJECTION),
                                backbone=config))
    limit = MAX_POSITIONS if name == "hf-clip" else 32
    with pytest.raises(ValueError, match=rf"max_length={limit + 1} exceeds .*max_position_embeddings={limit}"):
        backbone_tokenizer(config, limit + 1)


def test_blip2_needs_a_qformer_that_reads_text(weights, tmp_path: Path) -> None:
    source, _ = weights["hf-blip2"]
    arch = json.loads((source / "config.json").read_text())
    arch["qformer_config"]["use_qformer_text_input"] = False
    (tmp_path / "config.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        hf_blip2.arch(BackboneConfig(name="hf-blip2", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"model_type='blip-2', not one of \['clip'\]"):
        hf_clip.arch(BackboneConfig(name="hf-clip", path=str(tmp_path)))


@pytest.fixture(scope="module")
def checkpoints(weights, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """Per backbone: a checkpoint made from a copy of the weights directory that is deleted afterwards, and the
    outputs of the model it saved (loaded while the weights were still there)."""
    made = {}
    for name in BACKBONES:
        root = tmp_path_factory.mktemp(name)
        path = root / "weights"
        shutil.copytree(weights[name][0], path)
        ckpt = make_checkpoint(root / "model.pt", composer="atf", fill_zeros=True, overrides=overrides(name, path))
        ids, mask = tokenize(name, path, TEXTS)
        before = outputs(load_checkpoint(ckpt).model, ids, mask)
        shutil.rmtree(path)
        made[name] = (ckpt, before)
    return made


@pytest.mark.parametrize("name", BACKBONES)
def test_checkpoint_rebuilds_without_the_weights_directory(weights, checkpoints, name: str) -> None:
    ckpt, before = checkpoints[name]
    loaded = load_checkpoint(ckpt)
    assert loaded.config.preprocess.resize == "bicubic"  # the backbone's preprocessing was filled in
    ids, mask = (torch.from_numpy(a) for a in encode_texts(loaded.tokenizer, TEXTS))
    for a, b in zip(before, outputs(loaded.model, ids, mask)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The pretrained weights are in the checkpoint: the image vectors are the backbone's own.
    _, reference = weights[name]
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        if name == "hf-clip":
            expected = reference.get_image_features(pixel_values=pixels).pooler_output
        else:
            expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask).image_embeds.mean(1)
        torch.testing.assert_close(loaded.model.encode_image(pixels), F.normalize(expected, dim=-1))


@pytest.mark.parametrize("name", BACKBONES)
def test_export_bundle_parity(checkpoints, tmp_path: Path, name: str) -> None:
    """export_bundle raises when ORT differs from PyTorch by more than its tolerance (1e-4); measured here
    about 2e-7 for both graphs of both backbones."""
    ckpt, _ = checkpoints[name]
    bundle = export_bundle(ckpt, tmp_path / "bundle")
    manifest = verify_bundle(bundle)
    assert manifest["embed_dim"] == PROJECTION and manifest["max_sequence_length"] == MAX_POSITIONS
