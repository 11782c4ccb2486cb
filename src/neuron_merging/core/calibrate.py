"""Calibration with unlabeled inputs: least-squares refit, REPAIR and BN reset.

Every step uses the caller's input tensors only: no labels, no loss, no
gradients (everything runs under ``torch.no_grad``). The steps:

* ``"lstsq"``: group by group, in the order of the plans (the network's order),
  the consumer of the compressed model is refit in closed form so that, on the
  compressed model's *own* inputs (which already include the refits before
  it), its output matches the original consumer's output on the original
  inputs. The normal equations ``(XᵀX + ridge·mean(diag)·I)·β = XᵀY`` are
  accumulated batch by batch in float64 (``X``: the unfolded input patches of a
  convolution, or the input of a Linear, plus a constant column whose weight
  goes into the consumer's bias or the running mean of its successor BN).
* ``"lstsq-block"``: the same refit, but a consumer whose successor batch norm
  feeds a residual sum (its parent module outputs ``bn(consumer(x)) + r`` with
  ``r`` independent of the consumer, e.g. a ResNet block; checked by a probe)
  is refit so that the compressed *block output* matches the original's: its
  target is ``bn⁻¹(O − r')``, with ``O`` the original block output and ``r'``
  the compressed model's residual, so each block also absorbs the drift that
  the residual stream brought from the blocks before it. Other consumers are
  refit as in ``"lstsq"``.
* ``"lstsq-joint"``: ``"lstsq-block"`` that also refits, in the same
  sequential pass, every producer's kept rows on the compressed model's own
  inputs to the original's (pre-BN) outputs of those channels, so each block's
  producer first corrects the drift of its input, then its consumer is refit
  on top of it (a producer whose input is still the original's is left as it
  is: its rows already fit exactly).
* ``"flip"``: every later step also uses the horizontal mirror image of each
  calibration input (4-D image tensors only; others are left as they are):
  twice the rows for the same images.
* ``"repair"``: group by group, each consumer's output (after its successor
  batch norm when there is one) gets the per-channel mean and standard
  deviation of the original model's, through the BN's ``γ``/``β`` (REPAIR,
  Jordan et al. 2022), or the consumer's own weight and bias without BN.
* ``"bn"``: every batch norm's running statistics are recomputed on the data.

Each step costs two forwards over the calibration set (one of the original,
one of the compressed model): the sequential steps work inside forward hooks of
a single forward of the compressed model, on the whole set as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compensate import _batches, _inputs, _set, group_fields, successor_bns
from .record import evaluating

_BATCH = 250


def _design(layer: nn.Module, x: Tensor) -> Tensor:
    """``(rows, features)`` regressors of ``layer`` for input ``x``: a convolution's input
    padded as the layer pads it (its padding mode, ``"same"`` and ``"valid"`` too), then
    unfolded into patches."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError("grouped convolutions cannot be refit")
        pads: list[int] = []  # F.pad order: last dimension first, (before, after) each
        for i in (1, 0):
            if layer.padding == "valid":
                before = after = 0
            elif layer.padding == "same":
                total = layer.dilation[i] * (layer.kernel_size[i] - 1)
                before, after = total // 2, total - total // 2
            else:
                before = after = layer.padding[i]
            pads += [before, after]
        if any(pads):
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, pads, mode=mode)
        cols = F.unfold(x, layer.kernel_size, layer.dilation, 0, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(x.shape[0], -1)


def _targets(layer: nn.Module, y: Tensor) -> Tensor:
    if y.dim() == 4:
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(y.shape[0], -1)


def _outputs(model: nn.Module, names: Sequence[str], data: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The outputs of modules ``names`` on ``data`` (one forward, batch by batch)."""
    modules = dict(model.named_modules())
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []
    for name in dict.fromkeys(names):

        def hook(_m: nn.Module, _a: object, out: Tensor, name: str = name) -> None:
            store[name].append(out.detach().clone())  # a later in-place ReLU must not alter it

        handles.append(modules[name].register_forward_hook(hook))
    try:
        for part in _batches(data, _BATCH):
            model(*part)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def _fingerprint(x: Tensor) -> tuple[bytes, float, float]:
    """A summary of an input that equal tensors share (see :func:`lstsq_refit`)."""
    d = x.detach()
    head = d[:16].contiguous().cpu().numpy().tobytes()
    flat = d.to(torch.float64)
    return head, float(flat.sum()), float(flat.square().sum())


def _input_prints(
    model: nn.Module, names: Sequence[str], data: tuple[Tensor, ...]
) -> dict[str, tuple[bytes, float, float]]:
    """Fingerprints of the inputs of modules ``names`` on ``data`` (one batch, one forward)."""
    if not names:
        return {}
    modules = dict(model.named_modules())
    out: dict[str, tuple[bytes, float, float]] = {}
    handles = []
    for name in dict.fromkeys(names):

        def pre(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            out.setdefault(name, _fingerprint(args[0]))

        handles.append(modules[name].register_forward_pre_hook(pre))
    try:
        model(*data)  # the whole set as one batch, as the compressed model's pass
    finally:
        for h in handles:
            h.remove()
    return out


def _solve(layer: nn.Module, x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Ridge least squares ``y ≈ design(x)·W + c`` in float64: ``(W as layer.weight, c)``."""
    xtx = None
    xty = None
    step = max(1, _BATCH)
    for i in range(0, x.shape[0], step):
        d = _design(layer, x[i : i + step].to(torch.float64))
        d = torch.cat([d, torch.ones(d.shape[0], 1, dtype=torch.float64)], dim=1)
        t = _targets(layer, y[i : i + step].to(torch.float64))
        xtx = d.T @ d if xtx is None else xtx + d.T @ d
        xty = d.T @ t if xty is None else xty + d.T @ t
    assert xtx is not None and xty is not None
    size = xtx.shape[0]
    lift = ridge * float(xtx.diagonal()[:-1].mean().clamp_min(1e-300))
    system = xtx + lift * torch.eye(size, dtype=torch.float64)
    system[-1, -1] = xtx[-1, -1]  # the intercept is not shrunk
    beta = torch.linalg.solve(system, xty)  # (features + 1, out)
    return beta[:-1].T.reshape(layer.weight.shape), beta[-1]


def _bn_apply(bn: nn.Module, y: Tensor) -> Tensor:
    """``bn(y)`` in evaluation mode, in float64 (the module is not run, so no hook fires)."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    mean = bn.running_mean.detach().double().view(view)
    sigma = torch.sqrt(bn.running_var.detach().double() + float(bn.eps)).view(view)
    gamma = bn.weight.detach().double().view(view) if bn.weight is not None else 1.0
    beta = bn.bias.detach().double().view(view) if bn.bias is not None else 0.0
    return (y.double() - mean) / sigma * gamma + beta


def _bn_invert(ref: nn.Module, out: Tensor, rows: Tensor | None) -> Tensor:
    """The pre-BN ``y`` with ``ref(y)[:, rows] = out``, under ``ref``'s own statistics."""
    mean = ref.running_mean.detach().double()
    sigma = torch.sqrt(ref.running_var.detach().double() + float(ref.eps))
    n = mean.numel()
    gamma = ref.weight.detach().double() if ref.weight is not None else torch.ones(n).double()
    beta = ref.bias.detach().double() if ref.bias is not None else torch.zeros(n).double()
    if rows is not None:
        mean, sigma, gamma, beta = mean[rows], sigma[rows], gamma[rows], beta[rows]
    # A channel with γ = 0 contributes nothing: any pre-BN value fits it (keep 0).
    safe = torch.where(gamma.abs() > 1e-12, gamma, torch.ones_like(gamma))
    scale = torch.where(gamma.abs() > 1e-12, sigma / safe, torch.zeros_like(gamma))
    view = (1, -1) + (1,) * (out.dim() - 2)
    return (out.double() - beta.view(view)) * scale.view(view) + mean.view(view)


def residual_parents(
    model: nn.Module,
    data: tuple[Tensor, ...],
    consumers: Sequence[str],
    successors: dict[str, str],
) -> dict[str, str]:
    """``{consumer: parent}`` where the parent module outputs ``bn(consumer(x)) + r``.

    The parent is the consumer's enclosing module (its name's longest proper
    prefix). The property is checked by a probe, not assumed: the parent is run
    on its recorded input (two samples) once as it is and once with a random
    perturbation ``d`` added to the batch norm's output; it qualifies when its
    output moves by exactly ``d`` (so ``r`` does not depend on the consumer and
    nothing nonlinear follows the sum).
    """
    modules = dict(model.named_modules())
    parent_of: dict[str, str] = {}
    for c in consumers:
        if c not in successors or "." not in c:
            continue
        parent = c.rsplit(".", 1)[0]
        if successors[c].rsplit(".", 1)[0] == parent:
            parent_of[c] = parent
    if not parent_of:
        return {}
    inputs: dict[str, tuple[Tensor, ...]] = {}
    handles = []
    for parent in set(parent_of.values()):

        def grab(_m: nn.Module, args: tuple[Tensor, ...], parent: str = parent) -> None:
            inputs.setdefault(parent, tuple(a.detach().clone() for a in args))

        handles.append(modules[parent].register_forward_pre_hook(grab))
    try:
        model(*(d[:2] for d in data))
    finally:
        for h in handles:
            h.remove()
    found: dict[str, str] = {}
    gen = torch.Generator().manual_seed(0)
    for c, parent in parent_of.items():
        args = inputs.get(parent)
        if args is None:
            continue
        block, bn = modules[parent], modules[successors[c]]
        base = block(*args)
        if not isinstance(base, Tensor):
            continue
        poke: list[Tensor] = []

        def add(_m: nn.Module, _a: object, out: Tensor, poke: list[Tensor] = poke) -> Tensor:
            d = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            poke.append(d)
            return out + d

        h = bn.register_forward_hook(add)
        try:
            moved = block(*args)
        finally:
            h.remove()
        if (
            len(poke) == 1
            and isinstance(moved, Tensor)
            and moved.shape == poke[0].shape
            and torch.allclose(moved - base, poke[0], rtol=1e-4, atol=1e-4)
        ):
            found[c] = parent
    return found


def lstsq_refit(
    original: nn.Module,
    compressed: nn.Module,
    consumers: Sequence[tuple[str, Tensor | None]],
    data: tuple[Tensor, ...],
    ridge: float,
    successors: dict[str, str],
    parents: dict[str, str] | None = None,
    skip_unchanged: Sequence[str] = (),
) -> None:
    """Sequential closed-form refit of each consumer (see the module doc).

    ``consumers`` lists ``(name, rows)``: ``rows`` are the original output
    channels the compressed layer keeps (``None``: all of them). The original's
    consumer outputs are recorded in one forward; then one forward of the
    compressed model refits each consumer in a pre-hook, on its actual input,
    before the layer runs, so every later layer already sees the refit ones.
    The whole calibration set goes through as one batch (it is small).

    ``parents`` (``{consumer: parent}``, see :func:`residual_parents`) switches
    those consumers to the block-output target: the layer first runs as it is,
    and in the parent's forward hook, when the compressed residual ``r'`` is
    known (the parent's output minus the BN output), the consumer is refit to
    ``bn⁻¹(O − r')`` and the parent's output is replaced by the refit one.

    A layer named in ``skip_unchanged`` is left as it is when its input in the
    compressed model is the original's (nothing before it changed): its
    original rows are then already the exact fit, and a refit could only add
    noise (an underdetermined first layer overfits the calibration images).
    Inputs are compared by a fingerprint (the first 16 samples exactly, plus
    the float64 sum and sum of squares of all of them).
    """
    parents = parents or {}
    names = [c for c, _r in consumers]
    targets = _outputs(original, [n for n in names if n not in parents], data)
    prints = _input_prints(original, [n for n in skip_unchanged if n in names], data)
    blocks = _outputs(original, list(dict.fromkeys(parents.values())), data) if parents else {}
    rows_of = dict(consumers)
    work = dict(compressed.named_modules())
    originals = dict(original.named_modules())
    done: set[str] = set()
    seen: dict[str, tuple[Tensor, Tensor]] = {}  # block consumers: (input, output) as run
    handles = []

    def refit(layer: nn.Module, name: str, x: Tensor, y: Tensor) -> None:
        rows = rows_of[name]
        if layer.bias is not None:  # refit around the current bias
            shape = (1, -1) + (1,) * (y.dim() - 2)
            y = y - layer.bias.detach().view(shape)
        weight, intercept = _solve(layer, x, y, ridge)
        _set(layer, "weight", weight)
        if layer.bias is not None:
            _set(layer, "bias", layer.bias.detach().to(torch.float64) + intercept)
        elif name in successors:
            # The target is the original's pre-BN output, so the BN gets the
            # original's statistics back (undoing any data-free repair), with
            # the intercept folded into its mean.
            bn, ref = work[successors[name]], originals[successors[name]]
            mean = ref.running_mean.detach().to(torch.float64)
            var = ref.running_var.detach().to(torch.float64)
            if rows is not None:
                mean, var = mean[rows], var[rows]
            _set(bn, "running_mean", mean - intercept)
            _set(bn, "running_var", var)

    for name in dict.fromkeys(names):
        if name in parents:

            def keep_io(
                _m: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name
            ) -> None:
                if name not in done:
                    seen[name] = (args[0].detach().clone(), out.detach().clone())

            handles.append(work[name].register_forward_hook(keep_io))
            continue

        def pre(layer: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            if name in done:
                return
            done.add(name)
            y = targets.pop(name)
            if name in prints and _fingerprint(args[0]) == prints[name]:
                return  # same input as the original: its rows already fit exactly
            rows = rows_of[name]
            if rows is not None:
                y = y[:, rows]
            refit(layer, name, args[0].detach(), y)

        handles.append(work[name].register_forward_pre_hook(pre))
    for parent in dict.fromkeys(parents.values()):
        mine = [c for c, p in parents.items() if p == parent and c in rows_of]

        def post(
            _m: nn.Module, _a: object, out: Tensor, mine: list[str] = mine, parent: str = parent
        ) -> Tensor | None:
            fixed = out.double()
            for c in mine:
                if c in done or c not in seen:
                    continue
                done.add(c)
                x, y_run = seen.pop(c)
                bn_w, bn_o = work[successors[c]], originals[successors[c]]
                before = _bn_apply(bn_w, y_run)
                residual = fixed - before
                target = _bn_invert(bn_o, blocks[parent].double() - residual, None)
                refit(work[c], c, x, target)
                y_new = work[c](x)
                fixed = residual + _bn_apply(bn_w, y_new)
            return fixed.to(out.dtype)

        handles.append(work[parent].register_forward_hook(post))
    try:
        compressed(*data)
    finally:
        for h in handles:
            h.remove()


def _channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    flat = y.detach().transpose(0, 1).reshape(y.shape[1], -1).to(torch.float64)
    return flat.mean(dim=1), flat.std(dim=1)


def repair_stats(
    original: nn.Module,
    compressed: nn.Module,
    targets: Sequence[tuple[str, Tensor | None]],
    data: tuple[Tensor, ...],
) -> None:
    """REPAIR: match each target's per-channel output mean/std to the original's.

    ``targets`` lists ``(module name, kept channels)``; a batch norm is repaired
    through ``γ``/``β``, a layer with a bias through its weight rows and bias.
    In one forward of the compressed model, each target is corrected in a hook
    that also hands the corrected output on, so later targets see it.
    """
    names = [t for t, _r in targets]
    reference = {n: _channel_stats(y) for n, y in _outputs(original, names, data).items()}
    rows_of = dict(targets)
    work = dict(compressed.named_modules())
    done: set[str] = set()
    handles = []
    for name in dict.fromkeys(names):

        def post(m: nn.Module, _a: object, out: Tensor, name: str = name) -> Tensor | None:
            if name in done:
                return None
            done.add(name)
            mo, so = reference[name]
            rows = rows_of[name]
            if rows is not None:
                mo, so = mo[rows], so[rows]
            mc, sc = _channel_stats(out)
            ratio = torch.where(sc > 1e-12, so / sc.clamp_min(1e-12), torch.ones_like(sc))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                _set(m, "weight", m.weight.detach().double() * ratio)
                _set(m, "bias", (m.bias.detach().double() - mc) * ratio + mo)
            elif getattr(m, "bias", None) is not None:
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                _set(m, "weight", m.weight.detach().double() * ratio.view(shape))
                _set(m, "bias", (m.bias.detach().double() - mc) * ratio + mo)
            else:
                return None
            view = (1, -1) + (1,) * (out.dim() - 2)
            fixed = (out.double() - mc.view(view)) * ratio.view(view) + mo.view(view)
            return fixed.to(out.dtype)

        handles.append(work[name].register_forward_hook(post))
    try:
        compressed(*data)
    finally:
        for h in handles:
            h.remove()


def bn_reset(model: nn.Module, data: tuple[Tensor, ...]) -> None:
    """Recompute every batch norm's running statistics on ``data`` (exact averages)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        # The compressed model may share untouched buffers with the caller's model:
        # give each BN its own before resetting them in place.
        for attr in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(m, attr, None)
            if value is not None:
                setattr(m, attr, value.clone())
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for part in _batches(data, len(data[0])):  # one batch: the exact statistics
            model(*part)
    finally:
        for m, (mom, t) in zip(bns, saved, strict=True):
            m.momentum, m.training = mom, t


def calibrate(
    original: nn.Module,
    compressed: nn.Module,
    groups: Sequence[object],
    plans: Sequence[object],
    data: Tensor | Sequence[Tensor],
    steps: Sequence[str],
    ridge: float,
    folded: frozenset[str] = frozenset(),
) -> None:
    """Run the calibration ``steps`` on ``compressed`` (in place), in order.

    ``folded`` names producers whose rows were replaced by folding's centroids;
    a consumer that is such a producer is not refit (its target is not a row
    of the original layer).
    """
    inputs = _inputs(data)
    producer_rows = {group_fields(p.group)[0]: p.kept for p in plans}  # type: ignore[attr-defined]
    consumers = [group_fields(p.group)[2] for p in plans]  # type: ignore[attr-defined]
    succ = successor_bns(
        original, tuple(x[:1] for x in inputs), list(dict.fromkeys(consumers + list(producer_rows)))
    )
    with torch.no_grad(), evaluating(original), evaluating(compressed):
        for step in steps:
            if step == "flip":
                inputs = tuple(
                    torch.cat([x, x.flip(-1)]) if x.dim() == 4 and x.is_floating_point() else x
                    for x in inputs
                )
            elif step in ("lstsq", "lstsq-block", "lstsq-joint"):
                todo = [(c, producer_rows.get(c)) for c in consumers if c not in folded]
                parents = {}
                if step != "lstsq":  # consumers that are producers keep their own target
                    plain = [c for c, rows in todo if rows is None]
                    parents = residual_parents(original, inputs, plain, succ)
                extra: list[tuple[str, Tensor | None]] = []
                if step == "lstsq-joint":  # the producers' kept rows too, in the same pass
                    listed = {c for c, _r in todo}
                    extra = [
                        (p, rows)
                        for p, rows in producer_rows.items()
                        if p not in folded and p not in listed
                    ]
                lstsq_refit(
                    original,
                    compressed,
                    todo + extra,
                    inputs,
                    ridge,
                    succ,
                    parents,
                    skip_unchanged=[p for p, _r in extra],
                )
            elif step == "repair":
                targets = []
                for c in consumers:
                    if c in producer_rows:
                        continue  # repaired as the next group's producer output
                    targets.append((succ.get(c, c), None))
                for p in plans:
                    _prod, bn, _c, _f = group_fields(p.group)  # type: ignore[attr-defined]
                    if bn is not None:
                        targets.append((bn, p.kept))  # type: ignore[attr-defined]
                repair_stats(original, compressed, _ordered(original, targets), inputs)
            elif step == "bn":
                bn_reset(compressed, inputs)
            else:
                raise ValueError(f"unknown calibrate step {step!r}")


def _ordered(
    model: nn.Module, targets: list[tuple[str, Tensor | None]]
) -> list[tuple[str, Tensor | None]]:
    order = {name: i for i, (name, _m) in enumerate(model.named_modules())}
    return sorted(targets, key=lambda t: order.get(t[0], 0))
