"""hf-clip: OpenAI-style CLIP through transformers, as CLIP4Cir and CaLa use it; weights from a local directory.

The image tower keeps CLIP's vision transformer (stem: its last hidden states after post_layernorm, class token
first) and, when model.image.embed_dim equals CLIP's projection_dim, CLIP's own image embedding as the pooled
vector, so an untrained composer (the sum) starts from CLIP's zero-shot alignment. The text tower keeps CLIP's
causal text transformer and pools at the end-of-text token through text_projection, as CLIP does.

Also home of what hf-blip2 shares: the local-directory checks (cirflow never downloads weights), reading
safetensors or .bin weights by key prefix, and the tokenizer from tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer
from torch import nn

from cirflow.models.backbones.config import BackboneConfig, TowerPolicy
from cirflow.models.backbones.effnet_minilm import MissingWeightsError
from cirflow.models.backbones.towers import PretrainedTower, insert_adapters
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.text_encoder import TextEncoderConfig

# OpenAI CLIP's pixel statistics; BLIP-2 was trained with the same ones.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_TYPE = "clip"
DEFAULT_PAD = "<|endoftext|>"  # openai/clip-* pad with the end-of-text token; LAION's models name "!"


class NotLocalWeightsError(MissingWeightsError):
    """model.backbone.path does not name a local model directory (cirflow never downloads weights)."""


def weights_dir(config: BackboneConfig) -> Path:
    """The local model directory of config.path, holding config.json; a hub name or a bad path raises."""
    hint = ("cirflow never downloads weights: download the model yourself (e.g. `huggingface-cli download "
            "<name> --local-dir DIR`) and set model.backbone.path=DIR, a local directory with config.json")
    if not config.path:
        raise NotLocalWeightsError(f"backbone {config.name} needs model.backbone.path; {hint}")
    path = Path(config.path).expanduser()
    if not path.is_dir():
        looks_hub = "/" in config.path and not config.path.startswith(("/", ".", "~")) and not path.exists()
        what = "looks like a hub model name, not a local directory" if looks_hub else "is not a directory"
        raise NotLocalWeightsError(f"backbone {config.name}: path={config.path!r} {what}; {hint}")
    if not (path / "config.json").is_file():
        raise NotLocalWeightsError(f"backbone {config.name}: {path} holds no config.json; {hint}")
    return path


def read_arch(config: BackboneConfig, model_types: Iterable[str]) -> dict[str, Any]:
    """config.json of the local model directory, checked to be one of model_types."""
    path = weights_dir(config) / "config.json"
    try:
        arch = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NotLocalWeightsError(f"backbone {config.name}: cannot read {path}: {e}") from e
    allowed = list(model_types)
    if not isinstance(arch, dict) or arch.get("model_type") not in allowed:
        found = arch.get("model_type") if isinstance(arch, dict) else None
        raise ValueError(f"backbone {config.name}: {path} describes model_type={found!r}, not one of {allowed}")
    return arch


def read_weights(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of the model in directory `path` whose names start with one of `prefixes`: from
    model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin. Only what is asked for
    is read (safetensors are read lazily), and nothing is downloaded."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k.startswith(prefixes)}
    else:
        raise MissingWeightsError(f"{path} holds no weights (model.safetensors, model.safetensors.index.json or "
                                  "pytorch_model.bin)")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})
    return state


def load_weights(module: nn.Module, path: Path) -> None:
    """Load every tensor of `module` (named as in the transformers checkpoint) from directory `path`, quietly
    (from_pretrained prints load reports) and strictly: a missing tensor means the wrong model."""
    expected = module.state_dict()
    prefixes = tuple(sorted({k.split(".")[0] + "." if "." in k else k for k in expected}))
    state = read_weights(path, prefixes)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MissingWeightsError(f"{path} does not match its config.json: {len(missing)} tensors missing "
                                  f"(e.g. {missing[:3]})")
    shapes = [k for k in expected if state[k].shape != expected[k].shape]
    if shapes:
        raise MissingWeightsError(f"{path}: tensor {shapes[0]} has shape {list(state[shapes[0]].shape)}, the "
                                  f"config gives {list(expected[shapes[0]].shape)}")
    # Checkpoints may keep other heads (logit_scale, itm_head) and stale buffers (position_ids): not ours.
    module.load_state_dict({k: state[k] for k in expected})


def local_tokenizer(config: BackboneConfig, max_length: int, limit: int, default_pad: str) -> Tokenizer:
    """tokenizer.json of the local model directory, truncating at max_length (at most `limit`, the position
    table) and padding to the longest text with the model's pad token (from special_tokens_map.json or
    tokenizer_config.json, else `default_pad`)."""
    if max_length > limit:
        raise ValueError(f"backbone {config.name}: max_length={max_length} exceeds the model's "
                         f"max_position_embeddings={limit}")
    path = weights_dir(config)
    if not (path / "tokenizer.json").is_file():
        raise NotLocalWeightsError(f"backbone {config.name}: {path} holds no tokenizer.json (the fast tokenizer "
                                   "file that cirflow's runtime reads)")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    pad = _pad_token(path) or default_pad
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"backbone {config.name}: pad token {pad!r} is not in {path / 'tokenizer.json'}")
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad)  # to the longest in the batch
    return tok


def _pad_token(path: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            pad = json.loads(file.read_text()).get("pad_token")
            if isinstance(pad, dict):  # AddedToken form
                pad = pad.get("content")
            if isinstance(pad, str) and pad:
                return pad
    return None


def vision_size(vision: dict[str, Any]) -> int:
    size = vision.get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def check_image_size(name: str, vision: dict[str, Any], size: int) -> None:
    """Position embeddings are fixed to the vision config's image_size: other sizes are refused here, not
    interpolated."""
    if size != vision_size(vision):
        raise ValueError(f"backbone {name}: model.image.image_size={size} must equal the vision config's "
                         f"image_size={vision_size(vision)} (set model.image.image_size and preprocess.size)")


def check_text_length(name: str, max_length: int, limit: int) -> None:
    if max_length > limit:
        raise ValueError(f"backbone {name}: model.text.max_length={max_length} exceeds the text model's "
                         f"max_position_embeddings={limit}")


def _clip_config(arch: dict[str, Any]) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig.from_dict(arch)


def arch(config: BackboneConfig) -> dict[str, Any]:
    """CLIP's config.json (vision, text and projection sizes)."""
    return read_arch(config, [MODEL_TYPE])


def tokenizer(config: BackboneConfig, max_length: int) -> Tokenizer:
    limit = _clip_config(arch(config)).text_config.max_position_embeddings
    return local_tokenizer(config, max_length, limit, DEFAULT_PAD)


def preprocess(config: BackboneConfig, size: int) -> PreprocessConfig:
    """CLIP's: bicubic resize of the shorter side, centre crop, CLIP's pixel statistics."""
    check_image_size(config.name, arch(config).get("vision_config", {}), size)
    return PreprocessConfig(size=size, mean=CLIP_MEAN, std=CLIP_STD, resize="bicubic", mode="center_crop")


class _PositionTable(nn.Embedding):
    """An embedding table looked up by indexing. The dynamo exporter folds CLIP's constant position lookup into
    an initializer named after its op, "embedding", which is also the image graph's output name; onnx.checker
    then rejects the graph (not in SSA form). Same weights, same values, another op name."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


class _Vision(nn.Module):
    """CLIP's vision half, attributes named as in CLIPModel so that its checkpoint loads as is."""

    def __init__(self, clip: Any, projection: bool) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(clip.vision_config)
        embeddings = self.vision_model.embeddings
        table = _PositionTable(*embeddings.position_embedding.weight.shape)
        table.weight = embeddings.position_embedding.weight
        embeddings.position_embedding = table
        if projection:
            self.visual_projection = nn.Linear(clip.vision_config.hidden_size, clip.projection_dim, bias=False)


class _Text(nn.Module):
    def __init__(self, clip: Any, projection: bool) -> None:
        super().__init__()
        from transformers import CLIPTextModel

        self.text_model = CLIPTextModel(clip.text_config)
        if projection:
            self.text_projection = nn.Linear(clip.text_config.hidden_size, clip.projection_dim, bias=False)


class ClipImageTower(PretrainedTower):
    def __init__(self, config: ImageEncoderConfig, arch: dict[str, Any], policy: TowerPolicy, adapter_dim: int,
                 weights_dir: Path | None) -> None:
        super().__init__()
        clip = _clip_config(arch)
        check_image_size("hf-clip", clip.vision_config.to_dict(), config.image_size)
        own = config.embed_dim == clip.projection_dim  # CLIP's embedding is the pooled vector
        self.backbone = _Vision(clip, projection=own)
        if weights_dir is not None:
            load_weights(self.backbone, weights_dir)
        adapters = []
        if policy.train == "adapter":
            adapters = insert_adapters(((layer.mlp, "fc2") for layer in self.backbone.vision_model.encoder.layers),
                                       adapter_dim)
        hidden = clip.vision_config.hidden_size
        self.to_tokens = nn.Linear(hidden, config.dim)
        self.pool = None if own else nn.Linear(hidden, config.embed_dim)
        self.setup_policy(policy, adapters)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> CLIP's last hidden states after post_layernorm (B, 1 + patches, hidden), class first
        (CLIP normalises only the class token before its projection; here every token gets the same norm)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.policy.train != "frozen"):
            vision = self.backbone.vision_model
            return vision.post_layernorm(vision(pixel_values=pixels).last_hidden_state)

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = hidden[:, 0]  # (B, hidden)
        pooled = self.backbone.visual_projection(cls) if self.pool is None else self.pool(cls)
        return self.to_tokens(hidden), pooled

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(pixels))


class ClipTextTower(PretrainedTower):
    def __init__(self, config: TextEncoderConfig, arch: dict[str, Any], policy: TowerPolicy, adapter_dim: int,
                 weights_dir: Path | None) -> None:
        super().__init__()
        clip = _clip_config(arch)
        check_text_length("hf-clip", config.max_length, clip.text_config.max_position_embeddings)
        own = config.embed_dim == clip.projection_dim
        self.backbone = _Text(clip, projection=own)
        if weights_dir is not None:
            load_weights(self.backbone, weights_dir)
        adapters = []
        if policy.train == "adapter":
            adapters = insert_adapters(((layer.mlp, "fc2") for layer in self.backbone.text_model.encoder.layers),
                                       adapter_dim)
        hidden = clip.text_config.hidden_size
        self.to_tokens = nn.Linear(hidden, config.dim)
        self.pool = None if own else nn.Linear(hidden, config.embed_dim)
        self.setup_policy(policy, adapters)

    def stem(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> CLIP's final-layer-normed hidden states (B, L, hidden). No padding mask is
        needed: attention is causal and padding is on the right, so no real token ever sees a pad (what
        OpenAI's CLIP does)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.policy.train != "frozen"):
            return self.backbone.text_model(input_ids=ids).last_hidden_state

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # CLIP pools at the end-of-text token. transformers finds it by id (the first eos_token_id, or the
        # largest id for old configs), which needs the ids; the tokenizer puts it last, so the last real token
        # by the mask is the same position, whatever the pad token, and also works on cached stems.
        last = (mask.sum(1) - 1).clamp(min=0)  # (B,)
        eos = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, hidden)
        pooled = self.backbone.text_projection(eos) if self.pool is None else self.pool(eos)
        return self.to_tokens(hidden), pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(ids, mask), mask)


def build(image: ImageEncoderConfig, text: TextEncoderConfig, config: BackboneConfig, arch: dict[str, Any],
          weights: bool) -> tuple[nn.Module, nn.Module]:
    path = weights_dir(config) if weights else None
    return (ClipImageTower(image, arch, config.image, config.adapter_dim, path),
            ClipTextTower(text, arch, config.text, config.adapter_dim, path))
