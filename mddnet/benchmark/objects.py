"""Object classes: a washer, a gear and a capsule, drawn procedurally, and their part defects.

Every object is a signed distance in its own frame plus a surface colouring, laid by one renderer
(`render_object`) on a lit backdrop with a soft shadow. A part defect (chipped rim, broken tooth,
extra material, misplaced cap) changes the object's parameters and renders it again, so its
shadow and shading follow the changed shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from scipy import ndimage

from mddnet.benchmark import portable
from mddnet.benchmark.canvas import (
    LIGHT_ANGLE,
    Grid,
    Layer,
    Scene,
    blend,
    coverage,
    log_uniform,
    rgb255,
    smooth_noise,
    smoothstep,
)

__all__ = [
    "Capsule",
    "DrawnObject",
    "Gear",
    "Pose",
    "Washer",
    "break_tooth",
    "chip_washer",
    "fill_gap",
    "misplace_cap",
    "render_object",
]


# ---------------------------------------------------------------------------------------------
# Shared by all objects: pose, backdrop, shadow and metal shading


@dataclass(frozen=True)
class Pose:
    """Where an object lies: centre, rotation, size (image units) and light direction."""

    centre: tuple[float, float]
    angle: float
    scale: float
    light: tuple[float, float]  # unit vector towards the light, image coordinates


def _sample_pose(
    rng: np.random.Generator, scale: float, angle: tuple[float, float], shift: float = 0.06
) -> Pose:
    light = LIGHT_ANGLE + rng.uniform(-0.3, 0.3)
    return Pose(
        centre=(rng.uniform(-shift, shift), rng.uniform(-shift, shift)),
        angle=rng.uniform(*angle),
        scale=scale * rng.uniform(0.95, 1.05),
        light=(portable.cos(light), portable.sin(light)),
    )


def _object_frame(grid: Grid, pose: Pose, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates in the object's own frame.

    `offset` moves the object away from the light, which places its shadow.
    """
    dx = grid.x - pose.centre[0] + offset * pose.light[0]
    dy = grid.y - pose.centre[1] + offset * pose.light[1]
    c, s = portable.cos(pose.angle), portable.sin(pose.angle)
    return (c * dx + s * dy) / pose.scale, (-s * dx + c * dy) / pose.scale


def _backdrop(rng: np.random.Generator, grid: Grid, colour: np.ndarray, pose: Pose) -> np.ndarray:
    """A matte surface lit unevenly from the light's side, with a faint grain; (N, N, 3)."""
    lighting = 1.0 + 0.1 * (grid.x * pose.light[0] + grid.y * pose.light[1])
    grain = 0.03 * smooth_noise(rng, grid.n, 5) + 0.02 * smooth_noise(rng, grid.n, 48)
    return (colour * rng.uniform(0.92, 1.08) * (lighting + grain)[..., None]).astype(np.float32)


class DrawnObject(Protocol):
    """An object's frozen parameters, as `render_object` needs them."""

    @property
    def pose(self) -> Pose: ...

    @property
    def backdrop(self) -> np.ndarray: ...

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Signed distance (object units, negative inside) at object-frame points (u, v)."""
        ...

    def surface(self, grid: Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The object's colours (N, N, 3) at (u, v), whose signed distance is `d`."""
        ...


def render_object(grid: Grid, obj: DrawnObject) -> Layer:
    """Lay an object on its backdrop.

    The object casts a soft shadow away from the light; a missing or moved part moves its shadow
    too, and the mask includes that change like any other.
    """
    pose = obj.pose
    u, v = _object_frame(grid, pose)
    d = obj.sdf(u, v)  # (N, N) object units
    cover = coverage(d * pose.scale, grid.px)
    shadow = smoothstep(0.5 - obj.sdf(*_object_frame(grid, pose, 0.04)) * pose.scale / 0.08)
    background = obj.backdrop * (1.0 - 0.4 * shadow)[..., None]
    rgb = blend(background, obj.surface(grid, u, v, d), cover)
    return Layer(rgb=np.clip(rgb, 0.0, 1.0).astype(np.float32), support=cover)


def _metal(
    colour: np.ndarray,
    turning: np.ndarray,
    pose: Pose,
    grid: Grid,
    u: np.ndarray,
    v: np.ndarray,
    d: np.ndarray,
) -> np.ndarray:
    """Turned metal: concentric tool marks, lit bevels along every edge, a broad highlight."""
    rho = portable.hypot(u, v)
    marks = np.interp(rho, np.linspace(0.0, 1.2, turning.size), turning)
    gy, gx = np.gradient(d)  # points out of the material; canvas axes are image axes
    norm = np.maximum(portable.hypot(gx, gy), 1e-9)
    facing = (gx * pose.light[0] + gy * pose.light[1]) / norm  # bevel normal . light
    bevel = np.clip(1.0 + d / 0.07, 0.0, 1.0)
    hx = pose.centre[0] + 0.4 * pose.scale * pose.light[0]
    hy = pose.centre[1] + 0.4 * pose.scale * pose.light[1]
    highlight = portable.exp(
        -((grid.x - hx) ** 2 + (grid.y - hy) ** 2) / (2 * (0.3 * pose.scale) ** 2)
    )
    shade = 0.78 + 0.05 * marks + 0.4 * bevel * facing + 0.3 * highlight
    return colour * shade[..., None]


def _turning_marks(rng: np.random.Generator) -> np.ndarray:
    marks = ndimage.gaussian_filter1d(rng.normal(0.0, 1.0, 300), 1.2)
    return (marks / marks.std()).astype(np.float32)


def _jitter(rng: np.random.Generator, colour: np.ndarray, brightness: float = 0.08) -> np.ndarray:
    """Sample-to-sample colour variation: overall brightness and a faint cast (+-1.5 %)."""
    cast = rng.uniform(0.985, 1.015, 3).astype(np.float32)
    return colour * rng.uniform(1 - brightness, 1 + brightness) * cast


# ---------------------------------------------------------------------------------------------
# Washer: a turned steel ring

_WASHER_COLOUR = rgb255(176, 178, 184)
_WASHER_BACKDROP = rgb255(64, 70, 78)


@dataclass(frozen=True)
class Washer:
    """A turned steel ring."""

    pose: Pose
    inner: float  # hole radius / outer radius
    colour: np.ndarray
    turning: np.ndarray
    backdrop: np.ndarray
    chip: tuple[float, float, float] | None = None  # (u, v, radius) of a bite, object frame

    @classmethod
    def sample(cls, rng: np.random.Generator, grid: Grid) -> Washer:
        pose = _sample_pose(rng, scale=0.6, angle=(0.0, 2 * np.pi))
        return cls(
            pose=pose,
            inner=rng.uniform(0.44, 0.48),
            colour=_jitter(rng, _WASHER_COLOUR),
            turning=_turning_marks(rng),
            backdrop=_backdrop(rng, grid, _WASHER_BACKDROP, pose),
        )

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        rho = portable.hypot(u, v)
        d = np.maximum(rho - 1.0, self.inner - rho)
        if self.chip is not None:
            cu, cv, radius = self.chip
            d = np.maximum(d, radius - portable.hypot(u - cu, v - cv))
        return d

    def surface(self, grid: Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _metal(self.colour, self.turning, self.pose, grid, u, v, d)


def chip_washer(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Missing part: a bite broken out of the outer (mostly) or inner rim."""
    washer = scene.params
    outer = rng.random() < 0.7
    radius = log_uniform(rng, 0.05, 0.25)
    # Bites whose centre lies beyond the rim are shallow: the subtle end of the range.
    depth = rng.uniform(-0.3, 0.7) * radius
    at = 1.0 + depth if outer else washer.inner - depth
    phi = rng.uniform(0.0, 2 * np.pi)
    chipped = dataclasses.replace(
        washer, chip=(at * portable.cos(phi), at * portable.sin(phi), radius)
    )
    return scene.render(scene.grid, chipped).rgb


# ---------------------------------------------------------------------------------------------
# Gear: a brass spur gear with a keyed bore and lightening holes

_GEAR_COLOUR = rgb255(204, 164, 92)
_GEAR_BACKDROP = rgb255(150, 156, 162)
_TEETH = 14
_ROOT, _TOOTH = 0.84, 0.16  # root radius and tooth height (tip radius 1)
_TIP_HALF, _ROOT_HALF = 0.17, 0.3  # tooth half-widths at tip and root, in tooth periods
_BORE = 0.17
_HOLES, _HOLE_AT, _HOLE_RADIUS = 5, 0.57, 0.1


@dataclass(frozen=True)
class Gear:
    """A brass spur gear with a keyed bore and lightening holes."""

    pose: Pose
    colour: np.ndarray
    turning: np.ndarray
    backdrop: np.ndarray
    broken: tuple[int, float] | None = None  # (tooth, fraction of its height left)
    extra: tuple[int, float] | None = None  # (gap after tooth, fraction of the gap filled)

    @classmethod
    def sample(cls, rng: np.random.Generator, grid: Grid) -> Gear:
        pose = _sample_pose(rng, scale=0.62, angle=(0.0, 2 * np.pi))
        return cls(
            pose=pose,
            colour=_jitter(rng, _GEAR_COLOUR),
            turning=_turning_marks(rng),
            backdrop=_backdrop(rng, grid, _GEAR_BACKDROP, pose),
        )

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        rho = np.maximum(portable.hypot(u, v), 1e-6)
        t = portable.arctan2(v, u) * (_TEETH / (2 * np.pi))  # position in tooth periods
        nearest = np.round(t)
        tooth = nearest.astype(int) % _TEETH
        phase = t - nearest  # [-0.5, 0.5], 0 at a tooth's centre line
        ramp = _ROOT_HALF - _TIP_HALF
        height = np.clip((_ROOT_HALF - np.abs(phase)) / ramp, 0.0, 1.0)
        # d height / d angle on the flanks: it corrects the radial distance into a true distance.
        slope = np.where((height > 0) & (height < 1), -np.sign(phase) / ramp, 0.0)
        if self.broken is not None:
            index, left = self.broken
            hit = tooth == index
            height = np.where(hit, height * left, height)
            slope = np.where(hit, slope * left, slope)
        if self.extra is not None:
            index, fill = self.extra
            in_gap = (np.floor(t).astype(int) % _TEETH == index) & (height < fill)
            height = np.where(in_gap, fill, height)
            slope = np.where(in_gap, 0.0, slope)
        # Only in the teeth's ring: inside the root circle the nearest edge is not a flank.
        radial_slope = np.where(rho > _ROOT, _TOOTH * slope * _TEETH / (2 * np.pi) / rho, 0.0)
        d = (rho - _ROOT - _TOOTH * height) / np.sqrt(1.0 + radial_slope**2)
        d = np.maximum(d, _BORE - rho)
        keyway = np.maximum(np.abs(u - _BORE) - 0.06, np.abs(v) - 0.04)
        d = np.maximum(d, -keyway)
        angles = np.arange(_HOLES) * (2 * np.pi / _HOLES) + np.pi / _HOLES
        for a in angles:
            hole = (
                portable.hypot(u - _HOLE_AT * portable.cos(a), v - _HOLE_AT * portable.sin(a))
                - _HOLE_RADIUS
            )
            d = np.maximum(d, -hole)
        return d

    def surface(self, grid: Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        metal = _metal(self.colour, self.turning, self.pose, grid, u, v, d)
        groove = 1.0 - 0.18 * portable.exp(
            -(((portable.hypot(u, v) - 0.33) / 0.015) ** 2)
        )  # hub step
        return metal * groove[..., None]


def break_tooth(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Missing part: a tooth broken off, from its root (gone) to its tip (worn, subtle)."""
    left = rng.uniform(0.0, 0.7)
    broken = dataclasses.replace(scene.params, broken=(int(rng.integers(_TEETH)), left))
    return scene.render(scene.grid, broken).rgb


def fill_gap(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Extra part: casting flash filling the gap between two teeth, low (subtle) to full."""
    extra = dataclasses.replace(
        scene.params, extra=(int(rng.integers(_TEETH)), rng.uniform(0.3, 1.0))
    )
    return scene.render(scene.grid, extra).rgb


# ---------------------------------------------------------------------------------------------
# Capsule: a two-colour hard gelatine capsule

_CAP_COLOUR = rgb255(176, 38, 40)
_BODY_COLOUR = rgb255(236, 228, 206)
_CAPSULE_BACKDROP = rgb255(196, 198, 194)
_CAPSULE_RADIUS, _CAP_RADIUS = 0.31, 0.325
_SEAM = -0.1  # where the cap ends along the capsule's axis (tip at -1, other tip at +1)


def _tube(
    u: np.ndarray, v: np.ndarray, start: float, end: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of a round-ended tube along u, and its 3-D surface normal; (N, N, 3)."""
    du = u - np.clip(u, start, end)
    dist = portable.hypot(du, v)
    nz = np.sqrt(np.clip(1.0 - (dist / radius) ** 2, 0.0, 1.0))
    normal = np.stack([np.clip(du / radius, -1, 1), np.clip(v / radius, -1, 1), nz], axis=-1)
    return dist - radius, normal


def _gloss(colour: np.ndarray, normal: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Glossy gelatine: diffuse term plus a sharp specular highlight (Blinn-Phong)."""
    half = light + np.array([0.0, 0.0, 1.0], dtype=np.float32)
    half /= portable.norm(half)
    diffuse = np.clip((normal * light).sum(axis=-1), 0.0, None)  # (N, N)
    specular = portable.power(np.clip((normal * half).sum(axis=-1), 0.0, None), 40)
    return colour * (0.42 + 0.62 * diffuse)[..., None] + 0.45 * specular[..., None]


class _CapsuleParts(NamedTuple):
    body: np.ndarray  # (N, N) signed distance
    body_normal: np.ndarray  # (N, N, 3)
    cap: np.ndarray  # (N, N) signed distance
    cap_normal: np.ndarray  # (N, N, 3)
    cap_axis: np.ndarray  # (N, N) axis coordinate in the cap's own frame


@dataclass(frozen=True)
class Capsule:
    """A two-colour hard gelatine capsule: a cap over a body."""

    pose: Pose
    cap_colour: np.ndarray
    body_colour: np.ndarray
    backdrop: np.ndarray
    cap_shift: float = 0.0  # how far the cap is pulled off along the axis (object units)
    cap_tilt: float = 0.0  # cap rotated about the seam (radians)

    @classmethod
    def sample(cls, rng: np.random.Generator, grid: Grid) -> Capsule:
        pose = _sample_pose(rng, scale=0.66, angle=(-0.1, 0.1), shift=0.05)
        return cls(
            pose=pose,
            cap_colour=_jitter(rng, _CAP_COLOUR, 0.06),
            body_colour=_jitter(rng, _BODY_COLOUR, 0.04),
            backdrop=_backdrop(rng, grid, _CAPSULE_BACKDROP, pose),
        )

    def _cap_frame(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = portable.cos(self.cap_tilt), portable.sin(self.cap_tilt)
        du = u - _SEAM
        return c * du + s * v + _SEAM + self.cap_shift, -s * du + c * v

    def _parts(self, u: np.ndarray, v: np.ndarray) -> _CapsuleParts:
        """The body (it reaches under the cap) and the cap, which may be moved off its seat."""
        cu, cv = self._cap_frame(u, v)
        body, body_normal = _tube(u, v, _SEAM - 0.4, 1.0 - _CAPSULE_RADIUS, _CAPSULE_RADIUS)
        cap, cap_normal = _tube(cu, cv, -1.0 + _CAP_RADIUS, _SEAM, _CAP_RADIUS)
        cap = np.maximum(cap, cu - _SEAM)  # the cap is a sleeve cut flat at the seam
        return _CapsuleParts(body, body_normal, cap, cap_normal, cu)

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        parts = self._parts(u, v)
        return np.minimum(parts.body, parts.cap)

    def surface(self, grid: Grid, u: np.ndarray, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        pose = self.pose
        c, s = portable.cos(pose.angle), portable.sin(pose.angle)
        light = np.array(
            [c * pose.light[0] + s * pose.light[1], -s * pose.light[0] + c * pose.light[1], 1.1],
            dtype=np.float32,
        )
        light /= portable.norm(light)
        parts = self._parts(u, v)
        body_rgb = _gloss(self.body_colour, parts.body_normal, light)
        # The cap's rim casts a thin shadow on the body just past the seam.
        past_seam = parts.cap_axis - _SEAM
        rim = portable.exp(-(((past_seam - 0.02) / 0.03) ** 2)) * (past_seam > 0)
        body_rgb = body_rgb * (1.0 - 0.3 * rim)[..., None]
        cap_rgb = _gloss(self.cap_colour, parts.cap_normal, light)
        return blend(body_rgb, cap_rgb, coverage(parts.cap * pose.scale, grid.px))


def misplace_cap(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Misplaced part: the cap pulled partly off its body and/or tilted on it."""
    shift = rng.uniform(0.03, 0.2)
    tilt = rng.uniform(-0.12, 0.12) if rng.random() < 0.5 else 0.0
    moved = dataclasses.replace(scene.params, cap_shift=shift, cap_tilt=tilt)
    return scene.render(scene.grid, moved).rgb
