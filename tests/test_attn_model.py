"""AttnRNN: shapes, attention, the once-per-sample encoder projection, and Algorithm 2 against a slow loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from imet.heads.attn_model import AttnRNN

B, L, D, C, FR = 5, 6, 8, 7, 10


def tiny(seed: int = 0, *, dtype=torch.float64, attention: bool = True, dropout: float = 0.0, **sizes):
    """A tiny model with spread-out weights (so argmaxes are far from ties) and matching random inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = dict(n_labels=C, map_channels=D, fr_dim=FR, hidden=12, attention_dim=9, pred_dim=11) | sizes
    model = AttnRNN(**cfg, dropout=dropout, attention=attention).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.6)
    b, n = 5, cfg["n_labels"]
    maps = torch.randn(b, L, cfg["map_channels"], generator=g, dtype=dtype)
    fr_in = torch.randn(b, cfg["fr_dim"], generator=g, dtype=dtype)
    targets = (torch.rand(b, n, generator=g) < 0.3).to(dtype)
    targets[0] = 0  # no true label at all
    targets[1] = 0
    targets[1, 2] = 1  # a single true label
    pos_weight = torch.rand(n, generator=g, dtype=dtype) * 9 + 1
    return model, maps, fr_in, targets, pos_weight


def slow_loss(model, maps, fr_in, targets, pos_weight, steps: int, pool: str):
    """Algorithm 2 written out one sample at a time, with Python lists for the label sets."""
    n = targets.shape[1]
    total = 0.0
    for b in range(len(maps)):
        enc = model.encode(maps[b : b + 1], fr_in[b : b + 1])
        h, c, v_pred = enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None]
        emitted: list[int] = []
        truth = [j for j in range(n) if targets[b, j] > 0]
        y = targets[b]
        for _ in range(steps):
            y_prev = torch.zeros_like(v_pred)
            y_prev[0, 0, emitted] = 1
            logits, h, c, _ = model.step(enc, h, c, v_pred, y_prev)
            p = torch.sigmoid(logits[0, 0])
            total = total - (pos_weight * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
            pool_ = [j for j in truth if j not in emitted] if pool == "truth" else []
            pool_ = pool_ or [j for j in range(n) if j not in emitted]
            emitted.append(max(pool_, key=lambda j: logits[0, 0, j].item()))
            v_pred = p[None, None]
    return total / (len(maps) * steps)


def test_shapes_and_config_round_trip():
    model, maps, fr_in, targets, pos_weight = tiny(dtype=torch.float32)
    enc = model.encode(maps, fr_in)
    assert enc.maps.shape == (B, L, D) and enc.proj.shape == (B, L, 9) and enc.mean.shape == (B, D)
    assert enc.v_prob.shape == (B, C) and enc.h0.shape == enc.c0.shape == (B, 12)
    K = 3
    h = enc.h0[:, None].expand(B, K, 12)
    v = enc.v_prob[:, None].expand(B, K, C)
    logits, h2, c2, alpha = model.step(enc, h, h, v, torch.zeros_like(v))
    assert logits.shape == (B, K, C) and h2.shape == c2.shape == (B, K, 12) and alpha.shape == (B, K, L)
    loss = model.loss(maps, fr_in, targets, pos_weight, steps=4)
    assert loss.shape == () and torch.isfinite(loss)
    config = json.loads(json.dumps(model.config))
    rebuilt = AttnRNN(**config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode(maps, fr_in).v_prob, enc.v_prob)


def test_bad_inputs_raise():
    model, maps, fr_in, targets, pos_weight = tiny()
    with pytest.raises(ValueError, match="maps must be"):
        model.encode(maps[..., :-1], fr_in)
    with pytest.raises(ValueError, match="fr_in must be"):
        model.encode(maps, fr_in[:-1])
    with pytest.raises(ValueError, match="pool must be one of"):
        model.loss(maps, fr_in, targets, pos_weight, steps=2, pool="oracle")
    with pytest.raises(ValueError, match="steps must be"):
        model.loss(maps, fr_in, targets, pos_weight, steps=C + 1)


@pytest.mark.parametrize("attention", [True, False])
def test_attention_weights(attention):
    model, maps, fr_in, *_ = tiny(attention=attention)
    enc = model.encode(maps, fr_in)
    h = torch.randn(B, 4, 12, dtype=maps.dtype)
    v = torch.rand(B, 4, C, dtype=maps.dtype)
    _, _, _, alpha = model.step(enc, h, h, v, torch.zeros_like(v))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B, 4, dtype=alpha.dtype))
    if attention:
        assert alpha.std(-1).min() > 1e-3  # not uniform
    else:
        assert enc.proj is None and not hasattr(model, "att_v")
        torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / L))


def test_encoder_projection_once_per_sample():
    model, maps, fr_in, targets, pos_weight = tiny()
    calls, project = [], model.project
    model.project = lambda m: (calls.append(m.shape[0]), project(m))[1]
    model.loss(maps, fr_in, targets, pos_weight, steps=5).backward()
    assert calls == [B]  # one call, for the whole batch, over 5 steps


def test_map_statistics_standardise_the_cells_without_copying_them():
    model, maps, fr_in, *_ = tiny()
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(D, generator=g, dtype=maps.dtype) * 50
    std = torch.rand(D, generator=g, dtype=maps.dtype) * 100 + 1
    scaled = tiny()[0].set_map_stats(mean, std)  # the same weights (same seed), other map statistics
    raw = maps * std + mean  # cells whose standardised values are `maps`
    enc, enc_raw = model.encode(maps, fr_in), scaled.encode(raw, fr_in)
    assert enc_raw.maps is raw  # kept as given
    torch.testing.assert_close(enc_raw.proj, enc.proj)
    torch.testing.assert_close(enc_raw.mean, enc.mean)
    h, v = torch.zeros(B, 1, 12, dtype=maps.dtype), enc.v_prob[:, None]
    for a, b in zip(scaled.step(enc_raw, h, h, v, torch.zeros_like(v)), model.step(enc, h, h, v, torch.zeros_like(v)),
                    strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="positive std"):
        model.set_map_stats(mean, std * 0)


def paths_state(K: int):
    """A tiny model, its encoding, a generator and random h, c (B, K, 12) and v_pred (B, K, C) for K paths."""
    model, maps, fr_in, *_ = tiny()
    enc = model.encode(maps, fr_in)
    g = torch.Generator().manual_seed(1)
    h, c = (torch.randn(B, K, 12, generator=g, dtype=maps.dtype) for _ in range(2))
    return model, enc, g, h, c, torch.rand(B, K, C, generator=g, dtype=maps.dtype)


def test_step_with_beams_equals_separate_steps():
    K = 4
    model, enc, g, h, c, v_pred = paths_state(K)
    y_prev = (torch.rand(B, K, C, generator=g) < 0.3).to(v_pred.dtype)
    together = model.step(enc, h, c, v_pred, y_prev)
    for k in range(K):
        alone = model.step(enc, h[:, k : k + 1], c[:, k : k + 1], v_pred[:, k : k + 1], y_prev[:, k : k + 1])
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a[:, k : k + 1], b)


def test_step_on_live_paths_only():
    K = 3
    model, enc, g, h, c, v_pred = paths_state(K)
    live = torch.rand(B, K, generator=g) < 0.6
    full = model.step(enc, h, c, v_pred, torch.zeros_like(v_pred))
    part = model.step(enc, h, c, v_pred, torch.zeros_like(v_pred), live)
    for a, b in zip(full[:3], part[:3], strict=True):
        torch.testing.assert_close(b[live], a[live])
        assert (b[~live] == 0).all()
    torch.testing.assert_close(part[3], full[3])


@pytest.mark.parametrize("pool", ["predicted", "truth"])
@pytest.mark.parametrize("attention", [True, False])
def test_loss_matches_slow_algorithm_2(pool, attention):
    model, maps, fr_in, targets, pos_weight = tiny(attention=attention)
    fast = model.loss(maps, fr_in, targets, pos_weight, steps=5, pool=pool)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    slow = slow_loss(model, maps, fr_in, targets, pos_weight, steps=5, pool=pool)
    slow_grads = torch.autograd.grad(slow, list(model.parameters()))
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b)
    grads = dict(zip((name for name, _ in model.named_parameters()), fast_grads, strict=True))
    assert grads["fr.weight"].abs().sum() > 0  # f_R is trained, through v_pred


def test_loss_pools_differ_and_match_builtin_bce():
    """The two pools pick different labels; one step is exactly BCE-with-logits with pos_weight."""
    model, maps, fr_in, targets, pos_weight = tiny()
    a = model.loss(maps, fr_in, targets, pos_weight, steps=4, pool="predicted")
    b = model.loss(maps, fr_in, targets, pos_weight, steps=4, pool="truth")
    assert not torch.isclose(a, b)
    enc = model.encode(maps, fr_in)
    logits, *_ = model.step(enc, enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None],
                            torch.zeros(B, 1, C, dtype=maps.dtype))
    want = F.binary_cross_entropy_with_logits(logits[:, 0], targets, pos_weight=pos_weight)
    torch.testing.assert_close(model.loss(maps, fr_in, targets, pos_weight, steps=1), want)


def test_init_fr_sets_v_prob():
    model, maps, fr_in, *_ = tiny(dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(C, FR, generator=g), torch.randn(C, generator=g)
    mean, std = torch.randn(FR, generator=g), torch.rand(FR, generator=g) + 0.5
    model.init_fr(w.numpy(), b.numpy(), mean.numpy(), std.numpy())
    want = torch.sigmoid(((fr_in - mean) / std) @ w.T + b)
    torch.testing.assert_close(model.encode(maps, fr_in).v_prob, want)
    with pytest.raises(ValueError, match="weight has shape"):
        model.init_fr(w.T, b, mean, std)
    with pytest.raises(ValueError, match="std must be positive"):
        model.init_fr(w, b, mean, std * 0)


def test_residual_decoder_starts_as_f_r_and_adds_f_pred_to_its_logits():
    torch.manual_seed(0)
    model = AttnRNN(n_labels=C, map_channels=D, fr_dim=FR, hidden=12, attention_dim=9, pred_dim=11, residual=True)
    _, maps, fr_in, *_ = tiny(dtype=torch.float32)
    enc = model.encode(maps, fr_in)
    h, c, v, y = enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None], torch.zeros(len(maps), 1, C)
    logits, h1, *_ = model.step(enc, h, c, v, y)
    torch.testing.assert_close(torch.sigmoid(logits[:, 0]), enc.v_prob)  # f_pred's last layer starts at zero
    with torch.no_grad():
        model.pred[-1].bias.fill_(0.5)
    logits, *_ = model.step(enc, h, c, v, y)
    torch.testing.assert_close(logits[:, 0], enc.fr_logits + 0.5)
    assert AttnRNN(**model.config).residual


def test_training_reduces_loss():
    torch.manual_seed(0)
    model, maps, fr_in, targets, pos_weight = tiny(dtype=torch.float32, n_labels=6)
    targets = (torch.rand(len(maps), 6, generator=torch.Generator().manual_seed(4)) < 0.4).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(maps, fr_in, targets, pos_weight[:6], steps=3)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_finite_under_bf16_autocast():
    model, maps, fr_in, targets, pos_weight = tiny(dtype=torch.float32, dropout=0.5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(maps * 30, fr_in * 30, targets, pos_weight.float(), steps=5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_blocked_energies_equal_the_one_tensor_ones(monkeypatch):
    import imet.heads.attn_model as attn_model

    model, maps, fr_in, *_ = tiny()
    enc = model.encode(maps, fr_in)
    hid = torch.randn(B, 3, 9, dtype=maps.dtype, generator=torch.Generator().manual_seed(2))
    whole = model.att_out((enc.proj[:, None] + hid[:, :, None]).relu()).squeeze(-1)
    monkeypatch.setattr(attn_model, "CPU_BLOCK", 2 * 3 * L * 9)  # two samples a block: B = 5 leaves a short one
    with torch.inference_mode():
        torch.testing.assert_close(model._energies(enc.proj, hid), whole)  # the reused buffer
    torch.testing.assert_close(model._energies(enc.proj, hid), whole)  # under autograd
