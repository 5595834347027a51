"""Where JiT's noise goes: the perturbation site, the one extension point for the place of the perturbation.

JiT estimates how much the model's output moves when a forget sample moves a little. *Where* the sample moves is the
site's business, and nothing else in the package decides it:

* :class:`InputSite` (the paper's; ``perturb_at="input"``): the noise is added to the input. It needs
  floating-point inputs.
* :class:`AutoSite` (the default, ``perturb_at=None`` or ``"auto"``): the input site for floating-point inputs, and
  for integer inputs the module site at the model's first ``nn.Embedding``, announced when it is picked.
* :class:`ModuleSite` (``JiTSettings(perturb_at="embedding")``): the noise is added to the output of one module
  through a forward hook, which is removed after every perturbed pass, also when the pass raises. This is how models
  over token ids (or categorical features) are unlearned: ``perturb_at`` names their embedding, and the smoothing
  argument holds in the continuous space it computes.

A site does three things for the rest of the package:

* it **applies the noise** (:meth:`PerturbationSite.perturbing`) and reports the realised change's norm per sample,
  the ratio's denominator, in its own space;
* it reports the **scale** and the **dimension** of its space (:meth:`PerturbationSite.observe`,
  :meth:`PerturbationSite.dimension`): ``sigma`` is calibrated from that space's statistics and the unitless ratio
  multiplies by ``sigma * sqrt(dimension)``;
* it lets **probes live in its space** (:meth:`PerturbationSite.space`, :meth:`PerturbationSite.run`): the class
  probes and the guard's noise probes are points of the site's space, and :meth:`~PerturbationSite.run` evaluates the
  model from such a point.

A module site evaluates the model from a point ``z`` of its space by running the model on a *carrier* input (the first
forget input it was given, repeated) with the module's output replaced by ``z``. Whatever else the model reads from its
input (positions, a padding mask computed from the ids) is then the carrier's.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    >>> site = site_for("0", net)
    >>> x = torch.tensor([[1, 2], [3, 4]])
    >>> site.admit(x)
    >>> with site.perturbing(x, lambda like: torch.ones_like(like)) as p:
    ...     out = net(p.inputs)
    >>> torch.allclose(p.change(), torch.full((2,), 6**0.5)), len(net[0]._forward_hooks)  # ||ones(2, 3)||; no hook
    (True, 0)
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_jit.core.batch import ModelInput, batch_size, concat, describe_input, detached, index, map_tensors
from lightning_jit.core.errors import JiTInputError, JiTSettingError

#: What ``perturb_at`` takes: ``None`` or ``"auto"`` (the input, or the first ``nn.Embedding`` for integer inputs),
#: ``"input"`` (the input), a module's dotted name in the model, or ``fn(model) -> module``.
SiteSpec = str | Callable[[nn.Module], nn.Module] | None
#: ``noise(like) -> Tensor``: the noise to add to ``like`` (the perturbed rows in the site's space), shaped like it.
NoiseRows = Callable[[Tensor], Tensor]

#: The name ``perturb_at`` gives the input site explicitly; no module can be named so.
INPUT = "input"
#: ``perturb_at="auto"`` (what ``None`` does): the input for floating-point inputs, the first ``nn.Embedding``'s output
#: for integer ones. No module can be named so.
AUTO = "auto"
_DOTTED = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def check_site_spec(name: str, value: Any) -> Any:
    """The check of the ``perturb_at`` setting: ``None``, a dotted module name, or a callable."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and _DOTTED.match(value):
        return value
    raise JiTSettingError(
        name,
        f"must be None or 'auto' (the input, or the first nn.Embedding for integer inputs), 'input' (the input), a"
        f" module's dotted name in the model such as 'embedding' or"
        f" 'encoder.embeddings', or a callable `fn(model) -> module`, got {value!r}.",
    )


class Perturbed:
    """One perturbed pass in progress: :attr:`inputs` go to the model; :meth:`change` is, after the pass, the norm of
    the change the noise made to each row, in the site's space (float32), the ratio's denominator."""

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs
        self._change: Tensor | None = None

    def change(self) -> Tensor:
        if self._change is None:
            raise JiTInputError(
                "The perturbed pass never reached the perturbation site: the module `perturb_at` names did not run"
                " in the model's forward pass. Name a module that every forward pass runs."
            )
        return self._change


def _change_norm(before: Tensor, after: Tensor) -> Tensor:
    return (after.float() - before.float()).flatten(1).norm(dim=1)


class PerturbationSite:
    """Where the noise goes. Subclass it (as :class:`InputSite` and :class:`ModuleSite` do) for a new place.

    Attributes:
        name: How the run's record names the site (``"input"`` or the module's dotted name).
    """

    name: str = "input"
    #: Whether the noise goes to the input itself (then a labelled batch's survey needs no forward pass).
    perturbs_input: bool = True

    def admit(self, x: ModelInput) -> None:
        """Check a forget batch's input ``x`` (one tensor, or a dict or tuple of tensors) for this site, and remember
        what the site needs from it.

        Raises:
            JiTInputError: for an input the site cannot perturb.
        """

    def perturbing(
        self, rows: ModelInput, noise: NoiseRows, *, clean_first: bool = False, bounds: Any = None
    ) -> contextlib.AbstractContextManager[Perturbed]:
        """A context in which ``forward(p.inputs)`` is the model on ``rows`` with ``noise`` added at the site.

        Args:
            rows: The inputs of the pass (a module site takes a dict or tuple input too: it only joins it).
            noise: Called with the rows of the site's space that the noise goes to; returns the noise, shaped alike.
            clean_first: The pass takes ``rows`` twice: a clean copy first, then the perturbed one (so that one pass
                evaluates both, as the logit-norm penalty's reference does); ``noise`` still sees ``len(rows)`` rows.
            bounds: ``(low, high)`` to clamp the perturbed rows to (the input site only).
        """
        raise NotImplementedError

    def observe(self) -> contextlib.AbstractContextManager[Callable[[Tensor], Tensor]]:
        """A context in which the passes the model runs are watched: it yields ``take(x)``, which returns the last
        pass's value in the site's space for the inputs ``x`` (for the survey's statistics)."""
        raise NotImplementedError

    def space(self, forward: Callable[[Tensor], Any], x: Tensor) -> Tensor:
        """The point of the site's space that the inputs ``x`` reach (with autograd as the caller has it)."""
        raise NotImplementedError

    def run(self, forward: Callable[[Tensor], Any], z: Tensor) -> Any:
        """The model's output from ``z``, points of the site's space (e.g. class probes)."""
        raise NotImplementedError

    def dimension(self, x: Tensor) -> int:
        """Elements per sample in the site's space (``d`` in ``E||xi|| = sigma * sqrt(d)``), for the inputs ``x``."""
        raise NotImplementedError

    def follow(self, other: nn.Module) -> None:
        """Act on ``other`` too, a copy of the model the site was made for (a run's ``original=``, whose frozen passes
        must be perturbed and observed as the model's are). The input site needs nothing."""


class InputSite(PerturbationSite):
    """The noise is added to the (floating-point) input: the paper's site and the default.

    Args:
        model: The model, only to name its embedding in the error for integer inputs.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> with InputSite().perturbing(x, lambda like: torch.ones_like(like)) as p:
        ...     pass
        >>> p.inputs.tolist(), torch.allclose(p.change(), torch.full((2,), 3**0.5))
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], True)
    """

    name = "input"

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def admit(self, x: ModelInput) -> None:
        if isinstance(x, Tensor) and torch.is_floating_point(x):
            return
        embeddings = [n for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)] if self.model else []
        example = embeddings[0] if embeddings else "embedding"
        found = f" The model's first `nn.Embedding` is `{example}`." if embeddings else ""
        if not isinstance(x, Tensor):
            raise JiTInputError(
                f"The forget batch input is a {type(x).__name__} ({describe_input(x)}), and JiT perturbs the input by"
                " default, which needs one floating-point tensor. For a model that takes several fields (token ids"
                " with an attention mask, a dict or tuple input) set `perturb_at` to the module whose output the"
                f" noise goes to, e.g. `perturb_at={example!r}` (`--jit.perturb_at={example}`); the other fields then"
                f" reach the model unchanged.{found} Or set `input_key` / `batch_to_input` so that the input is one"
                " floating-point tensor."
            )
        raise JiTInputError(
            f"The forget batch input has dtype {x.dtype}, and JiT perturbs the input by default, which needs floating"
            f" point inputs. For token ids (or other categorical inputs) set `perturb_at` to the module whose output"
            f" the noise goes to, e.g. `perturb_at={example!r}` (`--jit.perturb_at={example}`).{found} Converting the"
            " ids to floats would only break the embedding."
        )

    @contextlib.contextmanager
    def perturbing(
        self, rows: Tensor, noise: NoiseRows, *, clean_first: bool = False, bounds: Any = None
    ) -> Iterator[Perturbed]:
        perturbed = rows + noise(rows).to(rows.dtype)
        if bounds is not None:
            perturbed = perturbed.clamp(bounds[0], bounds[1])
        p = Perturbed(torch.cat([rows, perturbed]) if clean_first else perturbed)
        p._change = _change_norm(rows, perturbed)
        yield p

    @contextlib.contextmanager
    def observe(self) -> Iterator[Callable[[Tensor], Tensor]]:
        yield lambda x: x

    def space(self, forward: Callable[[Tensor], Any], x: Tensor) -> Tensor:
        return x

    def run(self, forward: Callable[[Tensor], Any], z: Tensor) -> Any:
        return forward(z)

    def dimension(self, x: Tensor) -> int:
        return int(x[0].numel())


class ModuleSite(PerturbationSite):
    """The noise is added to the output of one module of the model, through a forward hook.

    Args:
        model: The model.
        target: The module's dotted name in ``model`` (``model.get_submodule``), or ``fn(model) -> module``.

    Raises:
        JiTSettingError: naming ``perturb_at``, when ``target`` names no module of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
        >>> site = ModuleSite(net, "0")
        >>> x = torch.tensor([[1, 2]])
        >>> site.admit(x)
        >>> z = site.space(net, x)  # the embedding's output
        >>> torch.equal(site.run(net, z), net(x)), site.dimension(x)
        (True, 6)
    """

    perturbs_input = False

    def __init__(self, model: nn.Module, target: str | Callable[[nn.Module], nn.Module]) -> None:
        self.module = _resolve(model, target)
        self.name = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
        self._path = next(n for n, m in model.named_modules() if m is self.module)
        self._modules = [self.module]  # the module, and the same module of the copies the site follows
        self.carrier: ModelInput = None
        self._dim: int | None = None

    def admit(self, x: ModelInput) -> None:
        if self.carrier is None:
            self.carrier = detached(index(x, slice(0, 1)), clone=True)

    @contextlib.contextmanager
    def _hook(self, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """``fn`` replaces the module's output in the passes run inside; the hook is removed on leaving, however."""
        calls = [0]

        def hook(module: nn.Module, args: Any, output: Any) -> Tensor:
            calls[0] += 1
            if calls[0] > 1:
                raise JiTInputError(
                    f"`perturb_at={self.name!r}` names a module that runs more than once in one forward pass; JiT"
                    " perturbs one place per sample. Name a module that runs once (e.g. the embedding itself)."
                )
            if not isinstance(output, Tensor) or not torch.is_floating_point(output) or output.dim() < 2:
                what = f"a {output.dtype} tensor" if isinstance(output, Tensor) else type(output).__name__
                raise JiTInputError(
                    f"`perturb_at={self.name!r}` names a module whose output is {what}; JiT adds noise to a"
                    " floating-point (batch, ...) tensor. Name the module whose output is the embedding."
                )
            self._dim = int(output[0].numel())
            return fn(output)

        handles = [module.register_forward_hook(hook) for module in self._modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def perturbing(
        self, rows: Tensor, noise: NoiseRows, *, clean_first: bool = False, bounds: Any = None
    ) -> Iterator[Perturbed]:
        if bounds is not None:
            raise JiTSettingError("clamp", f"clamps inputs; with `perturb_at={self.name!r}` it must be None.")
        n = batch_size(rows)
        p = Perturbed(concat([rows, rows]) if clean_first else rows)
        rows_in = 2 * n if clean_first else n

        def add(output: Tensor) -> Tensor:
            if output.shape[0] != rows_in:
                raise JiTInputError(
                    f"The output of `perturb_at={self.name!r}` has {output.shape[0]} rows for a batch of"
                    f" {rows_in}: name a module whose output has the batch first."
                )
            part = output[n:] if clean_first else output
            perturbed = part + noise(part).to(output.dtype)
            p._change = _change_norm(part, perturbed)
            return torch.cat([output[:n], perturbed]) if clean_first else perturbed

        with self._hook(add):
            yield p

    @contextlib.contextmanager
    def observe(self) -> Iterator[Callable[[Tensor], Tensor]]:
        seen: list[Tensor] = []

        def keep(output: Tensor) -> Tensor:
            seen.append(output.detach())
            return output

        def take(x: Tensor) -> Tensor:
            if not seen:
                raise JiTInputError(f"`perturb_at={self.name!r}` names a module the forward pass did not run.")
            return seen.pop()

        handles = [module.register_forward_hook(lambda module, args, output: keep(output)) for module in self._modules]
        try:
            yield take
        finally:
            for handle in handles:
                handle.remove()

    def space(self, forward: Callable[[Tensor], Any], x: Tensor) -> Tensor:
        self.admit(x)
        seen: list[Tensor] = []

        def keep(output: Tensor) -> Tensor:
            seen.append(output)
            return output

        with self._hook(keep):
            forward(x)
        if not seen:
            raise JiTInputError(f"`perturb_at={self.name!r}` names a module the forward pass did not run.")
        return seen[0]

    def run(self, forward: Callable[[Tensor], Any], z: Tensor) -> Any:
        if self.carrier is None:
            raise RuntimeError("A module site runs probes on a forget input: call `admit(x)` first.")
        carrier = map_tensors(
            lambda t: t.to(z.device).expand(z.shape[0], *t.shape[1:]) if t.dim() >= 1 else t.to(z.device),
            self.carrier,
        )

        def replace(output: Tensor) -> Tensor:
            if output.shape[1:] != z.shape[1:]:
                raise JiTInputError(
                    f"Probes of shape {tuple(z.shape[1:])} do not fit the output of `perturb_at={self.name!r}`,"
                    f" {tuple(output.shape[1:])}."
                )
            return z.to(output.dtype)

        with self._hook(replace):
            return forward(carrier)

    def follow(self, other: nn.Module) -> None:
        try:
            module = other.get_submodule(self._path)
        except AttributeError:
            raise JiTSettingError(
                "original",
                f"has no module {self._path!r}, the module `perturb_at={self.name!r}` names in the model: give a copy"
                " of the model from before the run.",
            ) from None
        if not any(module is m for m in self._modules):
            self._modules.append(module)

    def dimension(self, x: Tensor) -> int:
        if self._dim is None:
            raise RuntimeError(f"The dimension of `perturb_at={self.name!r}` is known after its first pass.")
        return self._dim


def first_embedding(model: nn.Module) -> str | None:
    """The dotted name of ``model``'s first ``nn.Embedding``, in the order the model registers its modules (a token
    model's token embedding: ``embed`` of a small encoder, ``bert.embeddings.word_embeddings`` of a BERT), or ``None``.

    Example:
        >>> first_embedding(nn.Sequential(nn.Linear(2, 2), nn.Embedding(4, 2))), first_embedding(nn.Linear(2, 2))
        ('1', None)
    """
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Embedding)), None)


class AutoSite(PerturbationSite):
    """The default site (``perturb_at=None``, or ``"auto"``): picked from the first forget input it sees.
    Floating-point inputs take the input site (the paper's JiT, bit for bit); integer inputs (token ids, categorical
    features) take the output of the model's first ``nn.Embedding`` (:func:`first_embedding`), and the pick is
    announced once. A model over integer inputs without an embedding gets the error that names ``perturb_at``.

    Args:
        model: The model.
        announce: Where the pick is announced (the fronts pass ``rank_zero_info``; default: the ``lightning_jit``
            logger at INFO level).

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
        >>> site = AutoSite(net)
        >>> site.admit(torch.tensor([[1, 2]]))
        >>> site.name, type(site.picked).__name__, site.perturbs_input
        ('0', 'ModuleSite', False)
    """

    def __init__(self, model: nn.Module, announce: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.announce = announce if announce is not None else logging.getLogger("lightning_jit").info
        self.picked: PerturbationSite | None = None
        self._followed: list[nn.Module] = []

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.picked.name if self.picked is not None else AUTO

    @property
    def perturbs_input(self) -> bool:  # type: ignore[override]
        return self._site().perturbs_input

    def _site(self) -> PerturbationSite:
        if self.picked is None:
            raise RuntimeError("`perturb_at='auto'` picks its site from the first forget input: call `admit(x)` first.")
        return self.picked

    def admit(self, x: ModelInput) -> None:
        if self.picked is None:
            one_float_tensor = isinstance(x, Tensor) and torch.is_floating_point(x)
            embedding = None if one_float_tensor else first_embedding(self.model)
            if embedding is None:
                site: PerturbationSite = InputSite(self.model)
                site.admit(x)  # integer or dict inputs without an embedding: the error that names `perturb_at`
            else:
                site = ModuleSite(self.model, embedding)
                what = f"{x.dtype} ids" if isinstance(x, Tensor) else describe_input(x)
                self.announce(
                    f"JiT: the forget inputs are {what}, so the noise goes to the output of the model's first"
                    f" `nn.Embedding`, `{embedding}` (perturb_at='auto', the default). Name another module with"
                    f" `perturb_at` if that is not the token embedding."
                )
            for other in self._followed:
                site.follow(other)
            self.picked = site
        self.picked.admit(x)

    def follow(self, other: nn.Module) -> None:
        if self.picked is not None:
            self.picked.follow(other)
        else:
            self._followed.append(other)

    def perturbing(
        self, rows: Tensor, noise: NoiseRows, *, clean_first: bool = False, bounds: Any = None
    ) -> contextlib.AbstractContextManager[Perturbed]:
        return self._site().perturbing(rows, noise, clean_first=clean_first, bounds=bounds)

    def observe(self) -> contextlib.AbstractContextManager[Callable[[Tensor], Tensor]]:
        return self._site().observe()

    def space(self, forward: Callable[[Tensor], Any], x: Tensor) -> Tensor:
        self.admit(x)
        return self._site().space(forward, x)

    def run(self, forward: Callable[[Tensor], Any], z: Tensor) -> Any:
        return self._site().run(forward, z)

    def dimension(self, x: Tensor) -> int:
        return self._site().dimension(x)


def _resolve(model: nn.Module, target: str | Callable[[nn.Module], nn.Module]) -> nn.Module:
    if isinstance(target, str):
        try:
            return model.get_submodule(target)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(target, names, n=1)
            embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            hint += f" The model's embeddings: {embeddings}." if embeddings else ""
            raise JiTSettingError("perturb_at", f"names no module of the model: {target!r}.{hint}") from None
    module = target(model)
    if not isinstance(module, nn.Module) or not any(module is m for m in model.modules()):
        raise JiTSettingError(
            "perturb_at", f"is a callable that returned {type(module).__name__}, not a module of the model."
        )
    return module


def site_for(spec: SiteSpec, model: nn.Module, announce: Callable[[str], None] | None = None) -> PerturbationSite:
    """The site a ``perturb_at`` setting names, on ``model``: :class:`AutoSite` for ``None`` (the default) or
    ``"auto"`` (the input for floating-point inputs, the first ``nn.Embedding``'s output for integer ones),
    :class:`InputSite` for ``"input"`` (the input, named explicitly), else :class:`ModuleSite`. A
    :class:`PerturbationSite` given as is is used as it is. ``announce`` is where :class:`AutoSite` says what it
    picked.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Flatten())
        >>> type(site_for(None, net)).__name__, type(site_for("input", net)).__name__, site_for("0", net).name
        ('AutoSite', 'InputSite', '0')
    """
    if isinstance(spec, PerturbationSite):
        return spec
    if spec == INPUT:
        return InputSite(model)
    if spec is None or spec == AUTO:
        return AutoSite(model, announce)
    check_site_spec("perturb_at", spec)
    return ModuleSite(model, spec)


__all__ = [
    "AUTO",
    "INPUT",
    "AutoSite",
    "InputSite",
    "ModuleSite",
    "PerturbationSite",
    "Perturbed",
    "SiteSpec",
    "check_site_spec",
    "first_embedding",
    "site_for",
]
