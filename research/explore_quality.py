"""Exploration (issue 7): which zero-shot change moves JiT's forget/retain trade-off on scikit-learn's digits.

This is the screening record behind the README's list of what did and did not help; results are summarised in
``docs/quality_exploration.md``. The one variant kept (``lognorm10``) lives in the library as
:func:`lightning_jit.objective.logit_norm_penalty` (``logit_norm_penalty=10``), and ``bench_quality.py`` measures it
through ``JiTUnlearning``; this script keeps its own copies of the variants so that each can be switched on alone.

For each job ``(variant, seed, model, scenario)`` the script takes the original classifier (trained once per
seed/model/label-set and cached in memory and on disk under ``OUT/cache``), then runs a plain, hand-written
unlearning loop: SGD over the forget set in unshuffled batches of 32, up to 30 epochs, whose loss is the library's
:func:`lightning_jit.objective.jit_objective` plus the variant's additions. No variant sees retain data.

After every step it records the forget-set accuracy, the forget-class TEST accuracy, the retained-class TEST accuracy
and a few diagnostics (the library's pre-update forget-accuracy window, the share of retained test samples predicted
as the most frequent class, logit norms), so that stopping rules can be compared post hoc on the same trajectory.

Reported per variant/model/scenario (mean ± std over seeds):

* oracle frontier: retained test accuracy at the first step where the forget-class test accuracy is <= 5%
  (sub-class: where the forget-set accuracy is <= the retrained model's + 5);
* the figures at the stop chosen by forget-set-only stopping rules (``win15`` is the library's rule:
  forget accuracy over the last >= 64 forget samples, measured before each update, <= 15%).

Random forgetting (5%) is reported after epoch 1 (the benchmark's setting) and after the last epoch run.

Run: ``python benchmarks/explore_quality.py --variants baseline,anchor1 --models CNN --scenarios full3,full8
--seeds 0 --workers 1 --out benchmarks/explore_out/screen``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_jit import objective as jit_obj  # noqa: E402
from lightning_jit.data import (  # noqa: E402
    DigitsCNN,
    class_mask,
    load_digits_split,
    random_forget_mask,
    train_classifier,
)
from lightning_jit.objective import jit_objective  # noqa: E402
from lightning_jit.probes import synthesize_class_probes  # noqa: E402
from lightning_jit.step import ForgetAccuracyWindow  # noqa: E402

TRAIN_EPOCHS = 15
BATCH = 32
ORACLE_FORGET_TEST = 5.0  # full-class: forget-class test accuracy <= 5%
SUBCLASS_MARGIN = 5.0  # sub-class: forget-set accuracy <= retrained + 5

#: Demo settings (lightning_jit.demo.DEMO_JIT_SETTINGS) plus the defaults of every addition.
BASE: dict[str, Any] = {
    "sigma": 0.1,
    "lr": 0.03,
    "n": 25,
    "epochs": 30,
    "normalize_logits": True,
    "center_logits": False,
    "momentum": 0.0,
    # additions (all off by default)
    "anchor": 0.0,  # lam * ||theta - theta0||^2
    "mask": None,  # None | "argmax" | float tau: drop samples whose p(label) < tau (argmax: predicted != label)
    "noise": "gauss",  # "gauss" | "anti" (antithetic pairs) | "orth" (orthogonalised Gaussian directions)
    "sigma_mode": "global",  # "global" | "pixel": sigma * per-pixel std of the forget inputs
    "lr_decay": 1.0,  # lr multiplied by this after every epoch
    "backtrack": False,  # halve lr (and undo the step) when the step raises the batch objective
    "lognorm": 0.0,  # lam * mean relu(||f(x~)|| / ||f0(x~)|| - 1)^2 on forget inputs and noisy copies
    "lognorm_sigma": 0.5,
    "lognorm_kind": "norm",  # "norm": one-sided ratio of norms; "norm2": two-sided; "max": growth of the max logit
    "lognorm_copies": 1,  # noisy copies of each forget input in the penalty
    "kd_noise": 0.0,  # lam * KL(f0(u) || f(u)) on u ~ N(0, 1) inputs (data-free anchor)
    "probe_kd": 0.0,  # lam * KL(f0(p) || f(p)) on class probes p synthesised from the original model
    "probe_classes": "others",  # "others": classes absent from the forget labels; "all": every class
    "probe_per_class": 16,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "anchor0.1": {"anchor": 0.1},
    "anchor1": {"anchor": 1.0},
    "anchor10": {"anchor": 10.0},
    "mask_argmax": {"mask": "argmax"},
    "mask_p0.2": {"mask": 0.2},
    "mask_p0.5": {"mask": 0.5},
    "anti24": {"noise": "anti", "n": 24},
    "orth25": {"noise": "orth"},
    "anti8": {"noise": "anti", "n": 8},
    "gauss8": {"n": 8},
    "decay0.85": {"lr_decay": 0.85},
    "backtrack": {"backtrack": True},
    "lr0.01": {"lr": 0.01},
    "sigma0.3": {"sigma": 0.3},
    "sigma0.03": {"sigma": 0.03},
    "pixsig0.1": {"sigma_mode": "pixel", "sigma": 0.1},
    "pixsig0.3": {"sigma_mode": "pixel", "sigma": 0.3},
    "lognorm1": {"lognorm": 1.0},
    "lognorm10": {"lognorm": 10.0},
    "lognorm3": {"lognorm": 3.0},
    "lognorm30": {"lognorm": 30.0},
    "lognorm100": {"lognorm": 100.0},
    "lognorm10_s0": {"lognorm": 10.0, "lognorm_sigma": 0.0},
    "lognorm10_s1": {"lognorm": 10.0, "lognorm_sigma": 1.0},
    "lognorm10_c4": {"lognorm": 10.0, "lognorm_copies": 4},
    "lognorm10_2s": {"lognorm": 10.0, "lognorm_kind": "norm2"},
    "lognorm10_max": {"lognorm": 10.0, "lognorm_kind": "max"},
    "lognorm10_pix": {"lognorm": 10.0, "sigma_mode": "pixel", "sigma": 0.1},
    "lognorm10_lr0.1": {"lognorm": 10.0, "lr": 0.1},
    "lognorm30_lr0.1": {"lognorm": 30.0, "lr": 0.1},
    "anchor0.3": {"anchor": 0.3},
    "lognorm10_s0.75": {"lognorm": 10.0, "lognorm_sigma": 0.75},
    "lognorm10_mask0.2": {"lognorm": 10.0, "mask": 0.2},
    "lognorm10_anchor0.1": {"lognorm": 10.0, "anchor": 0.1},
    "lognorm10_anti8": {"lognorm": 10.0, "noise": "anti", "n": 8},
    "kdnoise1": {"kd_noise": 1.0},
    "lognorm10_s1_pk0.3": {"lognorm": 10.0, "lognorm_sigma": 1.0, "probe_kd": 0.3},
    "lognorm10_s1_pk1": {"lognorm": 10.0, "lognorm_sigma": 1.0, "probe_kd": 1.0},
    "lognorm10_s1_pk3": {"lognorm": 10.0, "lognorm_sigma": 1.0, "probe_kd": 3.0},
    "lognorm10_s1_pkall1": {"lognorm": 10.0, "lognorm_sigma": 1.0, "probe_kd": 1.0, "probe_classes": "all"},
    "lognorm10_pk1": {"lognorm": 10.0, "probe_kd": 1.0},
    "lognorm10_pk3": {"lognorm": 10.0, "probe_kd": 3.0},
    "lognorm10_pkall1": {"lognorm": 10.0, "probe_kd": 1.0, "probe_classes": "all"},
    "lognorm10_pkall3": {"lognorm": 10.0, "probe_kd": 3.0, "probe_classes": "all"},
    "pk1": {"probe_kd": 1.0},
    "raw": {"normalize_logits": False},
    "momentum0.9": {"momentum": 0.9, "lr": 0.003},
}

SCENARIOS = {
    "full3": ("full-class 3", "full", 3),
    "full4": ("full-class 4", "full", 4),
    "full8": ("full-class 8", "full", 8),
    "sub3": ("sub-class 3", "sub", 3),
    "rand5": ("random 5%", "random", None),
}
MODELS = {"CNN": False, "CNN+BN": True}

#: Forget-set-only stopping rules evaluated post hoc on each trajectory: (name, field, threshold).
RULES = (
    ("win15", "window_acc", 15.0),  # the library's rule (target_forget_accuracy=15)
    ("win5", "window_acc", 5.0),
    ("win0", "window_acc", 0.0),
    ("set5", "forget_set_acc", 5.0),  # full forget-set pass after the update (one extra forward of the forget set)
    ("setconf0.1", "forget_set_conf", 0.1),  # mean p(label) on the forget set <= 0.1
)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    torch.set_num_threads(1)
    _quiet()


# ----------------------------------------------------------------------------------------------------------------
# Data, originals (cached), retrained references
# ----------------------------------------------------------------------------------------------------------------
_SPLITS: dict[bool, Any] = {}
_MODELS: dict[tuple, nn.Module] = {}


def split(coarse: bool):
    if coarse not in _SPLITS:
        _SPLITS[coarse] = load_digits_split(coarse=coarse)
    return _SPLITS[coarse]


def scenario_masks(key: str) -> tuple[bool, Tensor, Tensor | None]:
    """(coarse, forget_train mask, forget_test mask or None)."""
    _, kind, c = SCENARIOS[key]
    fine = split(False)
    if kind == "full":
        return False, class_mask(fine.y_train, [c]), class_mask(fine.y_test, [c])
    if kind == "sub":
        return True, class_mask(fine.y_train, [c]), class_mask(fine.y_test, [c])
    return False, random_forget_mask(len(fine.y_train), 0.05, seed=0), None


def get_model(cache_dir: Path, seed: int, model: str, coarse: bool, retrained_for: str | None = None) -> nn.Module:
    """The original (or the model retrained without ``retrained_for``'s forget set), cached in memory and on disk."""
    key = (seed, model, coarse, retrained_for)
    if key in _MODELS:
        return _MODELS[key]
    sp = split(coarse)
    net = DigitsCNN(num_classes=sp.num_classes, batchnorm=MODELS[model])
    kind = "retrained-" + retrained_for if retrained_for else "original"
    name = f"{kind}_{model}_{'coarse' if coarse else 'fine'}_s{seed}.pt"
    path = cache_dir / name
    if path.exists():
        net.load_state_dict(torch.load(path))
        net.eval()
    else:
        x, y = sp.x_train, sp.y_train
        if retrained_for is not None:
            keep = ~scenario_masks(retrained_for)[1]
            x, y = x[keep], y[keep]
        net = train_classifier(
            functools.partial(DigitsCNN, sp.num_classes, batchnorm=MODELS[model]), x, y, epochs=TRAIN_EPOCHS, seed=seed
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)
    for p in net.parameters():
        p.requires_grad_(True)
    _MODELS[key] = net.eval()
    return net


@torch.no_grad()
def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    if len(y) == 0:
        return float("nan")
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------------------------------------------
# Noise variants, by swapping the NoiseStream class that jit_objective instantiates (in this process only)
# ----------------------------------------------------------------------------------------------------------------
class _VariantNoise(jit_obj.NoiseStream):
    mode = "gauss"
    scale: Tensor | None = None
    n = 25

    def __init__(self, x, sigma, generator=None, keys=None, seed=0, epoch=0) -> None:
        super().__init__(x, sigma, generator=generator, keys=keys, seed=seed, epoch=epoch)
        self._j = 0
        self._prev: Tensor | None = None
        if self.mode == "orth":
            b, d = self.shape[0], int(np.prod(self.shape[1:]))
            g = torch.randn(b, d, self.n, generator=generator, dtype=self.dtype)
            q, _ = torch.linalg.qr(g)  # (b, d, n) orthonormal directions per sample (n <= d)
            self._bank = q * g.norm(dim=1, keepdim=True)  # keep the Gaussian norms (chi-distributed)

    def next(self) -> Tensor:
        if self.mode == "anti":
            if self._j % 2 == 0:
                self._prev = super().next()
                z = self._prev
            else:
                z = -self._prev
        elif self.mode == "orth":
            z = self._bank[:, :, self._j].reshape(self.shape).to(self.device) * self.sigma
        else:
            z = super().next()
        self._j += 1
        return z * self.scale if self.scale is not None else z


@contextlib.contextmanager
def noise_variant(mode: str, n: int, scale: Tensor | None) -> Iterator[None]:
    if mode == "gauss" and scale is None:
        yield
        return
    cls = type("_Configured", (_VariantNoise,), {"mode": mode, "n": n, "scale": scale})
    saved = jit_obj.NoiseStream
    jit_obj.NoiseStream = cls
    try:
        yield
    finally:
        jit_obj.NoiseStream = saved


# ----------------------------------------------------------------------------------------------------------------
# The unlearning loop
# ----------------------------------------------------------------------------------------------------------------
def unlearn(job: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    v = {**BASE, **VARIANTS[job["variant"]]}
    seed, model_name, sc = job["seed"], job["model"], job["scenario"]
    coarse, f_tr, f_te = scenario_masks(sc)
    kind = SCENARIOS[sc][1]
    sp = split(coarse)
    original = get_model(cache_dir, seed, model_name, coarse)
    retrained_forget = None
    if kind in ("sub", "random") or job.get("retrain_all"):
        retrained = get_model(cache_dir, seed, model_name, coarse, retrained_for=sc)
        retrained_forget = _acc(retrained, sp.x_train[f_tr], sp.y_train[f_tr])
        retrained_retained = (
            _acc(retrained, sp.x_test[~f_te], sp.y_test[~f_te])
            if f_te is not None
            else _acc(retrained, sp.x_test, sp.y_test)
        )
    else:
        retrained_retained = None
    xf, yf = sp.x_train[f_tr], sp.y_train[f_tr]
    if f_te is not None:
        xft, yft = sp.x_test[f_te], sp.y_test[f_te]
        xrt, yrt = sp.x_test[~f_te], sp.y_test[~f_te]
    else:
        xft, yft = sp.x_test[:0], sp.y_test[:0]
        xrt, yrt = sp.x_test, sp.y_test
    max_epochs = job.get("random_epochs", 3) if kind == "random" else v["epochs"]

    model = copy.deepcopy(original).eval()  # norm_policy "eval": BatchNorm keeps its running statistics
    frozen = copy.deepcopy(original).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=v["lr"], momentum=v["momentum"])
    gen = torch.Generator().manual_seed(seed)
    aux_gen = torch.Generator().manual_seed(10_000 + seed)
    scale = None
    sigma = float(v["sigma"])
    if v["sigma_mode"] == "pixel":
        scale = xf.std(dim=0, keepdim=True)  # (1, 1, 8, 8), zero on always-blank pixels
        scale = scale / xf.std()  # sigma is in units of the forget inputs' global std
    window = ForgetAccuracyWindow()
    with torch.no_grad():
        orig_norm_rt = float(frozen(xrt).norm(dim=1).mean())
    probes = probe_target = None
    if v["probe_kd"]:
        n_classes = int(frozen(xf[:1]).shape[1])
        forgotten = set(yf.tolist())
        classes = [c for c in range(n_classes) if v["probe_classes"] == "all" or c not in forgotten]
        probes, _ = synthesize_class_probes(frozen, classes, like=xf, per_class=v["probe_per_class"], seed=seed)
        with torch.no_grad():
            probe_target = frozen(probes).log_softmax(1)
    # Sub-class: the test digits that share the forgotten digit's coarse label (digit 2 for digit 3).
    sibling = None
    if kind == "sub":
        fine = split(coarse=False)  # the cached fine-label split (same order as the coarse one)
        sibling = (fine.y_test // 2 == SCENARIOS[sc][2] // 2) & (fine.y_test != SCENARIOS[sc][2])

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            lf = model(xf)
            prob = lf.softmax(1)
            lr_ = model(xrt)
            pred_rt = lr_.argmax(1)
            share = float(torch.bincount(pred_rt, minlength=lf.shape[1]).max()) / len(pred_rt) * 100
            return {
                "forget_set_acc": 100.0 * float((lf.argmax(1) == yf).float().mean()),
                "forget_set_conf": float(prob[torch.arange(len(yf)), yf].mean()),
                "forget_set_entropy": float(-(prob * prob.clamp_min(1e-12).log()).sum(1).mean()),
                "forget_test_acc": _acc(model, xft, yft),
                "retained_test_acc": 100.0 * float((pred_rt == yrt).float().mean()),
                "top_class_share": share,
                "logit_norm_ratio": float(lr_.norm(dim=1).mean()) / orig_norm_rt,
                "sibling_test_acc": _acc(model, sp.x_test[sibling], sp.y_test[sibling]) if sibling is not None else 0,
            }

    curve = [{"step": 0, "epoch": 0, "window_acc": 100.0, "lr": v["lr"], **evaluate()}]
    step = 0
    jit_seconds = 0.0
    lr_now = v["lr"]
    oracle_done = False
    terminated = "epochs"
    with noise_variant(v["noise"], v["n"], scale):
        for epoch in range(max_epochs):
            for start in range(0, len(yf), BATCH):
                t0 = time.perf_counter()
                x, y = xf[start : start + BATCH], yf[start : start + BATCH]
                for g in opt.param_groups:
                    g["lr"] = lr_now
                opt.zero_grad(set_to_none=True)
                clean = model(x)
                with torch.no_grad():
                    prob = clean.softmax(1)
                    correct = int((clean.argmax(1) == y).sum())
                window.update(correct, len(y))
                active = torch.ones(len(y), dtype=torch.bool)
                if v["mask"] == "argmax":
                    active = clean.argmax(1) == y
                elif v["mask"] is not None:
                    active = prob[torch.arange(len(y)), y] >= float(v["mask"])
                n_active = int(active.sum())
                gen_state = gen.get_state()

                def objective(logits: Tensor | None, x: Tensor = x, y: Tensor = y, active: Tensor = active) -> Tensor:
                    xa = x[active]
                    return jit_objective(
                        model,
                        xa,
                        sigma,
                        v["n"],
                        reduction="sum",
                        generator=gen,
                        clean_logits=logits,
                        normalize_logits=v["normalize_logits"],
                        center_logits=v["center_logits"],
                    ) / len(y)

                applied = False
                loss_value = float("nan")
                if n_active > 0 or v["anchor"] or v["lognorm"] or v["kd_noise"] or v["probe_kd"]:
                    loss = objective(clean[active]) if n_active > 0 else clean.sum() * 0.0
                    loss_value = float(loss)
                    if v["anchor"]:
                        loss = loss + v["anchor"] * sum(
                            ((p - p0) ** 2).sum() for p, p0 in zip(params, theta0, strict=True)
                        )
                    if v["lognorm"]:
                        noisy = (
                            [
                                x + v["lognorm_sigma"] * torch.randn(x.shape, generator=aux_gen)
                                for _ in range(v["lognorm_copies"])
                            ]
                            if v["lognorm_sigma"] > 0
                            else []
                        )
                        xt = torch.cat([x, *noisy])
                        out = torch.cat([clean, model(xt[len(x) :])]) if noisy else clean
                        with torch.no_grad():
                            ref_out = frozen(xt)
                        if v["lognorm_kind"] == "max":
                            ref = ref_out.max(1).values
                            pen = F.relu(out.max(1).values - ref) / ref_out.norm(dim=1)
                        else:
                            r = out.norm(dim=1) / ref_out.norm(dim=1) - 1
                            pen = r if v["lognorm_kind"] == "norm2" else F.relu(r)
                        loss = loss + v["lognorm"] * pen.pow(2).mean()
                    if v["kd_noise"]:
                        u = torch.randn((64, *x.shape[1:]), generator=aux_gen)
                        with torch.no_grad():
                            target = frozen(u).log_softmax(1)
                        kl = F.kl_div(model(u).log_softmax(1), target, log_target=True, reduction="batchmean")
                        loss = loss + v["kd_noise"] * kl
                    if probes is not None:
                        log_p = model(probes).log_softmax(1)
                        kl = F.kl_div(log_p, probe_target, log_target=True, reduction="batchmean")
                        loss = loss + v["probe_kd"] * kl
                    loss.backward()
                    before = [p.detach().clone() for p in params] if v["backtrack"] else None
                    opt.step()
                    applied = True
                    if v["backtrack"] and n_active > 0:
                        after_state = gen.get_state()
                        gen.set_state(gen_state)
                        with torch.no_grad():
                            new = float(objective(None))
                        gen.set_state(after_state)
                        if new > loss_value:
                            with torch.no_grad():
                                for p, b in zip(params, before, strict=True):
                                    p.copy_(b)
                            lr_now *= 0.5
                            applied = False
                opt.zero_grad(set_to_none=True)
                jit_seconds += time.perf_counter() - t0
                step += 1
                rec = {
                    "step": step,
                    "epoch": epoch + (start + len(y)) / len(yf),
                    "window_acc": window.accuracy() if window.ready() else 100.0,
                    "loss": loss_value,
                    "lr": lr_now,
                    "active": n_active / len(y),
                    "applied": applied,
                    **evaluate(),
                }
                curve.append(rec)
                if kind == "full":
                    oracle_done = oracle_done or rec["forget_test_acc"] <= ORACLE_FORGET_TEST
                elif kind == "sub":
                    oracle_done = oracle_done or rec["forget_set_acc"] <= retrained_forget + SUBCLASS_MARGIN
            window.saw_full_pass = True
            lr_now *= v["lr_decay"]
            last = curve[-1]
            if kind != "random":
                rules_done = all(_rule_index(curve, r) is not None for r in RULES)
                if oracle_done and rules_done:
                    terminated = "all rules and oracle reached"
                    break
                if last["retained_test_acc"] < 25.0:
                    terminated = "collapsed (retained < 25%)"
                    break
    return {
        **job,
        "settings": v,
        "retrained_forget_set_acc": retrained_forget,
        "retrained_retained_test_acc": retrained_retained,
        "original": curve[0],
        "curve": curve,
        "steps": step,
        "epochs_run": epoch + 1,
        "jit_seconds": jit_seconds,
        "jit_seconds_per_epoch": jit_seconds / max(1, epoch + 1),
        "terminated": terminated,
    }


def _rule_index(curve: list[dict], rule: tuple[str, str, float]) -> int | None:
    _, fld, thr = rule
    for i, rec in enumerate(curve[1:], start=1):
        if rec[fld] <= thr:
            return i
    return None


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Oracle frontier and stopping-rule figures of one trajectory."""
    curve, kind = res["curve"], SCENARIOS[res["scenario"]][1]
    out: dict[str, Any] = {}
    pick = (
        "forget_set_acc",
        "forget_test_acc",
        "retained_test_acc",
        "step",
        "epoch",
        "top_class_share",
        "sibling_test_acc",
    )
    if kind == "random":
        per_epoch = [r for r in curve if r["step"] > 0 and abs(r["epoch"] - round(r["epoch"])) < 1e-9]
        out["epoch1"] = {k: per_epoch[0][k] for k in pick} if per_epoch else None
        out["last"] = {k: curve[-1][k] for k in pick}
        return out
    oracle = None
    for rec in curve[1:]:
        hit = (
            rec["forget_test_acc"] <= ORACLE_FORGET_TEST
            if kind == "full"
            else rec["forget_set_acc"] <= res["retrained_forget_set_acc"] + SUBCLASS_MARGIN
        )
        if hit:
            oracle = {k: rec[k] for k in pick}
            break
    out["oracle"] = oracle
    # The best retained accuracy at any point where the forget-class test accuracy is <= 5% (full-class).
    if kind == "full":
        ok = [r["retained_test_acc"] for r in curve[1:] if r["forget_test_acc"] <= ORACLE_FORGET_TEST]
        out["oracle_best"] = max(ok) if ok else None
    for rule in RULES:
        i = _rule_index(curve, rule)
        rec = curve[i] if i is not None else curve[-1]
        out[rule[0]] = {**{k: rec[k] for k in pick}, "fired": i is not None}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def _job_runner(args: tuple[dict[str, Any], str]) -> dict[str, Any]:
    job, cache = args
    torch.set_num_threads(1)
    _quiet()
    t0 = time.perf_counter()
    res = unlearn(job, Path(cache))
    res["wall_seconds"] = time.perf_counter() - t0
    res["summary"] = summarise(res)
    return res


def _pretrain(args: tuple[int, str, bool, str | None, str]) -> str:
    seed, model, coarse, retrained_for, cache = args
    torch.set_num_threads(1)
    _quiet()
    get_model(Path(cache), seed, model, coarse, retrained_for)
    return f"{seed}/{model}/{coarse}/{retrained_for}"


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    a = np.array(vals, dtype=float)
    return f"{a.mean():.1f}" if len(a) == 1 else f"{a.mean():.1f} ± {a.std():.1f}"


def to_markdown(results: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["model"], r["scenario"]), []).append(r)
    lines = [
        "Accuracies in %, mean ± std over seeds. oracle: retained test acc at the first step with forget-class test"
        " acc <= 5% (sub-class: forget-set acc <= retrained + 5), `n/k` = runs that reach it; best: the best retained"
        " acc at any step meeting it. Rules (forget-set only): fs / ft / rt = forget-set / forget-class test /"
        " retained test acc at the stop. Random 5%: after epoch 1 and after the last epoch (fs / test acc).",
        "",
        "| variant | model | scenario | oracle rt | best rt | win15 fs/ft/rt | win5 fs/ft/rt | set5 fs/ft/rt |"
        " setconf0.1 fs/ft/rt | ep@win15 | s/epoch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (variant, model, sc), rs in groups.items():
        s = [r["summary"] for r in rs]
        spe = _ms([r["jit_seconds_per_epoch"] for r in rs])
        if SCENARIOS[sc][1] == "random":
            e1 = " / ".join(
                _ms([x["epoch1"][k] for x in s if x["epoch1"]]) for k in ("forget_set_acc", "retained_test_acc")
            )
            la = " / ".join(_ms([x["last"][k] for x in s]) for k in ("forget_set_acc", "retained_test_acc"))
            orig = _ms([r["original"]["retained_test_acc"] for r in rs])
            ret = _ms([r["retrained_forget_set_acc"] for r in rs])
            lines.append(
                f"| {variant} | {model} | {SCENARIOS[sc][0]} | orig test {orig} | retrained fs {ret} | ep1 {e1} |"
                f" last {la} | | | | {spe} |"
            )
            continue
        reached = [x["oracle"] for x in s if x["oracle"]]
        oracle = f"{_ms([o['retained_test_acc'] for o in reached])} ({len(reached)}/{len(s)})"
        best = _ms([x.get("oracle_best") for x in s])
        cells = []
        for rule in ("win15", "win5", "set5", "setconf0.1"):
            cells.append(
                " / ".join(
                    _ms([x[rule][k] for x in s]) for k in ("forget_set_acc", "forget_test_acc", "retained_test_acc")
                )
            )
        ep = _ms([x["win15"]["epoch"] for x in s])
        lines.append(
            f"| {variant} | {model} | {SCENARIOS[sc][0]} | {oracle} | {best} | "
            + " | ".join(cells)
            + f" | {ep} | {spe} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="baseline", help=f"Comma-separated, from: {','.join(VARIANTS)}")
    parser.add_argument("--models", default="CNN,CNN+BN")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/explore_out")
    parser.add_argument("--cache", default=None, help="Model cache directory (default OUT/../cache).")
    parser.add_argument("--random-epochs", type=int, default=3)
    parser.add_argument("--retrain-all", action="store_true", help="Also retrain for full-class scenarios.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out.parent / "cache"
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    models, scenarios = args.models.split(","), args.scenarios.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    pre = sorted(
        {(s, m, scenario_masks(sc)[0], None, str(cache)) for s in seeds for m in models for sc in scenarios}
        | {
            (s, m, scenario_masks(sc)[0], sc, str(cache))
            for s in seeds
            for m in models
            for sc in scenarios
            if SCENARIOS[sc][1] != "full" or args.retrain_all
        },
        key=str,
    )
    jobs = [
        {
            "variant": v,
            "seed": s,
            "model": m,
            "scenario": sc,
            "random_epochs": args.random_epochs,
            "retrain_all": args.retrain_all,
        }
        for v in variants
        for s in seeds
        for m in models
        for sc in scenarios
    ]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, initializer=_init_worker) if args.workers > 1 else None
    try:
        mapper = pool.imap_unordered if pool else map
        for tag in mapper(_pretrain, pre):
            print(f"[{time.perf_counter() - start:6.0f}s] model ready: {tag}", flush=True)
        for res in mapper(_job_runner, [(j, str(cache)) for j in jobs]):
            results.append(res)
            s = res["summary"]
            brief = (
                {k: s[k] for k in ("epoch1", "last")}
                if "epoch1" in s
                else {
                    "oracle_rt": s["oracle"] and round(s["oracle"]["retained_test_acc"], 1),
                    "win15": [
                        round(s["win15"][k], 1) for k in ("forget_set_acc", "forget_test_acc", "retained_test_acc")
                    ],
                }
            )
            print(
                f"[{time.perf_counter() - start:6.0f}s] {res['variant']} s{res['seed']} {res['model']}"
                f" {res['scenario']}:"
                f" {brief} ({res['epochs_run']} ep, {res['jit_seconds']:.1f}s jit, {res['terminated']})",
                flush=True,
            )
            (out / "results.json").write_text(json.dumps(results))
            (out / "results.md").write_text(to_markdown(sorted(results, key=_order(variants, models, scenarios))))
    finally:
        if pool:
            pool.close()
            pool.join()
    results.sort(key=_order(variants, models, scenarios))
    table = to_markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results))
    print(table)
    print(f"explore_quality finished in {time.perf_counter() - start:.0f} s; wrote {out}/results.md and results.json")


def _order(variants, models, scenarios):
    return lambda r: (variants.index(r["variant"]), models.index(r["model"]), scenarios.index(r["scenario"]), r["seed"])


if __name__ == "__main__":
    main()
