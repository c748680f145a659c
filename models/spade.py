"""SPADE (Park et al., 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization").

Generator: residual blocks whose normalisation is SPADE: a parameter-free instance or batch norm,
then a per-pixel scale and shift predicted from the label map (resized to the block's resolution)
by a shared conv + ReLU and two convs, ``x_norm * (1 + gamma) + beta``. The generator starts from
the label map downsampled by ``2**num_up`` (or, with ``use_vae``, from a style code encoded from the
real image) and doubles the resolution between blocks up to the output; a 3x3 conv + tanh head.
Discriminator: multi-scale PatchGANs on (label map, image) with spectral-normalised, instance-normed
inner convs (SPADE's ``spectralinstance``). Losses: hinge, discriminator feature matching
(``lambda_feat``), VGG19 perceptual (``lambda_vgg``, optional) and the KL term (``lambda_kld``) with
``use_vae``. Two time-scale update rule: G lr 1e-4, D lr 4e-4, betas (0, 0.9).

Spectral norm and half precision
--------------------------------
Every spectral-normalised conv here is an :class:`SNConv2d`. Its power iteration and the sigma it
divides by are computed in fp32 whatever the weight's dtype (autocast is switched off around them),
and the unit-vector normalisation measures a norm as ``max|x| * ||x / max|x|||`` so no square can
overflow or underflow. A naive half-precision iteration (``F.normalize`` on fp16 ``W^T u`` / ``W v``,
which is what ``torch.nn.utils.spectral_norm`` does on an fp16 module under O2/O3) fails three ways:

* sigma above 65504 (fp16's largest value) becomes inf, and the normalised weight inf/NaN or zero;
* small weights (fp16 subnormals below 6.1e-5, common with SPADE's xavier init at gain 0.02 on wide
  layers) give ``W v`` that keeps only a few significant bits: a sigma off by percent or more;
* the normalisation eps 1e-12 rounds to exactly 0 in fp16, so a zero vector normalises to 0/0 = NaN.

In fp32 every fp16- or bf16-stored weight (after a ``max|x|`` rescale) is represented exactly and
none of these can happen. The extra cost is one transient fp32 copy of each weight matrix per
forward: O(weights), against the O(weights x pixels) of the convolution itself.

The eps site ``spectral_norm`` is that normalisation's floor: ``x / max(||x||, eps)`` for u and v,
and ``W / max(sigma, eps)`` (a zero weight gives a zero weight, not NaN). Its default 1e-12 is torch's
own, so the fp32 reference is numerically torch's ``spectral_norm``; because the floor is applied in
fp32, 1e-12 stays 1e-12 under every opt level. The fp16-safe alternative a half-precision iteration
would need is 1e-6: it survives an fp16 cast (as a subnormal; 1e-8 and below round to 0), and it is
far below any genuine norm it could floor (sigma of SPADE's initialised layers is ~1e-2, so even in
the fused ``x * rsqrt(sum(x^2) + eps)`` form, where eps is in squared units, 1e-6 << sigma^2 ~ 1e-4).
The search space offers both so a study can confirm the site is inert for this implementation.

Running the power iteration once per network pass
-------------------------------------------------
torch's spectral norm updates u and v inside every forward. Under gradient checkpointing the
checkpointed block runs its forward again during backward, which would update u and v a second
time and rebuild the weight with a different sigma than the forward used (wrong gradients). Here
each network (generator, discriminator) runs the power iteration of all its SN convs once at the
start of its ``forward`` in training mode (what torch does, hoisted out of the blocks), and the
convs inside the blocks only read u and v. For the same reason the SPADE batch norm
(:class:`ParamFreeBatchNorm`) updates its running statistics at most once per network pass.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models.base import CITYSCAPES_LABEL_NC, TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import FeatureStack, instance_edges, maybe_checkpoint
from models.losses import VGGLoss, feature_matching_loss, gan_loss
from orchestrator.settings import SpeedFlags

INIT_GAIN = 0.02  # SPADE's xavier-normal init gain (``--init_variance``)
INIT_POWER_ITERATIONS = 15  # warm start of u, v after init, so sigma is accurate from step one
G_LR, D_LR, BETAS = 1e-4, 4e-4, (0.0, 0.9)  # TTUR: lr 2e-4 halved for G, doubled for D
EXTRA_UPSAMPLINGS = {"normal": 0, "more": 1, "most": 2}
# preset keys equal in every preset (SPADE's Cityscapes defaults)
_SHARED = dict(label_nc=CITYSCAPES_LABEL_NC, num_upsampling_layers="normal", num_D=2, lambda_feat=10.0,
               lambda_vgg=10.0, lambda_kld=0.05, vgg_weights=None)


# --------------------------------------------------------------------------- spectral norm


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Autocast disabled: CPU autocast runs ``matmul`` in half, CUDA's ``mv``; keep fp32 here."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def safe_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||, eps)`` (torch's ``F.normalize``) with ``||x||`` measured as
    ``m * ||x / m||``, ``m = max|x_i|``: the squares summed lie in [0, n] with the largest 1, so they
    neither overflow nor all underflow. Computed in ``x``'s dtype, where ``eps`` is rounded to that
    dtype (1e-12 becomes 0 in fp16: a zero ``x`` then gives 0/0 = NaN)."""
    m = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)  # the floor only avoids 0/0 for x = 0
    norm = m * torch.linalg.vector_norm(x / m)
    return x / norm.clamp_min(eps)


def power_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float,
                    n_iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_iterations`` rounds of ``v <- unit(W^T u), u <- unit(W v)`` for ``w`` of shape (h, w),
    all in ``w``'s dtype. Returns the new (u, v)."""
    for _ in range(n_iterations):
        v = safe_unit(torch.mv(w.t(), u), eps)
        u = safe_unit(torch.mv(w, v), eps)
    return u, v


class SNConv2d(nn.Conv2d):
    """Conv2d whose weight is divided by its largest singular value (Miyato et al., 2018).

    ``weight`` is the raw parameter; buffers ``weight_u`` (out_channels) and ``weight_v``
    (in_channels/groups * kh * kw) hold the power iteration's singular-vector estimates. The power
    iteration runs only when :meth:`power_iteration` is called (networks call it once per training
    forward, see the module docstring); ``forward`` uses the current u, v. Both compute in
    ``compute_dtype`` (fp32, or fp64 for fp64 weights): see the module docstring for why.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, *, eps: float = 1e-12, n_power_iterations: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.sn_eps = float(eps)
        self.n_power_iterations = n_power_iterations
        fan_in = self.weight[0].numel()
        self.register_buffer("weight_u", F.normalize(torch.randn(out_channels), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(fan_in), dim=0))

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    @torch.no_grad()
    def power_iteration(self, n_iterations: int | None = None) -> None:
        """Refine u, v in place (stored back in the buffers' own dtype)."""
        dtype = self.compute_dtype
        with _autocast_off(self.weight.device.type):
            w = self.weight.detach().flatten(1).to(dtype)
            u, v = power_iteration(w, self.weight_u.to(dtype), self.weight_v.to(dtype), self.sn_eps,
                                   n_iterations or self.n_power_iterations)
        self.weight_u.copy_(u)
        self.weight_v.copy_(v)

    def sigma(self) -> torch.Tensor:
        """``u^T W v`` in the compute dtype (differentiable w.r.t. the weight)."""
        dtype = self.compute_dtype
        with _autocast_off(self.weight.device.type):
            u = self.weight_u.detach().to(dtype, copy=True)  # copies: later in-place updates of the
            v = self.weight_v.detach().to(dtype, copy=True)  # buffers must not touch saved tensors
            return torch.dot(u, torch.mv(self.weight.flatten(1).to(dtype), v))

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(sigma, eps)`` in the weight's own dtype."""
        dtype = self.compute_dtype
        with _autocast_off(self.weight.device.type):
            sigma = self.sigma()
            return (self.weight.to(dtype) / sigma.clamp_min(self.sn_eps)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalized_weight(), self.bias)


class ParamFreeBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d without affine parameters (SPADE's ``syncbatch``/``batch`` param-free norm)
    whose running statistics update at most once per network pass: a network arms it at the start
    of its forward (:func:`begin_pass`), so the rerun of a gradient-checkpointed block during
    backward normalises with the same batch statistics but does not count them twice. Used outside
    such a network (never armed) it behaves like ``nn.BatchNorm2d``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps, affine=False)
        self._armed: bool | None = None  # None: not managed by a network

    def arm(self) -> None:
        self._armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self._armed is False:
            # momentum 0 leaves the running statistics as they are, and (unlike passing None for
            # them) saves the same tensors for backward as the first call: checkpointing compares
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, True, 0.0, self.eps)
        if self.training and self._armed:
            self._armed = False
        return super().forward(x)


def begin_pass(network: nn.Module) -> None:
    """Start of a training forward of ``network``: one power iteration for every SN conv, and arm
    every :class:`ParamFreeBatchNorm` for one running-statistics update. No-op in eval mode."""
    if not network.training:
        return
    for module in network.modules():
        if isinstance(module, SNConv2d):
            module.power_iteration()
        elif isinstance(module, ParamFreeBatchNorm):
            module.arm()


def init_weights(network: nn.Module, gain: float = INIT_GAIN) -> None:
    """SPADE's init: xavier-normal weights with ``gain`` for every conv and linear, zero biases;
    then a warm start of every SN conv's u, v on the new weights."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in network.modules():
        if isinstance(module, SNConv2d):
            module.power_iteration(INIT_POWER_ITERATIONS)


# --------------------------------------------------------------------------- generator


class SPADENorm(nn.Module):
    """Parameter-free norm of ``x``, then ``* (1 + gamma) + beta`` with gamma, beta predicted per
    pixel from the label map (nearest-resized to ``x``'s resolution) by a shared conv + ReLU and
    two convs, all ``kernel x kernel``."""

    def __init__(self, channels: int, label_nc: int, hidden: int, *, norm: str = "instance",
                 eps: float = 1e-5, kernel: int = 3):
        super().__init__()
        if norm == "instance":
            self.param_free = nn.InstanceNorm2d(channels, eps=eps, affine=False, track_running_stats=False)
        elif norm == "batch":
            self.param_free = ParamFreeBatchNorm(channels, eps=eps)
        else:
            raise ValueError(f"unknown param-free norm {norm!r}; allowed: instance, batch")
        pad = kernel // 2
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel, padding=pad), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, kernel, padding=pad)
        self.beta = nn.Conv2d(hidden, channels, kernel, padding=pad)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free(x)
        actv = self.shared(F.interpolate(seg, size=x.shape[-2:], mode="nearest"))
        return normalized * (1 + self.gamma(actv)) + self.beta(actv)


class SPADEResBlock(nn.Module):
    """SPADE -> lrelu -> SN conv3x3, twice, plus a shortcut that is learned (SPADE -> SN conv1x1
    without bias) when the channel count changes. The middle width is ``min(fin, fout)``."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int, *, norm: str = "instance",
                 eps: float = 1e-5, sn_eps: float = 1e-12):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmid = min(fin, fout)
        spade = dict(label_nc=label_nc, hidden=hidden, norm=norm, eps=eps)
        self.norm_0, self.conv_0 = SPADENorm(fin, **spade), SNConv2d(fin, fmid, 3, padding=1, eps=sn_eps)
        self.norm_1, self.conv_1 = SPADENorm(fmid, **spade), SNConv2d(fmid, fout, 3, padding=1, eps=sn_eps)
        if self.learned_shortcut:
            self.norm_s = SPADENorm(fin, **spade)
            self.conv_s = SNConv2d(fin, fout, 1, bias=False, eps=sn_eps)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx


class ConvEncoder(nn.Module):
    """The VAE image encoder: the image bilinearly resized to ``size`` x ``size``, stride-2 SN
    conv3x3 + instance-norm layers (widths ngf, 2ngf, ... capped at 8ngf) down to 4x4, lrelu, and
    two linear heads for the style code's mean and log-variance."""

    def __init__(self, ngf: int, z_dim: int, size: int, *, eps: float = 1e-5, sn_eps: float = 1e-12,
                 checkpointing: bool = False):
        super().__init__()
        n_layers = int(round(math.log2(size / 4))) if size >= 8 else 0
        if n_layers < 1 or 4 * 2**n_layers != size:
            raise ValueError(f"enc_size must be a power of two >= 8, got {size}")
        self.size, self.checkpointing = size, checkpointing
        widths = [3] + [min(ngf * 2**i, ngf * 8) for i in range(n_layers)]
        self.layers = nn.ModuleList(
            nn.Sequential(SNConv2d(cin, cout, 3, 2, 1, bias=False, eps=sn_eps),
                          nn.InstanceNorm2d(cout, eps=eps, affine=False, track_running_stats=False))
            for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.fc_mu = nn.Linear(widths[-1] * 16, z_dim)
        self.fc_var = nn.Linear(widths[-1] * 16, z_dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        for i, layer in enumerate(self.layers):
            x = maybe_checkpoint(layer, F.leaky_relu(x, 0.2) if i else x, enabled=self.checkpointing)
        x = F.leaky_relu(x, 0.2).flatten(1)
        return self.fc_mu(x), self.fc_var(x)


class SPADEGenerator(nn.Module):
    """SPADE's generator, with the number of channel-halving blocks as a parameter.

    Widths: ``top = ngf * 2**n_up_blocks`` for the head and two middle blocks, then
    ``n_up_blocks`` blocks halving it down to ``ngf`` (the paper: ngf 64, 4 such blocks, top 1024).
    Upsamplings ``num_up = n_up_blocks + 1`` ("normal"), one more between the middle blocks
    ("more"), and one more plus a last block to ``ngf // 2`` ("most"). The input resolution must be a
    multiple of ``2**num_up``.

    ``forward(seg, image=None)`` returns ``(fake, mu, logvar)``; ``mu``/``logvar`` are None without
    a VAE. With ``use_vae`` the style code is encoded from ``image`` (sampled by reparameterisation in
    training mode, the mean in eval mode so quality measurements are deterministic), or drawn from
    N(0, 1) when ``image`` is None. The fc output grid ``vae_grid`` is nearest-resized to the start
    resolution when the input size differs from the one it was built for."""

    def __init__(self, semantic_nc: int, ngf: int, n_up_blocks: int, num_upsampling_layers: str = "normal",
                 hidden: int = 128, *, norm: str = "instance", eps: float = 1e-5, sn_eps: float = 1e-12,
                 use_vae: bool = False, z_dim: int = 256, vae_grid: tuple[int, int] = (8, 16),
                 enc_size: int = 256, checkpointing: str = "none"):
        super().__init__()
        if num_upsampling_layers not in EXTRA_UPSAMPLINGS:
            raise ValueError(f"unknown num_upsampling_layers {num_upsampling_layers!r}; "
                             f"allowed: {sorted(EXTRA_UPSAMPLINGS)}")
        if n_up_blocks < 1:
            raise ValueError(f"n_up_blocks must be >= 1, got {n_up_blocks}")
        self.extra = EXTRA_UPSAMPLINGS[num_upsampling_layers]
        self.num_up = n_up_blocks + 1 + self.extra
        self.top = ngf * 2**n_up_blocks
        self.z_dim, self.vae_grid = z_dim, tuple(int(s) for s in vae_grid)
        self.checkpoint_blocks = checkpointing in ("blocks", "all")
        self.checkpoint_head = checkpointing == "all"
        if use_vae:
            self.encoder: ConvEncoder | None = ConvEncoder(ngf, z_dim, enc_size, eps=eps, sn_eps=sn_eps,
                                                           checkpointing=self.checkpoint_head)
            self.fc: nn.Module = nn.Linear(z_dim, self.top * self.vae_grid[0] * self.vae_grid[1])
        else:
            self.encoder = None
            self.fc = nn.Conv2d(semantic_nc, self.top, 3, padding=1)

        def block(fin: int, fout: int) -> SPADEResBlock:
            return SPADEResBlock(fin, fout, semantic_nc, hidden, norm=norm, eps=eps, sn_eps=sn_eps)

        self.head_0 = block(self.top, self.top)
        self.middle_0 = block(self.top, self.top)
        self.middle_1 = block(self.top, self.top)
        self.up_blocks = nn.ModuleList(block(self.top >> i, self.top >> (i + 1)) for i in range(n_up_blocks))
        final = ngf
        self.last = None
        if self.extra == 2:
            if ngf < 2:
                raise ValueError("num_upsampling_layers='most' needs ngf >= 2 (its last block has ngf // 2)")
            self.last = block(ngf, ngf // 2)
            final = ngf // 2
        self.conv_img = nn.Conv2d(final, 3, 3, padding=1)

    def _block(self, block: nn.Module, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(block, x, seg, enabled=self.checkpoint_blocks)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))

    def _style(self, seg: torch.Tensor, image: torch.Tensor | None):
        """(z, mu, logvar): reparameterisation in fp32 (``exp`` of a half log-variance overflows
        past 11), z handed on in the encoder's output dtype."""
        if image is None:
            return torch.randn(seg.shape[0], self.z_dim, device=seg.device, dtype=seg.dtype), None, None
        mu, logvar = self.encoder(image)
        if not self.training:
            return mu, mu, logvar
        std = torch.exp(0.5 * logvar.float())
        z = mu.float() + torch.randn_like(std) * std
        return z.to(mu.dtype), mu, logvar

    def forward(self, seg: torch.Tensor, image: torch.Tensor | None = None):
        begin_pass(self)
        n, _, height, width = seg.shape
        factor = 2**self.num_up
        if height % factor or width % factor:
            raise ValueError(f"SPADE generator with {self.num_up} upsamplings needs height and width "
                             f"divisible by {factor}, got {height}x{width}")
        start = (height // factor, width // factor)
        mu = logvar = None
        if self.encoder is not None:
            z, mu, logvar = self._style(seg, image)
            x = self.fc(z).view(n, self.top, *self.vae_grid)
            if tuple(x.shape[-2:]) != start:
                x = F.interpolate(x, size=start, mode="nearest")
        else:
            x = self.fc(F.interpolate(seg, size=start, mode="nearest"))

        x = self._block(self.head_0, x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self._block(self.middle_0, x, seg)
        if self.extra:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self._block(self.middle_1, x, seg)
        for block in self.up_blocks:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self._block(block, x, seg)
        if self.last is not None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self._block(self.last, x, seg)
        fake = maybe_checkpoint(self._output, x, enabled=self.checkpoint_head)
        return fake, mu, logvar


# --------------------------------------------------------------------------- discriminator


class SNPatchDiscriminator(FeatureStack):
    """SPADE's PatchGAN: conv4x4 stride 2 + lrelu; ``n_layers - 1`` blocks of SN conv4x4 (no bias)
    + instance norm + lrelu, widths doubling up to 512, stride 2 except the last (stride 1); a conv
    to one channel. ``forward`` returns every block's output, the prediction map last."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 4, *, eps: float = 1e-5,
                 sn_eps: float = 1e-12):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers_D must be >= 1, got {n_layers}")
        k, p = 4, 2
        blocks = [nn.Sequential(nn.Conv2d(in_channels, ndf, k, 2, p), nn.LeakyReLU(0.2))]
        channels = ndf
        for n in range(1, n_layers):
            out = min(channels * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            blocks.append(nn.Sequential(
                SNConv2d(channels, out, k, stride, p, bias=False, eps=sn_eps),
                nn.InstanceNorm2d(out, eps=eps, affine=False, track_running_stats=False),
                nn.LeakyReLU(0.2),
            ))
            channels = out
        blocks.append(nn.Conv2d(channels, 1, k, 1, p))
        self.blocks = nn.ModuleList(blocks)


class SNMultiscaleDiscriminator(nn.Module):
    """``num_d`` SNPatchDiscriminators, the i-th on the input average-pooled i times by 2. Returns
    one feature list per scale, full resolution first."""

    def __init__(self, in_channels: int, num_d: int = 2, ndf: int = 64, n_layers: int = 4, *,
                 eps: float = 1e-5, sn_eps: float = 1e-12):
        super().__init__()
        if num_d < 1:
            raise ValueError(f"num_D must be >= 1, got {num_d}")
        self.scales = nn.ModuleList(
            SNPatchDiscriminator(in_channels, ndf, n_layers, eps=eps, sn_eps=sn_eps) for _ in range(num_d)
        )

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        begin_pass(self)
        outputs = []
        for i, disc in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            outputs.append(disc(x))
        return outputs


# --------------------------------------------------------------------------- data


class LabelIdDataset(Dataset):
    """Wraps a data set of ``{"label": one-hot, "inst", "image"}`` samples (``StreetDataset``,
    ``FolderDataset``) into SPADE's input: ``label`` as class ids (1, H, W) int64 and ``inst`` as
    instance ids (1, H, W) int32, so no id is ever cast to half precision, and the one-hot map
    (label_nc x the bytes) is built on the device as SPADE does; ``image`` unchanged."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.inner[index]
        return {
            "label": sample["label"].argmax(dim=0, keepdim=True),
            "inst": sample["inst"].round().to(torch.int32),
            "image": sample["image"],
        }


# --------------------------------------------------------------------------- the model


def kld_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over batch and code (SPADE's form), in fp32."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


class SPADE(GANModel):
    name = "spade"
    supported_flags = TRAINER_FLAGS | {"checkpointing"}
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}
    presets: dict[str, dict[str, Any]] = {
        # tests: a 32x32 batch-2 step in a few tens of ms on a CPU (input size: multiple of 8)
        "tiny": dict(_SHARED, ngf=8, n_up_blocks=2, hidden=16, param_free_norm="instance", ndf=8, n_layers_D=3,
                     use_vae=False, z_dim=16, vae_grid=[4, 4], enc_size=32, use_vgg=False),
        # input size: multiple of 16
        "small": dict(_SHARED, ngf=32, n_up_blocks=3, hidden=64, param_free_norm="instance", ndf=32, n_layers_D=4,
                      use_vae=False, z_dim=64, vae_grid=[4, 8], enc_size=64, use_vgg=False),
        # the published Cityscapes network (spectralspadesyncbatch3x3 G, spectralinstance D/E, 256x512
        # input, multiple of 32); SyncBatchNorm there, plain BatchNorm here (no conversion under DDP)
        "paper": dict(_SHARED, ngf=64, n_up_blocks=4, hidden=128, param_free_norm="batch", ndf=64, n_layers_D=4,
                      use_vae=False, z_dim=256, vae_grid=[8, 16], enc_size=256, use_vgg=True),
    }

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        eps = {**self.eps_sites, **eps}
        norm_eps, sn_eps = eps["instance_norm"], eps["spectral_norm"]
        semantic_nc = arch["label_nc"] + 1  # one-hot labels + instance boundary map
        generator = SPADEGenerator(
            semantic_nc, arch["ngf"], arch["n_up_blocks"], arch["num_upsampling_layers"], arch["hidden"],
            norm=arch["param_free_norm"], eps=norm_eps, sn_eps=sn_eps, use_vae=arch["use_vae"],
            z_dim=arch["z_dim"], vae_grid=tuple(arch["vae_grid"]), enc_size=arch["enc_size"],
            checkpointing=flags.checkpointing,
        )
        discriminator = SNMultiscaleDiscriminator(semantic_nc + 3, arch["num_D"], arch["ndf"], arch["n_layers_D"],
                                                  eps=norm_eps, sn_eps=sn_eps)
        init_weights(generator)
        init_weights(discriminator)
        aux = nn.ModuleDict({"vgg": VGGLoss(arch["vgg_weights"])}) if arch["use_vgg"] else None
        self.hparams = arch
        return Nets(generator=generator, discriminator=discriminator, aux=aux)

    def dataset(self, data_cfg: Any, split: str) -> Dataset:
        if data_cfg.kind == "synthetic":
            from orchestrator.data.street import StreetDataset
            return LabelIdDataset(StreetDataset(data_cfg, split, label_nc=self.label_nc()))
        if data_cfg.kind == "folder":
            from orchestrator.data.folders import FolderDataset
            return LabelIdDataset(FolderDataset(data_cfg, split, label_nc=self.label_nc()))
        raise ValueError(f"spade has no data kind {data_cfg.kind!r}; allowed: synthetic, folder")

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        return {"generator": {"lr": G_LR, "betas": BETAS}, "discriminator": {"lr": D_LR, "betas": BETAS}}

    # ------------------------------------------------------------------ losses

    def _hparams(self) -> dict[str, Any]:
        if self.hparams is None:
            raise RuntimeError("call build() before the losses: the loss weights come from the preset")
        return self.hparams

    def semantics(self, batch: Batch) -> torch.Tensor:
        """One-hot labels plus the instance-boundary channel, in the image's dtype."""
        ids, image = batch["label"], batch["image"]
        n, _, height, width = ids.shape
        onehot = torch.zeros(n, self.label_nc(), height, width, dtype=image.dtype, device=image.device)
        onehot.scatter_(1, ids.long(), 1.0)
        return torch.cat([onehot, instance_edges(batch["inst"]).to(image.dtype)], dim=1)

    def _generate(self, nets: Nets, seg: torch.Tensor, real: torch.Tensor):
        return nets.generator(seg, real if self._hparams()["use_vae"] else None)

    @staticmethod
    def _discriminate(nets: Nets, seg: torch.Tensor, fake: torch.Tensor, real: torch.Tensor):
        """One discriminator pass over fakes and reals together (SPADE's way: one power iteration,
        shared batch statistics); returns (fake outputs, real outputs) split per scale and layer."""
        both = torch.cat([torch.cat([seg, fake.to(seg.dtype)], 1), torch.cat([seg, real.to(seg.dtype)], 1)], 0)
        outputs = nets.discriminator(both)
        n = fake.shape[0]
        return ([[f[:n] for f in scale] for scale in outputs], [[f[n:] for f in scale] for scale in outputs])

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        seg, real = self.semantics(batch), batch["image"]
        with torch.no_grad():
            fake, _, _ = self._generate(nets, seg, real)
        pred_fake, pred_real = self._discriminate(nets, seg, fake.detach(), real)
        loss_fake = gan_loss(pred_fake, False, "hinge")
        loss_real = gan_loss(pred_real, True, "hinge")
        return loss_fake + loss_real, {"d_real": loss_real.detach(), "d_fake": loss_fake.detach()}

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        hp = self._hparams()
        seg, real = self.semantics(batch), batch["image"]
        fake, mu, logvar = self._generate(nets, seg, real)
        pred_fake, pred_real = self._discriminate(nets, seg, fake, real)
        loss_gan = gan_loss(pred_fake, True, "hinge", for_discriminator=False)
        # SPADE sums the L1 over a scale's intermediate layers and averages over scales; the shared
        # helper averages over both, so scale its weight by the number of intermediate layers
        n_intermediate = len(pred_fake[0]) - 1
        loss_feat = feature_matching_loss(pred_fake, pred_real, hp["lambda_feat"] * n_intermediate)
        loss = loss_gan + loss_feat
        logs = {"g_gan": loss_gan.detach(), "g_feat": loss_feat.detach()}
        if hp["use_vgg"]:
            if nets.aux is None or "vgg" not in nets.aux:
                raise RuntimeError("use_vgg is set but nets.aux has no 'vgg' network")
            loss_vgg = hp["lambda_vgg"] * nets.aux["vgg"](fake, real.to(fake.dtype))
            loss = loss + loss_vgg
            logs["g_vgg"] = loss_vgg.detach()
        if mu is not None:
            loss_kld = hp["lambda_kld"] * kld_loss(mu, logvar)
            loss = loss + loss_kld
            logs["g_kld"] = loss_kld.detach()
        return loss, logs

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        seg, real = self.semantics(batch), batch["image"]
        fake, _, _ = self._generate(nets, seg, real)
        return fake, real
