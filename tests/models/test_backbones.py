"""The backbone registry: every backbone gives the towers' contract, trains under its freezing policy, and
exports with parity; the pretrained weights behave as pretrained weights (photos, unseen words)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from tokenizers import Tokenizer

from cirflow.core.config import load_config
from cirflow.export.bundle import export_bundle
from cirflow.export.manifest import PREPROCESS
from cirflow.export.runtime import BundleRuntime
from cirflow.models.backbones.config import BackboneConfig, TowerPolicy
from cirflow.models.backbones.registry import backbone_preprocess, backbone_tokenizer
from cirflow.models.backbones.towers import masked_mean
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.cir_model import CIRModel, build_model
from cirflow.models.device import DeviceError, resolve
from cirflow.models.evaluation import TorchEncoders
from cirflow.models.methods.base import encode_batch, similarity_structure_loss
from cirflow.models.preprocess import PreprocessConfig, preprocess_images
from cirflow.models.stem_cache import EvalStems, eval_stems, image_stems, pad_stems, text_stems
from cirflow.models.tiny import TINY_MODEL, make_checkpoint
from cirflow.models.tokenizer import encode_texts
from cirflow.models.train import train
from cirflow.models.train_config import TrainConfig

pytest.importorskip("transformers", reason="pretrained backbones need the 'pretrained' extra")

# Offline backbones with their test overrides (on top of TINY_MODEL: small joint widths and necks).
BACKBONES = {
    "tiny": (),
    "tiny-minilm": ("model.backbone.name=tiny-minilm",),
    "effnet-minilm": ("model.backbone.name=effnet-minilm",),
}
CAPTIONS = ["make the chestnut disc cobalt", "slide the wee jade tile to the northwest", "remove it"]


def model_config(name: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*TINY_MODEL, "optim.max_steps=1", *BACKBONES[name], *extra])


def inputs(config: TrainConfig, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokenizer = backbone_tokenizer(config.model.backbone, config.tokenizer.max_length)
    if tokenizer is None:
        return (torch.randn(batch, 3, 64, 64), torch.randint(4, 50, (batch, 6)),
                torch.tensor([[1] * 6] + [[1] * 4 + [0] * 2] * (batch - 1)))
    ids, mask = encode_texts(tokenizer, CAPTIONS[:batch])
    return torch.randn(batch, 3, 64, 64), torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_towers_give_tokens_and_unit_vectors(name: str) -> None:
    config = model_config(name, "model.text.vocab_size=50" if name == "tiny" else "model.text.vocab_size=30522")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    pixels, ids, mask = inputs(config)
    with torch.inference_mode():
        f = model.features(pixels, ids, mask)
        outs = model.encode_image(pixels), model.encode_text(ids, mask), model.compose(pixels, ids, mask)
    dim, embed = config.model.image.dim, config.model.image.embed_dim
    assert f.image_tokens.shape[0] == 3 and f.image_tokens.shape[2] == dim
    assert f.text_tokens.shape == (3, ids.shape[1], dim) and f.text_mask is mask
    for out in outs:
        assert out.shape == (3, embed)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_minilm_tokenizer_knows_words_the_captions_never_had() -> None:
    """The point of a pretrained text tower: the novel split's words are real vocabulary, not [UNK] pieces."""
    tokenizer = backbone_tokenizer(BackboneConfig(name="tiny-minilm"), 32)
    for word in ("chestnut", "cobalt", "northwest", "crimson", "disc"):
        tokens = tokenizer.encode(word).tokens
        assert "[UNK]" not in tokens and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]", tokens
    ids, mask = encode_texts(tokenizer, CAPTIONS)
    assert ids.shape[1] == mask.sum(1).max()  # padded to the longest, not to MiniLM's 128


def test_padding_leaves_minilm_text_vectors_unchanged() -> None:
    config = model_config("tiny-minilm", "model.text.vocab_size=30522")
    model = build_model(config.model).eval()
    tokenizer = backbone_tokenizer(config.model.backbone, 32)
    alone = encode_texts(tokenizer, CAPTIONS[2:])
    batch = encode_texts(tokenizer, CAPTIONS)
    with torch.inference_mode():
        a = model.encode_text(*map(torch.from_numpy, alone))
        b = model.encode_text(*map(torch.from_numpy, batch))[2:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- freezing policies, through the real training loop ---------------------------------------------------------

POLICIES = {
    "frozen image, frozen text (cached stems, noise, kept structure)": (
        "model.backbone.image.train=frozen", "model.backbone.text.train=frozen", "loss.text_noise=0.5",
        "loss.text_keep=1", "log_every_steps=1"),
    "full image, text adapters": ("model.backbone.image.train=full", "model.backbone.text.train=adapter"),
    "frozen image, gentle text": ("model.backbone.image.train=frozen", "model.backbone.text.lr_scale=0.1"),
}


# One training step reads one batch: the first 16 triplets are all it needs (decoded, and their frozen stems
# computed, once per run: half the run's time with all 160).
ONE_BATCH = ("optim.max_steps=1", "data.max_train_queries=16")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_freezing_policy_holds_through_a_training_step(policy: str, tiny_overrides: list[str],
                                                        tmp_path: Path) -> None:
    config = load_config(TrainConfig, None, [*tiny_overrides, *BACKBONES["effnet-minilm"], *POLICIES[policy],
                                             *ONE_BATCH, "optim.warmup_steps=0", "optim.lr=1e-2"])
    before = {k: v.clone() for k, v in build_model(config.model).state_dict().items()}
    after = load_checkpoint(train(config, tmp_path / "run")).model
    frozen = {id(p) for p in after.frozen_parameters()}
    changed = {name: not torch.equal(before[name], p) for name, p in after.named_parameters()}
    names = {id(p): name for name, p in after.named_parameters()}
    assert frozen, "every policy here freezes something"
    assert not any(changed[names[i]] for i in frozen), "a frozen weight moved"
    assert changed["image_encoder.neck.head.weight"] and changed["text_encoder.neck.pool.weight"]  # new layers train
    image_backbone = [changed[n] for n in changed if n.startswith("image_encoder.backbone.")]
    text_backbone = [changed[n] for n in changed if n.startswith("text_encoder.backbone.")]
    adapters = [changed[n] for n in changed if ".up." in n or ".down." in n]
    if "frozen image" in policy:
        assert not any(image_backbone)
        running = "image_encoder.backbone._bn0.running_mean"  # eval mode: BatchNorm statistics stay too
        torch.testing.assert_close(after.state_dict()[running], before[running], rtol=0, atol=0)
    else:
        assert all(image_backbone)
    if "adapters" in policy:
        assert adapters and all(adapters[1::2])  # every adapter's up-projection left zero
        assert not any(changed[n] for n in changed if n.startswith("text_encoder.backbone.") and
                       ".up." not in n and ".down." not in n)
    if "gentle" in policy:
        assert any(text_backbone)
    if "kept structure" in policy:
        logged = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
        assert 0 < logged["text_keep"] < 2


def test_tmcir_on_a_frozen_image_tower_edits_pixels_only_in_its_iacma_stage(
        tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IACMA's generator needs pixels; ATF, the longer stage, reads the cached image stems (it ran the whole
    EfficientNet every step before, ~15x slower)."""
    from cirflow.models.train_data import TripletBatches

    given = []
    use_stems = TripletBatches.use_stems
    monkeypatch.setattr(TripletBatches, "use_stems", lambda self, stems: (given.append(stems),
                                                                          use_stems(self, stems)))
    config = load_config(TrainConfig, None, [*tiny_overrides, *BACKBONES["effnet-minilm"],
                                             "model.backbone.image.train=frozen", "model.backbone.text.train=frozen",
                                             "method.name=tmcir", "method.generator=oracle", "method.iacma_steps=1",
                                             "model.composer.name=atf", *ONE_BATCH])
    load_checkpoint(train(config, tmp_path / "run"))
    assert [stems.images is not None for stems in given] == [False, True]  # IACMA, then ATF
    assert all(stems.texts is not None for stems in given)


def test_gentle_fine_tuning_scales_the_learning_rate_of_pretrained_weights(tiny_overrides: list[str]) -> None:
    import cirflow.models.train_stages as train_stages

    config = load_config(TrainConfig, None, [*tiny_overrides, *BACKBONES["tiny-minilm"], "optim.max_steps=1",
                                             "model.backbone.text.lr_scale=0.05", "model.text.vocab_size=30522"])
    model = build_model(config.model)
    stage = train_stages.Stage("train", config.optim, None, list(model.parameters()), None)  # type: ignore[arg-type]
    optimizer = train_stages.build_optimizer(stage, model.lr_scales())
    bert = {id(p) for p in model.text_encoder.backbone.parameters()}
    for group in optimizer.param_groups:
        in_bert = {id(p) in bert for p in group["params"]}
        assert len(in_bert) == 1  # a group is all pretrained or all new
        assert group["lr_scale"] == (0.05 if in_bert.pop() else 1.0)


def frozen_effnet_minilm() -> tuple[TrainConfig, CIRModel, Tokenizer, PreprocessConfig, np.ndarray]:
    """effnet-minilm with both pretrained networks frozen (a tiny head), its tokenizer and preprocessing, and
    four random 64 px images (uint8)."""
    config = load_config(TrainConfig, None, [*TINY_MODEL, *BACKBONES["effnet-minilm"], "optim.max_steps=1",
                                             "model.backbone.image.train=frozen", "model.backbone.text.train=frozen",
                                             "model.text.vocab_size=30522"])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    pixels = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    return (config, model, backbone_tokenizer(config.model.backbone, 32),
            backbone_preprocess(config.model.backbone, 64), pixels)


def test_cached_stems_give_the_uncached_features() -> None:
    _, model, tokenizer, preprocess, pixels = frozen_effnet_minilm()
    ids, mask = map(torch.from_numpy, encode_texts(tokenizer, CAPTIONS))
    reference, target = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    images = torch.from_numpy(preprocess_images([Image.fromarray(p) for p in pixels], preprocess))
    cached_images = image_stems(model, pixels, preprocess, torch.device("cpu"))
    cached_texts = text_stems(model, CAPTIONS, tokenizer, torch.device("cpu"))
    with torch.inference_mode():
        plain = encode_batch(model, images, reference, target, ids, mask)
        cached = encode_batch(model, cached_images, reference, target, ids, mask, image_stems=True,
                              text_stems=pad_stems([cached_texts[c] for c in CAPTIONS]))
    for a, b in ((plain.g, cached.g), (plain.ref.t, cached.ref.t), (plain.image_tokens, cached.image_tokens)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- export ----------------------------------------------------------------------------------------------------

# Backbones whose (checkpoint, bundle) other tests export too: the session's fixture of the same checkpoint.
SHARED_EXPORTS = {"effnet-minilm": "effnet_minilm_bundle",  # with the embedding test: its export takes a minute
                  "tiny": "tiny_combiner"}  # make_checkpoint(composer="combiner"), as the embedding tests' bundle


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_exports_with_parity_and_its_preprocessing(name: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    if name in SHARED_EXPORTS:
        ckpt, bundle = request.getfixturevalue(SHARED_EXPORTS[name])
    else:
        ckpt = make_checkpoint(tmp_path / "model.pt", composer="combiner", overrides=BACKBONES[name])
        bundle = export_bundle(ckpt, tmp_path / "bundle")  # raises when ORT and PyTorch differ by more than 1e-4
    config = load_checkpoint(ckpt).config
    assert json.loads((bundle / "manifest.json").read_text())["backbone"] == name
    assert json.loads((bundle / PREPROCESS).read_text())["mean"] == list(config.preprocess.mean)
    if name == "effnet-minilm":
        assert config.preprocess.mean == (0.5, 0.5, 0.5)  # the weights' constants, not the shapes statistics
    runtime = BundleRuntime.load(bundle, providers="cpu")
    images = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (90, 60), (40, 70, 220))]
    got = runtime.embed_queries(images, CAPTIONS[:2])
    model = load_checkpoint(ckpt).model
    pixels = torch.from_numpy(preprocess_images(images, config.preprocess))
    ids, mask = encode_texts(runtime.tokenizer, CAPTIONS[:2])
    with torch.inference_mode():
        expected = model.compose(pixels, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# --- pretrained weights on real photos ---------------------------------------------------------------------------

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "ihc", "moon", "motorcycle_left", "page", "retina", "rocket")


def photos() -> dict[str, Image.Image]:
    skimage = pytest.importorskip("skimage")
    folder = Path(skimage.__file__).parent / "data"
    found = {name: next(folder.glob(f"{name}.*"), None) for name in PHOTOS}
    return {name: Image.open(path).convert("RGB") for name, path in found.items() if path is not None}


def variants(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    return {"centre crop 80%": image.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
            "corner crop 85%": image.crop((0, 0, int(w * 0.85), int(h * 0.85))),
            "mirror": ImageOps.mirror(image),
            "brighter": ImageEnhance.Brightness(image).enhance(1.15),
            "warmer": Image.merge("RGB", [c.point(lambda v, k=k: min(255, int(v * k)))
                                          for c, k in zip(image.split(), (1.08, 1.0, 0.92))])}


def test_pretrained_image_features_find_the_photo_itself() -> None:
    """EfficientNet-Lite0's pooled features (the tower's stem, ImageNet weights, the weights' preprocessing):
    crops, mirror images and small colour shifts of a photo retrieve the photo itself first."""
    config = model_config("effnet-minilm", "model.text.vocab_size=30522")
    model = build_model(config.model).eval()
    preprocess = PreprocessConfig(**{**backbone_preprocess(config.model.backbone, 224).__dict__,
                                     "mode": "center_crop"})
    gallery = photos()
    assert len(gallery) >= 12

    def embed(images: list[Image.Image]) -> torch.Tensor:
        with torch.inference_mode():
            features = model.image_encoder.stem(torch.from_numpy(preprocess_images(images, preprocess)))
        return torch.nn.functional.normalize(features.mean(dim=(2, 3)), dim=-1)

    names = list(gallery)
    g = embed(list(gallery.values()))
    misses = []
    for name, image in gallery.items():
        for label, variant in variants(image).items():
            best = names[int((embed([variant]) @ g.T).argmax())]
            if best != name:
                misses.append(f"{name} / {label} -> {best}")
    assert not misses, misses


def test_efficientnet_port_classifies_a_photo() -> None:
    """The definition matches the weights: the ImageNet head (kept in the port for this check) calls a cat a cat."""
    from cirflow.models.backbones.efficientnet_lite import EfficientNetLite0
    from cirflow.models.backbones.effnet_minilm import effnet_weights

    net = EfficientNetLite0()
    net.load_state_dict(torch.load(effnet_weights(), map_location="cpu", weights_only=True))
    preprocess = backbone_preprocess(BackboneConfig(name="effnet-minilm"), 224)
    pixels = torch.from_numpy(preprocess_images([photos()["chelsea"]], preprocess))
    with torch.inference_mode():
        top = int(net.eval()(pixels).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)


# --- configuration errors -----------------------------------------------------------------------------------------

def test_policy_and_backbone_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'clip'"):
        BackboneConfig(name="clip")
    with pytest.raises(ValueError, match="train='partly'"):
        TowerPolicy(train="partly")
    with pytest.raises(ValueError, match="tiny trains from scratch"):
        BackboneConfig(name="tiny", text=TowerPolicy(train="frozen"))
    with pytest.raises(ValueError, match="EfficientNet tower takes full or frozen"):
        BackboneConfig(name="effnet-minilm", image=TowerPolicy(train="adapter"))


# --- devices ------------------------------------------------------------------------------------------------------

def test_auto_on_a_cpu_machine_never_initialises_cuda(tiny_overrides: list[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve("auto", "fp32").device.type == "cpu"
    assert resolve("auto", "bf16").bf16 is False  # falls back to fp32 on the CPU, with a log line
    train(load_config(TrainConfig, None, [*tiny_overrides, "optim.max_steps=1"]), tmp_path / "run")
    assert not torch.cuda.is_initialized()


def test_cuda_without_a_gpu_fails_at_once(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = load_config(TrainConfig, None, ["device=cuda", "data.root=/nonexistent/dataset", "optim.max_steps=1"])
    with pytest.raises(DeviceError, match="device=cuda but"):
        train(config, tmp_path / "run")  # before the (missing) dataset is even looked at
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="bf16 is autocast on a CUDA GPU"):
        load_config(TrainConfig, None, ["device=cpu", "precision=bf16"])


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    from cirflow.models.device import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_prefetch_stopped_early_leaves_no_thread_behind() -> None:
    import threading

    from cirflow.models.device import prefetch

    stream = prefetch(iter(range(1000)), depth=2)
    assert next(stream) == 0
    stream.close()  # what a `break` out of the training loop does
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_evaluation_runs_frozen_stems_once_per_input_and_run(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Gallery and reference copies of an image, repeated captions, and a later evaluation of the same split
    share one stem pass (the store keeps them between runs); the vectors are the whole towers'."""
    config, model, tokenizer, preprocess, gallery = frozen_effnet_minilm()
    pixels = preprocess_images([Image.fromarray(p) for p in gallery], preprocess)
    captions = [*CAPTIONS, CAPTIONS[2]]  # the short one again, padded to the longest
    ids, mask = encode_texts(tokenizer, captions)
    references = pixels[[0, 1, 1, 3]]

    def memos(m: CIRModel, store: Path | None = tmp_path) -> EvalStems:
        return eval_stems(m, gallery, captions, tokenizer, preprocess, store)

    tiny = build_model(load_config(TrainConfig, None, [*TINY_MODEL, "optim.max_steps=1"]).model)
    assert eval_stems(tiny, gallery, captions, tokenizer, preprocess) is None  # its towers train
    plain = TorchEncoders(model)
    stems = memos(model)
    cached = TorchEncoders(model, stems)
    np.testing.assert_allclose(cached.encode_images(pixels), plain.encode_images(pixels), atol=1e-5)
    np.testing.assert_allclose(cached.encode_queries(references, ids, mask), plain.encode_queries(references, ids, mask),
                               atol=1e-5)
    np.testing.assert_allclose(cached.encode_texts(ids, mask), plain.encode_texts(ids, mask), atol=1e-5)
    assert (stems.images.added, stems.texts.added) == (4, 3)  # references were gallery images; one caption twice
    stems.save()
    again = memos(model)  # a later run: every stem comes from the store
    np.testing.assert_allclose(TorchEncoders(model, again).encode_queries(pixels[::-1].copy(), ids, mask),
                               plain.encode_queries(pixels[::-1].copy(), ids, mask), atol=1e-5)
    assert (again.images.added, again.texts.added) == (0, 0)

    other = build_model(config.model).eval()
    with torch.no_grad():  # other frozen weights (say, another checkpoint's): the store has nothing for them
        next(other.image_encoder.backbone.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="made for another model's image tower"):
        TorchEncoders(other, stems)
    fresh = memos(other)
    TorchEncoders(other, fresh).encode_images(pixels)
    assert fresh.images.added == 4
    with pytest.raises(ValueError, match="not right-padded"):
        fresh.text(ids[:, ::-1].copy(), mask[:, ::-1].copy(), torch.device("cpu"))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    unwritable = memos(other, blocked)
    TorchEncoders(other, unwritable).encode_images(pixels)
    unwritable.save()  # a store that cannot be written costs time later, never this evaluation
    assert "not written" in caplog.text


def test_text_noise_perturbs_only_a_pretrained_text_stem() -> None:
    with pytest.raises(ValueError, match="loss.text_noise perturbs a pretrained text tower"):
        load_config(TrainConfig, None, ["loss.text_noise=0.5"])
    config = model_config("tiny-minilm", "model.text.vocab_size=30522", "loss.text_noise=0.5")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    pixels, ids, mask = inputs(config)
    rows = torch.arange(3)
    with torch.inference_mode():
        clean = encode_batch(model, pixels, rows, rows, ids, mask)
        noisy = encode_batch(model, pixels, rows, rows, ids, mask, text_noise=config.loss.text_noise)
    torch.testing.assert_close(clean.g, noisy.g)  # images untouched
    assert not torch.allclose(clean.ref.t, noisy.ref.t)
    cosine = (clean.ref.t * noisy.ref.t).sum(-1)
    assert (cosine > 0.5).all()  # perturbed, not replaced


def test_text_keep_scores_how_far_the_text_vectors_drift_from_the_sentence_model() -> None:
    with pytest.raises(ValueError, match="loss.text_keep compares with the frozen MiniLM tower"):
        model_config("tiny-minilm", "model.text.vocab_size=30522", "loss.text_keep=1")  # text tower trains
    config = model_config("tiny-minilm", "model.text.vocab_size=30522", "model.backbone.text.train=frozen",
                          "loss.text_keep=1", "loss.text_noise=0.5")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    pixels, ids, mask = inputs(config)
    rows = torch.arange(3)
    f = encode_batch(model, pixels, rows, rows, ids, mask, text_noise=0.5, sentences=True)
    with torch.inference_mode():  # the sentence vectors are the noise-free pretrained ones
        expected = masked_mean(model.text_encoder.stem(ids, mask), mask)
    torch.testing.assert_close(f.sentences, expected)
    assert f.sentences.grad_fn is None  # a fixed target: no gradient flows into it
    assert similarity_structure_loss(f.sentences, f.sentences).item() == pytest.approx(0, abs=1e-6)
    assert similarity_structure_loss(f.sentences[:2], f.sentences[[1, 0]]).item() == 0  # too few pairs to judge
    loss = similarity_structure_loss(f.ref.t, f.sentences)
    assert 0 < loss.item() <= 2
    loss.backward()  # it trains the layers over the frozen sentence model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.neck.parameters())


def test_stems_kept_between_runs_are_reused_only_for_the_same_inputs(tmp_path: Path) -> None:
    from cirflow.models.stem_cache import compute_stems

    config = model_config("tiny-minilm", "model.text.vocab_size=30522", "model.backbone.text.train=frozen")
    model = build_model(config.model)
    tokenizer = backbone_tokenizer(config.model.backbone, 32)
    pixels = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    first = compute_stems(model, pixels, CAPTIONS, tokenizer, config.preprocess, torch.device("cpu"), store=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert first.images is None and len(files) == 1 and files[0].startswith("text-")  # the image tower trains
    again = compute_stems(model, pixels, CAPTIONS, tokenizer, config.preprocess, torch.device("cpu"), store=tmp_path)
    for caption in CAPTIONS:
        torch.testing.assert_close(again.texts[caption], first.texts[caption], rtol=0, atol=0)
    with torch.no_grad():  # other frozen weights: another key, never the old stems
        next(model.text_encoder.backbone.parameters()).add_(1.0)
    compute_stems(model, pixels, CAPTIONS, tokenizer, config.preprocess, torch.device("cpu"), store=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    (tmp_path / files[0]).write_bytes(b"damaged")  # a damaged file is recomputed and rewritten
    with torch.no_grad():
        next(model.text_encoder.backbone.parameters()).sub_(1.0)
    fixed = compute_stems(model, pixels, CAPTIONS, tokenizer, config.preprocess, torch.device("cpu"), store=tmp_path)
    torch.testing.assert_close(fixed.texts[CAPTIONS[0]], first.texts[CAPTIONS[0]])
