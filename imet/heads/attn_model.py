"""AttnCNN-RNN, the paper's best model (sections 3.3-3.4, Algorithm 2): an attention LSTM that emits labels.

Per view it reads the frozen ResNet50 feature map `maps` (B, L, D) (L = 14*14 cells v_i of D = 2048) and
`fr_in` (B, F), the input of f_R, the baseline's last FC layer (pooled features, or pooled + HOG for the
"+HOG" variant of section 3.4). With C labels, A the attention width and H the LSTM width:

    v_prob    = sigmoid(f_R((fr_in - mean) / std))                  (B, C)  first v_pred
                (or, with `fr_net`, f_R = a class-attention module over the cells, fr_in = its HOG input)
    e_{i,t}   = w . ReLU(W_v v_i + b + W_h h_{t-1}) + b2            f_att, Linear-ReLU-Linear    (1)
    alpha_t   = softmax over the L cells of e_t                                                   (2)
    z_t       = sum_i alpha_{i,t} v_i                                                             (3)
    h_t, c_t  = LSTMCell([v_pred, z_t, y~_{t-1}], (h_{t-1}, c_{t-1}))   input size C + D + C       (4)
    p_t       = sigmoid(f_pred(h_t)),  f_pred = Linear(H, P) - ReLU - Dropout - Linear(P, C)       (5)

Choices the paper leaves open, made here:
- The first Linear of f_att is split in two: the encoder side W_v v_i + b is computed ONCE per sample in
  `encode` (`Encoded.proj`), and each step only adds W_h h_{t-1}, broadcast over cells and beams.
- h_0 = tanh(Linear(mean_i v_i)) and c_0 = tanh(Linear(mean_i v_i)): Show-Attend-Tell's init MLPs, one
  layer each; tanh keeps the starting state in the range an LSTM state lives in.
- f_pred has a ReLU between its two FC layers: without one, "two FC layers" collapse into a single
  low-rank linear map.
- `fr_net`: f_R may be a class-attention module over the cells (a fitted csra or mldecoder) instead of the
  last FC layer, so that the first v_pred already carries local evidence; trained on with the rest.
- `residual=True` is NOT the paper's eq. 5: p_t = sigmoid(f_pred(h_t) + f_R's logits), with f_pred's last
  layer starting at zero, so the decoder starts as f_R and learns corrections (co-occurrence, what the
  attention adds). Off in this class by default; the attn_rnn head turns it on.
- `attention=False` (the ablation) drops f_att: alpha is uniform, z_t is the mean of the cells.
- `step` returns logits; p_t = sigmoid(logits). The loss uses BCE-with-logits in float32 with the class
  weights, averaged over labels and samples (the paper sums over labels: a constant factor C, i.e. only a
  rescaled learning rate), then over the T steps.
- The label l_t is the argmax of the logits (same order as p_t, but no saturation at p = 1) over the
  candidate pool; ties go to the lowest label index. No gradient flows through the choice; the gradient
  does flow through v_pred = p_t, which the paper feeds back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imet.decode.beam import Encoded
from imet.heads.params import POOLS

CPU_BLOCK = 1 << 21  # elements of the attention intermediate built at once on the CPU (8 MiB in float32)


class AttnRNN(nn.Module):
    """Attention LSTM over a frozen CNN feature map that predicts one label per step (Algorithm 2)."""

    def __init__(
        self,
        *,
        n_labels: int,  # C, number of labels
        map_channels: int,  # D, channels of a feature-map cell (2048 for ResNet50)
        fr_dim: int,  # F, input width of f_R (2048, or 2048 + HOG length)
        hidden: int = 512,  # H, LSTM state width
        attention_dim: int = 512,  # A, hidden width of f_att
        pred_dim: int = 512,  # P, hidden width of f_pred
        dropout: float = 0.5,  # dropout between the two FC layers of f_pred
        attention: bool = True,  # False: uniform attention (z_t = mean of the cells), the ablation
        residual: bool = False,  # p_t = sigmoid(f_pred(h_t) + f_R logits): the decoder learns corrections to v_prob
        fr_net: nn.Module | None = None,  # f_R as a class-attention module over the cells (fr_in: its HOG input)
    ):
        super().__init__()
        self.n_labels, self.map_channels, self.fr_dim = n_labels, map_channels, fr_dim
        self.hidden, self.attention_dim, self.pred_dim = hidden, attention_dim, pred_dim
        self.dropout, self.attention, self.residual = dropout, attention, residual
        C, D, H, A = n_labels, map_channels, hidden, attention_dim
        self.register_buffer("fr_mean", torch.zeros(fr_dim))
        self.register_buffer("fr_std", torch.ones(fr_dim))
        self.register_buffer("map_mean", torch.zeros(map_channels))  # per-channel map statistics (train)
        self.register_buffer("map_std", torch.ones(map_channels))
        self.fr = nn.Linear(fr_dim, C) if fr_net is None else fr_net  # f_R, trained too (theta_R, Algorithm 2)
        if attention:
            self.att_v = nn.Linear(D, A)  # encoder side of f_att, once per sample
            self.att_h = nn.Linear(H, A, bias=False)  # decoder side of f_att, every step
            self.att_out = nn.Linear(A, 1)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.lstm = nn.LSTMCell(C + D + C, H)
        self.pred = nn.Sequential(nn.Linear(H, pred_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(pred_dim, C))
        if residual:  # starts as f_R: p_t = v_prob until the decoder has learnt something
            nn.init.zeros_(self.pred[-1].weight)
            nn.init.zeros_(self.pred[-1].bias)

    @property
    def config(self) -> dict:
        """The constructor arguments (JSON-able): `AttnRNN(**model.config)` rebuilds the model."""
        names = ("n_labels", "map_channels", "fr_dim", "hidden", "attention_dim", "pred_dim", "dropout")
        return {**{k: getattr(self, k) for k in names}, "attention": self.attention, "residual": self.residual}

    @torch.no_grad()
    def init_fr(self, weight, bias, mean, std) -> AttnRNN:
        """Start f_R from a fitted linear model: weight (C, F), bias (C,), input standardisation (F,)."""
        dtype = self.fr.weight.dtype
        weight, bias, mean, std = (torch.as_tensor(x, dtype=dtype) for x in (weight, bias, mean, std))
        want = {"weight": (self.n_labels, self.fr_dim), "bias": (self.n_labels,), "mean": (self.fr_dim,),
                "std": (self.fr_dim,)}
        for name, x in zip(want, (weight, bias, mean, std), strict=True):
            if tuple(x.shape) != want[name]:
                raise ValueError(f"init_fr: {name} has shape {tuple(x.shape)}, expected {want[name]}")
        if not bool((std > 0).all()):
            raise ValueError("init_fr: std must be positive everywhere")
        self.fr.weight.copy_(weight)
        self.fr.bias.copy_(bias)
        self.fr_mean.copy_(mean)
        self.fr_std.copy_(std)
        return self

    @torch.no_grad()
    def set_map_stats(self, mean, std) -> AttnRNN:
        """Per-channel mean and std (D,) of the map cells: the cells enter f_att, the LSTM and h0 standardised.

        Raw ResNet50 cells reach values in the hundreds; unscaled, they saturate the LSTM gates and the decoder
        ignores its input. The maps are never copied: the scaling is folded into W_v, and applied to z_t.
        """
        mean, std = (torch.as_tensor(x, dtype=self.map_mean.dtype) for x in (mean, std))
        if mean.shape != (self.map_channels,) or std.shape != (self.map_channels,) or not bool((std > 0).all()):
            raise ValueError(f"set_map_stats: need mean and positive std of shape ({self.map_channels},)")
        self.map_mean.copy_(mean)
        self.map_std.copy_(std)
        return self

    @torch.no_grad()
    def init_attention(self, weight, bias, sample: Tensor, spread: float = 2.0) -> AttnRNN:
        """Start f_att as "where does any label's evidence sit": its first layer's first rows become class
        scorers of a cell (`weight` (k, D), `bias` (k,) act on RAW cells, k <= A), the output layer sums their
        rectified scores, and the rest of the output layer starts at zero. The scale is set so that the
        energies of the cells of the `sample` views (n, L, D, raw) spread by `spread` (std over cells).

        Random f_att gives near-uniform attention, whose gradient reaches each cell's energy scaled by
        alpha = 1/L: on 196 cells the attention never forms (measured: alpha on the evidence cell 0.012
        against 0.007 for uniform, after 10 epochs). Set after `set_map_stats`.
        """
        weight, bias = (torch.as_tensor(x, dtype=self.att_v.weight.dtype) for x in (weight, bias))
        k = len(weight)
        if not self.attention or weight.shape != (k, self.map_channels) or bias.shape != (k,) or k > self.attention_dim:
            raise ValueError(f"init_attention: need weight (k <= {self.attention_dim}, {self.map_channels}), bias (k,)")
        w = weight * self.map_std  # on standardised cells, as att_v is applied
        b = bias + weight @ self.map_mean
        energies = (sample @ weight.T + bias).relu().sum(-1)  # (n, L) at scale 1 (ReLU is homogeneous)
        scale = spread / energies.std(dim=1).mean().clamp_min(1e-12)
        self.att_v.weight[:k] = scale * w
        self.att_v.bias[:k] = scale * b
        self.att_out.weight.zero_()
        self.att_out.weight[0, :k] = 1.0
        self.att_out.bias.zero_()
        return self

    def _standardize(self, x: Tensor) -> Tensor:
        """(..., D) map features in map-statistics units."""
        return (x - self.map_mean) / self.map_std

    def project(self, maps: Tensor) -> Tensor:
        """W_v applied to the standardised cells (B, L, D) -> (B, L, A), the scaling folded into W_v."""
        w = self.att_v.weight / self.map_std  # (A, D)
        return F.linear(maps, w, self.att_v.bias - w @ self.map_mean)

    def encode(self, maps: Tensor, fr_in: Tensor) -> Encoded:
        """Everything that depends on the sample only: computed once, shared by all steps and beams.

        `maps` stays raw; `mean` (the no-attention context and the input of h0, c0) is standardised, and
        `proj` = W_v applied to the standardised cells.
        """
        self._check_inputs(maps, fr_in)
        mean = self._standardize(maps.mean(dim=1))  # (B, D)
        proj = self.project(maps) if self.attention else None  # (B, L, A)
        fr_logits = self.fr_logits(maps, fr_in)  # (B, C)
        h0 = torch.tanh(self.init_h(mean))  # (B, H)
        c0 = torch.tanh(self.init_c(mean))  # (B, H)
        return Encoded(maps, proj, mean, torch.sigmoid(fr_logits), fr_logits, h0, c0)

    def fr_logits(self, maps: Tensor, fr_in: Tensor) -> Tensor:
        """f_R: the paper's last FC layer on the standardised `fr_in`, or a class-attention module (csra,
        mldecoder) over the raw cells with `fr_in` its HOG input: (B, C) logits."""
        if isinstance(self.fr, nn.Linear):
            return self.fr((fr_in - self.fr_mean) / self.fr_std)
        return self.fr(maps, fr_in)[0]

    def step(
        self, enc: Encoded, h: Tensor, c: Tensor, v_pred: Tensor, y_prev: Tensor, live: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One time step for K paths per sample: h, c (B, K, H); v_pred, y_prev (B, K, C).

        Returns logits (B, K, C), the new h and c (B, K, H), and alpha (B, K, L). The encoder tensors are
        broadcast over the K paths, never copied. With `live` (B, K) bool, the LSTM and f_pred run on the
        live paths only (beam search); the other paths get zeros.
        """
        B, K, H = h.shape
        if self.attention:
            e = self._energies(enc.proj, self.att_h(h))  # (B, K, L)
            alpha = torch.softmax(e, dim=-1, dtype=torch.promote_types(e.dtype, torch.float32))  # (B, K, L)
            z = self._standardize(torch.einsum("bkl,bld->bkd", alpha.to(enc.maps.dtype), enc.maps))  # (B, K, D)
        else:
            L = enc.maps.shape[1]
            alpha = enc.mean.new_full((B, K, L), 1.0 / L)  # (B, K, L)
            z = enc.mean[:, None].expand(B, K, -1)  # (B, K, D)
        x = torch.cat([v_pred, z.to(v_pred.dtype), y_prev.to(v_pred.dtype)], dim=-1)  # (B, K, C + D + C)
        x = x.reshape(B * K, -1)
        h, c = h.reshape(B * K, H), c.reshape(B * K, H)
        if live is None:
            h, c = self.lstm(x, (h, c))  # (B*K, H) each
            logits = self.pred(h)  # (B*K, C)
        else:
            rows = live.reshape(-1).nonzero().squeeze(1)  # (N,) live paths
            h_live, c_live = self.lstm(x[rows], (h[rows], c[rows]))  # (N, H) each
            logits = self.pred(h_live)  # (N, C)
            h, c, logits = (y.new_zeros(B * K, y.shape[1]).index_copy_(0, rows, y) for y in (h_live, c_live, logits))
        logits = logits.view(B, K, -1)
        if self.residual:
            logits = logits + enc.fr_logits[:, None].to(logits.dtype)
        return logits, h.view(B, K, H), c.view(B, K, H), alpha

    def _energies(self, proj: Tensor, hid: Tensor) -> Tensor:
        """e = w . ReLU(proj + hid) + b2 for proj (B, L, A) and hid (B, K, A): (B, K, L).

        On the CPU the (B, K, L, A) intermediate is built a few samples at a time: a cache-sized block is
        added, rectified and reduced while it is hot, instead of three passes over one huge fresh tensor.
        """
        B, K, A = hid.shape
        n = max(1, CPU_BLOCK // (K * proj.shape[1] * A)) if proj.device.type == "cpu" else B
        if n >= B or torch.is_grad_enabled():  # autograd keeps every block anyway
            return torch.cat([
                self.att_out((proj[i : i + n, None] + hid[i : i + n, :, None]).relu_()).squeeze(-1)  # (n, K, L)
                for i in range(0, B, n)
            ])
        buf = proj.new_empty((n, K, proj.shape[1], A))  # reused: fresh memory costs a page fault per page
        out = []
        for i in range(0, B, n):
            act = torch.add(proj[i : i + n, None], hid[i : i + n, :, None], out=buf[: min(n, B - i)])
            out.append(self.att_out(act.relu_()).squeeze(-1))  # (n, K, L)
        return torch.cat(out)

    def loss(
        self,
        maps: Tensor,
        fr_in: Tensor,
        targets: Tensor,
        pos_weight: Tensor | None,
        *,
        steps: int,
        pool: str = "predicted",
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Algorithm 2, batched over samples: the mean over T = `steps` steps of the weighted BCE of p_t
        (or of `criterion(logits (B, C), targets (B, C))`, e.g. the head's ASL or focal loss).

        pool="predicted" (the paper): l_t is the argmax of p_t over the labels not yet emitted.
        pool="truth" (the order-free RNN's ablation): over the true labels not yet emitted; once a
        sample has emitted all of them, over all labels not yet emitted.
        Either way the BCE is taken against the whole label vector, in float32 at least (safe under
        autocast).
        """
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        B, C = targets.shape
        if not 1 <= steps <= C:
            raise ValueError(f"steps must be in [1, n_labels={C}], got {steps}")
        enc = self.encode(maps, fr_in)
        dtype = torch.promote_types(enc.v_prob.dtype, torch.float32)  # float32 under autocast
        y = targets.to(dtype)  # (B, C)
        weight = None if pos_weight is None else pos_weight.to(dtype)  # (C,)
        h, c = enc.h0[:, None], enc.c0[:, None]  # (B, 1, H)
        v_pred = enc.v_prob[:, None]  # (B, 1, C)
        emitted = torch.zeros_like(y, dtype=torch.bool)  # (B, C) y~_{t-1}
        total = y.new_zeros(())
        for _ in range(steps):
            logits, h, c, _ = self.step(enc, h, c, v_pred, emitted[:, None])
            logits = logits[:, 0].to(dtype)  # (B, C)
            total = total + (F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight) if criterion is None
                             else criterion(logits, y))
            allowed = candidate_pool(emitted, y > 0.5, pool)  # (B, C)
            label = logits.detach().masked_fill(~allowed, float("-inf")).argmax(dim=1)  # (B,)
            emitted = emitted.scatter(1, label[:, None], True)
            v_pred = torch.sigmoid(logits)[:, None]  # (B, 1, C) p_t, gradient kept
        return total / steps

    def _check_inputs(self, maps: Tensor, fr_in: Tensor) -> None:
        if maps.dim() != 3 or maps.shape[2] != self.map_channels:
            raise ValueError(f"maps must be (B, L, {self.map_channels}), got {tuple(maps.shape)}")
        if fr_in.dim() != 2 or fr_in.shape != (maps.shape[0], self.fr_dim):
            raise ValueError(f"fr_in must be ({maps.shape[0]}, {self.fr_dim}), got {tuple(fr_in.shape)}")


def candidate_pool(emitted: Tensor, truth: Tensor, pool: str) -> Tensor:
    """(B, C) bool: labels l_t may be chosen from. `emitted`, `truth`: (B, C) bool."""
    free = ~emitted
    if pool == "predicted":
        return free
    true_left = truth & free  # (B, C)
    return torch.where(true_left.any(dim=1, keepdim=True), true_left, free)
