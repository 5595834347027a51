"""The settings of a JiT run, declared, documented and validated once.

:class:`JiTSettings` is read by everything that runs JiT: the wrapper, the callback, the command line (its
``--jit.*`` group and ``--help`` come from this class's fields and docstring), the tuner's output and the
checkpoints. Each field's check sits next to its declaration (``metadata["check"]``) and raises
:class:`~lightning_jit.core.errors.JiTSettingError` naming the field.

:func:`split_settings` routes keyword arguments to the three declarations a run takes (this one,
:class:`~lightning_jit.core.batch.BatchFormat` and :class:`~lightning_jit.core.guard.GuardSettings`), so that the
fronts accept ``JiTUnlearning(model, sigma=0.1, label_key="y")`` without repeating any list of settings.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.checks import boolean, choice, integer, is_number, non_negative, optional, positive, validate
from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.noise import PerturbationSpec, resolve_perturbation
from lightning_jit.core.site import AUTO, INPUT, check_site_spec

Reduction = Literal["mean", "sum"]
Task = Literal["auto", "class", "random"]
NormPolicy = Literal["eval", "train"]
OnUnverified = Literal["restore", "keep"]
ClampSpec = Literal["batch"] | tuple[float, float] | None
#: How many perturbed samples go through the model in one no-grad forward pass: an integer, ``None`` (all ``N * B`` at
#: once) or ``"auto"`` (by the input's device, see :data:`lightning_jit.core.objective.PERTURBATION_CHUNK_BY_DEVICE`).
PerturbationChunk = int | Literal["auto"] | None


def _percentage(name: str, value: Any) -> Any:
    if value is not None and not (is_number(value) and 0 <= value <= 100):
        raise JiTSettingError(name, f"must be a percentage in [0, 100] or None, got {value!r}.")
    return None if value is None else float(value)


def _clamp(name: str, value: Any) -> Any:
    if value is None or value == "batch":
        return value
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(is_number(v) for v in value)
    if not ok or not float(value[0]) < float(value[1]):
        raise JiTSettingError(name, f'must be None, "batch" or a (low, high) pair with low < high, got {value!r}.')
    return (float(value[0]), float(value[1]))


def _chunk(name: str, value: Any) -> Any:
    if value is None or value == "auto":
        return value
    return integer(1, 'Or "auto" (by device) or None (all perturbed copies in one pass).')["check"](name, value)


def _seed(name: str, value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise JiTSettingError(name, f"must be an int or None, got {value!r}.")
    return value


def _perturbation(name: str, value: Any) -> Any:
    resolve_perturbation(value)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# The declaration
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class JiTSettings:
    """The settings of a JiT run. Every front (wrapper, callback, command line, tuner) reads this one declaration.

    With no argument, a run calibrates itself from the model and the forget set
    (:mod:`lightning_jit.core.calibration`): the task, ``sigma``, the step size, which parameters to update, and when
    to stop. A setting given a value is used as given. The defaults are the best setting measured across every dataset
    and model of the benchmark (``docs/results/generalise.md``), not one dataset's.

    Args:
        sigma: Std of the input perturbations, in the units of the (normalised) input. ``None``: one std of the
            forget inputs.
        lr: Step size. ``None``: the normalised step (:class:`~lightning_jit.core.optimizer.NormalizedStep`),
            calibrated at the first step so that it moves the batch's predictions by a fixed small KL divergence. A
            number: plain SGD at that step size (the reference's update), unless the front is given an ``optimizer``.
        n_perturbations: ``N``, perturbations drawn per forget sample and step.
        epochs: Most passes over the forget set. ``None``: as many as ``max_cost`` allows (the run stops as soon as
            the forget set is verified forgotten).
        max_cost: Most samples through the model per forget sample (a forward counts 1, a forward and backward 3;
            the reference's one pass costs ``N + 3``), beyond the run's fixed set-up (the survey of the forget set,
            the step size's calibration, the probes' synthesis). ``None``: no bound.
        task: ``"class"`` (whole classes are forgotten: run until at most ``target_forget_accuracy`` percent of the
            forget set is still recognised), ``"random"`` (a sample of the training data, which a model that never saw
            it would still mostly recognise: one light pass, no class probes) or ``"auto"`` (class when the forget set
            holds at most half of the model's classes).
        target_forget_accuracy: The most forget samples (percent) that may still be recognised for the run to count
            as forgotten; checked on the whole forget set, with the final weights. ``None``: a class task's calibrated
            target (:data:`~lightning_jit.core.calibration.CLASS_TARGET`); a random task then has no target, and its
            outcome says so.
        reduction: ``"mean"`` averages the per-sample ratios over samples and perturbations (the step then does not
            depend on the batch size); ``"sum"`` sums over samples, as the reference does (``"sum" == B * "mean"``).
        normalize_logits: Compare unit-normalised outputs, so that JiT cannot lower its objective by inflating the
            logits of a neighbouring class (which then swallows retained samples). ``False`` is the reference.
        unitless_ratio: Multiply the ratio ``||f(x) - f(x')|| / ||xi||`` by ``E||xi|| = sigma * sqrt(d)``, so that it
            does not depend on the inputs' scale or dimension and its weight against the retain terms holds on any
            data. ``False`` is the reference.
        logit_norm_penalty: Weight of the penalty on logits growing beyond the original model's around the forget
            samples (:func:`~lightning_jit.core.penalties.logit_norm_penalty`); 0 turns it off.
        logit_norm_sigma: Std of the penalty's noisy copies of the forget inputs, in input units. ``None``: one std of
            the forget inputs.
        redistribution: Weight of the KL term that moves a forgotten class's probability to the classes the original
            model ranked next (:func:`~lightning_jit.core.penalties.redistribution_loss`), so that no neighbouring
            class takes it all; class tasks only, 0 turns it off.
        probe_distillation: Weight of the KL term that holds the model's predictions at the original's on class probes
            of the classes the forget set does not hold (:class:`~lightning_jit.core.distillation.DistillationSet`); 0
            turns it off.
        probes_per_class: Probes per kept class for ``probe_distillation``.
        retain_distillation: Weight of the KL term that holds the model's predictions at the original's on samples
            the user keeps, when the front is given a ``retain`` loader (never required: a run is zero-shot without
            it); 0 ignores the loader.
        update_scope: Update only the parameters of the last ``update_scope`` Linear/Conv modules, in the order the
            forward pass runs them. ``None``: every trainable parameter.
        clamp: ``None``, ``"batch"`` (clamp perturbed inputs to the batch min/max, as the reference) or
            ``(low, high)``.
        norm_policy: ``"eval"`` keeps BatchNorm statistics and dropout frozen during JiT; ``"train"`` reproduces the
            reference, which never sets the mode.
        perturbation: The noise distribution: a name registered with
            :func:`~lightning_jit.core.noise.register_perturbation` (``"gaussian"``, the paper's) or a callable.
        perturbation_chunk: Most perturbed samples per no-grad forward pass (bounds peak memory independently of
            ``N``); ``"auto"``: by device; ``None``: all at once.
        perturb_at: Where the noise goes (:mod:`lightning_jit.core.site`). ``None`` (or ``"auto"``): the input for
            floating-point inputs (the paper's JiT), the output of the model's first ``nn.Embedding`` for integer
            inputs (announced at the start; an error naming this setting when the model has none). ``"input"``: the
            input, always (it needs floating-point inputs). A module's dotted name in the model
            (``"embedding"``, ``"encoder.embeddings"``) or a callable ``fn(model) -> module``: the noise is added to
            that module's output through a forward hook, as for models over token ids. ``sigma``,
            ``logit_norm_sigma``, the unitless ratio's dimension and the class probes are then in that output's space,
            and ``clamp`` must be None.
        seed: Seed of the noise and of the probes. With per-sample ids in the batches (``(x, y, id)`` or
            ``{"id": ...}``) each sample's noise is keyed by ``(seed, id, epoch)``, so it does not depend on the batch
            or the process; without ids a generator seeded with ``seed`` is used. ``None``: the global RNG.
        on_unverified: What a run that does not end ``forgotten`` leaves in memory. ``"restore"`` (default): the
            weights from before the run, bit for bit, so that a pipeline goes on from a model that is either verified
            or the original. ``"keep"``: the run's partial progress (not a deletion; e.g. to inspect it, or to go on
            with a longer run and ``original=``). A random task has no target by default, so it never ends
            ``forgotten``: give it a ``target_forget_accuracy`` or ``"keep"``. The record says which happened
            (:attr:`~lightning_jit.core.outcome.Verification.restored`).

    Example:
        >>> JiTSettings().lr is None, JiTSettings().n_perturbations
        (True, 8)
        >>> JiTSettings.plain(sigma=0.1, lr=0.03).logit_norm_penalty
        0.0
    """

    sigma: float | None = field(
        default=None, metadata=optional(positive("It is the std of the input noise; try 0.1-1x the input's std."))
    )
    lr: float | None = field(
        default=None, metadata=optional(positive("It is the step size of the update; None calibrates it."))
    )
    n_perturbations: int = field(default=8, metadata=integer(1))
    epochs: int | None = field(default=None, metadata=optional(integer(1)))
    max_cost: float | None = field(
        default=120.0, metadata=optional(positive("It is in samples through the model per forget sample."))
    )
    task: Task = field(
        default="auto", metadata=choice(("auto", "class", "random"), "'auto' decides from the forget set's labels.")
    )
    target_forget_accuracy: float | None = field(default=None, metadata={"check": _percentage})
    reduction: Reduction = field(
        default="mean",
        metadata=choice(("mean", "sum"), '"sum" is the reference\'s per-batch sum: its lr equals the "mean" lr / B.'),
    )
    normalize_logits: bool = field(default=True, metadata={"check": boolean})
    unitless_ratio: bool = field(default=True, metadata={"check": boolean})
    logit_norm_penalty: float = field(default=10.0, metadata=non_negative("0 turns it off."))
    logit_norm_sigma: float | None = field(
        default=None, metadata=optional(positive("It is the std of the penalty's noisy copies."))
    )
    redistribution: float = field(default=1.0, metadata=non_negative("0 turns it off."))
    probe_distillation: float = field(default=5.0, metadata=non_negative("0 turns it off."))
    probes_per_class: int = field(default=4, metadata=integer(1))
    retain_distillation: float = field(default=1.0, metadata=non_negative("0 ignores the retain loader."))
    update_scope: int | None = field(default=2, metadata=optional(integer(1, "None updates every parameter.")))
    clamp: ClampSpec = field(default=None, metadata={"check": _clamp})
    norm_policy: NormPolicy = field(
        default="eval",
        metadata=choice(("eval", "train"), "'eval' keeps BatchNorm statistics frozen; 'train' is the reference."),
    )
    perturbation: PerturbationSpec = field(default="gaussian", metadata={"check": _perturbation})
    perturbation_chunk: PerturbationChunk = field(default="auto", metadata={"check": _chunk})
    perturb_at: str | Callable[[Any], Any] | None = field(default=None, metadata={"check": check_site_spec})
    seed: int | None = field(default=0, metadata={"check": _seed})
    on_unverified: OnUnverified = field(
        default="restore",
        metadata=choice(("restore", "keep"), "'restore' puts back the weights from before the run; 'keep' keeps them."),
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.perturb_at not in (None, INPUT, AUTO) and self.clamp is not None:
            raise JiTSettingError(
                "clamp",
                f"clamps perturbed inputs, but `perturb_at={self.perturb_at!r}` perturbs a module's output: set"
                " `clamp=None` (or `perturb_at=None`).",
            )

    # -- presets ------------------------------------------------------------------------------------------------------
    @classmethod
    def plain(cls, **overrides: Any) -> JiTSettings:
        """Plain JiT: the reference's objective with its bugs fixed (the paper's ``N = 25``, raw logits, every
        parameter updated), without the improvements that are on by default (normalised and unitless ratio, the
        logit-norm penalty, the redistribution term, probe distillation). For comparisons with the reference and for
        studying the method."""
        base = {
            "n_perturbations": 25,
            "normalize_logits": False,
            "unitless_ratio": False,
            "logit_norm_penalty": 0.0,
            "redistribution": 0.0,
            "probe_distillation": 0.0,
            "update_scope": None,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def reference(cls, **overrides: Any) -> JiTSettings:
        """The authors' published behaviour where the library has a choice: plain JiT, one pass, the per-batch
        ``"sum"``, inputs clamped to the batch range and the model left in train mode (``lr`` is then their ``eta``).
        The gradient-accumulation bug is not reproduced: gradients are always zeroed at every step."""
        base = {
            "epochs": 1,
            "max_cost": None,
            "reduction": "sum",
            "clamp": "batch",
            "norm_policy": "train",
            "seed": None,
        }
        return cls.plain(**{**base, **overrides})

    # -- use ----------------------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> JiTSettings:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    def hparams(self) -> dict[str, Any]:
        """The serialisable fields (a callable perturbation is named), for logs, checkpoints and audit records."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("perturbation", "perturb_at"):
            if callable(out[name]):
                out[name] = getattr(out[name], "__qualname__", repr(out[name]))
        if isinstance(out["clamp"], tuple):
            out["clamp"] = list(out["clamp"])
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Routing keyword arguments to the declarations a run takes
# ----------------------------------------------------------------------------------------------------------------------
_DECLARATIONS: tuple[type, ...] = (JiTSettings, BatchFormat, GuardSettings)


def field_names(declaration: type) -> tuple[str, ...]:
    """The settings a declaration takes, in order."""
    return tuple(f.name for f in dataclasses.fields(declaration))


def _owners() -> dict[str, type]:
    owners: dict[str, type] = {}
    for declaration in _DECLARATIONS:
        for name in field_names(declaration):
            if name in owners:  # a keyword could not be routed: the names must be unique across the declarations
                raise TypeError(f"`{name}` is declared by both {owners[name].__name__} and {declaration.__name__}.")
            owners[name] = declaration
    return owners


#: Which declaration each setting belongs to.
_FIELD_OWNERS = _owners()


def split_settings(
    settings: JiTSettings | None,
    batch_format: BatchFormat | None,
    guard: bool | GuardSettings,
    kwargs: dict[str, Any],
) -> tuple[JiTSettings, BatchFormat, GuardSettings]:
    """Build the three declarations of a run from objects and/or keyword arguments.

    Each keyword goes to the declaration that has a field of its name and overrides the object given for it.

    Raises:
        JiTSettingError: for a keyword no declaration takes (with the closest name), or an invalid value.

    Example:
        >>> s, b, g = split_settings(None, None, True, {"sigma": 0.1, "lr": 0.01, "label_key": "y", "check_every": 2})
        >>> s.sigma, b.label_key, g.check_every
        (0.1, 'y', 2)
    """
    known = _FIELD_OWNERS
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise JiTSettingError(
            unknown[0], f"is not a JiT setting.{hint} See `JiTSettings`, `BatchFormat` and `GuardSettings`."
        )
    if not isinstance(guard, (bool, GuardSettings)):
        raise JiTSettingError("guard", f"must be True, False or a GuardSettings, got {type(guard).__name__}.")
    by_declaration: dict[type, dict[str, Any]] = {decl: {} for decl in _DECLARATIONS}
    for name, value in kwargs.items():
        by_declaration[known[name]][name] = value

    def build(decl: type, given: Any) -> Any:
        changes = by_declaration[decl]
        if given is None:
            required = [
                f.name
                for f in dataclasses.fields(decl)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            missing = [name for name in required if name not in changes]
            if missing:
                raise JiTSettingError(
                    missing[0], f"is required: give {', '.join(f'`{m}`' for m in missing)} (or a `{decl.__name__}`)."
                )
            return decl(**changes)
        if not isinstance(given, decl):
            raise JiTSettingError(decl.__name__, f"must be a {decl.__name__}, got {type(given).__name__}.")
        return dataclasses.replace(given, **changes) if changes else given

    base_guard = guard if isinstance(guard, GuardSettings) else GuardSettings(enabled=guard)
    return build(JiTSettings, settings), build(BatchFormat, batch_format), build(GuardSettings, base_guard)


# ----------------------------------------------------------------------------------------------------------------------
# YAML, through the parser the command line uses for its `--jit.*` group
# ----------------------------------------------------------------------------------------------------------------------
def settings_parser(group: str = "jit") -> Any:
    """A ``jsonargparse`` parser with one ``--<group>`` argument of type :class:`JiTSettings`: the same typed parsing
    (and the same checks) as LightningCLI applies to ``--jit.*``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{group}", type=JiTSettings)
    return parser


def dump_settings(settings: JiTSettings, group: str = "jit") -> str:
    """``settings`` as a YAML ``<group>:`` section that ``lightning-jit unlearn --config`` accepts.

    Raises:
        JiTSettingError: for a callable perturbation, which YAML cannot name.

    Example:
        >>> text = dump_settings(JiTSettings(sigma=0.2, lr=0.05))
        >>> text.splitlines()[:3]
        ['jit:', '  sigma: 0.2', '  lr: 0.05']
        >>> load_settings(text) == JiTSettings(sigma=0.2, lr=0.05)
        True
    """
    if callable(settings.perturbation):
        raise JiTSettingError("perturbation", "is a callable: register it with a name to write it to YAML.")
    if callable(settings.perturb_at):
        raise JiTSettingError("perturb_at", "is a callable: name the module by its dotted name to write it to YAML.")
    parser = settings_parser(group)
    return parser.dump(parser.parse_object({group: settings.hparams()}), skip_none=False)


def load_settings(text: str, group: str = "jit") -> JiTSettings:
    """The :class:`JiTSettings` of a YAML ``<group>:`` section (as :func:`dump_settings` writes it)."""
    parser = settings_parser(group)
    return parser.instantiate(parser.parse_string(text))[group]
