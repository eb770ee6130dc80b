"""Attribute read-out of generated images, prompt adherence, and features for a Frechet distance.

The read-out is rule-based and exact on clean generator images:

1. every pixel gets the nearest :data:`~segquant_fx.t2i.data.PALETTE` color;
2. the background is the most frequent color;
3. every other color covering at least ``min_pixels`` pixels, some of them interior (all four
   neighbours the same color), is an object (objects of one scene have different colors, so a color
   names an object; blended edges of generated images that map to a third color are thin, not objects);
4. each object's mask is compared (IoU) with a bank of every template the generator can draw (4 shapes x
   2 sizes x 5 positions x 9 jitters = 360 masks, one matrix product); the best template gives shape,
   size and position. On a clean image the true template has IoU 1 and no other template reaches it;
   on a generated image the nearest template is read.

:func:`score_adherence` compares the read-out with the prompts' scenes attribute by attribute (background,
object count, object colors present, shape, size and position where the prompt names them) and overall
(every scored attribute of the image right). :func:`chance_adherence` scores images against the prompts
of *other* scenes: what a model that ignores its prompt (but draws perfect images) would get.

:func:`image_features` is a 64-dim descriptor (palette occupancy per region, color purity, edge energy,
object read-out quality) for :func:`frechet_distance` between image sets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.data import (
    IMAGE_SIZE,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZE_RADII,
    SIZES,
    Scenes,
    device_tables,
    render,
    shape_masks,
)

__all__ = [
    "ATTRIBUTES",
    "Readout",
    "read_attributes",
    "score_adherence",
    "judge",
    "chance_adherence",
    "image_features",
    "frechet_distance",
    "template_bank",
    "FEATURE_DIM",
    "QUALITY_WEIGHT",
]

#: Attributes :func:`score_adherence` reports, plus ``"overall"``.
ATTRIBUTES = ("background", "count", "color", "shape", "size", "position")


@functools.cache
def _template_bank_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    shapes, sizes, positions, jx, jy = torch.meshgrid(
        torch.arange(len(SHAPES)),
        torch.arange(len(SIZES)),
        torch.arange(len(POSITIONS)),
        torch.arange(-1, 2),
        torch.arange(-1, 2),
        indexing="ij",
    )
    attrs = torch.stack([shapes, sizes, positions, jx, jy], -1).reshape(-1, 5)
    centers = torch.tensor(POSITION_CENTERS)
    radius = torch.tensor(SIZE_RADII)[attrs[:, 1]]
    cx = centers[attrs[:, 2], 0] + attrs[:, 3]
    cy = centers[attrs[:, 2], 1] + attrs[:, 4]
    masks = shape_masks(attrs[:, 0], radius, cx, cy).reshape(len(attrs), -1).float()
    return masks, attrs


def template_bank(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks [K, H*W] float, attrs [K, 5])``; attrs = (shape, size, position, jitter x, jitter y)."""
    return _template_bank_on(torch.device(device))


@functools.lru_cache(maxsize=8)
def _template_bank_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    masks, attrs = _template_bank_cpu()
    return masks.to(device), attrs.to(device)


@dataclass(frozen=True)
class Readout:
    """What :func:`read_attributes` sees in ``B`` images (``C`` = 9 palette colors).

    Attributes:
        labels: ``[B, H, W]`` nearest palette color per pixel.
        background: ``[B]`` most frequent color.
        counts: ``[B, C]`` pixels per color.
        interior: ``[B, C]`` pixels per color whose four neighbours have the same color.
        is_object: ``[B, C]`` colors read as objects (not background, enough pixels and interior pixels).
        shape: ``[B, C]`` best template's shape per color (meaningful where ``is_object``).
        size: ``[B, C]`` best template's size.
        position: ``[B, C]`` best template's position.
        iou: ``[B, C]`` IoU of the best template.
    """

    labels: torch.Tensor
    background: torch.Tensor
    counts: torch.Tensor
    interior: torch.Tensor
    is_object: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    iou: torch.Tensor

    @property
    def n_objects(self) -> torch.Tensor:
        """``[B]`` number of objects read."""
        return self.is_object.sum(1)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE)
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"expected images [B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] in [0, 1], got {shape}")
    return images.detach().float()


@torch.no_grad()
def read_attributes(images: torch.Tensor, *, min_pixels: int = 12, min_interior: int = 6) -> Readout:
    """Read background, objects and their attributes from ``images`` (``[B, 3, 32, 32]`` in ``[0, 1]``).

    A non-background color is an object if it covers at least ``min_pixels`` pixels of which at least
    ``min_interior`` have all four neighbours of the same color (thin blended edges are not objects).
    """
    x = _check_images(images)
    dev = x.device
    palette = device_tables(dev)["palette"]
    b = x.shape[0]
    d = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # [B, C, H, W]
    labels = d.argmin(1)
    nc = palette.shape[0]
    onehot = torch.nn.functional.one_hot(labels.reshape(b, -1), nc).float()  # [B, HW, C]
    counts = onehot.sum(1)
    background = counts.argmax(1)
    # interior pixels: all four neighbours have the same color. Blended edges between two colors of a
    # generated image can map to a third palette color (red/blue edge pixels are nearest to gray); such
    # thin rings have no interior, while every template has at least 12 interior pixels.
    same = onehot.transpose(1, 2).reshape(b, nc, IMAGE_SIZE, IMAGE_SIZE)
    pad = torch.nn.functional.pad(same, (1, 1, 1, 1))
    interior = (
        same * pad[..., :-2, 1:-1] * pad[..., 2:, 1:-1] * pad[..., 1:-1, :-2] * pad[..., 1:-1, 2:]
    ).sum((2, 3))
    is_object = (
        (counts >= min_pixels)
        & (interior >= min_interior)
        & (torch.arange(nc, device=dev)[None] != background[:, None])
    )
    masks, attrs = template_bank(dev)
    # one GEMM: [B*C, HW] @ [HW, K] (einsum's path was ~10x slower on CPU)
    inter = (onehot.transpose(1, 2).reshape(b * nc, -1) @ masks.T).reshape(b, nc, -1)  # [B, C, K]
    union = counts[:, :, None] + masks.sum(1)[None, None, :] - inter
    iou = inter / union.clamp_min(1.0)
    best_iou, best = iou.max(2)
    return Readout(
        labels=labels,
        background=background,
        counts=counts.long(),
        interior=interior.long(),
        is_object=is_object,
        shape=attrs[best, 0],
        size=attrs[best, 1],
        position=attrs[best, 2],
        iou=best_iou,
    )


@torch.no_grad()
def judge(images: torch.Tensor, scenes: Scenes, *, min_pixels: int = 12) -> dict[str, torch.Tensor]:
    """Per-image and per-object verdicts of ``images`` against ``scenes``.

    Returns:
        Boolean tensors: ``overall``, ``background``, ``count`` ``[B]``; ``color``, ``shape``, ``size``,
        ``position`` ``[B, 2]``; and the masks they are scored on: ``objects`` (used slots),
        ``size_named`` and ``position_named`` ``[B, 2]``.
    """
    x = _check_images(images)
    if len(scenes) != x.shape[0]:
        raise ConfigError(f"{x.shape[0]} images but {len(scenes)} scenes; pass one scene per image")
    sc = scenes.to(x.device)
    ro = read_attributes(x, min_pixels=min_pixels)
    used = sc.object_mask  # [B, 2]
    col = sc.color
    present = ro.is_object.gather(1, col)
    shape_ok = present & (ro.shape.gather(1, col) == sc.shape)
    size_ok = present & (ro.size.gather(1, col) == sc.size)
    pos_ok = present & (ro.position.gather(1, col) == sc.position)
    bg_ok = ro.background == sc.background
    count_ok = ro.n_objects == sc.n_objects
    m_size = sc.mention_size & used
    m_pos = sc.mention_position & used
    obj_ok = present & shape_ok & (size_ok | ~m_size) & (pos_ok | ~m_pos)
    return {
        "overall": bg_ok & count_ok & (obj_ok | ~used).all(1),
        "background": bg_ok,
        "count": count_ok,
        "color": present,
        "shape": shape_ok,
        "size": size_ok,
        "position": pos_ok,
        "objects": used,
        "size_named": m_size,
        "position_named": m_pos,
    }


_SCORED_ON = {"color": "objects", "shape": "objects", "size": "size_named", "position": "position_named"}


def score_adherence(
    images: torch.Tensor, scenes: Scenes, *, min_pixels: int = 12, batch_size: int = 1024
) -> dict[str, float]:
    """Prompt adherence of ``images`` to ``scenes`` (e.g. :func:`~segquant_fx.t2i.data.parse_prompts` of the prompts).

    Returns:
        ``{"overall", "background", "count", "color", "shape", "size", "position", "n"}``: fractions in
        ``[0, 1]``. ``background``/``count``/``overall`` are per image; ``color`` (the object's color is
        present), ``shape``, ``size`` and ``position`` per prompted object, the last two only where the
        prompt names them. ``overall``: every scored attribute of the image is right (see :func:`judge`).
    """
    x = _check_images(images)
    if len(scenes) != x.shape[0]:
        raise ConfigError(f"{x.shape[0]} images but {len(scenes)} scenes; pass one scene per image")
    sums = dict.fromkeys(("overall", *ATTRIBUTES), 0.0)
    counts = dict.fromkeys(("overall", *ATTRIBUTES), 0)
    for start in range(0, x.shape[0], batch_size):
        v = judge(x[start : start + batch_size], scenes[start : start + batch_size], min_pixels=min_pixels)
        for key in sums:
            mask = v[_SCORED_ON[key]] if key in _SCORED_ON else None
            ok = v[key] if mask is None else v[key] & mask
            sums[key] += float(ok.sum())
            counts[key] += ok.numel() if mask is None else int(mask.sum())
    out = {k: (sums[k] / counts[k] if counts[k] else float("nan")) for k in sums}
    out["n"] = float(x.shape[0])
    return out


def chance_adherence(scenes: Scenes, *, shift: int = 1) -> dict[str, float]:
    """Adherence of perfect images of ``scenes`` scored against the prompts of *other* scenes.

    Image ``i`` is scored against scene ``(i + shift) mod B``: the level of a model that draws clean,
    in-distribution images but ignores its prompt.
    """
    if len(scenes) < 2:
        raise ConfigError("chance_adherence needs at least 2 scenes")
    idx = (torch.arange(len(scenes), device=scenes.device) + shift) % len(scenes)
    return score_adherence(render(scenes), scenes[idx])


# --------------------------------------------------------------------------------------------------
# features and Frechet distance
# --------------------------------------------------------------------------------------------------

#: Length of :func:`image_features`.
FEATURE_DIM = 64


_PURITY_BINS = (0.05, 0.1, 0.2, 0.3, 0.5)
#: Weight of the quality features (purity, edges, objects) relative to the content features.
QUALITY_WEIGHT = 4.0


@torch.no_grad()
def image_features(images: torch.Tensor, *, temperature: float = 0.05) -> torch.Tensor:
    """A ``[B, 64]`` descriptor of ``images`` for :func:`frechet_distance`: content and quality.

    * content (45): soft palette occupancy (softmax of ``-distance² / temperature``) over the whole
      image and each quadrant;
    * color purity (7): histogram of each pixel's distance to the nearest palette color (6 bins) and
      its mean; clean images sit entirely in the first bin;
    * edges (4): mean absolute neighbour difference per quadrant;
    * objects (8): number of objects read, mean and minimum template IoU of the objects, their shape
      histogram (4), object area fraction; clean images have IoU 1.

    The quality features (weighted by :data:`QUALITY_WEIGHT`) are (nearly) constant on clean generator
    images, so noise, blur, color drift or broken shapes move the distance far more than the sampling
    noise of the content features does.
    """
    x = _check_images(images)
    b = x.shape[0]
    palette = device_tables(x.device)["palette"]
    d = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
    p = torch.softmax(-d / temperature, dim=1)  # [B, 9, H, W]
    h = IMAGE_SIZE // 2
    regions = [p, p[..., :h, :h], p[..., :h, h:], p[..., h:, :h], p[..., h:, h:]]
    occ = torch.cat([r.mean((2, 3)) for r in regions], 1)
    dist = d.min(1).values.clamp_min(0).sqrt().reshape(b, -1)
    edges_ = torch.tensor((0.0, *_PURITY_BINS, float("inf")), device=x.device)
    purity = torch.stack(
        [
            ((dist >= lo) & (dist < hi)).float().mean(1)
            for lo, hi in zip(edges_[:-1], edges_[1:], strict=True)
        ],
        1,
    )
    purity = torch.cat([purity, dist.mean(1, keepdim=True)], 1)
    # absolute differences to the right and down neighbours, summed over channels, zero at the border
    e = torch.nn.functional.pad((x[..., :, 1:] - x[..., :, :-1]).abs().sum(1), (0, 1))
    e = e + torch.nn.functional.pad((x[..., 1:, :] - x[..., :-1, :]).abs().sum(1), (0, 0, 0, 1))
    edges = torch.stack([e[:, :h, :h], e[:, :h, h:], e[:, h:, :h], e[:, h:, h:]], 1).mean((2, 3))
    ro = read_attributes(x)
    obj = ro.is_object.float()
    n = obj.sum(1)
    iou_mean = (ro.iou * obj).sum(1) / n.clamp_min(1.0)
    iou_min = torch.where(ro.is_object, ro.iou, torch.ones_like(ro.iou)).min(1).values * (n > 0)
    shapes = torch.nn.functional.one_hot(ro.shape, len(SHAPES)).float() * obj[..., None]
    area = (ro.counts.float() * obj).sum(1) / float(IMAGE_SIZE * IMAGE_SIZE)
    objects = torch.cat([n[:, None], iou_mean[:, None], iou_min[:, None], shapes.sum(1), area[:, None]], 1)
    # quality features weighted up so that they, not the sampling noise of the content features, dominate
    return torch.cat([occ, QUALITY_WEIGHT * purity, QUALITY_WEIGHT * edges, QUALITY_WEIGHT * objects], 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½)``, computed in float64.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ConfigError(
            f"frechet_distance needs [N, D] and [M, D] features, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ConfigError("frechet_distance needs at least 2 samples per set")
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2.0 * torch.trace(cross)
    return float(value.clamp_min(0.0))
