"""Pre-training configuration: plain dataclasses loaded from YAML, overridable with ``key=value``.

A config file holds only the keys it changes; everything else keeps the defaults below (which are
the released ImageNet-100 recipe where the recipe says something). Overrides use dotted keys and
YAML values, e.g. ``optim.lr=0.5``, ``views.scale=[0.2,1.0]``, ``method=vicreg``. An unknown key,
a value of the wrong type or an out-of-range value raises :class:`ConfigError` naming the key,
before any data is read or any process group is started.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ssole_hub.models import RECIPE_MEAN, RECIPE_STD
from training.data import DatasetName
from training.objectives import METHODS

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "KnnConfig",
    "ModelConfig",
    "OptimConfig",
    "ViewsConfig",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was wrong."""


@dataclass
class DataConfig:
    """Where the training images come from and how they are loaded."""

    dataset: DatasetName = "folder"
    root: str | None = None
    """Image folder (``folder``) or idx-file folder (``fashion-mnist``; default Debian's path)."""
    val_root: str | None = None
    """Labelled held-out image folder for the kNN monitor (``folder`` only)."""
    batch_size: int = 32
    """Images per process and step (each contributes ``views.num_views`` crops)."""
    num_workers: int = 4
    max_images: int = 0
    """Train on a fixed random subset of this many images (0: all); for smoke tests."""
    synthetic_images: int = 4096
    synthetic_size: int = 64
    mean: tuple[float, float, float] = RECIPE_MEAN
    std: tuple[float, float, float] = RECIPE_STD
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the evaluation transform (1.0 for small, centred images)."""


@dataclass
class ViewsConfig:
    """Multi-crop views: ``num_views`` random crops of ``size`` px per image, per the recipe."""

    num_views: int = 4
    size: int = 224
    scale: tuple[float, float] = (0.14, 1.0)
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    backend: Literal["pil", "batch"] = "pil"
    """``pil``: per image in DataLoader workers. ``batch``: whole batches on the training device
    (GPU when there is one) with per-sample random parameters."""
    source_size: int = 0
    """``batch`` backend: workers resize/centre-crop every image to this square size first (0 keeps
    the dataset's own size, which must then be uniform)."""


@dataclass
class ModelConfig:
    """Backbone (a timm name) and projector."""

    arch: str = "ssole_resnet18"
    projector_hidden: int = 4096
    projector_out: int = 4096
    projector_depth: int = 3
    projector_batch_norm: bool = False
    channels_last: bool = True
    compile: bool = False
    sync_batchnorm: bool = True
    """Convert BatchNorm to SyncBatchNorm when more than one GPU process trains (PyTorch's
    SyncBatchNorm has no CPU kernels, so CPU runs keep per-process statistics)."""


@dataclass
class OptimConfig:
    """Optimiser and per-step learning-rate schedule (linear warm-up, then cosine)."""

    name: Literal["sgd", "lars"] = "sgd"
    lr: float = 2.0
    final_lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-5
    """Applied to weights only; biases and norm parameters (1-D) get none and skip LARS."""
    warmup_epochs: float = 0.0


@dataclass
class KnnConfig:
    """Online kNN monitor on a held-out split: frozen pooled backbone features, eval transform."""

    every_epochs: int = 0
    """Run every this many epochs (and after the last); 0 turns the monitor off."""
    at_start: bool = False
    """Also measure the randomly initialised backbone before training."""
    k: int = 20
    temperature: float = 0.07
    max_train_images: int = 10000
    max_val_images: int = 2000
    batch_size: int = 256


@dataclass
class Config:
    """A complete pre-training run.

    The objective's settings: ``ssole_lambda`` and ``ssole_gamma`` weigh SSOLE's terms, and two
    switches put the paper's claims to the test, one each: ``ssole_objective=coupled_ole`` (the
    coupled OLE loss SSOLE departs from) and ``ssole_centering=none`` (the low-rank term on raw
    views, not on their deviations from the mean). ``vicreg_weights``, ``barlowtwins_lambda`` and
    ``simclr_temperature`` set the peers'. :meth:`objective_options` hands them all to
    ``training.objectives.build_objective``.
    """

    method: Literal["ssole", "vicreg", "barlowtwins", "simclr"] = "ssole"
    ssole_lambda: float = 0.6
    ssole_gamma: float = 0.5
    ssole_objective: Literal["ssole", "coupled_ole"] = "ssole"
    """``ssole``: the paper's loss. ``coupled_ole``: the OLE loss the paper starts from (Lezama et
    al., CVPR 2018) on the views, ``mean_i ||Z_i||_* / N - ssole_lambda ||Z_all||_* / (b N)``:
    each image's N raw views against all b N views in one matrix, so the two terms are coupled
    (``ssole_gamma`` and ``ssole_centering`` play no part; see ``ssole_hub.SSOLELoss``)."""
    ssole_centering: Literal["mean", "none"] = "mean"
    """SSOLE's low-rank term on each image's views minus their mean (``mean``, the paper's,
    ``r_i = ||Z_i - 1 m_i^T||_*``) or on the raw views (``none``, ``r_i = ||Z_i||_*``), with the
    same ``r_i^2 / (N - 1)^2`` either way."""
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)
    """VICReg's (invariance, variance, covariance) weights (``method=vicreg``; the paper's)."""
    barlowtwins_lambda: float = 5e-3
    """Barlow Twins' weight of the off-diagonal (redundancy) terms (``method=barlowtwins``)."""
    simclr_temperature: float = 0.2
    """NT-Xent's temperature (``method=simclr``)."""
    epochs: int = 100
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU. ``fp16`` adds a GradScaler."""
    output_dir: str = "runs"
    run_name: str = ""
    """Run directory is ``output_dir/run_name``; empty means the config file's name."""
    resume: str = ""
    """``""`` starts fresh, ``latest`` continues from the run's newest checkpoint, or a path."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many steps in total; 0 runs all epochs."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N steps (0: only at each epoch's end)."""
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    max_nonfinite_steps: int = 20
    """Abort after this many consecutive steps with a non-finite loss."""
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)

    def validate(self) -> Config:
        """Check values that types alone cannot; returns ``self``.

        Raises:
            ConfigError: naming the first bad key.
        """
        for key, minimum in _MINIMUMS.items():
            value = _value_at(self, key)
            if value < minimum:
                raise ConfigError(f"{key} must be >= {minimum}, got {value}")
        for key, holds, requirement in _FIELD_RULES:
            value = _value_at(self, key)
            if not holds(value):
                raise ConfigError(f"{key} {requirement}, got {value}")
        self._check_combinations()
        if self.method not in METHODS:  # the Literal above mirrors METHODS; keep them in step
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_arch(self.model.arch)
        return self

    def objective_options(self) -> dict[str, Any]:
        """The keyword arguments of ``training.objectives.build_objective`` that this config
        sets: every method's (each objective reads only its own), all but ``gather``."""
        return {
            "lambda_": self.ssole_lambda,
            "gamma": self.ssole_gamma,
            "ssole_objective": self.ssole_objective,
            "ssole_centering": self.ssole_centering,
            "vicreg_weights": self.vicreg_weights,
            "barlowtwins_lambda": self.barlowtwins_lambda,
            "simclr_temperature": self.simclr_temperature,
        }

    def _check_combinations(self) -> None:
        """Check the values that are only wrong together with another one."""
        if self.optim.final_lr > self.optim.lr:
            raise ConfigError(
                f"optim.final_lr ({self.optim.final_lr}) must not exceed optim.lr ({self.optim.lr})"
            )
        folder = self.data.dataset == "folder"
        if folder and not self.data.root:
            raise ConfigError("data.root must name an image folder when data.dataset is 'folder'")
        knn_on = self.knn.every_epochs or self.knn.at_start
        if knn_on and folder and not self.data.val_root:
            raise ConfigError(
                "the kNN monitor needs a labelled held-out folder: set data.val_root, "
                "or knn.every_epochs=0 and knn.at_start=false"
            )
        if self.views.backend == "batch" and folder and not self.views.source_size:
            raise ConfigError(
                "views.backend=batch on an image folder needs views.source_size (e.g. 256) so "
                "that images of different sizes can be batched"
            )


# The least value of each numeric key (1: a count or size, 0: a rate, a limit or "off").
_MINIMUMS: dict[str, int] = {
    "epochs": 1,
    "data.batch_size": 1,
    "views.size": 1,
    "keep_checkpoints": 1,
    "log_every_steps": 1,
    "max_nonfinite_steps": 1,
    "model.projector_hidden": 1,
    "model.projector_out": 1,
    "model.projector_depth": 1,
    "knn.k": 1,
    "knn.batch_size": 1,
    "data.synthetic_images": 1,
    "data.synthetic_size": 1,
    "data.num_workers": 0,
    "data.max_images": 0,
    "max_steps": 0,
    "checkpoint_every_steps": 0,
    "knn.every_epochs": 0,
    "views.source_size": 0,
    "optim.lr": 0,
    "optim.final_lr": 0,
    "optim.weight_decay": 0,
    "optim.warmup_epochs": 0,
    "ssole_lambda": 0,
    "barlowtwins_lambda": 0,
}


def _is_probability(p: float) -> bool:
    return 0.0 <= p <= 1.0


# Per key: the rule its value must hold, and the rule in words (``"<key> <words>, got <value>"``).
_FIELD_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("views.num_views", lambda n: n >= 2, "must be >= 2 (the objectives compare views)"),
    ("views.flip_p", _is_probability, "must be a probability in [0, 1]"),
    ("views.color_jitter_p", _is_probability, "must be a probability in [0, 1]"),
    ("views.grayscale_p", _is_probability, "must be a probability in [0, 1]"),
    ("views.blur_p", _is_probability, "must be a probability in [0, 1]"),
    ("views.solarize_p", _is_probability, "must be a probability in [0, 1]"),
    ("views.scale", lambda s: 0.0 < s[0] <= s[1] <= 1.0, "must satisfy 0 < min <= max <= 1"),
    ("views.blur_sigma", lambda s: 0.0 < s[0] <= s[1], "must satisfy 0 < min <= max"),
    (
        "views.color_jitter",
        lambda jitter: not any(v < 0 for v in jitter) and not jitter[3] > 0.5,
        "must be non-negative with hue <= 0.5",
    ),
    ("data.std", lambda std: not any(s <= 0 for s in std), "must be positive"),
    ("data.eval_crop_pct", lambda p: 0.0 < p <= 1.0, "must be in (0, 1]"),
    ("ssole_gamma", _is_probability, "must be in [0, 1]"),
    ("vicreg_weights", lambda w: not any(v < 0 for v in w), "must be non-negative"),
    ("simclr_temperature", lambda t: t > 0, "must be > 0"),
    ("optim.momentum", lambda m: 0.0 <= m < 1.0, "must be in [0, 1)"),
)


def _value_at(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``optim.lr``) in ``cfg``."""
    value: Any = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _check_arch(arch: str) -> None:
    """Refuse an ``arch`` that timm does not know, ``ssole_hub``'s registered models included."""
    try:
        import timm

        known = timm.is_model(arch)
    except ImportError:  # pragma: no cover - timm is a hard dependency
        known = True
    if not known:
        import ssole_hub  # noqa: F401 - registers ssole_resnet* with timm

        if not timm.is_model(arch):
            raise ConfigError(f"model.arch {arch!r} is not a timm model name")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (YAML-, JSON- and ``weights_only``-safe)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(asdict(cfg))


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the value in the field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(
            _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-05" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}{_suggest(str(key), names)}; "
                f"valid keys here: {', '.join(sorted(names))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``run_name`` defaults to the file's stem. The result is validated.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ConfigError: on unreadable YAML, unknown keys, wrong types or bad values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path} must hold a mapping of config keys, got {type(loaded).__name__}"
            )
        values = loaded or {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    cfg = _build(Config, values)
    if not cfg.run_name:
        cfg.run_name = path.stem if path is not None else "run"
    return cfg.validate()
