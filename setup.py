"""Package discovery, the one thing pyproject.toml cannot say: every package under the stage folders, installed
under the `cirflow.*` namespace (core/ -> cirflow.core, models/backbones/ -> cirflow.models.backbones, ...).
The stage folders sit at the top of the repository (the layout asked for); `cirflow` itself is an implicit
namespace package, so there is no cirflow/ folder to shadow the mapping. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

STAGES = ("core", "models", "export", "indexing", "flows")

setup(
    packages=[f"cirflow.{stage}{'.' + sub if sub else ''}" for stage in STAGES
              for sub in ("", *find_packages(stage))],
    package_dir={f"cirflow.{stage}": stage for stage in STAGES},
)
