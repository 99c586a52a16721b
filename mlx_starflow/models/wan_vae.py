"""The Wan2.2 video VAE (`WanVAE_` of the reference's misc/wan_vae2.py) in MLX.

Layout: public `encode` / `decode` take and return channels-last arrays,
videos (B, T, H, W, 3) in [-1, 1] and latents (B, T', H', W', z_dim). A video has
T = 1 + 4k frames and H, W multiples of 16; it maps to 1 + k latent frames of
(H/16, W/16). Latents are normalised per channel, (mu - mean) / std, as the
reference's `encode(x, scale)`; `decode` undoes that first.

The temporal convolutions are causal. Video is processed in steps (encode: the
first frame, then 4 frames at a time; decode: one latent frame at a time), each
temporal layer keeping the last frames it saw in a `FrameCache`, so memory stays
bounded whatever the clip length. Any step size gives the same result (up to
float rounding): the first step alone is special (its frame is not paired in time).

Within a decode step the decoder is evaluated block by block (`Decoder.eval_blocks`),
and on a CPU (device.prepare sets `strip_elements`) its convolutions run in strips
of rows, each with its kernel's halo: MLX unfolds a convolution's input (27 times
for a 3x3x3 kernel) and allocates a graph's buffers when it schedules them, so one
graph for the step held every layer's unfolded input at once (177 KB a pixel of
output at the released widths; 107 KB block by block, 7.3 KB in strips too, plus
7 KB of frame caches; BENCHMARKS.md). Neither changes the numbers (strips: up to
float rounding).
"""

from dataclasses import asdict, dataclass, fields
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

# The per-channel latent statistics of the released Wan2.2_VAE.pth (z_dim 48).
RELEASED_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
RELEASED_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

# Keys of the reference's constructor arguments that change nothing at inference.
IGNORED_KEYS = {"dropout", "device", "attn_scales", "format"}


def _check_int(key, v, lo):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"wan vae config {key!r} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"wan vae config {key!r} must be at least {lo}, got {v}")
    return v


def _check_list(key, v, kind):
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"wan vae config {key!r} must be a list, got {v!r}")
    for item in v:
        ok = isinstance(item, bool) if kind is bool else not isinstance(item, bool)
        if not ok or not isinstance(item, (int, float) if kind is float else kind):
            raise ValueError(f"wan vae config {key!r} must hold {kind.__name__} values, got {item!r}")
    return tuple(kind(item) for item in v)


@dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 160  # encoder base width
    dec_dim: int = 256  # decoder base width
    z_dim: int = 48
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # One flag per downsampling stage (the reference's spelling); the decoder mirrors it.
    temperal_downsample: Tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    mean: Tuple[float, ...] = RELEASED_MEAN
    std: Tuple[float, ...] = RELEASED_STD

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        if not isinstance(d, dict):
            raise ValueError(f"wan vae config must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"wan vae config has unknown keys: {', '.join(map(repr, unknown))}")
        if "dropout" in d and (not isinstance(d["dropout"], (int, float)) or not 0 <= d["dropout"] < 1):
            raise ValueError(f"wan vae config 'dropout' must be a number in [0, 1), got {d['dropout']!r}")
        kw = {}
        for key in ("dim", "dec_dim", "z_dim", "num_res_blocks", "patch_size"):
            if key in d:
                kw[key] = _check_int(key, d[key], 1)
        if "dim_mult" in d:
            kw["dim_mult"] = _check_list("dim_mult", d["dim_mult"], int)
        if "temperal_downsample" in d:
            kw["temperal_downsample"] = _check_list("temperal_downsample", d["temperal_downsample"], bool)
        for key in ("mean", "std"):
            if key in d:
                kw[key] = _check_list(key, d[key], float)
        config = cls(**kw)
        config.validate()
        return config

    def validate(self):
        if self.patch_size != 2:
            # The reference hard-codes patches of 2x2 (12 input channels).
            raise ValueError(f"wan vae config 'patch_size' must be 2, got {self.patch_size}")
        if len(self.dim_mult) < 2 or any(m < 1 for m in self.dim_mult):
            raise ValueError(f"wan vae config 'dim_mult' must be 2 or more positive integers, got {self.dim_mult}")
        n = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != n:
            raise ValueError(
                f"wan vae config 'temperal_downsample' must have {n} flags (len(dim_mult) - 1), "
                f"got {len(self.temperal_downsample)}"
            )
        if sum(self.temperal_downsample) > 2:
            # Encoding steps of 4 frames must give whole latent frames.
            raise ValueError("wan vae config 'temperal_downsample' may set at most 2 flags (4x in time)")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.z_dim:
                raise ValueError(
                    f"wan vae config {key!r} must have z_dim = {self.z_dim} values, got {len(getattr(self, key))}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("wan vae config 'std' values must be positive")
        # The parameter-free shortcuts fold channels in whole groups.
        enc, dec, rev = self.encoder_dims, self.decoder_dims, self.temperal_downsample[::-1]
        for i in range(n + 1):
            fold = (4 if i < n else 1) * (2 if i < n and self.temperal_downsample[i] else 1)
            if (enc[i] * fold) % enc[i + 1]:
                raise ValueError(f"wan vae config: encoder stage {i} width {enc[i]} does not average into {enc[i + 1]}")
        for i in range(n):
            if (dec[i + 1] * 4 * (2 if rev[i] else 1)) % dec[i]:
                raise ValueError(f"wan vae config: decoder stage {i} width {dec[i]} does not repeat into {dec[i + 1]}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def encoder_dims(self) -> List[int]:
        return [self.dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> List[int]:
        return [self.dec_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)


class FrameCache:
    """What each temporal layer keeps from one step of frames to the next: a list
    of slots read and written in the same order at every step."""

    def __init__(self):
        self.slots = []
        self.pos = 0
        self.first = True  # the first step: one frame, unpaired in time

    def start(self, first: bool):
        self.pos, self.first = 0, first

    def read(self):
        return self.slots[self.pos] if self.pos < len(self.slots) else None

    def write(self, value):
        if self.pos < len(self.slots):
            self.slots[self.pos] = value
        else:
            self.slots.append(value)
        self.pos += 1

    def arrays(self):
        return [s for s in self.slots if s is not None]


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _row_strips(conv, rows_of, n: int, axis: int, pad: int, rows: int):
    """The output of `conv` (padding nothing along `axis`) on an input of `n` rows along `axis`
    zero-padded by `pad` either side, computed `rows` output rows at a time: rows_of(lo, hi)
    gives the input's rows lo:hi, each strip takes its `pad` rows of context, and each is
    evaluated into the output before the next, so no more than one strip is unfolded at once."""
    out = None
    for top in range(0, n, rows):
        bottom = min(top + rows, n)
        lo, hi = max(top - pad, 0), min(bottom + pad, n)
        v = rows_of(lo, hi)
        widths = [(0, 0)] * v.ndim
        widths[axis] = (pad - (top - lo), pad - (hi - bottom))
        y = conv(mx.pad(v, widths))
        if out is None:
            out = mx.zeros((*y.shape[:axis], n, *y.shape[axis + 1 :]), y.dtype)
        out[(slice(None),) * axis + (slice(top, bottom),)] = y  # in place: the output's buffer is reused
        mx.eval(out)
    return out


def _strip_rows(elements: Optional[int], per_row: int, kernel_rows: int, pad: int, stride: int, height: int) -> int:
    """Output rows per strip for an unfolded input of at most `elements` (per_row elements an
    output row), or 0: convolve whole (no limit, nothing unfolded, or it fits, or rows not
    'same'-padded with stride 1)."""
    if elements is None or per_row <= 0 or stride != 1 or 2 * pad != kernel_rows - 1:
        return 0
    rows = max(1, elements // per_row)
    return rows if rows < height else 0


def _identity(x):
    return x


class CausalConv3d(nn.Module):
    """Conv3d on (B, T, H, W, C), padded only in the past along time: the
    previous step's last frames (zeros before the first) stand in front.

    `pre`, a function of each position's channels alone (a norm and an activation), is
    applied to the input first, strip by strip when the convolution runs in strips of
    rows (`strip_elements`, as vae.Conv2d: set by device.prepare on a CPU), so neither
    it nor the input padded in time is ever whole. The cache keeps `pre`'s output."""

    strip_elements = None  # the largest unfolded input convolved at once, in elements

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel)
        pt, self.ph, self.pw = _triple(padding)
        self.past = 2 * pt  # frames needed from before this step
        self.stride = _triple(stride)
        self.weight = mx.zeros((cout, kt, kh, kw, cin))
        self.bias = mx.zeros((cout,))

    def __call__(self, x, cache: Optional[FrameCache] = None, pre=_identity):
        b, t, h, w, _ = x.shape
        prev = None
        if self.past:
            prev = cache.read() if cache is not None else None
            if prev is None:
                prev = mx.zeros((b, self.past, *x.shape[2:]), x.dtype)
            if cache is not None:
                # The last frames of [prev, pre(x)], copied (a slice would keep its whole buffer).
                last = pre(x[:, t - self.past :]) if t >= self.past else mx.concatenate([prev[:, t:], pre(x)], axis=1)
                cache.write(mx.contiguous(last))

        def rows_of(lo, hi):
            v = pre(x[:, :, lo:hi])
            return v if prev is None else mx.concatenate([prev[:, :, lo:hi], v], axis=1)

        cout, kt, kh, kw, cin = self.weight.shape
        if kt * kh * kw == 1 and self.stride == (1, 1, 1):
            # A product (the same numbers as conv3d, which copies its input twice first).
            return rows_of(0, h) @ self.weight.reshape(cout, cin).T + self.bias
        unfolded = kt * kh * kw * cin
        per_row = b * ((t + self.past - kt) // self.stride[0] + 1) * w * unfolded
        rows = _strip_rows(self.strip_elements, per_row, kh, self.ph, self.stride[1], h)
        if not rows:
            y = mx.conv3d(rows_of(0, h), self.weight, stride=self.stride, padding=(0, self.ph, self.pw))
            return y + self.bias

        def conv(v):
            return mx.conv3d(v, self.weight, stride=self.stride, padding=(0, 0, self.pw)) + self.bias

        return _row_strips(conv, rows_of, h, 2, self.ph, rows)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters) that convolves a large input in strips of rows
    when `strip_elements` is set, as CausalConv3d; `up` upsamples the input 2x first
    (nearest), strip by strip in strips."""

    strip_elements = None

    def __call__(self, x, up: bool = False):
        n, h, w, c = x.shape
        h, w = (2 * h, 2 * w) if up else (h, w)
        k, p = self.weight.shape[1], self.padding[0]
        rows = _strip_rows(self.strip_elements, n * w * c * k * k if k > 1 else 0, k, p, self.stride[0], h)
        if not rows:
            return super().__call__(_upsample2x(x) if up else x)

        def rows_of(lo, hi):
            if not up:
                return x[:, lo:hi]
            return _upsample2x(x[:, lo // 2 : (hi + 1) // 2])[:, lo % 2 : lo % 2 + hi - lo]

        def conv(v):
            return mx.conv2d(v, self.weight, stride=self.stride, padding=(0, self.padding[1])) + self.bias

        return _row_strips(conv, rows_of, h, 1, p, rows)


class RMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma over channels, i.e. x / rms(x) * gamma (the reference's
    F.normalize floors |x| at 1e-12; a tiny eps does the same job)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.gamma, 1e-24)


def _per_frame(fn, x):
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        if cin != cout:
            self.shortcut = CausalConv3d(cin, cout, 1)

    def __call__(self, x, cache):
        h = self.shortcut(x) if "shortcut" in self else x
        x = self.conv1(x, cache, lambda v: nn.silu(self.norm1(v)))
        x = self.conv2(x, cache, lambda v: nn.silu(self.norm2(v)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        q, k, v = mx.split(self.to_qkv(self.norm(x)).reshape(b * t, 1, h * w, 3 * c), 3, axis=-1)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.proj(y).reshape(b, t, h, w, c)


class Resample(nn.Module):
    """2x spatial up/down sampling, with 2x in time when `temporal`."""

    def __init__(self, dim, up: bool, temporal: bool):
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.conv = Conv2d(dim, dim, 3, padding=1)
            if temporal:  # each frame becomes two: the two halves of the output channels
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.conv = Conv2d(dim, dim, 3, stride=2)
            if temporal:  # frames paired with stride 2, each pair with the frame before
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x, cache: FrameCache):
        if self.up:
            if self.temporal:
                if cache.first:
                    cache.write(None)  # the first frame is not doubled; zeros stand before the next
                else:
                    y = self.time_conv(x, cache)
                    b, t, h, w, _ = x.shape
                    x = y.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)
            return _per_frame(lambda f: self.conv(f, up=True), x)
        x = _per_frame(lambda f: self.conv(mx.pad(f, [(0, 0), (0, 1), (0, 1), (0, 0)])), x)
        if self.temporal:
            prev = cache.read()
            cache.write(x[:, -1:])
            if not cache.first:  # the first frame passes through alone
                x = self.time_conv(mx.concatenate([prev, x], axis=1))
        return x


def _upsample2x(x):
    n, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


def avg_down(x, cout, ft, fs):
    """Parameter-free shortcut: fold ft frames and fs x fs pixels into channels
    (front-padding time with zeros to a multiple of ft), then average groups of
    channels down to cout."""
    pad = (ft - x.shape[1] % ft) % ft
    if pad:
        x = mx.concatenate([mx.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype), x], axis=1)
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, t // ft, h // fs, w // fs, cout, -1)
    return x.mean(axis=-1)


def dup_up(x, cout, ft, fs, first):
    """Parameter-free shortcut, the inverse fold: repeat channels, unfold them into
    ft frames and fs x fs pixels. The first step keeps only the last frame of each fold."""
    b, t, h, w, c = x.shape
    x = mx.repeat(x, cout * ft * fs * fs // c, axis=-1).reshape(b, t, h, w, cout, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, cout)
    return x[:, ft - 1 :] if first else x


class DownBlock(nn.Module):
    def __init__(self, cin, cout, num_blocks, temporal, down):
        super().__init__()
        self.cout, self.ft, self.fs = cout, 2 if temporal else 1, 2 if down else 1
        self.downsamples = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if down:
            self.downsamples.append(Resample(cout, up=False, temporal=temporal))

    def __call__(self, x, cache):
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + avg_down(x, self.cout, self.ft, self.fs)


class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_blocks, temporal, up):
        super().__init__()
        self.cout, self.ft, self.up = cout, 2 if temporal else 1, up
        self.upsamples = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        if up:
            self.upsamples.append(Resample(cout, up=True, temporal=temporal))

    def __call__(self, x, cache):
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return self.shortcut(x, h, cache)

    def shortcut(self, x, h, cache):
        """The block's output from its input x and its layers' output h."""
        return h + dup_up(x, self.cout, self.ft, 2, cache.first) if self.up else h


class Encoder(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims, n = config.encoder_dims, len(config.dim_mult)
        temporal = config.temperal_downsample
        self.conv1 = CausalConv3d(3 * config.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = [
            DownBlock(dims[i], dims[i + 1], config.num_res_blocks, i < n - 1 and temporal[i], i < n - 1)
            for i in range(n)
        ]
        c = dims[-1]
        self.middle = [ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)]
        self.head_norm = RMSNorm(c)
        self.head_conv = CausalConv3d(c, 2 * config.z_dim, 3, padding=1)

    def __call__(self, x, cache):
        x = self.conv1(x, cache)
        for layer in self.downsamples + self.middle:
            x = layer(x, cache)
        return self.head_conv(x, cache, lambda v: nn.silu(self.head_norm(v)))


class Decoder(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims, n = config.decoder_dims, len(config.dim_mult)
        temporal = config.temperal_downsample[::-1]
        c = dims[0]
        self.conv1 = CausalConv3d(config.z_dim, c, 3, padding=1)
        self.middle = [ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)]
        self.upsamples = [
            UpBlock(dims[i], dims[i + 1], config.num_res_blocks + 1, i < n - 1 and temporal[i], i < n - 1)
            for i in range(n)
        ]
        self.head_norm = RMSNorm(dims[-1])
        self.head_conv = CausalConv3d(dims[-1], 3 * config.patch_size**2, 3, padding=1)

    # Evaluate after each block (residual, attention, upsample), so only what the next block
    # needs is alive; False builds the step as one graph (the same numbers, every buffer at once).
    eval_blocks = True

    def _settle(self, x, cache):
        if self.eval_blocks:
            mx.eval(x, cache.arrays())
        return x

    def __call__(self, x, cache):
        x = self._settle(self.conv1(x, cache), cache)
        for layer in self.middle:
            x = self._settle(layer(x, cache), cache)
        for block in self.upsamples:
            # UpBlock's steps, each evaluated; without upsampling the block's input is not kept.
            h, x = x, x if block.up else None
            for layer in block.upsamples:
                h = self._settle(layer(h, cache), cache)
            x = self._settle(block.shortcut(x, h, cache), cache)
            del h
        return self.head_conv(x, cache, lambda v: nn.silu(self.head_norm(v)))


def patchify(x, p):
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p), channels ordered (C, column, row) as the reference."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p):
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


class WanVAE(nn.Module):
    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # -> latent mean and log-variance
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self):
        return self.conv2.weight.dtype

    def _scale(self):
        # In float32 whatever the weights' dtype; the reference multiplies by 1/std (its
        # `scale[1]`), so do we, for the same rounding.
        return mx.array(self.config.mean), 1.0 / mx.array(self.config.std)

    def encode(self, x: mx.array, frames_per_step: int = 4) -> mx.array:
        """Videos (B, 1 + 4k, H, W, 3) in [-1, 1] -> normalised latent means, float32
        (B, 1 + k, H/16, W/16, z_dim). The first frame is encoded alone, then
        `frames_per_step` frames (a multiple of 4) at a time."""
        cfg = self.config
        f = cfg.spatial_factor
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"encode expects videos (B, T, H, W, 3), channels last; got shape {tuple(x.shape)}")
        if (x.shape[1] - 1) % 4 or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"encode expects 1 + 4k frames and a height and width that are multiples of {f}; "
                f"got shape {tuple(x.shape)}"
            )
        if frames_per_step < 4 or frames_per_step % 4:
            raise ValueError(f"frames_per_step must be a positive multiple of 4, got {frames_per_step}")
        x = patchify(x.astype(self.dtype), cfg.patch_size)
        cache, outs = FrameCache(), []
        starts = [0, *range(1, x.shape[1], frames_per_step)]
        for i, s in enumerate(starts):
            cache.start(first=i == 0)
            out = self.encoder(x[:, s : 1 if i == 0 else s + frames_per_step], cache)
            mx.eval(out, cache.arrays())
            outs.append(out)
        mu = self.conv1(mx.concatenate(outs, axis=1))[..., : cfg.z_dim]
        mean, inv_std = self._scale()
        return (mu.astype(mx.float32) - mean) * inv_std

    def decode_steps(self, z: mx.array, frames_per_step: int = 1) -> Iterator[mx.array]:
        """Normalised latents (B, T', h, w, z_dim) -> videos (B, 1 + 4(T'-1), 16h, 16w, 3)
        (4 and 16 in the released layout: `config.temporal_factor`, `spatial_factor`),
        yielded step by step: the first latent frame alone, then `frames_per_step`
        latent frames at a time, each step evaluated before the next (memory stays
        that of one step, whatever the clip length)."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim or z.shape[1] < 1:
            raise ValueError(
                f"decode expects latents (B, T, h, w, {cfg.z_dim}), channels last; got shape {tuple(z.shape)}"
            )
        if frames_per_step < 1:
            raise ValueError(f"frames_per_step must be at least 1, got {frames_per_step}")
        mean, inv_std = self._scale()
        x = self.conv2((z.astype(mx.float32) / inv_std + mean).astype(self.dtype))
        cache = FrameCache()
        starts = [0, *range(1, x.shape[1], frames_per_step)]
        for i, s in enumerate(starts):
            cache.start(first=i == 0)
            out = unpatchify(self.decoder(x[:, s : 1 if i == 0 else s + frames_per_step], cache), cfg.patch_size)
            mx.eval(out, cache.arrays())
            yield out

    def stream_decoder(self) -> "StreamDecoder":
        """A decode fed one latent frame at a time as a sampler finishes them (previews)."""
        return StreamDecoder(self)

    def decode(self, z: mx.array, frames_per_step: int = 1) -> mx.array:
        """Normalised latents (B, T', h, w, z_dim) -> videos (B, 1 + 4(T'-1), 16h, 16w, 3), unclipped."""
        return mx.concatenate(list(self.decode_steps(z, frames_per_step)), axis=1)


class StreamDecoder:
    """The causal decode with frame caches of its own, fed one normalised latent frame
    (B, 1, h, w, z_dim) at a time: each call gives that frame's video frames (1 for the
    first, then `temporal_factor`), as decode_steps(z, 1) gives them for the whole clip.
    Its caches live as long as it does (about as much again as one decode step's memory)."""

    def __init__(self, vae: WanVAE):
        self.vae, self.cache, self.first = vae, FrameCache(), True

    def __call__(self, z: mx.array) -> mx.array:
        vae = self.vae
        mean, inv_std = vae._scale()
        x = vae.conv2((z.astype(mx.float32) / inv_std + mean).astype(vae.dtype))
        self.cache.start(first=self.first)
        self.first = False
        out = unpatchify(vae.decoder(x, self.cache), vae.config.patch_size)
        mx.eval(out, self.cache.arrays())
        return out


# Reference names (its nn.Sequential indices) -> ours.
_RENAMES = (
    (".residual.0.", ".norm1."),
    (".residual.2.", ".conv1."),
    (".residual.3.", ".norm2."),
    (".residual.6.", ".conv2."),
    (".resample.1.", ".conv."),
    ("encoder.head.0.", "encoder.head_norm."),
    ("encoder.head.2.", "encoder.head_conv."),
    ("decoder.head.0.", "decoder.head_norm."),
    ("decoder.head.2.", "decoder.head_conv."),
)


def sanitize(state_dict: dict) -> dict:
    """A `Wan2.2_VAE.pth` state dict -> WanVAE names and channels-last layouts.
    Keys it does not know pass through unchanged (strict loading then names them)."""
    out = {}
    for key, v in state_dict.items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        v = v if isinstance(v, mx.array) else mx.array(v)
        if key.endswith(".gamma"):
            v = v.reshape(-1)  # (C, 1, 1[, 1]) broadcast shapes of channels-first
        elif v.ndim == 5:
            v = v.transpose(0, 2, 3, 4, 1)  # conv3d OIDHW -> ODHWI
        elif v.ndim == 4 and (".to_qkv." in key or ".proj." in key):
            v = v.reshape(v.shape[:2])  # 1x1 conv2d -> linear
        elif v.ndim == 4:
            v = v.transpose(0, 2, 3, 1)  # conv2d OIHW -> OHWI
        out[key] = v
    return out
