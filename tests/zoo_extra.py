"""Models built for the tests: the shapes users bring that break naive pruning tools."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SkipConcat(nn.Module):
    """Residual add, a concatenation, and one layer used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = F.relu(self.a(x))
        r = h + self.b(h)  # residual
        s = self.shared(self.shared(r))  # used twice
        z = torch.cat([r, s], dim=1)  # concat
        return self.head(z.flatten(1))


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(32, 16, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.act(self.dw(x))
        x = self.act(self.grouped(x))
        y = self.pw(x)
        y += x[:, :16]  # in-place residual
        return self.fc(y.mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding tied to the output projection (used functionally)."""

    def __init__(self, vocab: int = 10, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.proj(self.emb(x).mean(1)))
        return self.out(h) + F.linear(h, self.emb.weight) * 0.5


class TinyTransformer(nn.Module):
    """One pre-norm transformer block over the rows of an 8x8 image, then a classifier."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(8, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos  # (B, 8 rows, dim)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if h.sum() > 0:
            h = F.relu(h)
        return self.fc2(h)


def token_data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (n, 6), generator=g), torch.randint(0, 10, (n,), generator=g)


def all_models() -> dict:
    """Every architecture the incremental evaluator and the sweep are checked on."""
    from tests.conftest import zoo_model

    return {
        "mlp": lambda d: zoo_model("mlp", d),
        "lenet5": lambda d: zoo_model("lenet5", d),
        "resnet": lambda d: zoo_model("resnet", d),
        "skip_concat_reuse": lambda d: SkipConcat(),
        "depthwise_grouped_inplace": lambda d: DepthwiseGrouped(),
        "transformer": lambda d: TinyTransformer(),
        "resnext": lambda d: ResNeXtBlock(),
        "regnet": lambda d: RegNetBlock(),
    }


# ---------------------------------------------------------------------- the shapes of real models
class OptionalArg(nn.Module):
    """``forward(x, mask=None)`` as in timm's ViT blocks."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x, mask=None):
        h = F.relu(self.fc1(x.flatten(1)))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class TiedHeadLM(nn.Module):
    """GPT-2 style: the token embedding is the output head's weight; per-token logits."""

    def __init__(self, vocab: int = 12, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens)))
        return self.head(h)  # (B, T, vocab)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size = x.size()[:-1] + (self.weight.size(-1),)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class GPT2Block(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2))  # (B, 8 rows, dim)
        t = t + self.c_proj(F.gelu(self.c_fc(t)))
        return self.head(t.mean(1))


class RawParam(nn.Module):
    """A weight used through F.linear, not through a Linear module."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64) * 0.1)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        return self.out(F.relu(F.linear(x.flatten(1), self.w)))


class LSTMClassifier(nn.Module):
    """Reads an 8x8 image row by row."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        h, _ = self.lstm(x.flatten(1, 2))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class LogitsOutput(nn.Module):
    """Returns a dict with 'logits', as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return {"logits": self.fc(x.flatten(1)), "hidden": x}


def lm_data(n: int = 48, t: int = 5, vocab: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -100  # ignored, as Hugging Face pads labels
    return x, y


class SEBlock(nn.Module):
    """Squeeze-and-excitation gating (EfficientNet, RegNet): a multiplicative branch."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MobileSE(nn.Module):
    """MobileNetV2 / EfficientNet shapes: inverted residual, depthwise, ReLU6 in place, SE, BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.se = SEBlock(24)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm and Linear layers, a layer-scale Parameter."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 2, stride=2)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        x = x + (self.gamma * h).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet: every layer reads the concatenation of all earlier outputs."""

    def __init__(self, growth: int = 4, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8 + i * growth, growth, 3, padding=1) for i in range(layers))
        self.head = nn.Linear(8 + layers * growth, 10)

    def forward(self, x):
        feats = [F.relu(self.stem(x))]
        for conv in self.convs:
            feats.append(F.relu(conv(torch.cat(feats, 1))))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


class ViTMasked(nn.Module):
    """timm-style ViT: class token, position embedding, blocks taking an optional attention mask."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)  # 8x8 -> 2x2 patches
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x, attn_mask=None):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for blk in self.blocks:
            t = blk(t, attn_mask)
        return self.head(self.norm(t)[:, 0])


class ViTBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ResNeXtBlock(nn.Module):
    """ResNeXt: a bottleneck whose 3x3 convolution is grouped (cardinality 4), BatchNorm after
    every convolution, an identity residual add (Xie et al. 2017)."""

    def __init__(self, width: int = 16, cardinality: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        x = F.relu(x + self.bn3(self.conv3(out)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RegNetBlock(nn.Module):
    """RegNetY: an X block (1x1, grouped 3x3 of group width 4 with stride 2, 1x1) with
    squeeze-excitation and a strided projection shortcut (Radosavovic et al. 2020)."""

    def __init__(self, cin: int = 8, width: int = 16, cout: int = 24, group_width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width // group_width, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.se = SEBlock(width)
        self.c = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
        self.head = nn.Linear(cout, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.proj(x) + self.c(self.se(self.b(self.a(x)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PointwiseGrouped(nn.Module):
    """The shape that was refused: pointwise -> grouped conv (groups=4) -> head."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(1, 8, 1)
        self.pw2 = nn.Conv2d(8, 16, 1)
        self.grp = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.pw2(torch.relu(self.pw1(x))))
        return self.head(torch.relu(self.grp(x)).mean((2, 3)))
