"""Few-shot vid2vid (Wang et al., NeurIPS 2019): label-map video -> photo video of a subject known
only from K example images, by generating part of the generator's weights from those examples.

Structure (NVlabs/few-shot-vid2vid and imaginaire's ``fs_vid2vid``, scaled down but with the same
parts; the names below are the classes in this file):

* **WeightGenerator** turns the K examples into the decoder's SPADE modulation weights:

  - an *image encoder* (``ReferenceEncoder`` on the example images) and a *label encoder* (the same
    architecture on the examples' one-hot label maps), each conv -> instance norm -> LeakyReLU,
    ``n_downsample`` stride-2 stages, then stride-1 stages back down the channel ladder at the
    bottleneck resolution (the original's ``ref_img_*`` / ``ref_label_*`` nets);
  - **AttentionModule**: two more label encoders, a *key* net on the examples' labels and a *query*
    net on the current frame's label. After ``n_downsample_atn`` stages, the K examples' features
    are merged per output position by a softmax over the similarity (key . query) of all K x h x w
    example positions, for the image and the label branch with the same attention map. It runs for
    every K, K = 1 included (then it is a soft spatial correspondence inside the one example);
  - the "mul" combination (imaginaire ``method_to_use_ref_labels: mul``): at each level, a C x C
    matrix = spatial mean of image features x channel-softmax of label features;
  - **hyper heads**: small MLPs applied to each row of that matrix whose outputs, reshaped, are the
    weights and biases of the gamma/beta convs of the SPADE layers of the first ``n_hyper`` decoder
    blocks (the highest-resolution ones), one set per sample.

  Every instance norm in the label encoders (example labels, attention keys and queries) uses the
  eps site ``label_encoder_norm``. imaginaire's ``custom_init`` set eps 0.1 only on the
  ``ref_label_*`` norms; here the attention key/query encoders share the site because they see the
  same piecewise-constant inputs and fail the same way in fp16 (the hazard tests in
  ``tests/test_fs_vid2vid.py`` measure it). Every other norm uses ``instance_norm``.

* **FewShotGenerator**: a SPADE residual decoder (``HyperResBlock``: SPADE-act-conv twice plus a
  SPADE-conv shortcut when the width changes) from the attention-combined example features at the
  bottleneck up to full resolution. Its SPADE conditioning maps come from an encoder-decoder
  **LabelEmbedder** of the current label (no norm, as in the original). Blocks ``i < n_hyper`` take
  their gamma/beta conv weights from the WeightGenerator (a per-sample conv, one grouped conv call);
  the others own theirs.

* **Temporal part, kept simple** (the choice this file makes): the raw frames of a clip are
  generated in one batched pass; then, for every frame ``t >= 1``, a small **FlowGenerator** sees
  (label t, label t-1, generated frame t-1), predicts the backward flow and a soft occlusion mask,
  and the output is ``raw_t * mask + warp(generated_{t-1}, flow) * (1 - mask)`` (the original's
  blend without ``spade_combine``). The previous generated frame is detached, as in vid2vid
  training. The flow is supervised by the data's exact ground-truth flow (L1 on visible points,
  ``lambda_flow``) instead of a pretrained FlowNet2. Not built: warping the example image
  (``warp_ref``), the multi-SPADE combination, the temporal discriminator (its loss weight is 0 in
  the published config), hyper convs in the label embedding and the main branch, the KL branch,
  spectral norm.

* **Discriminator**: multi-scale PatchGAN on (label, frame) pairs of every frame, hinge loss (the
  published config's), discriminator feature matching, optional VGG19 perceptual loss.

* **Mixed precision** (``benchmarks/fs_vid2vid_profile.py`` measures it). Kept in fp32, on purpose:
  the warp's sampling grid (in half, normalised coordinates near 1 are spaced 2**-10 (fp16) or
  2**-7 (bf16) apart: 0.125 px or 1 px at 256 px) and the flow loss's sums (a half sum over every
  pixel can overflow). Not in fp32: the softmaxes (attention map and channel softmax) return the
  half dtype with fp32 accumulation inside the kernel (``softmax_in_place_dtype``): the attention
  map, N*T x K*h*w x h*w elements, is the largest tensor of the step, and its fp32 copies moved
  most of the bytes a step's casts moved (4.8 -> 2.0 GB at 256x256, 44 -> 3.8 GB at 512x512).
  Images and label maps are cast once per loss (``_inputs``), not by each network that reads
  them. The losses and forward passes read nothing back to the host (tested).

Batch (see ``orchestrator.data.fewshot``): ``ref_images`` (N, K, 3, H, W), ``ref_labels``
(N, K, C, H, W), ``labels`` (N, T, C, H, W), ``frames`` (N, T, 3, H, W), ``flow`` (N, T-1, 2, H, W),
``flow_mask`` (N, T-1, 1, H, W). ``samples`` returns every frame of every clip: (N*T, 3, H, W).
H and W must be divisible by ``2 ** n_downsample``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CITYSCAPES_LABEL_NC, TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import MultiscaleDiscriminator, ResnetStack, maybe_checkpoint
from models.losses import VGGLoss, feature_matching_loss, gan_loss
from orchestrator.settings import SpeedFlags

HYPER_NORMS = ("spade_0", "spade_1", "spade_s")  # the SPADE layers of a residual block


# --------------------------------------------------------------------------- small blocks

class ConvNormAct(nn.Sequential):
    """conv (padding k//2) -> affine instance norm -> LeakyReLU(0.2): the original's conv block
    for the example encoders, the attention nets and the flow net."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 eps: float = 1e-5):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2),
            nn.InstanceNorm2d(out_channels, eps=eps, affine=True, track_running_stats=False),
            nn.LeakyReLU(0.2, inplace=True),
        )


def batch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A different conv per sample: ``x`` (N, Cin, H, W), ``weight`` (N, Cout, Cin, k, k), ``bias``
    (N, Cout) -> (N, Cout, H, W), 'same' padding. One grouped conv (groups = N) instead of the
    original's loop over samples; a batched matmul for 1x1 kernels."""
    n, cin, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[-1]
    if weight.shape[0] != n or weight.shape[2] != cin:
        raise ValueError(f"per-sample weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}")
    if k == 1:  # a 1x1 conv is a batched matmul (CPU's grouped 1x1 conv takes a slow path)
        out = torch.baddbmm(bias.unsqueeze(-1), weight.reshape(n, cout, cin), x.reshape(n, cin, h * w))
        return out.view(n, cout, h, w)
    out = F.conv2d(x.reshape(1, n * cin, h, w), weight.reshape(n * cout, cin, k, k), bias.reshape(n * cout),
                   padding=k // 2, groups=n)
    return out.view(n, cout, h, w)


def softmax_in_place_dtype(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax returned in ``x``'s own dtype, autocast or not.

    PyTorch's softmax kernels (CPU and CUDA) accumulate half and bfloat16 inputs in fp32 and round
    once, on output, so this equals ``softmax(x.float()).to(x.dtype)`` (bit for bit on the CPU,
    ``tests/test_fs_vid2vid.py``) without materialising fp32 copies of the input and the output
    (CUDA's autocast would also return fp32 here, for the next matmul to cast back). For the
    attention map, (N*T, K*h*w, h*w) elements, that fp32 island moved more bytes under O1 than the
    whole map does in fp32, and kept an fp32 copy of it for the backward pass."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.softmax(x, dim=dim)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers consuming ``x`` compute in: autocast's where it is on for ``x``'s
    device, else ``x``'s own. Inputs cast to it once are not cast again by every conv that reads
    them (the label maps feed six networks, and the flow net once per frame)."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def channel_ladder(ngf: int, n_downsample: int) -> list[int]:
    """Widths per level: ``ngf * 2**i`` for i <= n_downsample, and the bottleneck width once more
    (so the deepest decoder block keeps its width, as the original's ``max_num_filters`` cap does)."""
    ch = [ngf * 2**i for i in range(n_downsample + 1)]
    return ch + [ch[-1]]


# --------------------------------------------------------------------------- weight generation

class ReferenceEncoder(nn.Module):
    """first conv -> ``n_downsample`` stride-2 stages (``down``) -> stride-1 stages from the
    bottleneck width back to ``ch[1]`` (``up``, all at the bottleneck resolution). The weight
    generator drives the stages itself, because attention runs between two down stages."""

    def __init__(self, in_channels: int, ch: list[int], n_downsample: int, kernel_size: int, eps: float):
        super().__init__()
        self.first = ConvNormAct(in_channels, ch[0], kernel_size, eps=eps)
        self.down = nn.ModuleList(ConvNormAct(ch[i], ch[i + 1], kernel_size, 2, eps=eps) for i in range(n_downsample))
        # up[j] maps level j+2 to level j+1; level 0 (ch[0]) would feed no hyper layer, so it is not built
        self.up = nn.ModuleList(ConvNormAct(ch[i + 1], ch[i], kernel_size, eps=eps) for i in range(1, n_downsample))


class LabelEncoder(nn.Module):
    """A label map -> features after ``n_stages`` stride-2 stages (the attention key/query nets).
    Its instance norms use the ``label_encoder_norm`` eps."""

    def __init__(self, label_nc: int, ch: list[int], n_stages: int, kernel_size: int, eps: float):
        super().__init__()
        self.stages = nn.Sequential(
            ConvNormAct(label_nc, ch[0], kernel_size, eps=eps),
            *[ConvNormAct(ch[i], ch[i + 1], kernel_size, 2, eps=eps) for i in range(n_stages)],
        )

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.stages(label)


class AttentionModule(nn.Module):
    """Merges the K examples' features into one map per target frame: ``softmax_{K*h*w}(key . query)``
    weights every example position for every output position."""

    def __init__(self, label_nc: int, ch: list[int], n_stages: int, kernel_size: int, eps: float):
        super().__init__()
        self.key = LabelEncoder(label_nc, ch, n_stages, kernel_size, eps)
        self.query = LabelEncoder(label_nc, ch, n_stages, kernel_size, eps)

    def attention(self, ref_labels: torch.Tensor, labels: torch.Tensor, shots: int) -> torch.Tensor:
        """(N*K, C, H, W) example labels, (N*T, C, H, W) target labels -> (N*T, K*h*w, h*w)."""
        key, query = self.key(ref_labels), self.query(labels)
        nk, c, h, w = key.shape
        n = nk // shots
        frames = query.shape[0] // n
        key = key.view(n, 1, shots, c, h * w).expand(n, frames, shots, c, h * w)
        key = key.permute(0, 1, 2, 4, 3).reshape(n * frames, shots * h * w, c)
        energy = torch.bmm(key, query.view(n * frames, c, h * w))
        return softmax_in_place_dtype(energy, dim=1)

    @staticmethod
    def combine(features: torch.Tensor, attention: torch.Tensor, shots: int) -> torch.Tensor:
        """(N*K, C, h, w) example features -> (N*T, C, h, w) with the attention map."""
        nk, c, h, w = features.shape
        n = nk // shots
        frames = attention.shape[0] // n
        feats = features.view(n, 1, shots, c, h * w).expand(n, frames, shots, c, h * w)
        feats = feats.permute(0, 1, 3, 2, 4).reshape(n * frames, c, shots * h * w)
        return torch.bmm(feats, attention.to(feats.dtype)).view(n * frames, c, h, w)


class HyperHead(nn.Module):
    """``n_fc`` Linear-LeakyReLU layers and a Linear to ``out_per_row``, applied to each row of a
    (B, C, C) matrix; the rows' outputs, concatenated, are one sample's generated weights."""

    def __init__(self, channels: int, out_per_row: int, n_fc: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_fc):
            layers += [nn.Linear(channels, channels), nn.LeakyReLU(0.2, inplace=True)]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(channels, out_per_row)

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        b, rows, c = matrix.shape
        return self.out(self.mlp(matrix.reshape(b * rows, c))).reshape(b, -1)


class WeightGenerator(nn.Module):
    """K examples (+ their labels) and the target labels -> the decoder's bottleneck input and the
    per-sample SPADE weights of hyper layers ``0 .. n_hyper-1``.

    ``forward(ref_images (N,K,3,H,W), ref_labels (N,K,C,H,W), labels (N,T,C,H,W))`` returns
    ``(x, weights)``: ``x`` (N*T, ch[n_down], H/2^n_down, W/2^n_down) and ``weights[i]`` a tuple
    ``(w0, b0, w1, b1[, ws, bs])`` for hyper layer ``i`` (``w`` (N*T, 2*C_norm, ch[i], k, k),
    ``b`` (N*T, 2*C_norm), gamma and beta stacked)."""

    def __init__(self, label_nc: int, ch: list[int], n_downsample: int, n_hyper: int, n_fc: int,
                 spade_ks: int, ref_ks: int, n_downsample_atn: int, *, eps_label: float, eps_norm: float,
                 checkpoint_stages: bool = False):
        super().__init__()
        if not 1 <= n_downsample_atn <= n_downsample:
            raise ValueError(f"n_downsample_atn must be in 1..n_downsample ({n_downsample}), got {n_downsample_atn}")
        if not 1 <= n_hyper <= n_downsample:
            raise ValueError(f"n_hyper must be in 1..n_downsample ({n_downsample}), got {n_hyper}")
        self.ch, self.n_downsample, self.n_hyper, self.n_atn = ch, n_downsample, n_hyper, n_downsample_atn
        self.spade_ks = spade_ks
        self.checkpoint_stages = checkpoint_stages
        self.image_encoder = ReferenceEncoder(3, ch, n_downsample, ref_ks, eps_norm)
        self.label_encoder = ReferenceEncoder(label_nc, ch, n_downsample, ref_ks, eps_label)
        self.attention = AttentionModule(label_nc, ch, n_downsample_atn, ref_ks, eps_label)
        heads = []
        for i in range(n_hyper):
            rows = ch[i + 1]  # the feature level that feeds layer i has ch[i+1] channels
            sizes = self.norm_sizes(i)
            heads.append(nn.ModuleDict({
                name: HyperHead(rows, self._per_row(rows, norm_c, ch[i], spade_ks), n_fc)
                for name, norm_c in sizes.items()
            }))
        self.heads = nn.ModuleList(heads)

    def norm_sizes(self, i: int) -> dict[str, int]:
        """Channels normalised by each SPADE layer of decoder block ``i`` (ch[i+1] -> ch[i])."""
        fin, fout = self.ch[i + 1], self.ch[i]
        sizes = {"spade_0": fin, "spade_1": min(fin, fout)}
        if fin != fout:
            sizes["spade_s"] = fin
        return sizes

    @staticmethod
    def _per_row(rows: int, norm_c: int, cond_c: int, ks: int) -> int:
        total = 2 * norm_c * (cond_c * ks * ks + 1)  # gamma and beta: weights + biases
        if total % rows:
            raise ValueError(f"{total} generated values do not split into {rows} rows")
        return total // rows

    def _stage(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(module, x, enabled=self.checkpoint_stages)

    @staticmethod
    def _mul_combine(image_feat: torch.Tensor, label_feat: torch.Tensor) -> torch.Tensor:
        """(B, C, C): image features x channel-softmax of label features, summed over positions
        (the original) and scaled by C / (h*w) so its size depends on neither the resolution nor
        the width (a softmax over C channels averages 1/C)."""
        b, c, h, w = image_feat.shape
        soft = softmax_in_place_dtype(label_feat, dim=1).to(image_feat.dtype)
        prod = torch.bmm(image_feat.reshape(b, c, h * w), soft.reshape(b, c, h * w).transpose(1, 2))
        return prod * (c / (h * w))

    def encode(self, ref_images: torch.Tensor, ref_labels: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Run the encoders. Returns ``bottleneck`` (N*T, ch[n_down], h, w), ``attention``
        (N*T, K*h'*w', h'*w'), and per level ``l`` (1..n_down, ``n_down`` = bottleneck) the
        ``image_features[l]``, ``label_features[l]`` (after attention, per target frame) and the
        C x C ``matrices[l]`` that feed the hyper heads."""
        n, k = ref_images.shape[:2]
        img = self._stage(self.image_encoder.first, ref_images.flatten(0, 1))
        lab = self._stage(self.label_encoder.first, ref_labels.flatten(0, 1))
        atn = None
        for i in range(self.n_downsample):
            img = self._stage(self.image_encoder.down[i], img)
            lab = self._stage(self.label_encoder.down[i], lab)
            if i == self.n_atn - 1:  # merge the K examples, per target frame
                atn = self.attention.attention(ref_labels.flatten(0, 1), labels.flatten(0, 1), k)
                img = self.attention.combine(img, atn, k)
                lab = self.attention.combine(lab, atn, k)
        out: dict[str, Any] = {"bottleneck": img, "attention": atn, "image_features": {}, "label_features": {},
                               "matrices": {}}
        for level in range(self.n_downsample, 0, -1):
            if level < self.n_downsample:
                img = self._stage(self.image_encoder.up[level - 1], img)
                lab = self._stage(self.label_encoder.up[level - 1], lab)
            out["image_features"][level], out["label_features"][level] = img, lab
            out["matrices"][level] = self._mul_combine(img, lab)
        return out

    def forward(self, ref_images: torch.Tensor, ref_labels: torch.Tensor, labels: torch.Tensor):
        enc = self.encode(ref_images, ref_labels, labels)
        x, b, k = enc["bottleneck"], enc["bottleneck"].shape[0], self.spade_ks
        weights = []
        for i, heads in enumerate(self.heads):
            feat = enc["matrices"][i + 1]
            layer: list[torch.Tensor] = []
            for name, norm_c in self.norm_sizes(i).items():
                flat = heads[name](feat)
                n_bias = 2 * norm_c
                layer.append(flat[:, :-n_bias].reshape(b, n_bias, self.ch[i], k, k))
                layer.append(flat[:, -n_bias:])
            weights.append(tuple(layer))
        return x, weights


# --------------------------------------------------------------------------- image generation

class HyperSPADE(nn.Module):
    """Instance norm (no affine) modulated by ``1 + gamma`` and ``beta`` computed from the label
    embedding by one conv, whose weights are either this module's own or given per sample."""

    def __init__(self, channels: int, cond_channels: int, kernel_size: int, *, hyper: bool, eps: float):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, eps=eps, affine=False, track_running_stats=False)
        self.conv = None if hyper else nn.Conv2d(cond_channels, 2 * channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        if self.conv is None:
            if weight is None or bias is None:
                raise ValueError("a hyper SPADE layer needs generated weights")
            gamma_beta = batch_conv(cond, weight, bias)
        else:
            gamma_beta = self.conv(cond)
        gamma, beta = gamma_beta.chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class HyperResBlock(nn.Module):
    """SPADE-LReLU-conv, SPADE-LReLU-conv, plus a SPADE-conv shortcut when the width changes.
    ``forward(x, cond, *weights)`` with ``weights`` = (w0, b0, w1, b1[, ws, bs]) for a hyper block."""

    def __init__(self, fin: int, fout: int, cond_channels: int, spade_ks: int, *, hyper: bool, eps: float):
        super().__init__()
        fmid = min(fin, fout)
        self.hyper = hyper
        self.spade_0 = HyperSPADE(fin, cond_channels, spade_ks, hyper=hyper, eps=eps)
        self.conv_0 = nn.Conv2d(fin, fmid, 3, padding=1)
        self.spade_1 = HyperSPADE(fmid, cond_channels, spade_ks, hyper=hyper, eps=eps)
        self.conv_1 = nn.Conv2d(fmid, fout, 3, padding=1)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.spade_s = HyperSPADE(fin, cond_channels, spade_ks, hyper=hyper, eps=eps)
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        w = list(weights) if self.hyper else [None] * 6
        dx = self.conv_0(F.leaky_relu(self.spade_0(x, cond, w[0], w[1]), 0.2))
        dx = self.conv_1(F.leaky_relu(self.spade_1(dx, cond, w[2], w[3]), 0.2))
        shortcut = self.conv_s(self.spade_s(x, cond, w[4], w[5])) if self.learned_shortcut else x
        return shortcut + dx


class LabelEmbedder(nn.Module):
    """Encoder-decoder over the current label map (conv-LReLU, no norm): returns SPADE conditioning
    maps per level, ``out[i]`` with ch[i] channels at resolution H / 2**i."""

    def __init__(self, label_nc: int, ch: list[int], n_downsample: int, *, checkpoint_stages: bool = False):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.first = nn.Sequential(nn.Conv2d(label_nc, ch[0], 3, padding=1), act())
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(ch[i], ch[i + 1], 3, 2, 1), act())
                                  for i in range(n_downsample))
        self.up = nn.ModuleList(nn.Sequential(nn.ConvTranspose2d(ch[i + 1], ch[i], 3, 2, 1, output_padding=1), act())
                                for i in range(n_downsample))
        self.checkpoint_stages = checkpoint_stages

    def forward(self, label: torch.Tensor) -> list[torch.Tensor]:
        x = maybe_checkpoint(self.first, label, enabled=self.checkpoint_stages)
        for stage in self.down:
            x = maybe_checkpoint(stage, x, enabled=self.checkpoint_stages)
        out = [x]
        for stage in reversed(self.up):
            out.append(maybe_checkpoint(stage, out[-1], enabled=self.checkpoint_stages))
        return out[::-1]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` at ``pixel + flow`` (backward flow in pixels, x then y), bilinear, border
    padding; computed in fp32 and returned in ``image``'s dtype."""
    n, _, h, w = image.shape
    ys = (torch.arange(h, device=image.device, dtype=torch.float32) + 0.5) * (2.0 / h) - 1
    xs = (torch.arange(w, device=image.device, dtype=torch.float32) + 0.5) * (2.0 / w) - 1
    flow = flow.float()
    gx = xs.view(1, 1, w) + flow[:, 0] * (2.0 / w)
    gy = ys.view(1, h, 1) + flow[:, 1] * (2.0 / h)
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(image.dtype)


class FlowGenerator(nn.Module):
    """(label t, label t-1, image t-1) -> backward flow (pixels) and occlusion mask in (0, 1):
    conv stages down, residual blocks, upsample+conv stages, two heads."""

    def __init__(self, label_nc: int, ngf: int, n_downsample: int, n_blocks: int, multiplier: float, *,
                 eps: float, checkpointing: str = "none"):
        super().__init__()
        ch = [ngf * 2**i for i in range(n_downsample + 1)]
        self.multiplier = multiplier
        self.checkpoint_stages = checkpointing == "all"
        self.down = nn.ModuleList([ConvNormAct(2 * label_nc + 3, ngf, 3, eps=eps)]
                                  + [ConvNormAct(ch[i], ch[i + 1], 3, 2, eps=eps) for i in range(n_downsample)])
        self.blocks = ResnetStack(ch[-1], n_blocks, eps=eps, checkpointing=checkpointing in ("blocks", "all"))
        self.up = nn.ModuleList(ConvNormAct(ch[i + 1], ch[i], 3, eps=eps) for i in reversed(range(n_downsample)))
        self.to_flow = nn.Conv2d(ngf, 2, 3, padding=1)
        self.to_mask = nn.Conv2d(ngf, 1, 3, padding=1)

    def forward(self, label: torch.Tensor, prev_label: torch.Tensor, prev_image: torch.Tensor):
        x = torch.cat([label, prev_label, prev_image.to(label.dtype)], dim=1)
        for stage in self.down:
            x = maybe_checkpoint(stage, x, enabled=self.checkpoint_stages)
        x = self.blocks(x)
        for stage in self.up:
            x = maybe_checkpoint(stage, F.interpolate(x, scale_factor=2, mode="nearest"), enabled=self.checkpoint_stages)
        return self.to_flow(x) * self.multiplier, torch.sigmoid(self.to_mask(x))


class FewShotGenerator(nn.Module):
    """``forward(ref_images, ref_labels, labels)`` -> ``(frames, flows, masks)``: generated frames
    (N, T, 3, H, W) in [-1, 1], predicted backward flows (N, T-1, 2, H, W) and blend masks
    (N, T-1, 1, H, W) (weight of the raw frame; the rest comes from the warped previous frame)."""

    def __init__(self, label_nc: int, ngf: int, n_downsample: int, n_hyper: int, n_fc: int, spade_ks: int,
                 ref_ks: int, n_downsample_atn: int, flow_ngf: int, flow_downsample: int, flow_blocks: int,
                 flow_multiplier: float, *, eps_label: float = 1e-5, eps_norm: float = 1e-5,
                 checkpointing: str = "none"):
        super().__init__()
        ch = channel_ladder(ngf, n_downsample)
        self.ch, self.n_downsample, self.n_hyper = ch, n_downsample, n_hyper
        stages = checkpointing == "all"
        self.checkpoint_blocks = checkpointing in ("blocks", "all")
        self.weight_generator = WeightGenerator(label_nc, ch, n_downsample, n_hyper, n_fc, spade_ks, ref_ks,
                                                n_downsample_atn, eps_label=eps_label, eps_norm=eps_norm,
                                                checkpoint_stages=stages)
        self.label_embedding = LabelEmbedder(label_nc, ch, n_downsample, checkpoint_stages=stages)
        # blocks[i] maps ch[i+1] -> ch[i] at resolution H / 2**i
        self.blocks = nn.ModuleList(HyperResBlock(ch[i + 1], ch[i], ch[i], spade_ks, hyper=i < n_hyper, eps=eps_norm)
                                    for i in range(n_downsample + 1))
        self.to_image = nn.Conv2d(ch[0], 3, 3, padding=1)
        self.flow = FlowGenerator(label_nc, flow_ngf, flow_downsample, flow_blocks, flow_multiplier,
                                  eps=eps_norm, checkpointing=checkpointing)

    def raw_frames(self, ref_images: torch.Tensor, ref_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Every target frame from the examples alone (no temporal blend): (N*T, 3, H, W)."""
        x, weights = self.weight_generator(ref_images, ref_labels, labels)
        cond = self.label_embedding(labels.flatten(0, 1))
        for i in reversed(range(self.n_downsample + 1)):
            w = weights[i] if i < self.n_hyper else ()
            x = maybe_checkpoint(self.blocks[i], x, cond[i], *w, enabled=self.checkpoint_blocks)
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.tanh(self.to_image(F.leaky_relu(x, 0.2)))

    def forward(self, ref_images: torch.Tensor, ref_labels: torch.Tensor, labels: torch.Tensor):
        n, t, _, h, w = labels.shape
        step = 2**self.n_downsample
        if h % step or w % step:
            raise ValueError(f"frames of {h}x{w} are not divisible by 2**n_downsample = {step}")
        if t < 2:
            raise ValueError("few-shot vid2vid trains on clips of at least 2 frames (data.options.frames >= 2)")
        if ref_labels.shape[:2] != ref_images.shape[:2]:
            raise ValueError(f"ref_labels {tuple(ref_labels.shape)} and ref_images {tuple(ref_images.shape)} disagree")
        raw = self.raw_frames(ref_images, ref_labels, labels).view(n, t, 3, h, w)
        frames, flows, masks = [raw[:, 0]], [], []
        for i in range(1, t):
            prev = frames[-1].detach()
            flow, mask = self.flow(labels[:, i], labels[:, i - 1], prev)
            warped = warp(prev, flow)  # fp32 inside, returned in prev's (= raw's) dtype
            mask = mask.to(raw.dtype)
            frames.append(torch.lerp(warped, raw[:, i], mask))  # raw * mask + warped * (1 - mask), one kernel
            flows.append(flow)
            masks.append(mask)
        return torch.stack(frames, 1), torch.stack(flows, 1), torch.stack(masks, 1)


# --------------------------------------------------------------------------- the model

class FewShotVid2Vid(GANModel):
    name = "fs_vid2vid"
    supported_flags = TRAINER_FLAGS | {"checkpointing"}
    eps_sites = {"adam": 1e-8, "label_encoder_norm": 1e-5, "instance_norm": 1e-5}
    fp32_batch_keys = ("flow",)  # the flow target, in pixels
    presets: dict[str, dict[str, Any]] = {
        # tests: a 32x32, K=2, T=2, batch-2 step takes well under 0.5 s on a CPU
        "tiny": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=8, n_downsample=2, n_hyper=2, n_fc=1, spade_ks=1,
                     ref_ks=3, n_downsample_atn=2, flow_ngf=8, flow_downsample=1, flow_blocks=1,
                     flow_multiplier=4.0, ndf=8, n_layers_D=2, num_D=2, lambda_feat=10.0, lambda_flow=10.0,
                     use_vgg=False, lambda_vgg=10.0, vgg_weights=None),
        "small": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=16, n_downsample=3, n_hyper=3, n_fc=2, spade_ks=1,
                      ref_ks=3, n_downsample_atn=2, flow_ngf=16, flow_downsample=2, flow_blocks=2,
                      flow_multiplier=10.0, ndf=32, n_layers_D=3, num_D=2, lambda_feat=10.0, lambda_flow=10.0,
                      use_vgg=False, lambda_vgg=10.0, vgg_weights=None),
        # the published config (imaginaire projects/fs_vid2vid, ampO1): 32 filters, 5 downsamplings,
        # 4 hyper layers, 2 fc layers, 1x1 SPADE and example-encoder convs, attention after 2
        # downsamplings; flow net 32 filters, 3 downsamplings, 6 blocks, x20; D 32 filters, 4
        # layers, 2 scales; feature matching, perceptual and flow weights 10
        "paper": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=32, n_downsample=5, n_hyper=4, n_fc=2, spade_ks=1,
                      ref_ks=1, n_downsample_atn=2, flow_ngf=32, flow_downsample=3, flow_blocks=6,
                      flow_multiplier=20.0, ndf=32, n_layers_D=4, num_D=2, lambda_feat=10.0, lambda_flow=10.0,
                      use_vgg=True, lambda_vgg=10.0, vgg_weights=None),
    }

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        eps = {**self.eps_sites, **eps}
        generator = FewShotGenerator(
            arch["label_nc"], arch["ngf"], arch["n_downsample"], arch["n_hyper"], arch["n_fc"], arch["spade_ks"],
            arch["ref_ks"], arch["n_downsample_atn"], arch["flow_ngf"], arch["flow_downsample"],
            arch["flow_blocks"], arch["flow_multiplier"], eps_label=eps["label_encoder_norm"],
            eps_norm=eps["instance_norm"], checkpointing=flags.checkpointing,
        )
        discriminator = MultiscaleDiscriminator(arch["label_nc"] + 3, arch["num_D"], arch["ndf"], arch["n_layers_D"],
                                                eps=eps["instance_norm"])
        aux = nn.ModuleDict({"vgg": VGGLoss(arch["vgg_weights"])}) if arch["use_vgg"] else None
        self.hparams = arch
        return Nets(generator=generator, discriminator=discriminator, aux=aux)

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        if data_cfg.kind == "synthetic":
            from orchestrator.data.fewshot import FewShotDataset
            return FewShotDataset(data_cfg, split, label_nc=self.label_nc())
        raise ValueError(f"fs_vid2vid has no data kind {data_cfg.kind!r}; allowed: synthetic")

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        """The published config's TTUR: G lr 1e-4, D lr 4e-4, Adam betas (0, 0.999)."""
        return {"generator": {"lr": 1e-4, "betas": (0.0, 0.999)},
                "discriminator": {"lr": 4e-4, "betas": (0.0, 0.999)}}

    # ------------------------------------------------------------------ losses

    IMAGE_KEYS = ("ref_images", "ref_labels", "labels", "frames")

    @classmethod
    def _inputs(cls, batch: Batch) -> Batch:
        """The batch with its images and label maps cast once to the dtype the networks compute in
        (a no-op without autocast): under O1 the label maps would otherwise be cast by each of the
        six networks reading them, by each discriminator call, and by the flow net once per frame
        after an upcast of the previous frame to fp32. Flow and its mask stay as they are."""
        return {key: value.to(compute_dtype(value)) if key in cls.IMAGE_KEYS else value
                for key, value in batch.items()}

    @staticmethod
    def _generate(nets: Nets, batch: Batch):
        return nets.generator(batch["ref_images"], batch["ref_labels"], batch["labels"])

    @staticmethod
    def _pairs(labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(N, T, C, H, W) labels and (N, T, 3, H, W) images -> (N*T, C+3, H, W) D inputs."""
        return torch.cat([labels.flatten(0, 1), images.flatten(0, 1).to(labels.dtype)], dim=1)

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        batch = self._inputs(batch)
        with torch.no_grad():
            fake = self._generate(nets, batch)[0]
        pred_fake = nets.discriminator(self._pairs(batch["labels"], fake))
        pred_real = nets.discriminator(self._pairs(batch["labels"], batch["frames"]))
        loss_fake = gan_loss(pred_fake, False, "hinge")
        loss_real = gan_loss(pred_real, True, "hinge")
        return loss_fake + loss_real, {"d_real": loss_real.detach(), "d_fake": loss_fake.detach()}

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        if self.hparams is None:
            raise RuntimeError("call build() before generator_loss(): the loss weights come from the preset")
        hp = self.hparams
        batch = self._inputs(batch)
        fake, flow, _ = self._generate(nets, batch)
        pred_fake = nets.discriminator(self._pairs(batch["labels"], fake))
        with torch.no_grad():  # real features are targets only
            pred_real = nets.discriminator(self._pairs(batch["labels"], batch["frames"]))
        loss_gan = gan_loss(pred_fake, True, "hinge", for_discriminator=False)
        loss_feat = feature_matching_loss(pred_fake, pred_real, hp["lambda_feat"])
        # L1 to the exact flow on points visible in the previous frame (fp32: a half sum overflows)
        mask = batch["flow_mask"].float()
        flow_err = (flow.float() - batch["flow"].float()).abs() * mask
        loss_flow = hp["lambda_flow"] * flow_err.sum() / (2 * mask.sum()).clamp(min=1.0)
        loss = loss_gan + loss_feat + loss_flow
        logs = {"g_gan": loss_gan.detach(), "g_feat": loss_feat.detach(),
                "g_flow": loss_flow.detach()}
        if hp["use_vgg"]:
            if nets.aux is None or "vgg" not in nets.aux:
                raise RuntimeError("use_vgg is set but nets.aux has no 'vgg' network")
            fake_flat = fake.flatten(0, 1)
            loss_vgg = hp["lambda_vgg"] * nets.aux["vgg"](fake_flat, batch["frames"].flatten(0, 1).to(fake_flat.dtype))
            loss = loss + loss_vgg
            logs["g_vgg"] = loss_vgg.detach()
        return loss, logs

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every generated frame of every clip and its real frame: (N*T, 3, H, W) each."""
        fake = self._generate(nets, self._inputs(batch))[0]
        return fake.flatten(0, 1), batch["frames"].flatten(0, 1)
