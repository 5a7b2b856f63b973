"""The main job on the built-in default: generate shapes, train, evaluate, export, evaluate the bundle, then
treat the shapes test gallery as a shop catalog: embed it with the Ray job, build and publish an index, and
run the test queries through the search library.

It prints the PyTorch results per split (composed and both baselines), the exported bundle's results through
ONNX Runtime beside them, and the recall of the one query path (search library) beside the evaluator's: the
two must be equal, and the demo fails if they are not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cirflow.export.bundle import export_bundle
from cirflow.export.evaluate_bundle import evaluate_bundle
from cirflow.export.manifest import register_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.catalog import CatalogConfig
from cirflow.indexing.embed import EmbedConfig, run_embed
from cirflow.indexing.index_build import build_index
from cirflow.indexing.index_plan import IndexConfig
from cirflow.indexing.index_versions import publish
from cirflow.indexing.queries import encode_query_split
from cirflow.indexing.search import Searcher, VectorIndex
from cirflow.indexing.search_eval import recall_through_search
from cirflow.indexing.shards import open_run
from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.eval_job import EvalJobConfig, run_eval
from cirflow.models.report import format_table
from cirflow.models.train_job import train_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("workdir")
    train_config: Path | None = None
    scale: float = 1.0
    overrides: tuple[str, ...] = ()


def run_demo(config: DemoConfig) -> dict:
    data_dir = config.workdir / "data" / ("shapes" if config.scale == 1.0 else f"shapes-x{config.scale:g}")
    generate_shapes(ShapesConfig(scale=config.scale), data_dir)
    overrides = (f"data.root={data_dir}", "data.kind=shapes", *config.overrides)
    checkpoint = train_run(config.train_config, overrides, config.workdir)
    run_dir = checkpoint.parent.parent
    results = run_eval(EvalJobConfig(checkpoint, run_dir / "eval"))
    bundle = export_bundle(checkpoint, config.workdir / "bundles" / run_dir.name)
    register_bundle(bundle)  # workdir/bundles/CURRENT: what configs/embed_catalog.yaml embeds with
    ort = evaluate_bundle(bundle, "shapes", data_dir, tuple(s.split("/")[-1] for s in results))
    for split, modes in ort.items():
        rows = {"pytorch": results[split]["composed"], "onnxruntime": modes["composed"]}
        print(format_table(rows, f"{split}: composed queries, PyTorch checkpoint vs exported bundle (ORT)"))
    search = search_catalog(config, data_dir, bundle)
    evaluator = {k: ort["shapes/test"]["composed"][k] for k in search}
    print(format_table({"evaluator (ORT)": evaluator, "search library": search},
                       "shapes/test as a catalog: Ray embedding job -> FAISS index -> search library"))
    # Equal counts of hits; the tolerance only absorbs float32 vs float64 means.
    if any(abs(search[k] - evaluator[k]) > 1e-6 for k in search):
        raise RuntimeError(f"recall through the search library {search} differs from the evaluator's {evaluator}")
    log.info("demo finished: run %s, bundle %s", run_dir, bundle)
    return {"pytorch": results, "onnxruntime": ort, "search": search}


def search_catalog(config: DemoConfig, data_dir: Path, bundle: Path) -> dict[str, float]:
    """Embed the test gallery (Ray), index it (tuned with the val split's composed queries), search it."""
    catalog = CatalogConfig(name="shapes-test", folder=str(data_dir / "images" / "test"))
    run_dir = run_embed(EmbedConfig(catalog=catalog, bundle=str(bundle), workdir=str(config.workdir)))
    runtime = BundleRuntime.load(bundle)
    # The queries carry their reference images: build_index splits them by reference and leaves any reference
    # that is in the catalog out of its results (val references are not in the test gallery: none is).
    tuning = encode_query_split(runtime, "shapes", data_dir, "val")
    index_dir = build_index(open_run(run_dir), tuning, config.workdir / "indexes", IndexConfig())
    publish(index_dir)
    searcher = Searcher(VectorIndex.load(index_dir.parent), runtime)  # the published one, through CURRENT
    return recall_through_search(searcher, "shapes", data_dir, "test")
