"""The training iteration that MONAI's ``SupervisedTrainer`` runs (``iteration_update``).

The default MONAI iteration computes one loss from ``(pred, label)``; this method
needs the model's dict of outputs (scale logits, attention, equivariance target)
and reports each loss term, tau and the batch's scale accuracy, so the engine
gets this callable instead. Everything else (events, handlers, checkpoints,
DDP, validation) stays the engine's.
"""

from __future__ import annotations

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

__all__ = ['NonFiniteTrainingError', 'ScaleAttentionIteration', 'world_size']


class NonFiniteTrainingError(FloatingPointError):
    """A non-finite training loss or gradient. In distributed training it is raised on every rank
    at the same iteration (the loss check is all-reduced, the gradients are DDP's all-reduced
    ones), so every rank may safely meet at a barrier after it (see
    :class:`custom.training.handlers.NonFiniteStopBarrier`)."""


class ScaleAttentionIteration:
    """One optimisation step of F and G on a batch of magnification-labelled tiles.

    ``engine.network`` is a :class:`custom.model.networks.ScaleAttentionModel` (possibly
    DDP-wrapped), ``engine.loss_function`` a :class:`custom.model.losses.ScaleAttentionLoss`.

    Returns (and stores in ``engine.state.output``) a dict: ``image``, ``label``,
    ``pred`` (scale logits), ``attention``, ``loss`` (float) and each loss term,
    ``accuracy`` and, with the percentile sigmoid, ``tau`` (floats).

    Raises:
        NonFiniteTrainingError: (a ``FloatingPointError``) when the loss, or after backward a gradient, is NaN or infinite;
            the message names the iteration and the terms (or parameters). Nothing is stepped
            with it, and the buffers that the forward pass updates in place (BatchNorm running
            statistics, the running tau, their batch counters) are put back to their values
            before this iteration, so the model (and the checkpoint that ``CheckpointSaver``
            writes on the exception) is the finite state after the previous iteration. In
            distributed training every rank stops at the same iteration (the check is all-reduced).
    """

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("ScaleAttentionIteration: the data loader returned an empty batch.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        buffers = list(engine.network.buffers())
        saved = [b.detach().clone() for b in buffers]  # a few kB: BatchNorm statistics, running tau, counters
        outputs = engine.network(inputs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses = engine.loss_function(outputs, targets)
        total = losses["loss"]
        finite = bool(torch.isfinite(total.detach()))
        if not _on_every_rank(finite, total.device):
            _restore(buffers, saved)
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            if finite:  # distributed: another rank's loss is not finite, so every rank stops here together
                raise NonFiniteTrainingError(
                    f"non-finite training loss at iteration {engine.state.iteration} on another rank; this rank's terms: {terms}."
                )
            raise NonFiniteTrainingError(f"non-finite training loss at iteration {engine.state.iteration}: {terms}.")
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        total.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        named = [(n, p.grad) for n, p in engine.network.named_parameters() if p.grad is not None]
        if named and not torch.isfinite(torch.nn.utils.get_total_norm([g for _, g in named])):
            _restore(buffers, saved)
            engine.optimizer.zero_grad(set_to_none=True)
            bad = [n for n, g in named if not torch.isfinite(g).all()]
            raise NonFiniteTrainingError(
                f"non-finite gradients at iteration {engine.state.iteration} (loss {float(total.detach()):.4g}) "
                f"in {len(bad)} parameters, e.g. {bad[:3]}."
            )
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        logits = outputs["scale_logits"].detach()
        report = {k: float(v.detach()) for k, v in losses.items()}
        report["accuracy"] = float((logits.argmax(1) == targets.view(-1)).float().mean())
        if "tau" in outputs:  # absent for the plain sigmoid (M_-sparse)
            report["tau"] = float(outputs["tau"])
        engine.state.output.update({Keys.PRED: logits, "attention": outputs["attention"].detach(), **report})
        return engine.state.output


def world_size() -> int:
    """The number of ranks of the default process group, 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` AND-ed over the ranks of an initialised process group (a one-element all-reduce);
    ``flag`` itself without one. Under DistributedDataParallel a rank that stopped alone leaves
    the others in the gradient all-reduce: with Gloo they fail with "Connection closed by peer",
    with NCCL they wait for the collective timeout; either way the cause is not in their logs."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item() > 0)


@torch.no_grad()
def _restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Copy the values taken before the forward pass back into the module's buffers (in place)."""
    for b, v in zip(buffers, saved):
        b.copy_(v)
