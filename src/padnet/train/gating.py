"""Learned mode gates in the trainer (``--partition gates``): the glue between the loop and ModeGates.

The loop calls, in order: :meth:`GateDriver.attach_optimizer` (once, before the
LR scheduler is built), per step :meth:`before_step` (sharpness schedule, or
hardening once ``--harden-at`` of the run is reached), :meth:`penalty` (added to
the loss), :meth:`after_backward` (ARM's antithetic pass), per epoch
:meth:`epoch_stats`, and :meth:`state_dict` / :meth:`load_state_dict` for
checkpoints. The sharpness schedule runs over the steps before hardening.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..transforms.gates import ModeGates

GATES_PLOT = "gates.png"
PARTITIONS = ("imp", "gates")
DEFAULT_GATE_LR = 0.05  # Adam, gates and multipliers


class GateDriver:
    """Builds :class:`ModeGates` from a :class:`TrainConfig` and runs them through training."""

    def __init__(self, cfg, model: nn.Module, total_steps: int, log: Callable[[str], None]) -> None:
        schedule = cfg.gate_schedule or ("npn" if cfg.gate_estimator == "arm" else "constant")
        self.gates = ModeGates(
            model, target_ratio=cfg.ratio, granularity=cfg.partition_granularity, estimator=cfg.gate_estimator,
            scope=cfg.partition_scope, init=cfg.gate_init, sharpness=cfg.gate_sharpness,
            sharpness_end=cfg.gate_sharpness_end, schedule=schedule, seed=cfg.seed,
            density=cfg.density,  # --density: a second (live) gate learns which entries are pruned
        )
        self.cfg = cfg
        self.log = log
        self.total_steps = total_steps
        self.harden_step = min(total_steps, max(1, int(math.floor(cfg.harden_at * total_steps + 0.5))))
        self.hardened = False
        self.hardened_step: int | None = None
        self.harden_report: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.every = max(1, total_steps // 200)

    # ------------------------------------------------------------------ set-up
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Gates and multipliers leave the model optimizer and get their own Adam (``--gate-lr``)."""
        self.gates.remove_from_optimizer(optimizer)
        self.gate_optimizer: torch.optim.Optimizer | None = self.gates.build_optimizer(lr=self.gate_lr)

    @property
    def gate_lr(self) -> float:
        return DEFAULT_GATE_LR if self.cfg.gate_lr is None else float(self.cfg.gate_lr)

    def describe(self) -> str:
        g = self.gates
        return (f"mode gates: {g.estimator_name}, {g.granularity} units, {g.scope} budget, target kappa="
                f"{g.target_ratio}, init {g.init}, sharpness {g.schedule} {g.sharpness_start:g}->{g.sharpness_end:g}, "
                f"Adam lr {self.gate_lr:g}, hardening at step {self.harden_step}/{self.total_steps}")

    # --------------------------------------------------------------- per step
    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Sharpness for ``step``, or hardening at ``harden_step``; True when the gates were hardened now."""
        if self.hardened:
            return False
        if step >= self.harden_step:
            self.harden(step, optimizer)
            return True
        self.gate_optimizer.zero_grad(set_to_none=True)
        self.gates.step(step / self.harden_step)
        if step % self.every == 0:
            st = self.gates.stats()
            self.history.append({"step": step, "expected_ratio": st["expected_ratio"], "sharpness": st["sharpness"],
                                 "entropy": st["entropy"]})
        return False

    def penalty(self) -> Tensor | None:
        return None if self.hardened else self.gates.penalty()

    def after_backward(self, loss: Tensor, closure: Callable[[], Tensor]) -> None:
        if not self.hardened and self.gates.estimator_name == "arm":
            self.gates.arm_update_(loss, closure)

    def optimizer_step(self) -> None:
        """After the model optimizer's step: the gates' Adam step."""
        if not self.hardened:
            self.gate_optimizer.step()

    def check_finite(self) -> None:
        if not self.hardened:
            self.gates.check_finite()

    def harden(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        before = self.gates.stats()
        report = self.gates.harden_(optimizer)
        self.gate_optimizer = None
        self.hardened, self.hardened_step = True, step
        self.harden_report = {"step": step, "expected_ratio_before": before["expected_ratio"],
                              "ratio": report["ratio"], "layers": report["layers"],
                              "fractional_gates_folded": report["fractional_gates_folded"],
                              "transitions": report["transitions"]}
        if report.get("density") is not None:  # --density: the live gate's hardened density
            self.harden_report.update(density=report["density"], layer_densities=report.get("layer_densities"))
        self.history.append({"step": step, "expected_ratio": report["ratio"], "sharpness": None, "entropy": 0.0,
                             "hardened": True})
        self.log(f"gates hardened at step {step}: kappa={report['ratio']:.4f} (target {self.gates.target_ratio}, "
                 f"expected before {before['expected_ratio']:.4f}); {report['fractional_gates_folded']} fractional "
                 f"gates folded, {report['transitions']['to_static']} entries -> static, "
                 f"{report['transitions']['to_dynamic']} -> dynamic")

    # --------------------------------------------------------------- per epoch
    def epoch_stats(self, model: nn.Module) -> dict[str, Any]:
        if self.hardened:
            from ..layers.modes import pad_layers

            layers = {n: m.dynamic_ratio() for n, m in pad_layers(model)}
            sizes = {n: sum(g.mask.numel() for g in m.mode_groups()) for n, m in pad_layers(model)}
            total = sum(layers[n] * sizes[n] for n in layers) / max(sum(sizes.values()), 1)
            return {"gate_expected_ratio": total, "gate_layer_ratios": layers, "gate_entropy": 0.0,
                    "gate_penalty": 0.0, "gate_sharpness": None, "gates_hardened": True}
        self.gates.check_finite()
        st = self.gates.stats()
        return {"gate_expected_ratio": st["expected_ratio"], "gate_layer_ratios": st["layer_ratios"],
                "gate_entropy": st["entropy"], "gate_penalty": st["penalty"], "gate_sharpness": st["sharpness"],
                "gate_multipliers": st["multipliers"], "gates_hardened": False}

    @staticmethod
    def log_line(row: dict[str, Any]) -> str:
        if row.get("gates_hardened"):
            return f"  kappa {row['gate_expected_ratio']:.4f} (hardened)"
        return (f"  gates E[kappa] {row['gate_expected_ratio']:.4f} H {row['gate_entropy']:.3f} "
                f"pen {row['gate_penalty']:+.4f} k {row['gate_sharpness']:g}")

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"gates": None if self.hardened else self.gates.state_dict(), "hardened": self.hardened,
                "gate_optimizer": None if self.hardened else self.gate_optimizer.state_dict(),
                "hardened_step": self.hardened_step, "harden_report": self.harden_report,
                "history": list(self.history), "config": self.gates.config()}

    def prepare_restore(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Before the model and optimizer are loaded: a run checkpointed after hardening drops its gates."""
        if state.get("hardened"):
            self.gates.remove_(optimizer)
            self.gate_optimizer = None
            self.hardened = True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {"density": None, **(state.get("config") or {})}  # checkpoints from before the live gate
        if saved != self.gates.config():
            raise ValueError(f"checkpoint gates were built with {state.get('config')}, this run builds "
                             f"{self.gates.config()}; resume with the same gate settings")
        if not state.get("hardened"):
            self.gates.load_state_dict(state["gates"])
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.hardened = bool(state.get("hardened"))
        self.hardened_step = state.get("hardened_step")
        self.harden_report = state.get("harden_report")
        self.history = list(state.get("history", []))

    # ----------------------------------------------------------------- finish
    def summary(self) -> dict[str, Any]:
        return {"config": self.gates.config(), "gate_lr": self.gate_lr, "harden_step": self.harden_step,
                "hardened_step": self.hardened_step, "harden_report": self.harden_report}

    def plot(self, out_dir: Path, title: str) -> str | None:
        """Expected dynamic ratio (and sharpness) over training -> ``gates.png``; its name, or None."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [r for r in self.history if r.get("expected_ratio") is not None]
        if not rows:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot([r["step"] for r in rows], [r["expected_ratio"] for r in rows], label="E[dynamic ratio]")
        ax.axhline(self.gates.target_ratio, color="gray", ls="--", lw=1, label="target")
        if self.hardened_step is not None:
            ax.axvline(self.hardened_step, color="red", ls=":", lw=1, label="hardened")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("dynamic ratio")
        ax.set_ylim(0, 1.02)
        sharp = [(r["step"], r["sharpness"]) for r in rows if r.get("sharpness") is not None]
        if sharp:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in sharp], [k for _, k in sharp], color="tab:orange", lw=1, alpha=0.7)
            ax2.set_ylabel("sharpness", color="tab:orange")
            if max(k for _, k in sharp) / max(min(k for _, k in sharp), 1e-12) > 50:
                ax2.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / GATES_PLOT, dpi=120)
        plt.close(fig)
        return GATES_PLOT
