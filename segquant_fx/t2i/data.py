"""Procedural text-to-image data: 32x32 RGB images of colored shapes and the prompts that describe them.

A *scene* is a background color and one or two objects, each with a color, a shape, a size and a
position. Scenes are sampled as batched tensors (:class:`Scenes`), rendered with pure tensor ops
(:func:`render`, no per-pixel Python loops, so thousands of images per call on CPU or GPU), turned into
prompts (:func:`scene_prompts`) and token ids (:func:`scene_token_ids`, vectorized, equal to
``tokenize(scene_prompts(...))``). :func:`parse_prompts` is the inverse of :func:`scene_prompts`.

Grammar (every word is in :data:`VOCAB`)::

    prompt   := object ["and" object] "on a" BG "background"
    object   := "a" [SIZE] COLOR SHAPE [position]
    position := "in the center" | "at the top left" | "at the top right"
              | "at the bottom left" | "at the bottom right"

e.g. ``"a small red circle at the top left and a blue cross on a gray background"``. An attribute left
out of the prompt (size, position) is still drawn at random in the image; it is simply not scored.

Geometry (pixel centers at ``i + 0.5``, ``y`` grows downwards): small objects have half-extent 4 px,
large ones 7 px; positions are the image center ``(16, 16)`` and the quadrant centers ``(8, 8)`` ...,
each jittered by -1, 0 or +1 px per axis. Two-object scenes use two different corners and two
different colors, so objects never overlap and each color names one object. Edges are hard (no
anti-aliasing), which makes the read-out in :mod:`segquant_fx.t2i.readout` exact on clean images.

Determinism: the same seed, device and :class:`SceneConfig` give the same scenes. CPU and CUDA random
streams differ, so fixed evaluation sets are drawn on the CPU (:func:`heldout_scenes`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from segquant_fx.errors import ConfigError

__all__ = [
    "IMAGE_SIZE",
    "MAX_TOKENS",
    "PALETTE",
    "COLOR_NAMES",
    "OBJECT_COLORS",
    "SHAPES",
    "SIZES",
    "SIZE_RADII",
    "POSITIONS",
    "POSITION_CENTERS",
    "VOCAB",
    "PAD_ID",
    "SceneConfig",
    "Scenes",
    "sample_scenes",
    "heldout_scenes",
    "render",
    "shape_masks",
    "object_geometry",
    "device_tables",
    "scene_prompts",
    "scene_token_ids",
    "parse_prompts",
    "tokenize",
    "detokenize",
]

IMAGE_SIZE = 32
#: Token ids per prompt (the longest prompt has 21 words; the rest is padding).
MAX_TOKENS = 24

#: The nine colors every pixel is drawn from (RGB in [0, 1]); index = color id.
COLOR_NAMES: tuple[str, ...] = ("black", "white", "gray", "red", "green", "blue", "yellow", "cyan", "magenta")
PALETTE = torch.tensor(
    [
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [0.5, 0.5, 0.5],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
    ]
)
#: Color ids objects may have (gray is a background-only color).
OBJECT_COLORS: tuple[int, ...] = (0, 1, 3, 4, 5, 6, 7, 8)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
#: Half-extent in pixels of each size.
SIZE_RADII: tuple[float, ...] = (4.0, 7.0)
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
#: (x, y) center of each position before jitter.
POSITION_CENTERS: tuple[tuple[float, float], ...] = (
    (16.0, 16.0),
    (8.0, 8.0),
    (24.0, 8.0),
    (8.0, 24.0),
    (24.0, 24.0),
)
_POSITION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("in", "the", "center"),
    ("at", "the", "top", "left"),
    ("at", "the", "top", "right"),
    ("at", "the", "bottom", "left"),
    ("at", "the", "bottom", "right"),
)

#: The word-level vocabulary; id 0 pads (an all-padding sequence is the empty prompt used for CFG).
VOCAB: tuple[str, ...] = (
    "<pad>",
    "a",
    "and",
    "on",
    "background",
    *SIZES,
    *COLOR_NAMES,
    *SHAPES,
    "in",
    "at",
    "the",
    "center",
    "top",
    "bottom",
    "left",
    "right",
)
PAD_ID = 0
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}


@functools.lru_cache(maxsize=16)
def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Constant lookup tables on ``device``, built once.

    Creating them per call would copy host memory to the GPU every training step, and a blocking
    host-to-device copy synchronizes the stream, which would stall the CPU until the GPU drained.
    Callers must not modify them.
    """
    phrase = torch.full((len(POSITIONS), 4), -1, dtype=torch.long)
    for p, words in enumerate(_POSITION_PHRASES):
        phrase[p, : len(words)] = torch.tensor([_WORD_ID[w] for w in words])
    return {
        "palette": PALETTE.to(device),
        "object_colors": torch.tensor(OBJECT_COLORS, device=device),
        "radii": torch.tensor(SIZE_RADII, device=device),
        "centers": torch.tensor(POSITION_CENTERS, device=device),
        "color_ids": torch.tensor([_WORD_ID[c] for c in COLOR_NAMES], device=device),
        "shape_ids": torch.tensor([_WORD_ID[c] for c in SHAPES], device=device),
        "size_ids": torch.tensor([_WORD_ID[c] for c in SIZES], device=device),
        "phrase": phrase.to(device),
    }


def device_tables(device: torch.device | str) -> dict[str, torch.Tensor]:
    """Read-only constant tables (palette, radii, position centers, word ids) on ``device``, cached."""
    return _tables(torch.device(device))


@dataclass(frozen=True, kw_only=True)
class SceneConfig:
    """How scenes are drawn.

    Attributes:
        p_two: Probability of a two-object scene.
        p_mention_size: Probability that the prompt names an object's size.
        p_mention_position: Probability that the prompt names an object's position.
        jitter: Maximum position jitter in pixels per axis (0 or 1).
    """

    p_two: float = 0.4
    p_mention_size: float = 0.8
    p_mention_position: float = 0.8
    jitter: int = 1

    def __post_init__(self) -> None:
        for name in ("p_two", "p_mention_size", "p_mention_position"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"SceneConfig.{name}={v!r} must be a probability in [0, 1]")
        if self.jitter not in (0, 1):
            raise ConfigError(f"SceneConfig.jitter={self.jitter!r} must be 0 or 1 (objects would overlap)")

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready dict (model cards record it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Scenes:
    """A batch of ``B`` scenes as tensors (object slot 1 is unused where ``n_objects == 1``).

    Attributes:
        background: ``[B]`` color id of the background.
        n_objects: ``[B]`` 1 or 2.
        color: ``[B, 2]`` color id per object.
        shape: ``[B, 2]`` index into :data:`SHAPES`.
        size: ``[B, 2]`` index into :data:`SIZES`.
        position: ``[B, 2]`` index into :data:`POSITIONS`.
        jitter: ``[B, 2, 2]`` (dx, dy) offsets in pixels.
        mention_size: ``[B, 2]`` whether the prompt names the size.
        mention_position: ``[B, 2]`` whether the prompt names the position.
    """

    background: torch.Tensor
    n_objects: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    jitter: torch.Tensor
    mention_size: torch.Tensor
    mention_position: torch.Tensor

    def __len__(self) -> int:
        return int(self.background.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.background.device

    def to(self, device: torch.device | str) -> Scenes:
        """The same scenes on ``device``."""
        return Scenes(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __getitem__(self, index: slice | torch.Tensor | Sequence[int]) -> Scenes:
        """A sub-batch (``scenes[i:j]`` or an index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Scenes(*(getattr(self, f.name)[index] for f in fields(self)))

    @property
    def object_mask(self) -> torch.Tensor:
        """``[B, 2]`` True where the object slot is used."""
        return torch.arange(2, device=self.device)[None, :] < self.n_objects[:, None]


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of scenes must be a positive int, got {n!r}")
    return n


def sample_scenes(
    n: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    config: SceneConfig | None = None,
) -> Scenes:
    """Draw ``n`` scenes.

    Args:
        n: Number of scenes.
        generator: Random generator; must live on ``device``. ``None`` uses the global RNG.
        device: Where the tensors live (default: the generator's device, else CPU).
        config: Sampling probabilities (default :class:`SceneConfig`).

    Returns:
        A :class:`Scenes` batch.
    """
    n = _check_count(n)
    cfg = config or SceneConfig()
    dev = (
        torch.device(device)
        if device is not None
        else (generator.device if generator is not None else torch.device("cpu"))
    )
    g = generator

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    n_objects = 1 + (uniform(n) < cfg.p_two).long()
    two = n_objects == 2
    # object colors: two distinct draws from OBJECT_COLORS, then a background different from both
    obj_colors = device_tables(dev)["object_colors"]
    k = len(OBJECT_COLORS)
    c0 = torch.randint(0, k, (n,), generator=g, device=dev)
    c1 = (c0 + torch.randint(1, k, (n,), generator=g, device=dev)) % k
    color = torch.stack([obj_colors[c0], obj_colors[c1]], dim=1)
    # background: uniform over the palette minus the object colors of this scene
    nc = PALETTE.shape[0]
    allowed = torch.ones(n, nc, dtype=torch.bool, device=dev)
    # scatter instead of boolean-mask indexing: a mask index would synchronize the GPU every step
    allowed.scatter_(1, color[:, :1], False)
    allowed.scatter_(1, torch.where(two, color[:, 1], color[:, 0])[:, None], False)
    scores = torch.where(allowed, uniform(n, nc), torch.full((n, nc), -1.0, device=dev))
    background = scores.argmax(dim=1)

    shape = torch.randint(0, len(SHAPES), (n, 2), generator=g, device=dev)
    size = torch.randint(0, len(SIZES), (n, 2), generator=g, device=dev)
    # one object: any of the 5 positions; two objects: two different corners (1..4)
    single_pos = torch.randint(0, len(POSITIONS), (n,), generator=g, device=dev)
    corners = torch.argsort(uniform(n, 4), dim=1)[:, :2] + 1
    position = torch.where(two[:, None], corners, torch.stack([single_pos, torch.zeros_like(single_pos)], 1))
    jitter = torch.randint(-cfg.jitter, cfg.jitter + 1, (n, 2, 2), generator=g, device=dev)
    mention_size = uniform(n, 2) < cfg.p_mention_size
    mention_position = uniform(n, 2) < cfg.p_mention_position
    # keep unused slots canonical so that equal scenes compare equal
    used = torch.arange(2, device=dev)[None, :] < n_objects[:, None]
    zero = torch.zeros_like(shape)
    return Scenes(
        background=background,
        n_objects=n_objects,
        color=torch.where(used, color, zero),
        shape=torch.where(used, shape, zero),
        size=torch.where(used, size, zero),
        position=torch.where(used, position, zero),
        jitter=torch.where(used[..., None], jitter, torch.zeros_like(jitter)),
        mention_size=mention_size & used,
        mention_position=mention_position & used,
    )


def heldout_scenes(n: int = 512, seed: int = 1234, config: SceneConfig | None = None) -> Scenes:
    """A fixed evaluation set: ``n`` scenes drawn on the CPU with ``seed`` (same on every machine)."""
    return sample_scenes(n, torch.Generator().manual_seed(seed), config=config)


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def shape_masks(
    shape: torch.Tensor,
    radius: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    image_size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Boolean masks ``[N, H, W]`` of ``N`` shapes (all arguments ``[N]``; coordinates in pixels).

    Pixel ``(i, j)`` (row, column) is inside when its center ``(j + 0.5, i + 0.5)`` satisfies the
    shape's inequality: circle ``dx² + dy² <= r²``; square ``max(|dx|, |dy|) <= r``; triangle (apex
    up) ``|dy| <= r`` and ``|dx| <= (dy + r) / 2``; cross: ``|dx| <= 0.45 r`` and ``|dy| <= r``, or
    the same with ``dx``/``dy`` swapped.
    """
    dev = shape.device
    u = torch.arange(image_size, device=dev, dtype=torch.float32) + 0.5
    dx = u[None, None, :] - cx.float()[:, None, None]
    dy = u[None, :, None] - cy.float()[:, None, None]
    r = radius.float()[:, None, None]
    adx, ady = dx.abs(), dy.abs()
    circle = dx * dx + dy * dy <= r * r
    square = (adx <= r) & (ady <= r)
    triangle = (ady <= r) & (adx <= (dy + r) * 0.5)
    arm = 0.45 * r
    cross = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # [N, 4, H, W]
    return stacked.gather(1, shape.long()[:, None, None, None].expand(-1, 1, image_size, image_size))[:, 0]


def object_geometry(scenes: Scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(radius, cx, cy)``, each ``[B, 2]``, of the objects of ``scenes`` (jitter applied)."""
    tables = device_tables(scenes.device)
    radii, centers = tables["radii"], tables["centers"]
    c = centers[scenes.position]  # [B, 2, 2]
    return radii[scenes.size], c[..., 0] + scenes.jitter[..., 0], c[..., 1] + scenes.jitter[..., 1]


def render(scenes: Scenes) -> torch.Tensor:
    """Images ``[B, 3, 32, 32]`` in ``[0, 1]`` (float32, on the scenes' device)."""
    b = len(scenes)
    palette = device_tables(scenes.device)["palette"]
    img = palette[scenes.background][:, :, None, None].expand(b, 3, IMAGE_SIZE, IMAGE_SIZE).clone()
    radius, cx, cy = object_geometry(scenes)
    used = scenes.object_mask
    for slot in range(2):
        mask = shape_masks(scenes.shape[:, slot], radius[:, slot], cx[:, slot], cy[:, slot])
        mask = mask & used[:, slot, None, None]
        img = torch.where(mask[:, None], palette[scenes.color[:, slot]][:, :, None, None], img)
    return img


# --------------------------------------------------------------------------------------------------
# prompts and tokens
# --------------------------------------------------------------------------------------------------


def _object_words(color: int, shape: int, size: int | None, position: int | None) -> list[str]:
    words = ["a"]
    if size is not None:
        words.append(SIZES[size])
    words += [COLOR_NAMES[color], SHAPES[shape]]
    if position is not None:
        words += list(_POSITION_PHRASES[position])
    return words


def scene_prompts(scenes: Scenes) -> list[str]:
    """The prompt of every scene (see the grammar in the module docstring)."""
    cols = [getattr(scenes, f.name).cpu().tolist() for f in fields(scenes)]
    bg, n_obj, color, shape, size, position, _, m_size, m_pos = cols
    out = []
    for i in range(len(bg)):
        words: list[str] = []
        for slot in range(n_obj[i]):
            if slot:
                words.append("and")
            words += _object_words(
                color[i][slot],
                shape[i][slot],
                size[i][slot] if m_size[i][slot] else None,
                position[i][slot] if m_pos[i][slot] else None,
            )
        words += ["on", "a", COLOR_NAMES[bg[i]], "background"]
        out.append(" ".join(words))
    return out


def scene_token_ids(scenes: Scenes, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids ``[B, max_tokens]`` of the scenes' prompts, built with tensor ops (no strings).

    Equal to ``tokenize(scene_prompts(scenes), max_tokens)``; used on the fly during training.
    """
    dev = scenes.device
    b = len(scenes)
    wid = _WORD_ID
    tables = device_tables(dev)
    color_ids, shape_ids, size_ids = tables["color_ids"], tables["shape_ids"], tables["size_ids"]
    # position phrases as 4 slots; "in the center" leaves its 4th slot unused (id -1)
    phrase = tables["phrase"]

    slots: list[torch.Tensor] = []
    keep: list[torch.Tensor] = []
    true = torch.ones(b, dtype=torch.bool, device=dev)

    def add(ids: torch.Tensor | int, k: torch.Tensor) -> None:
        slots.append(torch.full((b,), ids, dtype=torch.long, device=dev) if isinstance(ids, int) else ids)
        keep.append(k)

    for slot in range(2):
        used = scenes.n_objects > slot
        if slot:
            add(wid["and"], used)
        add(wid["a"], used)
        add(size_ids[scenes.size[:, slot]], used & scenes.mention_size[:, slot])
        add(color_ids[scenes.color[:, slot]], used)
        add(shape_ids[scenes.shape[:, slot]], used)
        ph = phrase[scenes.position[:, slot]]  # [B, 4]
        for j in range(4):
            add(ph[:, j], used & scenes.mention_position[:, slot] & (ph[:, j] >= 0))
    add(wid["on"], true)
    add(wid["a"], true)
    add(color_ids[scenes.background], true)
    add(wid["background"], true)

    ids = torch.stack(slots, dim=1)
    kept = torch.stack(keep, dim=1)
    if ids.shape[1] > max_tokens and bool((kept.sum(1) > max_tokens).any()):
        raise ConfigError(
            f"max_tokens={max_tokens} is shorter than the longest prompt ({int(kept.sum(1).max())} words)"
        )
    # move kept slots to the front, in order (stable sort on "dropped")
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices
    ids = torch.where(kept.gather(1, order), ids.gather(1, order), torch.full_like(ids, PAD_ID))
    if ids.shape[1] < max_tokens:
        ids = torch.cat(
            [ids, torch.full((b, max_tokens - ids.shape[1]), PAD_ID, dtype=ids.dtype, device=dev)], 1
        )
    return ids[:, :max_tokens].contiguous()


def tokenize(prompts: Sequence[str] | str, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids ``[B, max_tokens]`` (int64, CPU) of ``prompts``; ``""`` is the empty (all-padding) prompt.

    Raises:
        ConfigError: A word is not in :data:`VOCAB`, or a prompt has more than ``max_tokens`` words.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = torch.full((len(prompts), max_tokens), PAD_ID, dtype=torch.long)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"prompt {i} is a {type(p).__name__}, not a string")
        words = p.lower().replace(",", " ").split()
        if len(words) > max_tokens:
            raise ConfigError(
                f"prompt {i} has {len(words)} words; the tiny text encoder reads at most {max_tokens}"
            )
        for j, w in enumerate(words):
            if w not in _WORD_ID or w == VOCAB[PAD_ID]:
                raise ConfigError(
                    f"prompt {p!r}: word {w!r} is not in the tiny text encoder's vocabulary; "
                    f"known words: {' '.join(VOCAB[1:])}"
                )
            out[i, j] = _WORD_ID[w]
    return out


def detokenize(token_ids: torch.Tensor) -> list[str]:
    """Prompts back from ``[B, T]`` token ids (padding dropped)."""
    return [" ".join(VOCAB[t] for t in row if t != PAD_ID) for row in token_ids.tolist()]


class _Parser:
    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.words = prompt.lower().replace(",", " ").split()
        self.i = 0

    def fail(self, expected: str) -> ConfigError:
        got = self.words[self.i] if self.i < len(self.words) else "the end of the prompt"
        return ConfigError(
            f"cannot parse prompt {self.prompt!r}: expected {expected} at word {self.i + 1}, got {got!r}; "
            "prompts look like 'a [small|large] COLOR SHAPE [at the top left|...] [and a ...] on a COLOR background'"
        )

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, options: Sequence[str], expected: str) -> int:
        w = self.peek()
        if w not in options:
            raise self.fail(expected)
        self.i += 1
        return list(options).index(w)

    def position(self) -> int | None:
        for p, phrase in enumerate(_POSITION_PHRASES):
            if tuple(self.words[self.i : self.i + len(phrase)]) == phrase:
                self.i += len(phrase)
                return p
        if self.peek() in ("in", "at"):
            raise self.fail("'in the center' or 'at the top|bottom left|right'")
        return None

    def obj(self) -> tuple[int, int, int | None, int | None]:
        self.take(["a"], "'a'")
        size = self.take(SIZES, "a size") if self.peek() in SIZES else None
        color = self.take(COLOR_NAMES, "a color")
        if color not in OBJECT_COLORS:
            self.i -= 1
            raise self.fail(f"an object color ({', '.join(COLOR_NAMES[c] for c in OBJECT_COLORS)})")
        shape = self.take(SHAPES, "a shape")
        return color, shape, size, self.position()


def parse_prompts(prompts: Sequence[str] | str) -> Scenes:
    """Parse prompts of the generator's grammar back into :class:`Scenes` (the inverse of :func:`scene_prompts`).

    Attributes a prompt leaves out get ``mention_* = False`` and value 0; jitter is 0.

    Raises:
        ConfigError: A prompt does not follow the grammar (the message names the word), repeats a color
            or puts two objects in the same place.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if not isinstance(p, str):
            raise ConfigError(f"prompts must be strings, got {type(p).__name__}")
        ps = _Parser(p)
        objs = [ps.obj()]
        if ps.peek() == "and":
            ps.i += 1
            objs.append(ps.obj())
        ps.take(["on"], "'on'")
        ps.take(["a"], "'a'")
        bg = ps.take(COLOR_NAMES, "a background color")
        ps.take(["background"], "'background'")
        if ps.peek() is not None:
            raise ps.fail("the end of the prompt")
        if len(objs) == 2:
            if objs[0][0] == objs[1][0]:
                raise ConfigError(
                    f"prompt {p!r}: both objects are {COLOR_NAMES[objs[0][0]]}; give them different colors"
                )
            for o in objs:
                if o[3] == 0:
                    raise ConfigError(
                        f"prompt {p!r}: two-object scenes place objects in corners, not 'in the center'"
                    )
            if objs[0][3] is not None and objs[0][3] == objs[1][3]:
                raise ConfigError(f"prompt {p!r}: both objects are at the {POSITIONS[objs[0][3]]}")
        if any(o[0] == bg for o in objs):
            raise ConfigError(f"prompt {p!r}: an object has the background color {COLOR_NAMES[bg]}")
        rows.append((bg, objs))
    n = len(rows)

    def col(fn: object, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(
            [[fn(objs[s]) if s < len(objs) else 0 for s in range(2)] for _, objs in rows],  # type: ignore[operator]
            dtype=dtype,
        ).reshape(n, 2)

    return Scenes(
        background=torch.tensor([bg for bg, _ in rows], dtype=torch.long),
        n_objects=torch.tensor([len(objs) for _, objs in rows], dtype=torch.long),
        color=col(lambda o: o[0]),
        shape=col(lambda o: o[1]),
        size=col(lambda o: o[2] or 0),
        position=col(lambda o: o[3] or 0),
        jitter=torch.zeros(n, 2, 2, dtype=torch.long),
        mention_size=col(lambda o: o[2] is not None, torch.bool),
        mention_position=col(lambda o: o[3] is not None, torch.bool),
    )
