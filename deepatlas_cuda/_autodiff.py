"""What the ops' autograd does not cover fails loudly instead of giving silently wrong numbers: forward-mode AD
(dual tensors, torch.func.jvp) and double backward (a gradient of a gradient, e.g. create_graph=True)."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad


def reject_forward_ad(op: str, *tensors) -> None:
    """Raise if any of ``tensors`` carries a forward-mode tangent: the ops have no forward-mode formula, and a
    custom op would otherwise drop the tangent (the output looks constant)."""
    if getattr(forward_ad, "_current_level", -1) < 0:  # outside every dual_level / jvp: no tangent can exist
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            try:
                dual = forward_ad.unpack_dual(tensor).tangent is not None
            except RuntimeError:  # a tensor that cannot be unpacked here (vmap inside jvp): assume the worst
                dual = True
            if dual:
                raise NotImplementedError(f"{op}: forward-mode AD (forward_ad dual tensors, torch.func.jvp / "
                                          f"jacfwd) is not supported; use reverse mode (backward, torch.autograd.grad)")


def forbid_double_backward(op: str, *backward_ops: str) -> None:
    """Give each ``deepatlas::<backward op>`` an autograd formula that raises: differentiating a gradient of
    ``op`` again (create_graph=True, then a second backward through it) would otherwise give zeros."""
    def second_order(ctx, *grads):
        raise NotImplementedError(f"{op}: double backward (the gradient of a gradient, e.g. after backward or "
                                  f"autograd.grad with create_graph=True) is not supported")

    def nothing_saved(ctx, inputs, output):
        pass

    for name in backward_ops:
        torch.library.register_autograd(f"deepatlas::{name}", second_order, setup_context=nothing_saved)
