"""SiT: the scalable-interpolant transformer velocity predictor, and FlowTurbo's velocity refiner.

The layout (module names, parameter names and shapes) is that of the public SiT checkpoints
(``SiT-XL-2-256x256.pt``), which is DiT's backbone: patch embedding, timestep and label
embeddings summed into a conditioning vector ``c``, ``depth`` transformer blocks with adaLN-Zero
modulation by ``c``, and a modulated linear head.

Time convention: ``t = 0`` is noise, ``t = 1`` is data, ``t`` in [0, 1] (not scaled by 1000).
Label ``num_classes`` is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SIT_CONFIGS", "SiT", "VelocityRefiner", "sincos_pos_embed_2d", "timestep_embedding"]


def _sizes(depth: int, hidden_size: int, num_heads: int) -> dict[str, dict[str, int]]:
    return {
        f"/{p}": dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=p)
        for p in (2, 4, 8)
    }


SIT_CONFIGS: dict[str, dict[str, int]] = {
    f"SiT-{size}{suffix}": cfg
    for size, (depth, hidden, heads) in {
        "XL": (28, 1152, 16),
        "L": (24, 1024, 16),
        "B": (12, 768, 12),
        "S": (12, 384, 6),
        # Small sizes for CPU work and the demo data; not public checkpoints. Demo is deep and
        # narrow so that its one-block refiner costs about 1/12 of a base evaluation.
        "Demo": (12, 128, 4),
        "Tiny": (2, 64, 2),
    }.items()
    for suffix, cfg in _sizes(depth, hidden, heads).items()
}
"""Model sizes by name (``"SiT-XL/2"``): depth, hidden_size, num_heads, patch_size."""


# ----------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal frequency embedding of scalar times.

    Args:
        t: (B,) times, any float dtype; used as given (SiT passes t in [0, 1]).
        dim: embedding width; the first half are cosines, the second half sines.
        max_period: the longest period, which sets the lowest frequency.

    Returns:
        (B, dim) float32 embedding ``cat([cos(t * f), sin(t * f)])`` with
        ``f_i = max_period ** (-i / (dim // 2))``; odd ``dim`` is zero-padded.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) ``cat([sin(pos * omega), cos(pos * omega)])``, float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    args = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT layout).

    Tokens are in row-major order (token ``i * grid_size + j`` is row ``i``, column ``j``). The
    first ``dim / 2`` channels encode the column index ``j`` and the last ``dim / 2`` the row
    index ``i``, each as ``cat([sin, cos])`` with ``omega_k = 10000 ** (-k / (dim / 4))``. (The
    public code builds its grid with ``meshgrid(w, h)``, so its "h" half is really the column.)

    Args:
        dim: embedding width, a multiple of 4.
        grid_size: tokens per side.

    Returns:
        (grid_size ** 2, dim) float32 embedding.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    idx = torch.arange(grid_size)
    rows = idx.repeat_interleave(grid_size)  # (T,) i of token i * G + j
    cols = idx.repeat(grid_size)  # (T,) j of token i * G + j
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)  # (T, dim)
    return emb.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: (B, T, D) tokens, (B, D) shift and scale -> (B, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (B, C, H, W) -> (B, (H/p) * (W/p), D)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar times to vectors: sinusoidal features then a two-layer MLP. (B,) -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels to vectors, with label dropout to the null class for guidance. (B,) -> (B, D).

    The table has one extra row, the null class ``num_classes``, when ``dropout_prob > 0``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null class, at random or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU. (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: (B, T, D) tokens, (B, D) c -> (B, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """Modulated norm and linear head: (B, T, D) tokens, (B, D) c -> (B, T, p * p * C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT velocity predictor ``(x, t, y) -> v`` with the public SiT checkpoint layout.

    Args:
        input_size: latent (or image) side length H = W.
        patch_size: patch side p; the model sees (input_size / p) ** 2 tokens.
        in_channels: channels C of x and of the predicted velocity.
        hidden_size: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over D.
        class_dropout_prob: probability, in training mode, of replacing a label by the null
            class ``num_classes``; if > 0 the label table has a null row.
        num_classes: number of real classes.
        learn_sigma: the head outputs 2C channels (as the public checkpoints do) of which
            ``forward`` returns the first C.
        embed_channels: channels the patch embedding takes; defaults to ``in_channels``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        embed_channels: int | None = None,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch_size {patch_size}"
            )
        self.config: dict[str, Any] = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            embed_channels=embed_channels,
        )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(embed_channels or in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False
        )  # (1, T, D), fixed
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> SiT:
        """Build a named size (``"SiT-XL/2"``, see ``SIT_CONFIGS``); kwargs override the rest."""
        if name not in SIT_CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(SIT_CONFIGS)}")
        return cls(**{**SIT_CONFIGS[name], **kwargs})

    def initialize_weights(self) -> None:
        """DiT/SiT initialisation; adaLN and the head start at zero, blocks start as identity."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        with torch.no_grad():
            self.pos_embed.copy_(
                sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0)
            )
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer]:
            for p in module.parameters():
                nn.init.zeros_(p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C_out) tokens -> (B, C_out, H, W) image."""
        B, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid_size
        x = x.reshape(B, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C_out, g, p, g, p)
        return x.reshape(B, c, g * p, g * p)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        """Names a misfit input before torch fails deep inside (shapes, dtypes, devices only:
        no device synchronisation)."""
        weight = self.x_embedder.proj.weight
        c, size = weight.shape[1], self.input_size
        name = type(self).__name__
        what = "torch.cat([x, v], 1)" if isinstance(self, VelocityRefiner) else "x"
        if x.ndim != 4 or x.shape[1:] != (c, size, size):
            raise ValueError(
                f"{name} takes {what} of shape (B, {c}, {size}, {size}), got {tuple(x.shape)}"
                + (": add the batch dimension, x[None]" if x.ndim == 3 else "")
            )
        if x.device != weight.device:
            raise ValueError(
                f"{what} is on {x.device} but the {name}'s weights are on {weight.device}: "
                f"create the noise there, or move the model (model.to({str(x.device)!r}))"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{what} is {x.dtype} but the {name}'s weights are {weight.dtype}: cast one to "
                f"the other (noise.to({weight.dtype}) or model.to({x.dtype})), or run under "
                "torch.autocast"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t must be a scalar or of shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}"
            )
        if not isinstance(y, Tensor):
            raise TypeError(
                f"y must be a tensor of class labels of shape (B,), got {type(y).__name__}: "
                "e.g. torch.tensor(labels, device=x.device)"
            )
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must hold integer class labels (torch.long), got {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"y must have shape (B,) = ({x.shape[0]},), one label per sample, got "
                f"{tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}: move the labels")

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity.

        Args:
            x: (B, embed_channels, H, W) state.
            t: (B,) times in [0, 1] (0 noise, 1 data), or a scalar / 0-dim tensor for all.
            y: (B,) long labels; ``num_classes`` is the null class.
            force_drop_ids: optional (B,) ints; where 1 the label is replaced by the null class.

        Returns:
            (B, C, H, W) velocity (the first C of the 2C head channels when ``learn_sigma``).
        """
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        self._check_inputs(x, t, y)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        out = self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)
        return out[:, : self.in_channels] if self.learn_sigma else out


class VelocityRefiner(SiT):
    """FlowTurbo's velocity refiner ``(x, t, v, y) -> delta_v``.

    A shallow SiT (one block by default) whose patch embedding takes the state and the current
    velocity concatenated on channels (2C), predicting a correction to that velocity. The public
    refiner for SiT-XL/2 is one XL block: about 29.7 M parameters, 4.4 % of the base.

    Args: as ``SiT``, with ``depth`` defaulting to 1; the patch embedding always takes 2C.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 1,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ) -> None:
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            embed_channels=2 * in_channels,
        )
        del self.config["embed_channels"]  # fixed by the class

    @classmethod
    def from_base(cls, base: SiT, depth: int = 1, **overrides: Any) -> VelocityRefiner:
        """A refiner matching ``base``'s sizes (the paper's choice: one block of the base)."""
        if not isinstance(base, SiT):
            raise TypeError(
                f"from_base copies a SiT's sizes; the base is a {type(base).__name__}. Use "
                "VelocityRefiner.from_name(<SiT size>, input_size=..., in_channels=..., "
                "num_classes=...) with the base's shape and classes"
            )
        sizes = {k: v for k, v in base.config.items() if k not in ("depth", "embed_channels")}
        return cls(**{**sizes, "depth": depth, **overrides})

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> VelocityRefiner:
        """A refiner with a named size's width, heads and patch, and one block unless ``depth``."""
        return super().from_name(name, **{"depth": 1, **kwargs})  # type: ignore[return-value]

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        t: Tensor | float,
        v: Tensor,
        y: Tensor,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity correction.

        Args:
            x: (B, C, H, W) state.
            t: (B,) times in [0, 1], or a scalar / 0-dim tensor for all.
            v: (B, C, H, W) velocity to refine.
            y: (B,) long labels; ``num_classes`` is the null class.
            force_drop_ids: optional (B,) ints; where 1 the label is replaced by the null class.

        Returns:
            (B, C, H, W) correction ``delta_v``.
        """
        if v.shape != x.shape:
            raise ValueError(
                f"the refiner's velocity v must be shaped like x {tuple(x.shape)}, got "
                f"{tuple(v.shape)}"
            )
        return super().forward(torch.cat([x, v], dim=1), t, y, force_drop_ids)
