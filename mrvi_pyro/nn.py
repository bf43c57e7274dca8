"""Neural building blocks of MrVI, in plain PyTorch (this module imports no Pyro).

Every block is a small ``torch.nn.Module`` that can be swapped for a user-written one with
the same call signature:

- :class:`ConditionalLayerNorm` -- layer norm without affine parameters, followed by a
  per-condition (per-sample) scale and shift.
- :class:`ResidualBlock` -- ``x + ReLU(LayerNorm(Linear(x)))``.
- :class:`AttentionBlock` -- the tokenised multi-head attention used by both the sample mapper
  ``f_phi(u, s)`` and the nuisance block ``g(z, b)``.
- :class:`EncoderU` -- the amortised encoder of ``q(u | x, s)``.
- :class:`SampleMapper` -- ``f_phi(u, s)``: the sample-specific offset added to ``z_base(u)``.
- :class:`DecoderX` -- ``log softmax(A [z + g(z, b)] + gamma)``: log normalised expression.

All blocks broadcast over leading dimensions, which is how counterfactuals for every sample are
computed in one pass: a query of shape ``(n, 1, d)`` against sample embeddings of shape
``(S, e)`` gives an output of shape ``(n, S, out)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._malloc import raise_mmap_threshold

_FOLD_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mrvi_pyro_fold_scope", default=None)


@contextlib.contextmanager
def reuse_folded():
    """Let every :class:`AttentionBlock` fold its parameters once for the whole context.

    :func:`mrvi_pyro.posterior.iter_posterior_u`, through which every analysis passes (distances,
    DE, DA, representations), holds one open for its whole pass; outside one, and always under
    autograd, the block folds on every call. Nested uses share the outer scope; the folds are
    dropped when the outermost context exits. Scopes are per thread (a context variable)."""
    if _FOLD_SCOPE.get() is not None:
        yield
        return
    _FOLD_SCOPE.set({})
    try:
        yield
    finally:
        _FOLD_SCOPE.set(None)


PRIME_FACTOR = 4
""":func:`workspace` raises glibc's mmap threshold (:func:`mrvi_pyro._malloc.raise_mmap_threshold`)
to this many times a new buffer's size."""


def workspace(owner: object, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """A scratch tensor of ``shape`` (dtype and device of ``like``) that ``owner`` reuses for
    ``name`` throughout one :func:`reuse_folded` scope; None outside one or under autograd.

    An analysis pass calls each block once per slice of cells; its largest temporaries (a few MB
    for a few thousand (cell, sample) pairs) are otherwise freed after every call, and glibc's
    allocator returns such blocks to the system and faults them in again on the next call
    (measured: ~250,000 page faults and ~1 s of the ~3 s of grouped distances of 20,000 cells x
    24 samples at 1 thread; ``benchmarks/README.md``, stop 32). The contents are garbage on
    return; a caller must not keep a result that aliases it.
    """
    scope = _FOLD_SCOPE.get()
    if scope is None or torch.is_grad_enabled():
        return None
    size = math.prod(shape)
    key = ("workspace", id(owner), name)
    held = scope.get(key)
    if held is None or held[0] is not owner or held[1].numel() < size or held[1].dtype != like.dtype \
            or held[1].device != like.device:
        if like.device.type == "cpu":
            raise_mmap_threshold(PRIME_FACTOR * size * like.element_size())
        held = (owner, torch.empty(size, dtype=like.dtype, device=like.device))
        scope[key] = held
    return held[1][:size].view(shape)


class ConditionalLayerNorm(nn.Module):
    """Layer norm (no affine parameters) with a learned scale and shift per condition.

    Parameters
    ----------
    n_features
        Size of the last dimension.
    n_conditions
        Number of conditions (e.g. samples).
    eps
        Layer-norm epsilon (1e-6 in architecture 1, torch's 1e-5 in architectures 2 and 3).
    """

    def __init__(self, n_features: int, n_conditions: int, eps: float = 1e-6):
        super().__init__()
        self.n_features, self.eps = n_features, eps
        self.scale = nn.Embedding(n_conditions, n_features)
        self.shift = nn.Embedding(n_conditions, n_features)
        nn.init.normal_(self.scale.weight, mean=1.0, std=0.02)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.n_features,), eps=self.eps)
        return x * self.scale(condition) + self.shift(condition)


class ResidualBlock(nn.Module):
    """``x + ReLU(LayerNorm(Linear(x)))`` (the encoder's block in architecture 1)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.linear = nn.Linear(n_features, n_features)
        self.norm = nn.LayerNorm(n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(self.linear(x)))


class ResnetBlock(nn.Module):
    """The reference's residual block (architectures 2 and 3).

    ``act(LayerNorm(fc2(act(LayerNorm(fc1(x))) + skip(x))))`` with ``skip`` the identity when
    ``n_in == n_hidden`` and a linear map otherwise.

    Parameters
    ----------
    n_in, n_out, n_hidden
        Input, output and inner widths.
    activation
        ``"relu"`` (the encoder's) or ``"gelu"`` (the attention MLPs').
    """

    def __init__(self, n_in: int, n_out: int, n_hidden: int = 128, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', not {activation!r}.")
        self.activation = activation
        self.fc1 = nn.Linear(n_in, n_hidden)
        self.norm1 = nn.LayerNorm(n_hidden)
        self.fc_match = nn.Linear(n_in, n_hidden) if n_in != n_hidden else None
        self.fc2 = nn.Linear(n_hidden, n_out)
        self.norm2 = nn.LayerNorm(n_out)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.activation == "relu" else F.gelu(x)

    def first_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the block's input maps, ``fc1`` stacked on the skip: (2 n_hidden, n_in).

        Both are linear in the input, so callers whose input is itself a linear function of
        something else can fold them (see :meth:`AttentionBlock._forward`)."""
        if self.fc_match is None:
            eye = torch.eye(self.fc1.in_features, dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
            return torch.cat([self.fc1.weight, eye]), torch.cat([self.fc1.bias, torch.zeros_like(self.fc1.bias)])
        return torch.cat([self.fc1.weight, self.fc_match.weight]), torch.cat([self.fc1.bias, self.fc_match.bias])

    def tail(self, first: torch.Tensor) -> torch.Tensor:
        """The block given ``first`` = the output of :meth:`first_linear` on its input."""
        inner, skip = first.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            h = self.act(self.norm1(inner)) + skip
            return self.act(self.norm2(self.fc2(h)))
        # Inference: the activation and the skip in place (two (rows, width) temporaries fewer).
        h = self.act_(self.norm1(inner)).add_(skip)
        return self.act_(self.norm2(self.fc2(h)))

    def act_(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`act` in place (no autograd)."""
        return x.relu_() if self.activation == "relu" else torch._C._nn.gelu_(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.fc_match is None else self.fc_match(x)
        h = self.act(self.norm1(self.fc1(x))) + skip
        return self.act(self.norm2(self.fc2(h)))


class ResnetMLP(nn.Module):
    """The reference's MLP of the attention blocks (architectures 2 and 3): one :class:`ResnetBlock`
    (inner width 128, output ``n_hidden``, GELU) followed by ``Linear(n_hidden, n_out)``.

    :meth:`first_linear` and :meth:`tail` split it after its first linear maps, which is what
    the factorised attention folds.
    """

    def __init__(self, n_in: int, n_out: int, n_hidden: int = 32, n_block_hidden: int = 128):
        super().__init__()
        self.block = ResnetBlock(n_in, n_hidden, n_block_hidden, activation="gelu")
        self.fc = nn.Linear(n_hidden, n_out)

    def first_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block.first_linear()

    def tail(self, first: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block.tail(first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x))


def _simple_mlp(n_in: int, n_out: int, n_hidden: int) -> nn.Sequential:
    """``Linear - GELU - Linear``: the attention MLPs of architecture 1."""
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_out))


def _mlp_first_linear(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mlp, ResnetMLP):
        return mlp.first_linear()
    return mlp[0].weight, mlp[0].bias


def _mlp_tail(mlp: nn.Module, first: torch.Tensor) -> torch.Tensor:
    if isinstance(mlp, ResnetMLP):
        return mlp.tail(first)
    return mlp[2](mlp[1](first))


def _foldable_mlp(mlp: nn.Module) -> bool:
    if type(mlp) is ResnetMLP:
        return type(mlp.block) is ResnetBlock
    return (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[0]) is nn.Linear
            and mlp[0].bias is not None)


TABLE_STEP = 0.05
"""Spacing of the nodes of a score table (:func:`score_table`) times the widest spread of one
key's tokens: the interpolation error is at most ``TABLE_STEP**4 / 384`` of that spread (below
float32 rounding), however peaked the softmax."""

TABLE_MAX_NODES = 65536
"""Above this many nodes (scores spread over more than ~3,000 times the keys' spread) a block
computes its softmax directly instead."""

TABLE_MAX_ENTRIES = 1 << 22
"""Nor is a table built with more than this many (node, key) entries (32 MB for the two float32
tables); it is built in pieces of about as many (node, key, token) terms, so its float64
temporaries stay below ~100 MB."""


def score_table(a: torch.Tensor, y: torch.Tensor) -> dict | None:
    """Tables of the attention's weighted mean as a function of the score slope, per key.

    Without dropout, head ``h``'s output for query token ``i`` needs ``m = sum_j p_j y_j`` with
    ``p = softmax(a y)``: ``a`` (one scalar per query, head and token, :meth:`AttentionBlock._forward`)
    and the key's tokens ``y`` (T,). For one key, ``m(a)`` is a smooth function of the scalar
    ``a`` (the derivative of ``log sum_j exp(a y_j)``) whose derivative is the variance of ``y``
    under ``p``. When every query meets every key (counterfactuals: each cell under each sample),
    this tabulates ``m`` and its derivative in float64 on nodes ``k * step`` covering the range
    of ``a``, for each key, so that each (query, key) pair costs a cubic Hermite interpolation
    (:func:`interpolate_scores`) instead of a softmax over T tokens for each of its H T scores.

    ``a`` is (*A, H, T) and ``y`` (*Y, T) with broadcasting leading shapes. Returns None (compute
    directly) unless the leading shapes form an outer product: ``a`` of size 1 in the last
    leading dimension, ``y`` of size 1 in all others, at least two of each, and a float32 ``a``
    (a float64 computation keeps its precision). Node ``k`` sits at ``k * step`` for every table
    of the same keys, so blocks and chunks of one analysis interpolate between the same nodes.
    """
    n = max(a.dim() - 2, y.dim() - 1)
    lead_a = (1,) * (n - (a.dim() - 2)) + tuple(a.shape[:-2])
    lead_y = (1,) * (n - (y.dim() - 1)) + tuple(y.shape[:-1])
    if (a.dtype != torch.float32 or n < 2 or lead_a[-1] != 1 or lead_y[-1] < 2
            or any(d != 1 for d in lead_y[:-1]) or math.prod(lead_a) < 2):
        return None
    keys = y.detach().reshape(-1, y.shape[-1]).double()  # (R, T)
    width = float((keys.max(-1).values - keys.min(-1).values).max())
    if not (width > 0 and math.isfinite(width)):
        return None
    step = TABLE_STEP / width
    low, high = float(a.min()), float(a.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    first, last = math.floor(low / step), math.floor(high / step) + 1
    if last - first + 1 > TABLE_MAX_NODES or (last - first + 1) * keys.shape[0] > TABLE_MAX_ENTRIES:
        return None
    nodes = torch.arange(first, last + 1, dtype=torch.float64, device=a.device) * step  # (K,)
    value = torch.empty(len(nodes), keys.shape[0], dtype=a.dtype, device=a.device)
    slope = torch.empty_like(value)
    piece = max(1, TABLE_MAX_ENTRIES // keys.numel())
    for start in range(0, len(nodes), piece):
        p = torch.softmax(nodes[start:start + piece, None, None] * keys, dim=-1)  # (k, R, T)
        mean = (p * keys).sum(-1)
        variance = ((p * keys.square()).sum(-1) - mean.square()).clamp_min(0.0)
        value[start:start + piece], slope[start:start + piece] = mean, variance * step
    return {"first": first, "step": step, "n_keys": keys.shape[0], "value": value, "slope": slope}


def interpolate_scores(table: dict, a: torch.Tensor) -> torch.Tensor:
    """``m`` of :func:`score_table` for every query of ``a`` (*Q, 1, H, T) against every key:
    (*Q, R, H * T), index ``h * T + i`` as in :meth:`AttentionBlock._forward`."""
    heads, tokens = a.shape[-2:]
    position = a.detach().reshape(-1, 1).double() / table["step"] - table["first"]  # (N, 1)
    node = position.floor().clamp_(0, table["value"].shape[0] - 2)
    t = (position - node).to(a.dtype)
    node = node.long().squeeze(-1)
    one_minus = 1.0 - t
    h00 = (1.0 + 2.0 * t) * one_minus.square()
    h10 = t * one_minus.square()
    h01 = t.square() * (3.0 - 2.0 * t)
    h11 = t.square() * (t - 1.0)
    m = table["value"].index_select(0, node).mul_(h00)  # (N, R)
    m.addcmul_(table["slope"].index_select(0, node), h10)
    node += 1
    m.addcmul_(table["value"].index_select(0, node), h01)
    m.addcmul_(table["slope"].index_select(0, node), h11)
    m = m.view(*a.shape[:-3], heads * tokens, table["n_keys"])
    return m.transpose(-1, -2)


BLOCK_PAIRS_PER_THREAD = 2048
"""Default (query, key) pairs per torch thread in one block of :meth:`AttentionBlock.forward`
without autograd."""


class AttentionBlock(nn.Module):
    """Tokenised multi-head attention of a query vector against a key/value embedding.

    The query (size ``query_dim``) is projected without bias to ``n_tokens`` scalars, each a
    token of dimension 1; the key/value embedding (size ``kv_dim``) likewise. Tokens are lifted
    to ``n_channels`` channels, ``n_heads``-head scaled dot-product attention mixes them
    (dropout on the attention weights), each token's output is projected to ``head_out``
    channels, flattened, passed through an MLP (``post``) to ``n_tokens`` values, and a second
    MLP (``residual``) maps ``[query, those values]`` to the output. With ``mlp="resnet"`` (the
    default, architectures 2 and 3) both MLPs are the reference's (:class:`ResnetMLP`: a residual block
    with layer norms, width 128, then ``n_hidden`` -> output), the lifts start without bias and
    the head projection is square, as scvi-tools' ``nn.MultiheadAttention`` parametrises them;
    ``mlp="simple"`` (architecture 1, models saved before) is ``Linear - GELU - Linear``.

    :meth:`forward_unfactored` computes exactly that; :meth:`forward` computes the same function
    in a factorised form that builds no q/k/v tensors (see :meth:`_forward`), and falls back to
    the literal form when parts of the block have been replaced (:meth:`factorisable`).

    Parameters
    ----------
    query_dim, kv_dim, out_dim
        Sizes of the query, the key/value embedding and the output.
    n_tokens, n_channels, n_heads, head_out, n_hidden
        Attention geometry (defaults follow the reference: 16 tokens, 8 channels in 2 heads,
        ``head_out`` output channels per token (default ``n_channels`` for ``mlp="resnet"``, 4
        for ``"simple"``), hidden width 32 in the MLPs).
    mlp
        ``"resnet"`` (the reference's MLPs) or ``"simple"`` (architecture 1).
    dropout_rate
        Dropout on the attention weights.
    stop_gradients_mlp
        Detach the query on its path into the attention projection only.
    use_map
        If True the block returns one tensor (a point estimate); otherwise it returns
        ``(loc, scale)`` with a softplus scale.
    lift
        How a scalar token is lifted to q/k/v: ``"single"`` (one linear map per role,
        architecture 2) or ``"product"`` (the reference's bias-free token lift times
        ``nn.MultiheadAttention``'s input projection, architecture 3, which
        :class:`mrvi_pyro.module.MrVIModule` builds by default).
    """

    def __init__(
        self,
        query_dim: int,
        kv_dim: int,
        out_dim: int,
        *,
        n_tokens: int = 16,
        n_channels: int = 8,
        n_heads: int = 2,
        head_out: int | None = None,
        n_hidden: int = 32,
        dropout_rate: float = 0.03,
        stop_gradients_mlp: bool = True,
        use_map: bool = True,
        mlp: str = "resnet",
        lift: str = "single",
    ):
        super().__init__()
        if lift not in ("single", "product"):
            raise ValueError(f"lift must be 'single' or 'product', not {lift!r}.")
        if n_channels % n_heads:
            raise ValueError(f"n_channels ({n_channels}) must be divisible by n_heads ({n_heads}).")
        if mlp not in ("resnet", "simple"):
            raise ValueError(f"mlp must be 'resnet' or 'simple', not {mlp!r}.")
        head_out = (n_channels if mlp == "resnet" else 4) if head_out is None else head_out
        self.n_tokens, self.n_channels, self.n_heads = n_tokens, n_channels, n_heads
        self.stop_gradients_mlp, self.use_map = stop_gradients_mlp, use_map
        self.query_tokens = nn.Linear(query_dim, n_tokens, bias=False)
        self.kv_tokens = nn.Linear(kv_dim, n_tokens, bias=False)
        # Lifting a 1-d token to channels and projecting it to q/k/v are both linear, so they
        # are folded into one weight and bias per role.
        self.lift_kind = lift
        if lift == "single":
            self.q_lift = nn.Linear(1, n_channels)
            self.k_lift = nn.Linear(1, n_channels)
            self.v_lift = nn.Linear(1, n_channels)
        else:
            # As scvi-tools parametrises it: a bias-free token lift for the query and one shared
            # by keys and values, then nn.MultiheadAttention's input projection (Xavier, zero bias).
            self.query_token = nn.Linear(1, n_channels, bias=False)
            self.kv_token = nn.Linear(1, n_channels, bias=False)
            self.in_proj = nn.Linear(n_channels, 3 * n_channels)
            with torch.no_grad():
                nn.init.xavier_uniform_(self.in_proj.weight)
                self.in_proj.bias.zero_()
        self.head_proj = nn.Linear(n_channels, head_out)
        self.dropout = nn.Dropout(dropout_rate)
        n_out = out_dim if use_map else 2 * out_dim
        make_mlp = ResnetMLP if mlp == "resnet" else _simple_mlp
        self.post = make_mlp(n_tokens * head_out, n_tokens, n_hidden)
        self.residual = make_mlp(query_dim + n_tokens, n_out, n_hidden)
        if mlp == "resnet":
            self._reference_init()

    def lifts(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Effective ``(weight (C,), bias (C,))`` lifting a scalar token to q, k and v."""
        if self.lift_kind == "single":
            return tuple((m.weight[:, 0], m.bias) for m in (self.q_lift, self.k_lift, self.v_lift))
        n = self.n_channels
        w, b = self.in_proj.weight, self.in_proj.bias
        tq, tkv = self.query_token.weight[:, 0], self.kv_token.weight[:, 0]
        return ((w[:n] @ tq, b[:n]), (w[n:2 * n] @ tkv, b[n:2 * n]), (w[2 * n:] @ tkv, b[2 * n:]))

    def _reference_init(self) -> None:
        """Start the lifts and the head projection where scvi-tools' block starts.

        There, a token is lifted by a bias-free ``Linear(1, C)`` (one for the query, one shared
        by keys and values) and then by ``nn.MultiheadAttention``'s input projection (Xavier
        uniform, zero bias); the composition is our lift. Its output projection starts with
        zero bias."""
        n = self.n_channels
        if self.lift_kind == "product":
            with torch.no_grad():
                self.head_proj.bias.zero_()
            return
        with torch.no_grad():
            in_proj = nn.init.xavier_uniform_(torch.empty(3 * n, n))
            token_q = torch.empty(n).uniform_(-1.0, 1.0)
            token_kv = torch.empty(n).uniform_(-1.0, 1.0)
            for lift, rows, token in ((self.q_lift, slice(0, n), token_q), (self.k_lift, slice(n, 2 * n), token_kv),
                                      (self.v_lift, slice(2 * n, 3 * n), token_kv)):
                lift.weight.copy_((in_proj[rows] @ token).unsqueeze(-1))
                lift.bias.zero_()
            self.head_proj.bias.zero_()

    def _heads(self, tokens: torch.Tensor, lift: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # tokens (..., T) -> (..., H, T, C/H); used by :meth:`forward_unfactored`.
        x = tokens.unsqueeze(-1) * lift[0] + lift[1]
        x = x.unflatten(-1, (self.n_heads, self.n_channels // self.n_heads))
        return x.transpose(-2, -3)

    def forward_unfactored(self, query: torch.Tensor, kv: torch.Tensor):
        """The block written out literally (q, k, v tensors, dot products, projections).

        :meth:`forward` computes the same function (values and gradients, up to float
        rounding, and the same dropout draws) with far fewer operations; this form is kept as
        its specification and is what the tests compare it against.
        """
        shape = torch.Size(np.broadcast_shapes(query.shape[:-1], kv.shape[:-1]))
        attn_query = query.detach() if self.stop_gradients_mlp else query
        q_lift, k_lift, v_lift = self.lifts()
        q = self._heads(self.query_tokens(attn_query), q_lift) / math.sqrt(self.n_channels // self.n_heads)
        kv_tok = self.kv_tokens(kv)
        k = self._heads(kv_tok, k_lift)
        v = self._heads(kv_tok, v_lift)
        weights = self.dropout(torch.softmax(q @ k.transpose(-1, -2), dim=-1))
        mixed = (weights @ v).transpose(-2, -3).flatten(-2)  # (..., T, C)
        summary = self.post(self.head_proj(mixed).flatten(-2))
        query = query.expand(*shape, query.shape[-1])
        return self._output(self.residual(torch.cat([query, summary], dim=-1)))

    def _output(self, out: torch.Tensor):
        if self.use_map:
            return out
        loc, scale = out.chunk(2, dim=-1)
        return loc, F.softplus(scale) + 1e-5

    inference_block_pairs: int | None = None
    """Without autograd, (query, key) pairs are processed in blocks of about this many along the
    first leading dimension: the (H, T, T) workspace of a block stays in cache and the memory
    of a large broadcast (every cell against every sample) stays bounded. ``None`` (default):
    :data:`BLOCK_PAIRS_PER_THREAD` per torch thread, for at most 8 threads (see
    :meth:`block_pairs`)."""

    def block_pairs(self) -> int:
        """Pairs per block of the inference path: :attr:`inference_block_pairs` when set.

        By default 2,048 per torch thread (at most 8): each operation of a block then has enough
        work to split over the threads, while one block's scores stay small (4 MB per thread).
        Measured on 2 cores with 20,000 cells x 24 samples (``get_local_sample_distances``):
        against a fixed 1,024 pairs, 1 thread ran 12-15% faster at 2,048-3,072 pairs (6,144 was
        slower: the scores left the cache) and 2 threads 15-20% faster at 3,072-6,144 pairs."""
        if self.inference_block_pairs is not None:
            return self.inference_block_pairs
        return BLOCK_PAIRS_PER_THREAD * min(torch.get_num_threads(), 8)

    def factorisable(self) -> bool:
        """Whether :meth:`forward` can use the factorised form: the lifts, the head projection and
        the first layers of ``post`` and ``residual`` are the linear layers it folds. A block whose
        parts were replaced by other modules runs :meth:`forward_unfactored` instead."""
        if self.lift_kind == "single":
            lifts = all(type(m) is nn.Linear and m.in_features == 1 and m.bias is not None
                        for m in (self.q_lift, self.k_lift, self.v_lift))
        else:
            lifts = all(type(m) is nn.Linear for m in (self.query_token, self.kv_token, self.in_proj))
        mlps = all(_foldable_mlp(mlp) for mlp in (self.post, self.residual))
        return lifts and mlps and type(self.head_proj) is nn.Linear and self.head_proj.bias is not None

    def forward(self, query: torch.Tensor, kv: torch.Tensor):
        """Attend ``query`` (..., query_dim) to ``kv`` (..., kv_dim); leading dims broadcast."""
        if not self.factorisable():
            return self.forward_unfactored(query, kv)
        if torch.is_grad_enabled():
            # Training: folding the parameters costs more than it saves (see _forward_direct).
            return self._forward_direct(query, kv)
        shape = torch.Size(np.broadcast_shapes(query.shape[:-1], kv.shape[:-1]))
        n_pairs, block = math.prod(shape), self.block_pairs()
        folded = self._folded()
        table = self._score_table(query, kv, folded)
        if not shape or shape[0] < 2 or n_pairs <= block:
            return self._forward(query, kv, folded, table)
        step = max(1, block * shape[0] // n_pairs)

        def rows(t: torch.Tensor, i: int) -> torch.Tensor:
            # Slice the first broadcast dimension where ``t`` has it; otherwise ``t`` broadcasts.
            if t.dim() - 1 == len(shape) and t.shape[0] > 1:
                return t[i : i + step]
            return t

        parts = [self._forward(rows(query, i), rows(kv, i), folded, table) for i in range(0, shape[0], step)]
        if self.use_map:
            return torch.cat(parts)
        return tuple(torch.cat(side) for side in zip(*parts))

    tabulate_scores: bool = True
    """Without autograd and dropout, compute the attention of every query against every key from
    per-key tables (:func:`score_table`) when the shapes allow it; False: always directly."""

    def _score_table(self, query: torch.Tensor, kv: torch.Tensor, folded: dict) -> dict | None:
        """:func:`score_table` for one call of :meth:`forward` (all its blocks), or None."""
        if not self.tabulate_scores or (self.training and self.dropout.p > 0):
            return None
        attn_query = query.detach() if self.stop_gradients_mlp else query
        a = self.query_tokens(attn_query).unsqueeze(-2) * folded["slope"] + folded["intercept"]
        return score_table(a, self.kv_tokens(kv))

    def _forward(self, query: torch.Tensor, kv: torch.Tensor, folded: dict | None = None,
                 table: dict | None = None):
        """The computation of :meth:`forward` on one block.

        Tokens are scalars lifted linearly to channels, so everything but the softmax
        factorises. With query token ``x_i`` and key/value token ``y_j``, head ``h``'s score is
        ``(x_i w_qh + b_qh) . (y_j w_kh + b_kh) / sqrt(d)``; the terms constant in ``j`` cancel
        in the softmax, leaving ``a_hi y_j`` with ``a_hi = (x_i w_qh.w_kh + b_qh.w_kh) / sqrt(d)``.
        The attention output of a token is ``m_hi w_vh + r_hi b_vh`` with
        ``m_hi = sum_j p_hij y_j`` and ``r_hi = sum_j p_hij`` (1 without dropout), and the head
        projection and the first linear maps of ``post`` (for :class:`ResnetMLP`, its ``fc1``
        and its skip, stacked) are linear, so they fold into one (2 H T -> width) map. The
        per-pair work is one (H, T, T) softmax and a weighted sum (or, with a ``table`` from
        :func:`score_table`, one interpolation per score); no q/k/v tensors are built
        and nothing per query is broadcast to every key. The first linear maps of ``residual``
        are split the same way: their query part runs once per query.
        """
        folded = self._folded() if folded is None else folded
        attn_query = query.detach() if self.stop_gradients_mlp else query
        x = self.query_tokens(attn_query)  # (..., T)
        y = self.kv_tokens(kv).unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, T)
        a = x.unsqueeze(-2) * folded["slope"] + folded["intercept"]  # (..., H, T)
        dropped = self.training and self.dropout.p > 0
        if (table is not None and not dropped and not torch.is_grad_enabled() and a.dim() >= 4
                and a.shape[-3] == 1 and y.shape[-4] == table["n_keys"]):
            m = interpolate_scores(table, a)  # (..., R, H * T)
        else:
            weights = torch.softmax(a.unsqueeze(-1) * y, dim=-1)  # (..., H, T, T)
            if dropped:
                weights = self.dropout(weights)
            # Without autograd (and without dropout, whose r needs them) the weights are not
            # needed afterwards: multiply in place.
            weighted = weights * y if torch.is_grad_enabled() or dropped else weights.mul_(y)
            m = weighted.sum(-1).flatten(-2)  # (..., H * T), index h * T + i
        rows = math.prod(m.shape[:-1])  # (pairs): also the leading size of ``summary`` below
        if dropped:
            hidden = torch.addmm(folded["bias"], m.flatten(0, -2), folded["k_m"]).view(*m.shape[:-1], -1)
            hidden = hidden + weights.sum(-1).flatten(-2) @ folded["k_r"]
        else:
            # The two (pairs, width) inputs of the MLP tails share one reused buffer (no autograd
            # here; ``workspace`` gives None under autograd or outside an analysis pass).
            buffer = workspace(self, "hidden", (rows, folded["k_m"].shape[-1]), m)
            hidden = torch.addmm(folded["bias_r1"], m.flatten(0, -2), folded["k_m"], out=buffer).view(*m.shape[:-1], -1)
        summary = _mlp_tail(self.post, hidden)  # (..., T)
        res_weight, res_bias = folded["residual_first"]
        n_query = query.shape[-1]
        from_query = F.linear(query, res_weight[:, :n_query], res_bias)  # once per query
        # No autograd here: add the query part in place instead of allocating another (pairs, width).
        buffer = workspace(self, "hidden", (rows, res_weight.shape[0]), summary)
        hidden = torch.mm(summary.reshape(-1, summary.shape[-1]), res_weight[:, n_query:].T, out=buffer)
        hidden = hidden.view(*summary.shape[:-1], -1).add_(from_query)
        return self._output(_mlp_tail(self.residual, hidden))

    def _forward_direct(self, query: torch.Tensor, kv: torch.Tensor):
        """:meth:`forward_unfactored` with the factorised scores of :meth:`_forward` and nothing folded.

        The attention weights come from the per-head slope and intercept (no q/k tensors); the
        values, the head projection and both MLPs are applied as written. Folding them
        (:meth:`_folded`) costs a fixed ~30 small operations on the parameters per call, forward
        and backward, which outweighs what it saves per row on a training minibatch.
        """
        n_heads, head_dim = self.n_heads, self.n_channels // self.n_heads
        lifts = self.lifts()
        slope, intercept = self._score_factors(lifts)
        _, _, (w_v, b_v) = lifts
        attn_query = query.detach() if self.stop_gradients_mlp else query
        x = self.query_tokens(attn_query)  # (..., T)
        y = self.kv_tokens(kv).unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, T)
        a = x.unsqueeze(-2) * slope + intercept  # (..., H, T)
        weights = self.dropout(torch.softmax(a.unsqueeze(-1) * y, dim=-1))
        m = (weights * y).sum(-1)  # (..., H, T)
        # Head h's output for token i is m_hi w_vh + r_hi b_vh with r_hi = sum_j p_hij (1 unless dropout).
        mixed = m.unsqueeze(-1) * w_v.view(n_heads, 1, head_dim)  # (..., H, T, d)
        if self.training and self.dropout.p > 0:
            mixed = mixed + weights.sum(-1).unsqueeze(-1) * b_v.view(n_heads, 1, head_dim)
        else:
            mixed = mixed + b_v.view(n_heads, 1, head_dim)
        mixed = mixed.transpose(-2, -3).flatten(-2)  # (..., T, C)
        summary = self.post(self.head_proj(mixed).flatten(-2))
        shape = summary.shape[:-1]
        return self._output(self.residual(torch.cat([query.expand(*shape, query.shape[-1]), summary], dim=-1)))

    def _score_factors(self, lifts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``(slope, intercept)``, each (H, 1): head h's score of query token ``x_i``
        against key token ``y_j`` is ``(slope_h x_i + intercept_h) y_j`` up to terms constant in j."""
        n_heads, head_dim = self.n_heads, self.n_channels // self.n_heads
        (w_q, b_q), (w_k, _), _ = lifts
        w_q, b_q, w_k = w_q.view(n_heads, head_dim), b_q.view(n_heads, head_dim), w_k.view(n_heads, head_dim)
        return (((w_q * w_k).sum(-1) / math.sqrt(head_dim)).unsqueeze(-1),
                ((b_q * w_k).sum(-1) / math.sqrt(head_dim)).unsqueeze(-1))

    def _folded(self) -> dict:
        """Parameters of :meth:`_forward` folded from the block's weights (see its docstring).

        Inside :func:`reuse_folded` (no autograd) the result is kept and reused until the
        context exits or a parameter changes (another tensor, other storage, or an in-place
        update, which bumps the tensor's version counter). Inference calls the block once per
        slice of cells or draws, and folding costs ~30 small operations each time: reusing the
        folds made DE with LFCs on 20,000 cells 12% faster (``benchmarks/README.md``, stop 24)."""
        scope = _FOLD_SCOPE.get()
        if scope is None or torch.is_grad_enabled():
            return self._fold()
        key = [(p, p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters()]
        cached = scope.get(id(self))
        if cached is not None and cached[0] is self and len(cached[1]) == len(key) and all(
            a[0] is b[0] and a[1:] == b[1:] for a, b in zip(cached[1], key)
        ):
            return cached[2]
        folded = self._fold()
        scope[id(self)] = (self, key, folded)
        return folded

    def _fold(self) -> dict:
        n_heads, head_dim, n_tokens = self.n_heads, self.n_channels // self.n_heads, self.n_tokens
        lifts = self.lifts()
        slope, intercept = self._score_factors(lifts)
        _, _, (w_v, b_v) = lifts
        # Fold v-lift -> head_proj -> the first linear maps of post into weights on m (and on r
        # under dropout).
        first_weight, first_bias = _mlp_first_linear(self.post)
        w_first = first_weight.view(first_weight.shape[0], n_tokens, -1)  # (k, T, O)
        w_proj = self.head_proj.weight.view(-1, n_heads, head_dim)  # (O, H, d)
        v_lift = torch.stack([w_v, b_v]).view(2, n_heads, head_dim)
        via = torch.einsum("ohd,rhd->rho", w_proj, v_lift)  # through the value weight (r=0) or bias (r=1)
        k_m, k_r = torch.einsum("kio,rho->rhik", w_first, via).reshape(2, n_heads * n_tokens, -1)
        bias = torch.addmv(first_bias, first_weight, self.head_proj.bias.repeat(n_tokens))  # of the proj bias
        return {
            "slope": slope,  # (H, 1)
            "intercept": intercept,
            "k_m": k_m,
            "k_r": k_r,
            "bias": bias,
            "bias_r1": bias + k_r.sum(0),  # r = 1 without dropout
            "residual_first": _mlp_first_linear(self.residual),
        }


class EncoderU(nn.Module):
    """Amortised encoder of ``q(u | x, s)``.

    ``log1p(x)`` -> ``n_layers`` x (Linear -> sample-conditional LayerNorm -> GELU) ->
    + sample embedding -> ``n_residual`` residual blocks -> mean and softplus scale heads.

    Architectures 2 and 3 (3 is the default) use the reference's blocks: :class:`ResnetBlock` (two linear maps,
    two layer norms, ReLU), exact GELU and layer-norm epsilon 1e-5. Architecture 1 (models
    saved before) uses :class:`ResidualBlock`, tanh-approximated GELU and epsilon 1e-6.

    Parameters
    ----------
    n_input
        Number of genes.
    n_output
        Dimension of ``u``.
    n_samples
        Number of samples (conditions of the layer norms and the embedding).
    n_hidden, n_layers
        Width and depth of the hidden layers.
    sample_embedding_dim
        Size of the sample embedding (must equal ``n_hidden``: it is added to the hidden state).
    n_residual
        Number of residual blocks.
    architecture
        2 or 3 (the reference's blocks; the encoder is the same in both) or 1 (see above).
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_samples: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_residual: int = 2,
        architecture: int = 2,
    ):
        super().__init__()
        self.gelu_approximate = "tanh" if architecture == 1 else "none"
        self.linears = nn.ModuleList(
            nn.Linear(n_input if i == 0 else n_hidden, n_hidden) for i in range(n_layers)
        )
        eps = 1e-6 if architecture == 1 else 1e-5
        self.norms = nn.ModuleList(ConditionalLayerNorm(n_hidden, n_samples, eps) for _ in range(n_layers))
        self.sample_embedding = nn.Embedding(n_samples, n_hidden)
        nn.init.normal_(self.sample_embedding.weight, std=0.1)
        if architecture == 1:
            blocks = [ResidualBlock(n_hidden) for _ in range(n_residual)]
        else:
            blocks = [ResnetBlock(n_hidden, n_hidden, n_hidden) for _ in range(n_residual)]
        self.residuals = nn.Sequential(*blocks)
        self.loc = nn.Linear(n_hidden, n_output)
        self.scale = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor, sample_index: torch.Tensor):
        """Return ``(loc, scale)`` of ``q(u | x, s)`` from raw counts ``x`` (n, G)."""
        h = torch.log1p(x)
        for linear, norm in zip(self.linears, self.norms):
            h = F.gelu(norm(linear(h), sample_index), approximate=self.gelu_approximate)
        h = self.residuals(h + self.sample_embedding(sample_index))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-5


class SampleMapper(nn.Module):
    """``f_phi(u, s)``: attention between ``LayerNorm(u)`` and a learned sample embedding.

    Parameters
    ----------
    n_latent_u, n_latent
        Dimensions of ``u`` and ``z``.
    n_samples
        Number of samples.
    embedding_dim
        Size of the sample embedding (16 by default).
    stop_gradients
        Detach ``u`` before the mapper (the offset does not train the encoder).
    **attention_kwargs
        Passed to :class:`AttentionBlock` (``use_map``, ``dropout_rate``, ``stop_gradients_mlp``,
        ``n_channels``, ``n_heads``, ``n_hidden``).
    """

    def __init__(
        self,
        n_latent_u: int,
        n_latent: int,
        n_samples: int,
        *,
        embedding_dim: int = 16,
        stop_gradients: bool = False,
        **attention_kwargs,
    ):
        super().__init__()
        self.stop_gradients = stop_gradients
        self.sample_embedding = nn.Embedding(n_samples, embedding_dim)
        nn.init.normal_(self.sample_embedding.weight, std=0.1)
        self.query_norm = nn.LayerNorm(n_latent_u)
        self.kv_norm = nn.LayerNorm(embedding_dim)
        self.attention = AttentionBlock(n_latent_u, embedding_dim, n_latent, **attention_kwargs)

    def sample_keys(self, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised embeddings of the given samples (all samples when None)."""
        emb = self.sample_embedding.weight if sample_index is None else self.sample_embedding(sample_index)
        return self.kv_norm(emb)

    def forward(self, u: torch.Tensor, sample_index: torch.Tensor | None = None):
        """Offset for ``u`` (..., L_u) under ``sample_index`` (...,).

        With ``sample_index=None`` every sample is used: the output has shape
        ``(..., S, L)`` (or a ``(loc, scale)`` pair when the block is not MAP).
        """
        if self.stop_gradients:
            u = u.detach()
        query = self.query_norm(u)
        keys = self.sample_keys(sample_index)
        if sample_index is None:
            query = query.unsqueeze(-2)
        return self.attention(query, keys)


class MLPSampleMapper(nn.Module):
    """``f_phi(u, s)`` as an MLP on ``[LayerNorm(u), sample embedding]`` (the ``"mlp"`` variant).

    Same call signature as :class:`SampleMapper` (MAP only).
    """

    def __init__(self, n_latent_u: int, n_latent: int, n_samples: int, *, embedding_dim: int = 16,
                 n_hidden: int = 32, stop_gradients: bool = False):
        super().__init__()
        self.stop_gradients = stop_gradients
        self.sample_embedding = nn.Embedding(n_samples, embedding_dim)
        nn.init.normal_(self.sample_embedding.weight, std=0.1)
        self.query_norm = nn.LayerNorm(n_latent_u)
        self.mlp = nn.Sequential(
            nn.Linear(n_latent_u + embedding_dim, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_latent)
        )

    def forward(self, u: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        query = self.query_norm(u.detach() if self.stop_gradients else u)
        if sample_index is None:
            keys, query = self.sample_embedding.weight, query.unsqueeze(-2)
        else:
            keys = self.sample_embedding(sample_index)
        shape = torch.Size(np.broadcast_shapes(query.shape[:-1], keys.shape[:-1]))
        joint = torch.cat([query.expand(*shape, query.shape[-1]), keys.expand(*shape, keys.shape[-1])], dim=-1)
        return self.mlp(joint)


class LinearSampleMapper(nn.Module):
    """``f_phi(u, s) = B_s u + c_s``: a per-sample linear map (the ``"linear"`` variant).

    ``B_s`` starts at zero; with ``B_s = 0`` every cell sees the same sample offset ``c_s``,
    so sample distances do not depend on the cell. Same call signature as
    :class:`SampleMapper` (MAP only).
    """

    def __init__(self, n_latent_u: int, n_latent: int, n_samples: int, *, stop_gradients: bool = False):
        super().__init__()
        self.stop_gradients = stop_gradients
        self.weight = nn.Parameter(torch.zeros(n_samples, n_latent, n_latent_u))
        self.bias = nn.Parameter(0.1 * torch.randn(n_samples, n_latent))

    def forward(self, u: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        u = u.detach() if self.stop_gradients else u
        if sample_index is None:
            return torch.einsum("slk,...k->...sl", self.weight, u) + self.bias
        return torch.einsum("...lk,...k->...l", self.weight[sample_index], u) + self.bias[sample_index]


class DecoderX(nn.Module):
    """Log normalised expression ``log softmax(A [z + g(z, b)] + gamma)``.

    With one nuisance level ``g`` is absent and the logits are ``Linear(LayerNorm(z))``.
    With ``low_dim_batch=False`` the nuisance block has output size G and is added to the
    logits instead of to ``z``.

    Parameters
    ----------
    n_latent, n_genes, n_batches
        Dimensions.
    low_dim_batch
        Where the nuisance effect enters (see above).
    embedding_dim
        Size of the nuisance embedding.
    stop_gradients
        Detach ``z`` on its way into the nuisance block.
    **attention_kwargs
        Passed to :class:`AttentionBlock`.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        n_batches: int,
        *,
        low_dim_batch: bool = True,
        embedding_dim: int = 16,
        stop_gradients: bool = False,
        **attention_kwargs,
    ):
        super().__init__()
        self.n_batches, self.low_dim_batch, self.stop_gradients = n_batches, low_dim_batch, stop_gradients
        self.linear = nn.Linear(n_latent, n_genes)
        if n_batches >= 2:
            self.batch_embedding = nn.Embedding(n_batches, embedding_dim)
            nn.init.normal_(self.batch_embedding.weight, std=0.1)
            self.query_norm = nn.LayerNorm(n_latent)
            self.kv_norm = nn.LayerNorm(embedding_dim)
            out_dim = n_latent if low_dim_batch else n_genes
            self.nuisance = AttentionBlock(n_latent, embedding_dim, out_dim, **attention_kwargs)
        else:
            self.norm = nn.LayerNorm(n_latent)

    def forward(self, z: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Log normalised expression (..., G) for ``z`` (..., L) in nuisance levels ``batch_index``."""
        if self.n_batches < 2:
            return torch.log_softmax(self._logits(self.norm(z)), dim=-1)
        query = self.query_norm(z.detach() if self.stop_gradients else z)
        effect = self.nuisance(query, self.kv_norm(self.batch_embedding(batch_index)))
        if self.low_dim_batch:
            return torch.log_softmax(self._logits(z + effect), dim=-1)
        return torch.log_softmax(self._logits(z) + effect, dim=-1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``self.linear(x)``. Without autograd, and when the map is a plain ``nn.Linear``, the
        product is formed first and the bias added in place: on the large inputs of inference
        (many cells x draws x levels by thousands of genes) torch's fused form, which first
        copies the bias into every row of the output, took ~1.5x as long on 2 CPU cores."""
        if torch.is_grad_enabled() or type(self.linear) is not nn.Linear:
            return self.linear(x)
        return torch.matmul(x, self.linear.weight.T).add_(self.linear.bias)
