"""The stages of a JiT run, each owning its own state; :mod:`lightning_jit.core.engine` composes them.

* :mod:`.collectives`: how the processes split batches and agree, and the helpers every stage shares;
* :mod:`.calibration`: the forget-set survey and what the run decides from it (task, sigma, scope, step size);
* :mod:`.held`: the samples a run holds besides the forget set (frozen original, probes, retain set, siblings);
* :mod:`.loss`: the loss of one step, with the DDP scaling;
* :mod:`.update`: back-propagation and the optimizer step, skipped when not finite;
* :mod:`.divergence`: skipped and divergent steps;
* :mod:`.stopping`: the stopping rule; :mod:`.budget`: the cost bound;
* :mod:`.rollback`: the collapse guard's checks, rollback and step halving;
* :mod:`.verification`: measuring the forget set, the held-out test's scores, the sibling check and the outcome;
* :mod:`.sample_request`: a sample request's settlement and its matching update;
* :mod:`.resume`: the versions of a run's state.
"""
