"""Export the inference surfaces of a CIRModel to ONNX with the dynamo exporter, then check the files.

Only `CIRModel.compose`, `CIRModel.encode_image` and `CIRModel.encode_text` are traced (through the small
wrappers below), and for a composer that re-ranks (ARTEMIS) its query features and exact score, so training-only
parts (losses, logit scale, stage-2 copies, the methods' branches) never reach the graph. The text
encoder is the evaluator's text-only baseline (q = t): what a text-only search can honestly answer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from cirflow.export.manifest import QUERY_FEATURES, GraphSpec
from cirflow.models.cir_model import CIRModel, needs_rerank

log = logging.getLogger(__name__)

# Pinned rather than the exporter's default so that a torch upgrade cannot silently change the graphs (and with
# them the bundle id); opset 20 is what the dynamo exporter gives here and what ORT 1.32 and TensorRT 10 parse.
OPSET = 20


class QueryEncoder(nn.Module):
    """(pixel_values (B,3,H,W), input_ids (B,L), attention_mask (B,L)) -> query (B, D), unit length; and, for a
    composer that re-ranks (models/rerank.py), the query's features for the re-ranker (B, F, D) too."""

    def __init__(self, model: CIRModel) -> None:
        super().__init__()
        self.model = model
        self.with_features = needs_rerank(model.composer)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.with_features:
            return self.model.compose(pixel_values, input_ids, attention_mask)
        f = self.model.features(pixel_values, input_ids, attention_mask)
        return self.model.compose_features(f), self.model.composer.query_features(f.v, f.t)


class Reranker(nn.Module):
    """(query_features (B,F,D), candidates (B,N,D): the candidates' catalog vectors) -> scores (B, N): the
    composer's exact score (ARTEMIS: models/artemis.py)."""

    def __init__(self, model: CIRModel) -> None:
        super().__init__()
        self.composer = model.composer

    def forward(self, query_features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.composer.score(query_features, candidates)


class ImageEncoder(nn.Module):
    """pixel_values (B,3,H,W) -> embedding (B, D), unit length."""

    def __init__(self, model: CIRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """(input_ids (B,L), attention_mask (B,L)) -> text (B, D), unit length."""

    def __init__(self, model: CIRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


WRAPPERS = {"query_encoder": QueryEncoder, "image_encoder": ImageEncoder, "text_encoder": TextEncoder}


def example_inputs(model: CIRModel, batch: int, length: int, seed: int = 0,
                   candidates: int = 0) -> dict[str, torch.Tensor]:
    """Random but valid encoder inputs: pixels, token ids in the vocabulary, a mask padding the first row; with
    `candidates`, the re-ranker's too (the features of real queries, unit candidate vectors)."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.image.image_size
    ids = torch.randint(0, model.config.text.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, max(1, length // 2):] = 0  # padding must be exercised, not only full rows
    inputs = {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
              "attention_mask": mask}
    if candidates:
        with torch.inference_mode():
            inputs[QUERY_FEATURES] = QueryEncoder(model).eval()(inputs["pixel_values"], ids, mask)[1].clone()
        inputs["candidates"] = F.normalize(torch.randn(batch, candidates, model.embed_dim, generator=g), dim=-1)
    return inputs


def export_graph(module: nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], max_length: int,
                 out_dir: Path) -> Path:
    """Export `module` to out_dir/spec.file (+ spec.file.data) with dynamic batch and sequence axes."""
    module = module.eval()  # the wrappers are new modules and start in training mode
    batch = torch.export.Dim("batch", min=1)
    # The text encoder slices its position table, so the sequence axis is bounded by the model's max_length.
    sequence = torch.export.Dim("sequence", min=1, max=max_length)
    axes = {"pixel_values": {0: batch}, "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: sequence}, QUERY_FEATURES: {0: batch},
            "candidates": {0: batch, 1: torch.export.Dim("candidates", min=1)}}
    args = tuple(inputs[name] for name in spec.inputs)
    path = out_dir / spec.file
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # Harmless: the exporter notes that the Dim names we gave are also the names it derived.
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                    input_names=list(spec.inputs), output_names=output_names(module, spec),
                                    dynamic_shapes={name: axes[name] for name in spec.inputs}, verbose=False)
    _strip_debug_metadata(program.model)
    program.save(str(path), external_data=True)
    log.info("exported %s", path)
    return path


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """onnxscript logs every optimiser rewrite at INFO and torch warns about absent torchvision ops; at the
    CLI's INFO level that buries our own lines. Raised for the export only, then restored."""
    levels = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
              "torch.onnx._internal.exporter._registration": logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    before = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(max(logger.level, level))
    try:
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


def _strip_debug_metadata(model: Any) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with absolute source paths and line numbers,
    FX node dumps): kept, they would make the bundle id depend on where and at which line the code sits."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for value in (*graph.inputs, *graph.outputs):
            value.metadata_props.clear()
        for node in graph.all_nodes():
            node.metadata_props.clear()
            node.doc_string = None
            for value in node.outputs:
                value.metadata_props.clear()


def check_graph(path: Path) -> ort.InferenceSession:
    """onnx.checker by path (so external data is checked too) and a load in the pinned ORT, on CPU."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{path.name} fails onnx.checker: {e}") from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def graph_versions(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"ir_version": int(model.ir_version), "opset": int(opset)}


def output_names(module: nn.Module, spec: GraphSpec) -> list[str]:
    """The graph's outputs: spec.output, and the re-ranker's query features after it where the query encoder
    gives them."""
    return [spec.output, QUERY_FEATURES] if getattr(module, "with_features", False) else [spec.output]


def max_abs_diff(session: ort.InferenceSession, module: nn.Module, spec: GraphSpec,
                 inputs: dict[str, torch.Tensor]) -> float:
    """ORT against eager PyTorch on the same inputs, the largest difference over every output."""
    with torch.inference_mode():
        expected = module.eval()(*(inputs[name] for name in spec.inputs))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(output_names(module, spec), {name: inputs[name].numpy() for name in spec.inputs})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
