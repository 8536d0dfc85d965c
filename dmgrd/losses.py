"""Losses of the reverse-distillation family (SPEC §1.5, §3.4, §4.5, §7.5)."""

import math

import torch
import torch.nn.functional as F

from dmgrd import ops
from dmgrd.numerics import level_sum
from dmgrd.ops.cosine_kd_loss import REDUCTIONS as KD_REDUCTIONS

COS_CHAN_MODES = ("channel", "flatten")
SSOT_MODES = ("sinkhorn", "legacy", "off")


def kd_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], reduction: str = "flatten") -> torch.Tensor:
    """Σ_l mean_b [1 - cos]: over the flattened C·H·W vector of each image (``"flatten"``, the official code)
    or per pixel over channels and averaged (``"pixel"``, the RD4AD paper; DRD's ``cos_pixel``). Accumulated
    in float32.

    Runs :func:`dmgrd.ops.cosine_kd_loss` (fused forward and backward; its torch reference under
    ``use_backend("torch")``)."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    return ops.cosine_kd_loss(teacher, student, reduction)


def cos_chan(teacher: list[torch.Tensor], student: list[torch.Tensor], mode: str = "channel") -> torch.Tensor:
    """DRD's "individual image" term (SPEC §7.5), Σ_l over the levels, in float32.

    ``"channel"``: mean_{b,c} [1 - cos over H·W of channel c of image b], what the official code computes (it
    passes each level as one tensor to RD4AD's per-image loss, whose loop then runs over the images and
    reshapes each to C x HW). ``"flatten"``: mean_b [1 - cos over C·H·W], the per-image cosine that loss
    computes when given a list of levels (equal to ``kd_loss(..., "flatten")``).
    """
    if mode not in COS_CHAN_MODES:
        raise ValueError(f"cos_chan mode must be one of {COS_CHAN_MODES}, got {mode!r}")
    if mode == "flatten":
        return kd_loss(teacher, student, "flatten")
    return level_sum((1 - F.cosine_similarity(t.float().flatten(2), s.float().flatten(2), dim=2)).mean()
                     for t, s in zip(teacher, student, strict=True))


def seg_l1(anomaly_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |A - M| in float32: DRD's segmentation term between a training anomaly map and its target mask."""
    if anomaly_map.shape != target.shape:
        raise ValueError(f"anomaly_map {tuple(anomaly_map.shape)} and target {tuple(target.shape)} must match")
    return (anomaly_map.float() - target.float()).abs().mean()


def contrast_loss(abnormal: list[torch.Tensor], normal: list[torch.Tensor], margin: float = 0.5) -> torch.Tensor:
    """Σ_l mean_b max(0, cos(vec a_l[b], vec n_l[b]) - margin): CosineEmbeddingLoss with target -1."""
    return level_sum(F.relu(F.cosine_similarity(a.float().flatten(1), n.float().flatten(1), dim=1) - margin).mean()
                     for a, n in zip(abnormal, normal, strict=True))


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, scaling: float = 0.5,
                        diameter: float | None = None) -> torch.Tensor:
    """Debiased entropic OT between uniform point clouds, one problem per batch item: [B, N, D] x [B, M, D] -> [B].

    Cost |x - y|^2 / 2, epsilon = blur^2, annealed from ``diameter^2`` down to ``blur^2`` by ``scaling``
    (the geomloss ``SamplesLoss("sinkhorn", p=2, debias=True)`` conventions), symmetric log-domain updates.
    """
    x, y = x.float(), y.float()
    if diameter is None:
        with torch.no_grad():
            both = torch.cat([x, y], dim=1)
            diameter = (both.amax(1) - both.amin(1)).norm(dim=-1).max().item() or 1.0
    eps_list = _epsilon_schedule(diameter, blur, scaling)
    return _ot_entropic(x, y, eps_list) - 0.5 * (_ot_self(x, eps_list) + _ot_self(y, eps_list))


def _epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    steps = max(math.ceil(math.log(diameter / blur) / -math.log(scaling)), 0)
    return [diameter**2] + [(diameter * scaling**i) ** 2 for i in range(1, steps)] + [blur**2] * 2


def _ot_entropic(x: torch.Tensor, y: torch.Tensor, eps_list: list[float]) -> torch.Tensor:
    """Regularised OT cost <a, f> + <b, g> after symmetric Sinkhorn iterations (dual potentials f, g).

    The annealing runs without autograd; one last differentiable update from the converged potentials gives
    the gradient (the envelope theorem; geomloss's ``last_extrapolation``).
    """
    cost = torch.cdist(x, y).square() / 2  # B x N x M
    log_a = -math.log(x.shape[1])
    log_b = -math.log(y.shape[1])

    def update(f, g, eps, cost):
        f_new = -eps * torch.logsumexp(log_b + (g.unsqueeze(1) - cost) / eps, dim=2)
        g_new = -eps * torch.logsumexp(log_a + (f.unsqueeze(2) - cost) / eps, dim=1)
        return f_new, g_new

    f = torch.zeros(x.shape[:2], device=x.device)
    g = torch.zeros(y.shape[:2], device=y.device)
    with torch.no_grad():
        for eps in eps_list:
            f_new, g_new = update(f, g, eps, cost.detach())
            f, g = 0.5 * (f + f_new), 0.5 * (g + g_new)
    f, g = update(f, g, eps_list[-1], cost)
    return f.mean(1) + g.mean(1)


def _ot_self(x: torch.Tensor, eps_list: list[float]) -> torch.Tensor:
    """:func:`_ot_entropic` of ``x`` with itself, with one potential: the cost is symmetric, so the symmetric
    updates keep ``f == g`` from their common start, and the two halves of the value and gradient are equal."""
    cost = torch.cdist(x, x).square() / 2
    log_a = -math.log(x.shape[1])

    def update(f, eps, cost):
        return -eps * torch.logsumexp(log_a + (f.unsqueeze(1) - cost) / eps, dim=2)

    f = torch.zeros(x.shape[:2], device=x.device)
    with torch.no_grad():
        for eps in eps_list:
            f = 0.5 * (f + update(f, eps, cost.detach()))
    return 2 * update(f, eps_list[-1], cost).mean(1)


def ssot_loss(feats: list[torch.Tensor], mode: str, generator: torch.Generator | None = None,
              num_points: int = 1024, blur: float = 0.05) -> torch.Tensor:
    """Self-supervised OT between each sample's feature cloud and another sample's (SPEC §3.4).

    ``"sinkhorn"``: B problems per level, x = the sample's pixels (L2-normalised over channels, up to
    ``num_points`` of them), y = the same for the batch rolled by a random non-zero shift.
    ``"legacy"``: the official construction, softmax(vec Z) of the batch as *one* cloud of B points against
    its permutation: the same empirical measure, so the divergence is ~0 with no useful gradient.
    """
    if mode not in SSOT_MODES:
        raise ValueError(f"ssot must be one of {SSOT_MODES}, got {mode!r}")
    batch, device = feats[0].shape[0], feats[0].device
    if mode == "off" or batch < 2:
        return torch.zeros((), device=device)
    if mode == "legacy":
        perm = torch.randperm(batch, generator=generator).to(device)
        clouds = [torch.softmax(z.float().flatten(1), dim=1).unsqueeze(0) for z in feats]  # 1 x B x CHW each
        return level_sum(sinkhorn_divergence(cloud, cloud[:, perm], blur=blur).sum() for cloud in clouds)
    shift = int(torch.randint(1, batch, (1,), generator=generator))
    eps_list = _epsilon_schedule(2.0, blur, 0.5)  # unit vectors: diameter 2
    terms = []
    for z in feats:
        points = F.normalize(z.float().flatten(2).transpose(1, 2), dim=2)  # B x HW x C
        if points.shape[1] > num_points:
            keep = torch.randperm(points.shape[1], generator=generator)[:num_points].to(device)
            points = points[:, keep]
        # The batch mean of sinkhorn_divergence(points, rolled): the rolled clouds' self-terms are the same
        # problems as the points' own, so both debiasing halves average to the points' self-term.
        rolled = points.roll(shift, dims=0)
        terms.append((_ot_entropic(points, rolled, eps_list) - _ot_self(points, eps_list)).mean())
    return level_sum(terms)


def triplet_loss(anchor: list[torch.Tensor], positive: list[torch.Tensor], negative: list[torch.Tensor],
                 margin: float = 1.0) -> torch.Tensor:
    """Σ_l TripletMarginLoss(margin) on the L2-normalised global-average-pooled feature vectors.

    DM-GRD's ``triplet="embedding"`` passes (Z_n, Z_n of other samples, Z_a); ``"legacy"`` (the official code)
    passes memory items only, with positive and negative the same tensor, so the value is the constant
    ``num_levels * margin`` and has no gradient (SPEC §4.5).
    """
    def pooled(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float().mean((2, 3)), dim=1)

    return level_sum(F.triplet_margin_loss(pooled(a), pooled(p), pooled(n), margin=margin)
                     for a, p, n in zip(anchor, positive, negative, strict=True))


def memory_margin_loss(student: list[torch.Tensor], normal: list[torch.Tensor], abnormal: list[torch.Tensor],
                       margin: float = 1.0) -> torch.Tensor:
    """Σ_l mean_b relu(d(s, nearest normal) - d(s, nearest abnormal) + margin), s = normalise(GAP(S_l[b])).

    ``normal`` and ``abnormal`` are per level the L2-normalised GAP vectors of the memory items ([L, C_l]);
    ``d`` is the squared L2 distance of unit vectors, ``2 (1 - cos)`` (:func:`dmgrd.ops.dual_memory_margin`).
    DM-GRD's ``triplet="memory"`` passes the student output of every training input.
    """
    queries = [F.normalize(s.to(n.dtype).mean((2, 3)), dim=1) for s, n in zip(student, normal, strict=True)]
    return level_sum(ops.dual_memory_margin(q, n, a, margin, "l2")[4].mean()
                     for q, n, a in zip(queries, normal, abnormal, strict=True))
