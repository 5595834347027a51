"""What rank 0 sends back to the launching process when a launcher runs the fit in other processes.

Lightning's ``ddp_spawn``, ``ddp_fork`` and ``ddp_notebook`` launchers (``_MultiProcessingLauncher``) run
``trainer.fit`` in new processes. When they join, the launching process receives rank 0's weights, its
``callback_metrics`` and a few Trainer attributes, but not the state of the callbacks it was given: those objects are
copies in the other processes, and no callback hook runs in the launching process after the fit. A callback whose
results users read after ``trainer.fit`` (an outcome, a ledger) therefore uses this module:

* in ``__init__`` (in the launching process), :func:`expect_from_rank_zero` registers the callback under a fresh token;
  the copies the launcher sends to the other processes carry the same token;
* in ``setup`` (in every launched process), :func:`send_to_launcher` makes the launcher's rank-0 process add the
  callback's :meth:`~FromRankZero.state_for_launcher` to the extra results it returns (Lightning's
  ``get_extra_results``, called after the fit, once the callback's state is final);
* when the launching process unpickles those results, :func:`_receive` hands each state to the registered callback
  (:meth:`~FromRankZero.load_from_rank_zero`).

Under the ``ddp`` launcher (``_SubprocessScriptLauncher``), under ``torchrun`` or SLURM, the launching process is rank
0 itself, so there is nothing to send: :func:`send_to_launcher` does nothing.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

#: The key of the launcher's extra results under which the callbacks' states travel.
EXTRA_RESULTS_KEY = "lightning_jit_from_rank_zero"

#: The callbacks of this process waiting for rank 0's state, by token (weakly: a callback no one holds is dropped).
_WAITING: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class FromRankZero(Protocol):
    """A callback whose state the launching process receives from rank 0."""

    launcher_token: str

    def state_for_launcher(self) -> Any:
        """The picklable state to send to the launching process (called in rank 0, after the fit)."""

    def load_from_rank_zero(self, state: Any) -> None:
        """Take the state rank 0 sent (called in the launching process)."""


def expect_from_rank_zero(callback: FromRankZero) -> str:
    """Register ``callback`` in this process to receive rank 0's state; returns its token (keep it on the callback).

    Example:
        >>> class Holder:
        ...     def load_from_rank_zero(self, state):
        ...         self.state = state
        >>> holder = Holder()
        >>> holder.launcher_token = expect_from_rank_zero(holder)
        >>> _receive({holder.launcher_token: {"outcome": "forgotten"}}) and holder.state
        {'outcome': 'forgotten'}
    """
    token = uuid.uuid4().hex
    _WAITING[token] = callback
    return token


def send_to_launcher(trainer: pl.Trainer, callback: FromRankZero) -> None:
    """Under a launcher that runs the fit in other processes, make rank 0 send ``callback``'s state back to the
    launching process with the fit's results. Call it from the callback's ``setup`` (every launched process calls it;
    only rank 0's launcher sends). Elsewhere it does nothing."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        return
    senders: list[FromRankZero] | None = getattr(launcher, "_lightning_jit_senders", None)
    if senders is None:
        senders = []
        original = launcher.get_extra_results

        def get_extra_results(trainer: pl.Trainer) -> dict[str, Any]:
            extra = original(trainer)
            extra[EXTRA_RESULTS_KEY] = _ToLaunchingProcess({c.launcher_token: c.state_for_launcher() for c in senders})
            return extra

        launcher.get_extra_results = get_extra_results  # this process's copy of the launcher, for this fit only
        launcher._lightning_jit_senders = senders
    if all(c is not callback for c in senders):
        senders.append(callback)


class _ToLaunchingProcess:
    """The callbacks' states, by token. Unpickled in the launching process, it delivers them (:func:`_receive`)."""

    def __init__(self, states: dict[str, Any]) -> None:
        self.states = states

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _receive, (self.states,)


def _receive(states: dict[str, Any]) -> bool:
    """Hand each state to the callback registered under its token in this process; returns whether all found one."""
    delivered = True
    for token, state in states.items():
        callback = _WAITING.get(token)
        if callback is None:
            delivered = False
            continue
        try:
            callback.load_from_rank_zero(state)
        except Exception as err:  # never break the launcher's own results over a callback's state
            delivered = False
            rank_zero_warn(f"{type(callback).__name__} could not take rank 0's state: {type(err).__name__}: {err}")
    return delivered
