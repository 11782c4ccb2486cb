"""The typed, serialisable configuration behind :func:`neuron_merging.merge`.

A :class:`MergeConfig` holds every knob of one compression run. It validates
itself on construction, so a bad value fails early with a message naming the
argument, and it round-trips through plain JSON (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any, Literal

from .errors import ConfigError

Mode = Literal["merge", "prune"]
BNRule = Literal["paper", "exact"]
Rounding = Literal["round", "floor"]

#: Cosine-similarity threshold below which a pruned neuron is not merged. 0.1 is
#: the value the paper uses for every convolutional experiment (VGG, ResNet, WRN);
#: the fully connected LeNet experiment used 0.45.
DEFAULT_THRESHOLD: float = 0.1
#: Weight of the cosine distance against the bias distance in the BN rule. 0.85 is
#: the paper's value for VGG-16 and ResNet-56 on CIFAR-10.
DEFAULT_LAMBDA: float = 0.85

BN_RULES: tuple[str, ...] = ("paper", "exact")
ROUNDINGS: tuple[str, ...] = ("round", "floor")
MODES: tuple[str, ...] = ("merge", "prune")
SELECTIONS: tuple[str, ...] = ("criterion", "group", "cover", "lstsq", "auto")
COMPENSATIONS: tuple[str, ...] = ("merge", "fold", "lstsq")
GRAMS: tuple[str, ...] = ("propagated", "whitened")
REPAIRS: tuple[str, ...] = ("none", "mean", "mean+var")
CALIBRATE_STEPS: tuple[str, ...] = (
    "lstsq",
    "lstsq-block",
    "lstsq-joint",
    "flip",
    "bn",
    "repair",
)


@functools.lru_cache(maxsize=64)
def _kept_share(ratio: float) -> Fraction:
    """``1 - ratio`` exactly, the ratio read as the decimal it was written as."""
    return 1 - Fraction(repr(ratio))


@dataclass(frozen=True)
class MergeConfig:
    """Everything that decides how a model is compressed.

    Attributes:
        ratio: fraction of neurons removed from every merge group, in ``[0, 1)``.
        criterion: name of a registered criterion (``"l1-norm"``, ``"l2-norm"``,
            ``"l2-GM"``) deciding which neurons are kept.
        threshold: minimum cosine similarity for a pruned neuron to be merged into
            its partner; ``None`` merges every pruned neuron.
        lam: weight ``λ`` of the cosine distance against the bias distance when
            the producer is followed by batch norm.
        bn_rule: ``"paper"`` reproduces the released code, ``"exact"`` follows the
            algebra (see :mod:`neuron_merging.core.assign`).
        rounding: how ``n·(1-ratio)`` becomes a neuron count.
        keep: per-layer neuron counts that override ``ratio`` (producer names).
        exclude: producer names left untouched.
        mode: ``"merge"`` compensates pruned neurons, ``"prune"`` only drops them.
        coupled: also compress coupled channel groups (residual streams, concats,
            channels read by several layers), each with one plan for all its layers.
        approximate: merge, approximately, groups that are not positively homogeneous
            only because of one GELU, SiLU, ReLU6, Hardswish or gated (SwiGLU/GeGLU)
            unit, with least-squares scales under a Gaussian model (:mod:`.approx`);
            otherwise those groups are only pruned.
        selection: how the kept set is chosen: ``"criterion"`` (the paper: the
            criterion's top scores), ``"group"`` (criterion on producer rows +
            consumer columns + BN scale), ``"cover"`` (greedy k-medoids cover in
            the merge's distance, weighted by the criterion) or ``"lstsq"``
            (greedy removal by least-squares compensation error; without
            moments, i.e. no batch norm and no data, it keeps the criterion's set)
            or ``"auto"`` (``"lstsq"`` without calibration data; with it, the
            compression runs with ``"criterion"`` and with ``"lstsq"`` and keeps
            the one whose outputs on the calibration inputs are closest to the
            original's).
        compensation: with ``mode="merge"``, ``"merge"`` (the paper's partner and
            scale), ``"fold"`` (k-means clusters → centroids) or ``"lstsq"`` (a
            dense least-squares mix of the kept channels; without moments it
            falls back to ``"merge"``).
        gram: data-free estimate of the channel correlations behind ``lstsq``
            and ``repair``: ``"propagated"`` (noise images through the network,
            every BN renormalising) or ``"whitened"`` (signed filter cosines).
        repair: ``"mean"`` corrects the consumer's expected input (BN running
            mean or bias), ``"mean+var"`` also its variance (BN running var).
        ridge: relative ridge of the least-squares solves.
        seed: seed of the noise images of ``gram="propagated"``.
        calibrate: steps run when calibration data is passed to
            :func:`~neuron_merging.core.api.compress`, in this order:
            ``"lstsq"`` (sequential least-squares refit of every consumer),
            ``"lstsq-block"`` (the same, to the residual block's output where
            the consumer's BN output enters a residual sum),
            ``"lstsq-joint"`` (``"lstsq-block"`` + each producer's kept rows in
            the same pass),
            ``"flip"`` (later steps also use the mirrored images),
            ``"repair"`` (match per-channel output mean/std to the original's),
            ``"bn"`` (reset BN statistics). Data also replaces the Gaussian
            moments of ``selection``/``compensation``/``repair`` by measured ones.
    """

    ratio: float = 0.5
    criterion: str = "l1-norm"
    threshold: float | None = DEFAULT_THRESHOLD
    lam: float = DEFAULT_LAMBDA
    bn_rule: str = "paper"
    rounding: str = "round"
    keep: Mapping[str, int] = field(default_factory=dict)
    exclude: Sequence[str] = ()
    mode: str = "merge"
    coupled: bool = False
    approximate: bool = False
    selection: str = "criterion"
    compensation: str = "merge"
    gram: str = "propagated"
    repair: str = "none"
    ridge: float = 1e-3
    seed: int = 0
    calibrate: Sequence[str] = ()

    def __post_init__(self) -> None:
        from .select import available_criteria

        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not (0.0 <= float(ratio) < 1.0) or math.isnan(ratio):
            raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
        if not isinstance(self.criterion, str) or self.criterion not in available_criteria():
            raise ConfigError(
                f"unknown criterion {self.criterion!r}; "
                f"choose one of {', '.join(available_criteria())}"
            )
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 <= t <= 1.0:
                raise ConfigError(f"threshold must be None or in [-1, 1], got {t!r}")
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ConfigError(f"lam (λ) must be in [0, 1], got {lam!r}")
        if self.bn_rule not in BN_RULES:
            raise ConfigError(f"unknown bn_rule {self.bn_rule!r}; choose one of paper, exact")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; choose one of round, floor")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of merge, prune")
        if not isinstance(self.keep, Mapping):
            raise ConfigError("keep must be a mapping {layer_name: neuron_count}")
        for name, count in self.keep.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"keep[{name!r}] must be a positive integer, got {count!r}")
        for flag in ("coupled", "approximate"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.exclude, str):
            raise ConfigError(
                f"exclude must be a list of layer names, not a single string "
                f"(use exclude=[{self.exclude!r}])"
            )
        try:
            exclude = tuple(self.exclude)
        except TypeError:
            raise ConfigError(
                f"exclude must be a list of layer names, got {self.exclude!r}"
            ) from None
        bad = [name for name in exclude if not isinstance(name, str)]
        if bad:
            raise ConfigError(f"exclude must hold layer names (strings), got {bad[0]!r}")
        for name, value, allowed in (
            ("selection", self.selection, SELECTIONS),
            ("compensation", self.compensation, COMPENSATIONS),
            ("gram", self.gram, GRAMS),
            ("repair", self.repair, REPAIRS),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        r = self.ridge
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < math.inf:
            raise ConfigError(f"ridge must be a finite number >= 0, got {r!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63  # what torch.Generator.manual_seed takes
        ):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.calibrate, str):
            raise ConfigError("calibrate must be a list of steps, not a single string")
        for step in self.calibrate:
            if step not in CALIBRATE_STEPS:
                raise ConfigError(
                    f"unknown calibrate step {step!r}; choose from {', '.join(CALIBRATE_STEPS)}"
                )
        object.__setattr__(self, "calibrate", tuple(self.calibrate))
        object.__setattr__(self, "keep", dict(self.keep))
        object.__setattr__(self, "exclude", exclude)

    def kept_count(self, n: int) -> int:
        """Number of neurons kept out of ``n`` under ``ratio`` and ``rounding``.

        ``floor`` is exact: the ratio is read as the decimal it was written as
        (``0.8`` is 4/5), so ``floor(100 · (1 - 0.8))`` is 20, not the 19 that
        float error gives. ``round`` keeps its float arithmetic, which the paper
        presets' goldens were computed with.
        """
        if self.rounding == "floor":
            return math.floor(n * _kept_share(float(self.ratio)))
        return round(n * (1.0 - self.ratio))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` restores an equal config."""
        data = asdict(self)
        data["keep"] = dict(self.keep)
        data["exclude"] = list(self.exclude)
        data["calibrate"] = list(self.calibrate)
        return data

    @property
    def beyond_paper(self) -> bool:
        """Whether any option beyond the paper's algorithm is on."""
        return (
            self.selection != "criterion" or self.compensation != "merge" or self.repair != "none"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
            raise ConfigError(
                f"MergeConfig.from_dict expects a mapping of field names, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MergeConfig field(s): {', '.join(unknown)}")
        return cls(**dict(data))
