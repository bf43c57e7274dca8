"""Adam for :func:`mrvi_pyro.train.train_svi`: torch's fused Adam kernel, called directly.

Why not ``torch.optim.Adam`` itself: every ``torch.optim`` optimiser wraps its methods in
``torch._disable_dynamo``, which imports ``torch._dynamo`` (with sympy and parts of
``torch.distributed``) the first time one is constructed in a process. Measured here (2 CPU
cores, ``benchmarks/first_call.py``): that import is all of the extra ~1 s that the first
``train()`` call of a process took over later ones, and ~70 MB of resident memory, for code
that training never runs. :class:`Adam` makes the very same update (the fused kernel
``torch.optim.Adam(fused=True)`` runs: ``torch._fused_adam_``, tested bit-equal step by step)
and keeps the same ``state_dict`` layout, so checkpoints written with either load into the other.

Where this torch build has no fused kernel for the parameters (no ``torch._fused_adam_``, a
device other than CPU/CUDA, a non-floating dtype), :func:`make_adam` returns
``torch.optim.Adam`` as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_GROUP_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": True, "decoupled_weight_decay": False}
"""The settings ``torch.optim.Adam(fused=True)`` records in its param group besides the rates."""


def fused_kernel_available(params: list[torch.Tensor]) -> bool:
    """Whether :class:`Adam` can update ``params`` (torch has the fused kernel; floating
    parameters on CPU or CUDA)."""
    return hasattr(torch, "_fused_adam_") and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and not p.is_complex() for p in params
    )


class Adam:
    """``torch.optim.Adam(params, fused=True, lr=, betas=, eps=, weight_decay=)`` without torch.optim.

    One parameter group. A parameter without a gradient in a step is skipped (no weight decay,
    no moment update), as torch's Adam does. ``state_dict`` / ``load_state_dict`` use torch's
    layout (``{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}``).
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        params = list(params)
        if not params:
            raise ValueError("Adam got an empty parameter list.")
        if not fused_kernel_available(params):
            raise ValueError("Adam needs floating parameters on CPU or CUDA and torch._fused_adam_; "
                             "use torch.optim.Adam (mrvi_pyro.train.make_adam chooses).")
        lr, eps, weight_decay = float(lr), float(eps), float(weight_decay)
        beta1, beta2 = (float(b) for b in betas)
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"Invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}.")
        self.param_groups = [{"params": params, "lr": lr, "betas": (beta1, beta2), "eps": eps,
                              "weight_decay": weight_decay, **_GROUP_FLAGS}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @property
    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        # The fused kernel takes tensors of one device and dtype per call.
        buckets: dict[tuple, tuple[list, ...]] = {}
        for p in self._params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients.")
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            lists = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
            for target, value in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                target.append(value)
        beta1, beta2 = group["betas"]
        for params, grads, exp_avgs, exp_avg_sqs, steps in buckets.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                               maximize=False, grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        """torch.optim's layout: per-parameter state by position, then the group's settings."""
        index = {id(p): i for i, p in enumerate(self._params)}
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        group["params"] = list(range(len(self._params)))
        return {"state": {index[id(p)]: dict(state) for p, state in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict`` of this class or of ``torch.optim.Adam`` (one group, the same
        number of parameters, no amsgrad/maximize); the tensors are copied to each parameter's
        device (moments in its dtype, the step count in float32, as the fused kernel keeps it)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("The optimiser state must have exactly one parameter group.")
        saved = groups[0]
        if len(saved.get("params", ())) != len(self._params):
            raise ValueError(f"The optimiser state is for {len(saved.get('params', ()))} parameters, "
                             f"not {len(self._params)}.")
        if saved.get("amsgrad") or saved.get("maximize"):
            raise ValueError("The optimiser state uses amsgrad or maximize, which this Adam does not.")
        positions = {int(key): i for i, key in enumerate(saved["params"])}
        state = {}
        for key, values in state_dict.get("state", {}).items():
            p = self._params[positions[int(key)]]
            state[p] = {
                "step": torch.as_tensor(values["step"]).to(dtype=torch.float32, device=p.device).clone(),
                "exp_avg": values["exp_avg"].to(dtype=p.dtype, device=p.device).clone(),
                "exp_avg_sq": values["exp_avg_sq"].to(dtype=p.dtype, device=p.device).clone(),
            }
        group = self.param_groups[0]
        group.update({"lr": float(saved["lr"]), "betas": tuple(float(b) for b in saved["betas"]),
                      "eps": float(saved["eps"]), "weight_decay": float(saved["weight_decay"])})
        self.state = state
