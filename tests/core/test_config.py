from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cirflow.core.config import (
    ConfigError,
    apply_overrides,
    check_between,
    check_choice,
    check_fraction,
    check_integer,
    check_non_negative,
    check_positive,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from cirflow.models.train_config import TrainConfig


@dataclass(frozen=True)
class Inner:
    size: int = 3
    ratio: float = 0.5
    names: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    label: str | None = None


def test_nested_roundtrip_and_int_to_float() -> None:
    cfg = from_dict(Outer, {"inner": {"size": 5, "ratio": 1, "names": ["x", "y"]}, "label": "z"})
    assert cfg == Outer(Inner(5, 1.0, ("x", "y")), "z")
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"config\.inner: unknown key\(s\) \['sise'\]; valid keys: \['names', 'ratio', 'size'\]"):
        from_dict(Outer, {"inner": {"sise": 4}})


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"config\.inner\.size: expected int, got 'big'"):
        from_dict(Outer, {"inner": {"size": "big"}})
    with pytest.raises(ConfigError, match="expected int, got True"):
        from_dict(Outer, {"inner": {"size": True}})


def test_float_without_dot_is_a_float() -> None:
    assert load_config(TrainConfig, None, ["optim.lr=3e-3"]).optim.lr == 0.003
    with pytest.raises(ConfigError, match="optim.lr: expected float, got 'fast'"):
        load_config(TrainConfig, None, ["optim.lr=fast"])


def test_overrides_parse_yaml_values() -> None:
    out = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d=text"])
    assert out == {"a": {"b": 2, "c": [1, 2]}, "d": "text"}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_load_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("# cirflow train --config job.yaml\noptim:\n  lr: 0.01\nmodel:\n  composer:\n    name: sum\n")
    cfg = load_config(TrainConfig, path, ["optim.batch_size=8"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.model.composer.name) == (0.01, 8, "sum")
    assert cfg.optim.max_minutes == TrainConfig().optim.max_minutes  # untouched defaults stay


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match="recipe='three_stage' is not one of"):
        load_config(TrainConfig, None, ["recipe=three_stage"])


@dataclass(frozen=True)
class Ranged:
    size: int = 1
    budget: float = 0.0  # 0 = none
    rate: float = 0.5
    optional: int | None = None
    share: float = 0.5  # strictly between 0 and 1
    bits: int = 8

    def __post_init__(self) -> None:
        check_positive(self, "size", "optional")
        check_non_negative(self, "budget")
        check_fraction(self, "rate")
        check_between(self, 0, 1, "share", exclude_low=True, exclude_high=True)
        check_between(self, 1, 16, "bits")


@pytest.mark.parametrize("data, reason", [
    ({"size": 0}, "size must be positive, got 0"),
    ({"optional": -2}, "optional must be positive, got -2"),
    ({"budget": -1.0}, "budget must not be negative, got -1.0"),
    ({"rate": 1.5}, "rate must lie in [0, 1], got 1.5"),
    ({"share": 0.0}, "share must lie in (0, 1), got 0.0"),
    ({"share": 1.0}, "share must lie in (0, 1), got 1.0"),
    ({"bits": 17}, "bits must lie in [1, 16], got 17"),
])
def test_range_checks_are_config_errors_naming_the_section(data: dict, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Ranged, data, "job.limits")
    assert str(info.value) == f"job.limits: {reason}"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan", "-Infinity"])
def test_a_float_that_is_not_finite_is_refused_naming_the_key(value: object) -> None:
    # inf passes `> 0` and NaN fails every comparison: a range check alone lets them through to the job.
    with pytest.raises(ConfigError) as info:
        from_dict(Ranged, {"budget": value}, "job.limits")
    shown = "-inf" if str(value).startswith("-") else "nan" if "nan" in str(value) else "inf"
    assert str(info.value) == f"job.limits.budget: must be a finite number, got {shown}"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "config.optim.lr"),
    ("optim.lr=.inf", "config.optim.lr"),  # YAML's own spelling, a float already
    ("optim.max_minutes=nan", "config.optim.max_minutes"),
    ("model.image.mlp_ratio=-inf", "config.model.image.mlp_ratio"),
])
def test_training_config_refuses_non_finite_floats(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got -?(inf|nan)$"):
        load_config(TrainConfig, None, [override])


def test_an_integer_too_large_for_a_float_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^config.optim.lr: must be a finite number, got an integer of 400 digits$"):
        load_config(TrainConfig, None, ["optim.lr=1" + "0" * 399])


@pytest.mark.parametrize("check, value", [
    (check_positive, float("inf")), (check_positive, float("nan")),
    (check_non_negative, float("inf")), (check_non_negative, float("nan")),
])
def test_range_checks_refuse_non_finite_values_of_configs_built_directly(check: object, value: float) -> None:
    @dataclass(frozen=True)
    class Direct:  # built from flags, not from_dict: the checks are its only guard
        rate: float

        def __post_init__(self) -> None:
            check(self, "rate")  # type: ignore[operator]

    with pytest.raises(ValueError, match=f"^rate must be a finite number, got {value}$"):
        Direct(value)


def test_range_checks_accept_their_bounds() -> None:
    assert from_dict(Ranged, {"size": 1, "budget": 0.0, "rate": 1.0}) == Ranged(1, 0.0, 1.0)
    assert from_dict(Ranged, {"rate": 0.0}).rate == 0.0
    assert from_dict(Ranged, {"bits": 1}).bits == 1 and from_dict(Ranged, {"bits": 16}).bits == 16
    with pytest.raises(ValueError, match=r"^share must lie in \(0, 1\), got nan$"):  # built directly: NaN fails both ends
        Ranged(share=float("nan"))


class LimitsError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:  # built from flags or a deployment's args: no from_dict checked the types
    max_k: int = 100
    workers: int = 0

    def __post_init__(self) -> None:
        check_integer(self, "max_k", "workers", error=LimitsError)
        check_positive(self, "max_k", error=LimitsError)
        check_non_negative(self, "workers", error=LimitsError)


@pytest.mark.parametrize("values, reason", [
    ({"max_k": 0}, "max_k must be positive, got 0"),
    ({"workers": -1}, "workers must not be negative, got -1"),
    ({"max_k": 2.5}, "max_k must be an integer, got 2.5"),
    ({"workers": True}, "workers must be an integer, got True"),
])
def test_range_checks_raise_the_configs_own_error(values: dict, reason: str) -> None:
    with pytest.raises(LimitsError) as info:
        Limits(**values)
    assert str(info.value) == reason


def test_flatten_spells_leaves_as_override_keys() -> None:
    tree = {"a": {"b": 1, "c": {"d": None}, "e": {}}, "f": [1, 2]}
    assert flatten(tree) == {"a.b": 1, "a.c.d": None, "f": [1, 2]}
    flat = flatten(to_dict(Outer()))
    assert flat == {"inner.size": 3, "inner.ratio": 0.5, "inner.names": ["a"], "label": None}
    assert from_dict(Outer, apply_overrides({}, [f"{k}={v}" for k, v in flat.items() if v is not None])) == Outer()


def test_check_choice_names_the_field_the_value_and_the_choices_in_order() -> None:
    class PlanError(ValueError):
        pass

    check_choice("ivf_pq", "index_type", ("flat", "hnsw", "ivf_pq"))
    with pytest.raises(PlanError, match=r"^index_type='ivfpq' is not one of \['flat', 'hnsw', 'ivf_pq'\]$"):
        check_choice("ivfpq", "index_type", ("flat", "hnsw", "ivf_pq"), error=PlanError)
    with pytest.raises(ValueError, match=r"^mode=None is not one of"):
        check_choice(None, "mode", ["stretch"])
