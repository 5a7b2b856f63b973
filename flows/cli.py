"""The `cirflow` command line: one subcommand per job; each parses arguments and calls one entry point.

Stage modules are imported inside each subcommand so that `cirflow --help` stays fast and a subcommand
loads only what it uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cirflow.core.logs import configure_logging
from cirflow.models.images import DEFAULT_FORMATS, ImageLimits


def tcp_port(text: str) -> int:
    """argparse type: a TCP port to listen on, 1..65535 (uvicorn takes 0 for a random port, and larger numbers
    modulo 65536: either would listen somewhere else than the log says)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give a whole number in 1..65535")
    return port


def local_dir(text: str) -> Path:
    """argparse type: a local directory. pathlib would read `ftp://host/x` as the local ./ftp:/host/x, and a job
    would "succeed" into it."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is a URI; this job writes to a local (or mounted) directory: "
                                         "give its path")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cirflow", description="Composed image retrieval pipeline")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate built-in datasets").add_subparsers(dest="dataset", required=True)
    shapes = data.add_parser("shapes", help="the built-in shapes CIR benchmark, in CIRR format")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--scale", type=float, default=1.0)
    shapes.add_argument("--workers", type=int, default=2)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", type=Path, help="YAML file (defaults: cirflow.models.train_config.TrainConfig)")
    train.add_argument("--workdir", type=local_dir, default=Path("workdir"))
    train.add_argument("--run-id", help="run directory name under WORKDIR/runs (default: from the config hash)")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.max_minutes=2")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (metrics.json, tables, example sheets)")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--out", type=Path, help="output directory (default: beside the checkpoint's run, eval/)")
    ev.add_argument("--kind", help="dataset kind (default: the training one); 'fashioniq' = all categories")
    ev.add_argument("--root", type=Path, help="dataset directory (default: the training one)")
    ev.add_argument("--splits", help="comma-separated splits (default: the config's eval_splits)")

    exp = sub.add_parser("export", help="export a checkpoint to a model bundle (ONNX); 'export trt' builds engines")
    exp.add_argument("--checkpoint", type=Path, help="checkpoint to export (e.g. RUN/checkpoints/model.pt)")
    exp.add_argument("--out", type=Path, help="bundle directory to write (e.g. workdir/bundles/NAME)")
    exp_sub = exp.add_subparsers(dest="export_command")
    trt = exp_sub.add_parser("trt", help="build TensorRT engines inside an existing bundle (GPU + tensorrt)")
    trt.add_argument("--bundle", type=Path, required=True)
    trt.add_argument("--fp32", action="store_true", help="build fp32 engines (default: fp16)")
    trt.add_argument("--max-batch", type=int, default=64)
    trt.add_argument("--max-seq", type=int, help="default: the bundle's max_text_length")

    embed = sub.add_parser("embed", help="embed a catalog with a bundle (on Ray): Parquet shards + errors table")
    embed.add_argument("--config", type=Path, help="YAML file (keys: cirflow.indexing.embedding.job.EmbedConfig)")
    embed.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. catalog.folder=images/")

    index = sub.add_parser("index", help="FAISS indexes: query vectors, build, search").add_subparsers(
        dest="index_command", required=True)
    queries = index.add_parser("queries", help="encode a CIR split's composed queries, with their reference "
                               "images (for tuning an index of any catalog)")
    queries.add_argument("--bundle", type=Path, required=True)
    queries.add_argument("--kind", default="shapes", help="dataset kind (shapes, cirr, fashioniq/<category>)")
    queries.add_argument("--root", type=Path, required=True, help="dataset directory")
    queries.add_argument("--split", default="val")
    queries.add_argument("--out", type=Path, required=True, help="queries Parquet file to write")
    build = index.add_parser("build", help="build, tune and publish a FAISS index from an embedding snapshot")
    build.add_argument("--embeddings", required=True, help="WORKDIR/embeddings/<catalog>/<bundle_id> (a path or URI)")
    build.add_argument("--queries", type=Path, required=True, help="real composed query vectors (index queries); "
                       "references found in the catalog are left out of their results while tuning, as search does")
    build.add_argument("--out", type=Path, default=Path("workdir/indexes"), help="indexes root")
    build.add_argument("--config", type=Path, help="YAML file (keys: cirflow.indexing.index.plan.IndexConfig)")
    build.add_argument("--no-publish", action="store_true", help="do not point the catalog's CURRENT at it")
    build.add_argument("--keep", type=int, default=5, help="published versions kept for rollback (at least 2)")
    build.add_argument("--shards", type=int, default=1, help="build the version as this many index shards by "
                       "catalog id, one machine each (served by `cirflow serve` in one process, or by a Ray Serve "
                       "deployment per shard); default 1: one index")
    build.add_argument("overrides", nargs="*", help="key=value overrides, e.g. index_type=hnsw")
    versions = index.add_parser("versions", help="a catalog's published index versions, newest first")
    versions.add_argument("--catalog", type=Path, required=True, help="WORKDIR/indexes/<catalog>")
    rollback = index.add_parser("rollback", help="publish an earlier index version again (atomic)")
    rollback.add_argument("--catalog", type=Path, required=True, help="WORKDIR/indexes/<catalog>")
    rollback.add_argument("--to", help="index_id to restore (default: the newest published before CURRENT)")
    rollback.add_argument("--keep", type=int, default=5, help="published versions kept (at least 2)")
    search = index.add_parser("search", help="one composed query against an index")
    search.add_argument("--index", type=Path, required=True, help="index directory, or catalog directory (CURRENT)")
    search.add_argument("--bundle", type=Path, required=True)
    search.add_argument("--image", type=Path, required=True, help="reference image file")
    search.add_argument("--text", required=True, help="modification text")
    search.add_argument("-k", type=int, default=10, help="results to return (at most the index size)")
    search.add_argument("--exclude-id", type=int, help="catalog id to leave out (the reference's own)")
    search.add_argument("--rerank-n", type=int, help="a bundle with a re-ranker: the index's candidates re-scored "
                        "exactly (default: the bundle's; 0: none); other bundles ignore it")

    serve = sub.add_parser("serve", help="the search service and page over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--index", type=Path, required=True,
                       help="WORKDIR/indexes/<catalog> (its CURRENT is served and hot-reloaded) or one version")
    serve.add_argument("--bundle", type=Path, help="a bundle, or a directory of bundles searched for the index's "
                       "bundle_id (default: WORKDIR/bundles)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    serve.add_argument("--port", type=tcp_port, default=8000)
    serve.add_argument("--providers", default="auto", help="ONNX Runtime providers: auto, tensorrt, cuda, cpu")
    serve.add_argument("--workers", type=int, default=0, help="request threads (default: one per core)")
    serve.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime threads per request")
    serve.add_argument("--reload-seconds", type=float, default=2.0, help="CURRENT poll interval; 0: no reload")
    serve.add_argument("--verify", default="sha256", choices=["sha256", "size"],
                       help="index file check at each load (size: fast start on huge indexes)")
    serve.add_argument("--max-k", type=int, default=100)
    serve.add_argument("--max-rerank-n", type=int, default=1000,
                       help="a bundle with a re-ranker: the most candidates a request may have re-scored")
    serve.add_argument("--api-key-file", type=Path, help="a file holding the API key that search and the items "
                       "then need as `Authorization: Bearer <key>` (else CIRFLOW_API_KEY; neither: no key)")
    serve.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes,
                       help="largest encoded image (upload or catalog file) the image gate reads")
    serve.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels,
                       help="largest width x height, judged from the header before decoding")
    serve.add_argument("--image-formats", default=",".join(DEFAULT_FORMATS),
                       help="the image formats accepted, comma-separated PIL names")

    demo = sub.add_parser("demo", help="the main job end to end on the built-in shapes benchmark")
    demo.add_argument("--workdir", type=local_dir, default=Path("workdir"))
    demo.add_argument("--config", type=Path, help="training YAML (default: built-in defaults)")
    demo.add_argument("--scale", type=float, default=1.0, help="shapes dataset scale")
    demo.add_argument("overrides", nargs="*", help="training key.path=value overrides")

    flow = sub.add_parser("flow", help="run one Prefect flow (a temporary Prefect server of its own, stopped with "
                          "this process, unless PREFECT_API_URL is set)")
    flow.add_argument("name", choices=sorted(FLOWS))
    flow.add_argument("--config", type=Path, help="the flow's YAML, e.g. configs/catalog_flow.yaml")
    flow.add_argument("overrides", nargs="*", help="key.path=value overrides")

    args = parser.parse_args(argv)
    configure_logging(args.log_level)  # values from input (file names, URIs) cannot forge a log line
    # Prefect's client logs every API request at INFO, faiss every CPU-feature probe of its loader.
    for noisy in ("httpx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (config, dataset, checkpoint, bundle): one clear line, no traceback.
        logging.getLogger("cirflow").error("%s", e)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        from cirflow.models.data.shapes import ShapesConfig, generate_shapes

        generate_shapes(ShapesConfig(seed=args.seed, scale=args.scale, workers=args.workers), args.out)
        print(args.out)
    elif args.command == "train":
        from cirflow.models.train_job import train_run

        print(train_run(args.config, args.overrides, args.workdir, args.run_id))
    elif args.command == "eval":
        from cirflow.models.eval_job import EvalJobConfig, run_eval

        out = args.out or args.checkpoint.parent.parent / "eval"
        splits = tuple(s for s in (args.splits or "").split(",") if s)
        run_eval(EvalJobConfig(args.checkpoint, out, args.kind, args.root, splits))
    elif args.command == "export" and args.export_command == "trt":
        from cirflow.export.tensorrt import TensorRTUnavailable, build_engines

        try:
            build_engines(args.bundle, fp16=not args.fp32, max_batch=args.max_batch, max_seq=args.max_seq)
        except TensorRTUnavailable as e:  # no GPU or no TensorRT here: say so, with its own exit code
            logging.getLogger("cirflow").error("%s", e)
            return 3
        print(args.bundle)
    elif args.command == "export":
        if args.checkpoint is None or args.out is None:
            raise ValueError("cirflow export needs --checkpoint CKPT and --out BUNDLE "
                             "(or: cirflow export trt --bundle BUNDLE)")
        from cirflow.export.bundle import export_bundle

        print(export_bundle(args.checkpoint, args.out))
    elif args.command == "embed":
        from cirflow.core.config import load_config
        from cirflow.indexing.embedding.job import EmbedConfig, run_embed

        print(run_embed(load_config(EmbedConfig, args.config, args.overrides)))
    elif args.command == "index":
        return _index(args)
    elif args.command == "serve":
        from cirflow.indexing.service.app import serve
        from cirflow.indexing.service.security import read_api_key
        from cirflow.indexing.service.state import ServiceConfig

        images = ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels,
                             formats=tuple(f.strip() for f in args.image_formats.split(",") if f.strip()))
        config = ServiceConfig(args.index, args.bundle, providers=args.providers, verify=args.verify,
                               reload_seconds=args.reload_seconds, workers=args.workers,
                               ort_threads=args.ort_threads, max_k=args.max_k,
                               max_rerank_n=args.max_rerank_n, images=images,
                               api_key=read_api_key(args.api_key_file, os.environ))
        serve(config, args.host, args.port)
    elif args.command == "demo":
        from cirflow.flows.demo import DemoConfig, run_demo

        run_demo(DemoConfig(args.workdir, args.config, args.scale, tuple(args.overrides)))
    elif args.command == "flow":
        return _flow(args)
    return 0


def _index(args: argparse.Namespace) -> int:

    from cirflow.export.runtime import BundleRuntime

    if args.index_command == "queries":
        from cirflow.indexing.index.queries import encode_query_split, write_queries

        runtime = BundleRuntime.load(args.bundle)
        print(write_queries(args.out, encode_query_split(runtime, args.kind, args.root, args.split),
                            runtime.bundle_id))
    elif args.index_command == "build":
        from cirflow.core.config import load_config
        from cirflow.indexing.embedding.shards import open_snapshot
        from cirflow.indexing.index.build import build_index
        from cirflow.indexing.index.plan import IndexConfig
        from cirflow.indexing.index.queries import read_queries
        from cirflow.indexing.index.versions import publish
        from cirflow.indexing.search.index_store import read_manifest

        run = open_snapshot(args.embeddings)
        config = load_config(IndexConfig, args.config, args.overrides)
        queries = read_queries(args.queries, run.bundle_id)
        if args.shards == 1:
            index_dir = build_index(run, queries, args.out, config)
        else:
            from cirflow.indexing.index.sharded import build_sharded_index

            index_dir = build_sharded_index(run, queries, args.out, config, args.shards)
        if not args.no_publish:
            publish(index_dir, keep=args.keep)
        manifest = read_manifest(index_dir)
        logging.getLogger("cirflow").info("%s: %s", manifest["type"], manifest["reason"])
        print(index_dir)
    elif args.index_command == "versions":
        from cirflow.indexing.index.versions import versions

        for row in versions(args.catalog):
            flags = ("CURRENT " if row["current"] else "") + ("HELD " if row["held"] else "") + (
                "" if row["exists"] else "(deleted)")
            print(f"{row['index_id']}\t{row['at']}\t{row['action']}\t{flags.strip()}")
            if row["held"]:
                holds = row["holds"]
                print(f"  HELD: rolled back from {row['from']}; scheduled runs publish nothing built from snapshot "
                      f"{holds['snapshot']} with bundle {holds['bundle_id']} until a newer snapshot or bundle")
    elif args.index_command == "rollback":
        from cirflow.indexing.index.versions import rollback

        print(rollback(args.catalog, args.to, args.keep))
    elif args.index_command == "search":
        from cirflow.indexing.search import Searcher

        result = Searcher.load(args.index, args.bundle).search(args.image, args.text, args.k, args.exclude_id,
                                                               rerank_n=args.rerank_n)
        for rank, (i, score, uri) in enumerate(zip(result.ids, result.scores, result.uris), 1):
            print(f"{rank}\t{i}\t{score:.4f}\t{uri}")
    return 0


# `cirflow flow NAME`: module and flow object, imported when run.
FLOWS = {"catalog": ("cirflow.flows.catalog_flow", "catalog"),
         "pipeline": ("cirflow.flows.pipeline_flow", "pipeline"),
         "training": ("cirflow.flows.training_flow", "training")}


def _flow(args: argparse.Namespace) -> int:
    import importlib
    import json

    from cirflow.flows.prefect_server import prefect_api

    module, name = FLOWS[args.name]
    flow = getattr(importlib.import_module(module), name)
    with prefect_api():  # the configured server, or a temporary one that dies with this process
        result = flow(config=str(args.config) if args.config else None, overrides=list(args.overrides))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
