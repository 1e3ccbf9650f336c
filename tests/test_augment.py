"""Augmentation: the batched torch path matches the albumentations reference in statistics,
strength 0 is the identity, and device batches cover every training row once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import albumentations.augmentations.geometric.functional as AF
from conftest import DIGITS
from pipeline import augment, data
from pipeline.settings import AugSettings

AFFINE = dict(rotate=10.0, scale=0.1, shift=0.1)
ELASTIC = dict(elastic_alpha=34.0, elastic_sigma=4.0, p_elastic=1.0)


@pytest.fixture(scope="module")
def digits():
    comp = data.load_competition(DIGITS)
    return comp.x_train, comp.y_train


def _torch_aug(images, seed=0, **kw):
    aug = augment.BatchAugment(**kw, generator=torch.Generator().manual_seed(seed))
    return aug(torch.from_numpy(images).float() / 255).numpy()


def _alb_aug(images, seed=0, **kw):
    t = augment.build_transform(**kw)
    t.set_random_seed(seed)
    return np.stack([t(image=im[0])["image"][None] for im in images]).astype(np.float32) / 255


def test_strength_zero_is_identity(digits):
    x, _ = digits
    assert augment.build_transform() is None
    aug = augment.BatchAugment()
    xt = torch.from_numpy(x[:16]).float() / 255
    assert aug.is_identity and aug(xt) is xt
    # p=0 also turns a part off
    assert augment.BatchAugment(**AFFINE, p_affine=0.0).is_identity


@pytest.mark.parametrize("settings, tol", [(AFFINE, 0.03), ({**AFFINE, **ELASTIC}, 0.08),
                                           (ELASTIC, 0.08)])
def test_backends_agree_on_pixel_mass(digits, settings, tol):
    x, _ = digits
    orig = x.astype(np.float32).sum((1, 2, 3)).mean() / 255
    t = _torch_aug(x, **settings).sum((1, 2, 3)).mean()
    a = _alb_aug(x, **settings).sum((1, 2, 3)).mean()
    assert abs(t - a) / a < tol
    assert abs(t - orig) / orig < 0.1  # ink is moved, not created or lost


def test_backends_agree_on_change_per_image(digits):
    """Mean absolute pixel change of the same rotation/zoom or elastic settings."""
    x, _ = digits
    base = x.astype(np.float32) / 255
    for settings, tol in ((dict(rotate=10.0, scale=0.1), 0.1), (ELASTIC, 0.15)):
        t = np.abs(_torch_aug(x, **settings) - base).mean()
        a = np.abs(_alb_aug(x, **settings) - base).mean()
        assert t > 0.01 and a > 0.01
        assert abs(t - a) / a < tol, (settings, t, a)


def _centre_of_mass(images):
    a = images[:, 0]
    ys, xs = np.mgrid[:a.shape[1], :a.shape[2]]
    m = a.sum((1, 2))
    return np.stack([(a * xs).sum((1, 2)) / m, (a * ys).sum((1, 2)) / m], 1)


def test_shift_range_of_both_backends(digits):
    """shift=0.1 on 28 px: torch shifts uniformly up to 2.8 px; albumentations truncates the
    shift to whole pixels (at most int(2.8) = 2 px), the one documented difference."""
    x, _ = digits
    c0 = _centre_of_mass(x.astype(np.float32))
    dt = np.abs(_centre_of_mass(_torch_aug(x, shift=0.1)) - c0)
    da = np.abs(_centre_of_mass(_alb_aug(x, shift=0.1)) - c0)
    assert 2.3 < dt.max() <= 2.8 + 0.05 and 1.2 < dt.mean() < 1.6  # uniform(-2.8, 2.8): E|d| 1.4
    assert da.max() <= 2.0 + 0.05 and 0.75 < da.mean() < 1.1      # int(uniform): E|d| 0.93


def test_elastic_displacement_magnitude_matches_albumentations():
    aug = augment.BatchAugment(**ELASTIC, generator=torch.Generator().manual_seed(0))
    torch_px = aug.displacement(400, 28, torch.device("cpu")).norm(dim=-1).mean().item()
    rng = np.random.default_rng(0)
    alb_px = np.mean([np.hypot(*AF.generate_displacement_fields((28, 28), 34.0, 4.0, False, (0, 0),
                                                                rng, "uniform")).mean()
                      for _ in range(400)])
    assert 1.0 < torch_px < 5.0
    assert abs(torch_px - alb_px) / alb_px < 0.15


def test_rotation_only_rotates(digits):
    """A pure rotation changes the image but keeps its ink (mass)."""
    x, _ = digits
    out = _torch_aug(x[:64], rotate=30.0)
    assert not np.allclose(out, x[:64] / 255)
    assert abs(out.sum() / (x[:64].sum() / 255) - 1) < 0.03


def test_seeded_and_random(digits):
    x, _ = digits
    a, b = _torch_aug(x[:32], seed=1, **AFFINE), _torch_aug(x[:32], seed=1, **AFFINE)
    c = _torch_aug(x[:32], seed=2, **AFFINE)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_device_batches_cover_each_row_once(digits):
    x, y = digits
    cfg = AugSettings(**AFFINE)
    batches = augment.DeviceBatches(x, y, 64, torch.device("cpu"), cfg, seed=0)
    assert len(batches) == 400 // 64
    seen = []
    for xb, yb in batches:
        assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert 0 <= xb.min() and xb.max() <= 1
        seen.append(yb)
    labels = torch.cat(seen).numpy()
    assert len(labels) == 6 * 64
    # a permutation without the dropped tail: label counts never exceed the data's
    assert (np.bincount(labels, minlength=10) <= np.bincount(y, minlength=10)).all()
    first = torch.cat([yb for _, yb in batches])
    assert not torch.equal(first, torch.from_numpy(labels))  # reshuffled every epoch


def test_flips_and_colour_jitter_on_both_backends(digits):
    """Flips mirror real digits exactly (p=1); colour jitter at strength 0 is the identity and
    otherwise changes brightness within its range; the albumentations path does the same."""
    x, _ = digits
    imgs = torch.from_numpy(x[:16]).float() / 255
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment.BatchAugment(hflip=1.0, generator=g)(imgs), imgs.flip(-1))
    assert torch.equal(augment.BatchAugment(vflip=1.0, generator=g)(imgs), imgs.flip(-2))
    assert augment.BatchAugment(brightness=0.0, contrast=0.0, saturation=0.0).is_identity
    bright = augment.BatchAugment(brightness=0.3, generator=g)(imgs)
    ratio = bright.sum((1, 2, 3)) / imgs.sum((1, 2, 3))
    assert (ratio <= 1.3 + 1e-4).all() and (ratio >= 0.7 - 1e-4).all() and ratio.std() > 0.01
    alb = _alb_aug(x[:4], hflip=1.0)
    np.testing.assert_array_equal(alb, x[:4, :, :, ::-1].astype(np.float32) / 255)


def test_colour_jitter_on_real_rgb_photographs():
    """Saturation acts on RGB only: a real photograph (scikit-image's astronaut) desaturated
    towards gray keeps its mean brightness; both backends accept (S, S, 3) images."""
    skdata = pytest.importorskip("skimage.data")
    from pipeline.data import to_array
    from PIL import Image

    rgb = to_array(Image.fromarray(skdata.astronaut()), 64, 3)  # (3, 64, 64) uint8
    x = torch.from_numpy(rgb[None]).float() / 255
    out = augment.BatchAugment(saturation=0.9, generator=torch.Generator().manual_seed(1))(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert abs(float(out.mean() - x.mean())) < 0.05
    t = augment.build_transform(hflip=1.0, brightness=0.2, saturation=0.2)
    assert t(image=rgb.transpose(1, 2, 0))["image"].shape == (64, 64, 3)
    ds = augment.ImageDataset(rgb[None], np.array([0]), t)
    assert ds[0][0].shape == (3, 64, 64)


class _PreSplitAugment:
    """The augmentation as ``BatchAugment.__call__`` computed it before drawing and applying were
    split (git d1df2f6, pipeline/augment.py), kept verbatim as the oracle of bit-identity."""

    def __init__(self, rotate=0.0, scale=0.0, shift=0.0, elastic_alpha=0.0, elastic_sigma=4.0, p_affine=1.0,
                 p_elastic=0.5, hflip=0.0, vflip=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                 p_color=1.0, generator=None):
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.alpha, self.sigma = elastic_alpha, elastic_sigma
        self.p_affine, self.p_elastic = p_affine, p_elastic
        self.generator = generator
        self.has_affine = bool(rotate or scale or shift) and p_affine > 0
        self.has_elastic = bool(elastic_alpha) and p_elastic > 0
        self.hflip, self.vflip = hflip, vflip
        self.jitter = (brightness, contrast, saturation)
        self.p_color = p_color
        self.has_color = any(self.jitter) and p_color > 0

    def _uniform(self, *shape, device):
        return torch.rand(*shape, device=device, generator=self.generator) * 2 - 1

    def _gate(self, b, p, device):
        return (torch.rand(b, device=device, generator=self.generator) < p).float()

    def sampling_grid(self, b, side, device):
        import math
        import torch.nn.functional as F
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.has_affine:
            gate = self._gate(b, self.p_affine, device)
            angle = self._uniform(b, device=device) * math.radians(self.rotate) * gate
            zoom = 1 + self._uniform(b, device=device) * self.scale * gate
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            theta[:, :, 2] = self._uniform(b, 2, device=device) * (2 * self.shift) * gate[:, None]
        grid = F.affine_grid(theta, [b, 1, side, side], align_corners=False)
        if self.has_elastic:
            grid = grid + self.displacement(b, side, device) * (2.0 / side)
        return grid

    def displacement(self, b, side, device):
        m = augment.gaussian_blur_matrix(side, self.sigma, device)
        field = m @ self._uniform(b * 2, side, side, device=device) @ m.T
        gate = self._gate(b, self.p_elastic, device)
        return (field.view(b, 2, side, side) * (self.alpha * gate)[:, None, None, None]).permute(0, 2, 3, 1)

    def _flip(self, x, p, dim):
        gate = self._gate(x.shape[0], p, x.device).bool()[:, None, None, None]
        return torch.where(gate, x.flip(dim), x)

    def _color(self, x):
        b = x.shape[0]
        gate = self._gate(b, self.p_color, x.device)[:, None, None, None]
        brightness, contrast, saturation = self.jitter

        def factor(s):
            return 1 + self._uniform(b, device=x.device)[:, None, None, None] * s * gate

        if brightness:
            x = x * factor(brightness)
        if contrast:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * factor(contrast) + mean
        if saturation and x.shape[1] == 3:
            gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = gray + (x - gray) * factor(saturation)
        return x.clamp_(0, 1)

    def __call__(self, x):
        import torch.nn.functional as F
        if self.has_affine or self.has_elastic:
            grid = self.sampling_grid(x.shape[0], x.shape[-1], x.device)
            x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.hflip:
            x = self._flip(x, self.hflip, -1)
        if self.vflip:
            x = self._flip(x, self.vflip, -2)
        if self.has_color:
            x = self._color(x)
        return x


# conf/aug/default.yaml
DEFAULT = dict(rotate=10.0, scale=0.1, shift=0.1, elastic_alpha=34.0, elastic_sigma=4.0, p_elastic=0.5)
SPLIT_CASES = [DEFAULT, AFFINE, ELASTIC, dict(rotate=30.0, p_affine=0.5), dict(hflip=0.5, vflip=0.5),
               dict(rotate=5.0, hflip=0.5, brightness=0.3, contrast=0.2, saturation=0.4, p_color=0.6),
               dict(saturation=0.3, p_color=0.7), {}]


@pytest.mark.parametrize("settings", SPLIT_CASES)
@pytest.mark.parametrize("channels", [1, 3])
def test_draw_then_apply_is_bit_identical_to_the_pre_split_augmentation(digits, settings, channels):
    """Three consecutive calls (so the generator's state after each is checked too), and draw +
    apply on a cloned generator, equal the pre-split implementation bit for bit."""
    x, _ = digits
    imgs = torch.from_numpy(x[:40]).float().div_(255).expand(-1, channels, -1, -1).contiguous()
    imgs = imgs * torch.linspace(0.6, 1.0, channels).view(1, channels, 1, 1)  # RGB channels that differ
    old = _PreSplitAugment(**settings, generator=torch.Generator().manual_seed(7))
    new = augment.BatchAugment(**settings, generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        twin = torch.Generator().manual_seed(0)
        twin.set_state(new.generator.get_state())
        params = new.draw(len(imgs), channels, 28, imgs.device, generator=twin)
        split = new.apply(imgs.clone(), params)
        expected, got = old(imgs.clone()), new(imgs.clone())
        assert torch.equal(got, expected) and torch.equal(split, expected)
        # saturation acts on RGB only
        identity = settings == {} or (channels == 1 and set(settings) <= {"saturation", "p_color"})
        assert torch.equal(got, imgs) == identity
    assert torch.equal(new.generator.get_state(), old.generator.get_state())


@pytest.mark.parametrize("settings", SPLIT_CASES[:1] + SPLIT_CASES[5:7])
def test_members_draws_applied_together_equal_each_alone(digits, settings):
    """Three members' draws, each from its own generator, concatenated (draw_members, or
    AugParams.cat of their own draws) and applied in one pass: each member's images come out
    exactly as its own augmentation makes them, and its generator ends in the same state."""
    x, _ = digits
    channels = 3 if "saturation" in settings else 1
    imgs = torch.from_numpy(x[:96]).float().div_(255).expand(-1, channels, -1, -1).contiguous()
    aug = augment.BatchAugment(**settings)
    seeds = [11, 12, 13]
    alone = [augment.BatchAugment(**settings, generator=torch.Generator().manual_seed(s))(imgs[m * 32:(m + 1) * 32])
             for m, s in enumerate(seeds)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    together = aug.apply(imgs.clone(), aug.draw_members(gens, 32, channels, 28, imgs.device))
    assert torch.equal(together, torch.cat(alone))
    cat = augment.AugParams.cat([aug.draw(32, channels, 28, imgs.device, torch.Generator().manual_seed(s))
                                 for s in seeds])
    assert cat.batch == 96 and torch.equal(aug.apply(imgs.clone(), cat), together)
    following = [torch.rand(3, generator=g) for g in gens]
    for s, f in zip(seeds, following):
        g = torch.Generator().manual_seed(s)
        aug.draw(32, channels, 28, imgs.device, g)
        assert torch.equal(torch.rand(3, generator=g), f)
    with pytest.raises(ValueError, match="draws for 96 images"):
        aug.apply(imgs[:32], cat)


# ---------------------------------------------------------------------- rot90 and random erasing

def _rotations(img: np.ndarray) -> list[np.ndarray]:
    """``img`` (..., S, S) rotated by 90, 180 and 270 degrees (counter-clockwise)."""
    return [np.rot90(img, k, axes=(-2, -1)) for k in (1, 2, 3)]


def _which_rotation(out: np.ndarray, img: np.ndarray) -> int:
    """k in {1, 2, 3} when ``out`` is ``img`` rotated by k x 90 degrees; 0 when it is none of them."""
    hits = [k for k, r in zip((1, 2, 3), _rotations(img)) if np.array_equal(out, r)]
    assert len(hits) <= 1  # no digit of the fixture is symmetric under rotation
    return hits[0] if hits else 0


def test_rot90_turns_each_real_image_by_90_180_or_270_degrees_on_both_backends(digits):
    """rot90=1: every digit comes out as exactly one of its three rotations (never as itself), all
    three angles occur in about equal numbers; albumentations' OneOf of transpose/flip pairs too."""
    x, _ = digits
    imgs = x[:120]
    base = imgs.astype(np.float32) / 255
    for out in (_torch_aug(imgs, rot90=1.0), _alb_aug(imgs, rot90=1.0)):
        ks = np.array([_which_rotation(o, b) for o, b in zip(out, base)])
        assert (ks > 0).all()
        counts = np.bincount(ks, minlength=4)[1:]
        assert (counts >= 25).all(), counts  # 40 expected each
    # p=0.5 rotates about half of them, leaves the rest as they were
    out = _torch_aug(x, rot90=0.5)
    ks = np.array([_which_rotation(o, b) for o, b in zip(out, x.astype(np.float32) / 255)])
    same = np.array([np.array_equal(o, b) for o, b in zip(out, x.astype(np.float32) / 255)])
    assert ((ks > 0) | same).all() and 0.4 < (ks > 0).mean() < 0.6
    with pytest.raises(ValueError, match="square"):
        augment.BatchAugment(rot90=1.0)(torch.zeros(2, 1, 28, 30))


def _erased_boxes(out: np.ndarray, base: np.ndarray):
    """Per image: (bounding box (top, bottom, left, right) of the changed pixels or None, changed
    pixels (S, S) bool over every channel)."""
    boxes, changed = [], (out != base).any(1)
    for c in changed:
        ys, xs = np.nonzero(c)
        boxes.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if len(ys) else None)
    return boxes, changed


@pytest.mark.parametrize("erase_area", [0.25, 0.4])
def test_random_erasing_replaces_one_rectangle_of_the_set_area_with_noise(digits, erase_area):
    """erase=1 on real digits: the changed pixels of each image fill one rectangle (exactly, on
    the torch path: uniform float noise never equals a pixel) of area in [0.02, erase_area] of the
    image up to rounding the sides, aspect ratio in [0.3, 3.3], values in [0, 1); nothing outside
    it changes. The areas are uniform: mean (0.02 + erase_area) / 2 on both backends."""
    x, _ = digits
    base = x.astype(np.float32) / 255
    side = x.shape[-1]
    tol = side  # rounding each side to whole pixels: (h +- 1/2)(w +- 1/2) - hw <= (h + w)/2 + 1/4 < S
    means = []
    for backend, out in (("torch", _torch_aug(x, erase=1.0, erase_area=erase_area)),
                         ("albumentations", _alb_aug(x, erase=1.0, erase_area=erase_area))):
        boxes, changed = _erased_boxes(out, base)
        areas = []
        for box, c, o in zip(boxes, changed, out):
            assert box is not None
            top, bottom, left, right = box
            inside = np.zeros_like(c)
            inside[top:bottom, left:right] = True
            assert not (c & ~inside).any()  # the rest of the image unchanged
            h, w = bottom - top, right - left
            if backend == "torch":
                assert c[inside].all()
                assert 0.3 - 1 / min(h, w) <= h / w <= 3.3 + 1 / min(h, w)
            else:  # a random uint8 equals the pixel it replaces one time in 256
                assert c[inside].mean() > 0.9
            assert ((o >= 0) & (o < 1 + 1e-6)).all()
            areas.append(h * w)
            assert 0.02 * side**2 - tol <= h * w <= min(erase_area, 0.3 if backend != "torch" else 1) * side**2 + tol
        means.append(np.mean(areas) / side**2)
        if backend == "torch":
            assert abs(means[-1] - (0.02 + erase_area) / 2) < 0.02, means
    assert erase_area > 0.3 or abs(means[0] - means[1]) < 0.02, means  # albumentations caps the area at 0.3


def test_random_erasing_on_a_real_rgb_photograph():
    """Every channel of the rectangle is noise (per pixel and channel), on both backends; erase=0.5
    erases about half the images of a batch and leaves the others bit-identical."""
    skdata = pytest.importorskip("skimage.data")
    from pipeline.data import to_array
    from PIL import Image

    rgb = to_array(Image.fromarray(skdata.astronaut()), 64, 3)  # (3, 64, 64) uint8
    x = torch.from_numpy(rgb[None]).float().div(255).expand(64, -1, -1, -1).contiguous()
    aug = augment.BatchAugment(erase=1.0, generator=torch.Generator().manual_seed(3))
    p = aug.draw(64, 3, 64, x.device)
    out, mask = aug.apply(x, p), aug.erase_mask(p, 64)
    assert torch.equal(out != x, mask[:, None].expand_as(x))  # all three channels, only there
    noise = out[mask[:, None].expand_as(x)]
    assert abs(float(noise.mean()) - 0.5) < 0.02 and float(noise.std()) > 0.25
    half = augment.BatchAugment(erase=0.5, generator=torch.Generator().manual_seed(3))(x)
    erased = (half != x).flatten(1).any(1).float().mean()
    assert 0.3 < float(erased) < 0.7
    t = augment.build_transform(erase=1.0)
    t.set_random_seed(3)
    img = rgb.transpose(1, 2, 0)
    got = t(image=img)["image"]
    assert got.shape == img.shape and (got != img).any(-1).mean() >= 0.02 * 0.9


NEW_PARTS = dict(rot90=0.5, erase=0.5, erase_area=0.3)


@pytest.mark.parametrize("settings", [DEFAULT, dict(hflip=0.5, vflip=0.5),
                                      dict(rotate=5.0, hflip=0.5, brightness=0.3, saturation=0.4, p_color=0.6)])
@pytest.mark.parametrize("channels", [1, 3])
def test_rot90_and_erase_at_zero_leave_the_old_augmentation_bit_identical(digits, settings, channels):
    """rot90=0 and erase=0 (whatever erase_area) draw nothing: the output and the generator's
    state equal the pre-split oracle bit for bit, through the settings path (AugSettings ->
    batch_augment_from_cfg) too; the albumentations pipeline is the same as without them."""
    x, _ = digits
    imgs = torch.from_numpy(x[:40]).float().div_(255).expand(-1, channels, -1, -1).contiguous()
    old = _PreSplitAugment(**settings, generator=torch.Generator().manual_seed(7))
    new = augment.BatchAugment(**settings, rot90=0.0, erase=0.0, erase_area=0.4,
                               generator=torch.Generator().manual_seed(7))
    cfg = augment.batch_augment_from_cfg(AugSettings(**settings), torch.Generator().manual_seed(7))
    for _ in range(2):
        expected = old(imgs.clone())
        assert torch.equal(new(imgs.clone()), expected) and torch.equal(cfg(imgs.clone()), expected)
    assert torch.equal(new.generator.get_state(), old.generator.get_state())
    assert torch.equal(cfg.generator.get_state(), old.generator.get_state())
    assert augment.BatchAugment(rot90=0.0, erase=0.0, erase_area=0.4).is_identity
    assert augment.build_transform(rot90=0.0, erase=0.0, erase_area=0.4) is None
    a = augment.build_transform(**settings)
    b = augment.build_transform(**settings, rot90=0.0, erase=0.0, erase_area=0.4)
    assert repr(a) == repr(b)
    np.testing.assert_array_equal(_alb_aug(x[:8], **settings), _alb_aug(x[:8], **settings, rot90=0.0, erase=0.0))


def test_rot90_and_erase_are_read_from_the_settings():
    p = augment.aug_params(AugSettings(rot90=0.25, erase=0.5, erase_area=0.3))
    assert (p["rot90"], p["erase"], p["erase_area"]) == (0.25, 0.5, 0.3)
    aug = augment.batch_augment_from_cfg(AugSettings(rot90=0.25, erase=0.5, erase_area=0.3))
    assert (aug.rot90, aug.erase, aug.erase_area) == (0.25, 0.5, 0.3) and not aug.is_identity
    t = augment.transform_from_cfg(AugSettings(rot90=0.25, erase=0.5, erase_area=0.3))
    assert "OneOf" in repr(t) and "Erasing" in repr(t) and "scale=(0.02, 0.3)" in repr(t)


def test_rot90_and_erase_reproduce_with_the_same_seed(digits):
    """The same seed gives the same output (torch: generator; DeviceBatches: a reseeded epoch;
    albumentations: set_random_seed); another seed another one."""
    x, y = digits
    settings = {**DEFAULT, **NEW_PARTS}
    a, b = _torch_aug(x[:64], seed=5, **settings), _torch_aug(x[:64], seed=5, **settings)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _torch_aug(x[:64], seed=6, **settings))
    a, b = _alb_aug(x[:64], seed=5, **NEW_PARTS), _alb_aug(x[:64], seed=5, **NEW_PARTS)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _alb_aug(x[:64], seed=6, **NEW_PARTS))
    batches = augment.DeviceBatches(x, y, 64, torch.device("cpu"), AugSettings(**NEW_PARTS), seed=0)
    epochs = []
    for _ in range(2):
        batches.generator.manual_seed(9)
        epochs.append([xb for xb, _ in batches])
    assert all(torch.equal(p, q) for p, q in zip(*epochs))


def test_rot90_and_erase_draws_applied_together_equal_each_alone(digits):
    """A fused group's draws (draw_members, AugParams.cat) with rot90 and erasing (per-channel
    fill on RGB) give each member exactly its own augmentation."""
    x, _ = digits
    settings = {**NEW_PARTS, "hflip": 0.5, "saturation": 0.2}
    imgs = torch.from_numpy(x[:96]).float().div_(255).expand(-1, 3, -1, -1).contiguous()
    aug = augment.BatchAugment(**settings)
    seeds = [11, 12, 13]
    alone = [augment.BatchAugment(**settings, generator=torch.Generator().manual_seed(s))(imgs[m * 32:(m + 1) * 32])
             for m, s in enumerate(seeds)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    together = aug.apply(imgs.clone(), aug.draw_members(gens, 32, 3, 28, imgs.device))
    assert torch.equal(together, torch.cat(alone))
    cat = augment.AugParams.cat([aug.draw(32, 3, 28, imgs.device, torch.Generator().manual_seed(s)) for s in seeds])
    assert cat.erase_fill.shape == (96, 3, 28, 28) and torch.equal(aug.apply(imgs.clone(), cat), together)


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    """``tta.dihedral``: the image, its mirror (as with ``hflip`` alone), then the rotations by
    90, 180 and 270 degrees each followed by its mirror; eight distinct exact pixel permutations
    of a real digit, closed under the mirror and the quarter turn."""
    comp = data.load_competition(DIGITS)
    x = torch.from_numpy(comp.x_train[:4]).float()
    views = augment.TTAViews(hflip=False, dihedral=True)
    out = list(views(x))
    assert len(views) == len(out) == 8
    torch.testing.assert_close(out[0], x)
    torch.testing.assert_close(out[1], x.flip(-1))
    assert len({v.numpy().tobytes() for v in out}) == 8
    for v in out:
        torch.testing.assert_close(v.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
        assert any(torch.equal(torch.rot90(v, 1, (-2, -1)), w) for w in out)
        assert any(torch.equal(v.flip(-1), w) for w in out)
    assert len(augment.TTAViews(hflip=True)) == 2


def test_a_balanced_sampler_draws_every_class_equally_often(digits):
    """``train.sampler=balanced`` on the fixture's digits with classes 5-9 cut to a fifth: the
    device batches, the streamed batches, the albumentations loader and a top-stages member's
    epochs each draw every class about equally often (each row with probability inversely
    proportional to its class's count), as many rows an epoch as there are; the plain shuffle
    still draws every row exactly once. Reseeded epochs repeat their draws (resume)."""
    from pipeline.settings import AugBackend
    from pipeline.train.batches import TrainingSet, make_batches, set_epoch
    from pipeline.train.topstages import _epoch_batches

    x, y = digits
    rows = np.flatnonzero((y < 5) | (np.arange(len(y)) % 5 == 0))
    counts = np.bincount(y[rows], minlength=10)
    assert counts.max() >= 4 * counts.min()
    labels = torch.from_numpy(y[rows])
    generator = torch.Generator().manual_seed(0)
    plain = augment.epoch_order(labels, generator, balanced=False)
    assert np.array_equal(np.sort(plain.numpy()), np.arange(len(rows)))
    drawn = torch.cat([augment.epoch_order(labels, generator, balanced=True) for _ in range(20)])
    share = np.bincount(y[rows][drawn.numpy()], minlength=10) / len(drawn)
    assert np.abs(share - 0.1).max() < 0.02, share  # shuffled: the largest class is 3x the smallest's share
    data_set = TrainingSet(x, y, rows)
    none = AugSettings(backend="torch", rotate=0.0, scale=0.0, shift=0.0)
    for aug, stream in ((none, False), (none, True), (AugSettings(backend=AugBackend.albumentations.value), False)):
        batches = make_batches(data_set, 16, torch.device("cpu"), aug, seed=3, stream=stream, balanced=True)
        seen = []
        for epoch in range(8):
            set_epoch(batches, 3, epoch)
            seen += [int(v) for _, yb in batches for v in yb]
        share = np.bincount(seen, minlength=10) / len(seen)
        assert len(seen) == 8 * (len(rows) // 16) * 16 and np.abs(share - 0.1).max() < 0.03, (aug.backend, share)
        set_epoch(batches, 3, 7)
        assert [int(v) for _, yb in batches for v in yb] == seen[-(len(rows) // 16) * 16:]  # the same epoch again
    pairs = np.concatenate(_epoch_batches(8, rows, 64, seed=0, balanced_by=y[rows]))
    share = np.bincount(y[pairs[:, 1]], minlength=10) / len(pairs)
    assert np.abs(share - 0.1).max() < 0.02 and set(pairs[:, 1]) <= set(rows)
