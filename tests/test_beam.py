"""Batched beam search and greedy decoding against the slow reference in tests/reference_beam.py."""

from __future__ import annotations

import pytest
import torch
from reference_beam import reference_beam_search

from imet.decode.beam import _best, beam_search, beam_search_rules, greedy_decode
from imet.heads.attn_model import AttnRNN

B, L, D, FR, T = 8, 6, 8, 10, 5
# Thresholds log(gamma f) = SHIFT + per-class noise. For the tiny models below, -inf never stops a path,
# 0 stops every path at step 1, and the middle values stop paths at different steps.
SHIFTS = {"never": float("-inf"), "late": -0.14, "mixed": -0.13, "early": -0.12, "step1": 0.0}


def tiny(seed: int = 0, *, n_labels: int = 9, attention: bool = True, dtype=torch.float64):
    """A tiny model with spread-out weights and matching random inputs (maps, fr_in)."""
    g = torch.Generator().manual_seed(seed)
    model = AttnRNN(n_labels=n_labels, map_channels=D, fr_dim=FR, hidden=16, attention_dim=12, pred_dim=16,
                    attention=attention).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.6)
    maps = torch.randn(B, L, D, generator=g, dtype=dtype)
    fr_in = torch.randn(B, FR, generator=g, dtype=dtype)
    return model, maps, fr_in


def thresholds(shift: float, n_labels: int = 9) -> torch.Tensor:
    noise = torch.randn(n_labels, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return shift + 0.1 * noise


def assert_same_as_reference(result, reference, *, alpha: bool = False, atol: float = 1e-6):
    assert result.labels.shape[0] == len(reference)
    for b, ref in enumerate(reference):
        n = len(ref["labels"])
        assert result.length[b] == n
        assert result.labels[b, :n].tolist() == ref["labels"]
        assert (result.labels[b, n:] == -1).all()
        assert abs(result.score[b].item() - ref["score"]) < atol
        if alpha:
            torch.testing.assert_close(result.alpha[b, :n], ref["alpha"])
            assert (result.alpha[b, n:] == 0).all()


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("beam", [1, 2, 3, 5])
def test_beam_search_matches_reference(beam, shift):
    model, maps, fr_in = tiny()
    log_thr = thresholds(SHIFTS[shift])
    result = beam_search(model, maps, fr_in, beam=beam, steps=T, log_threshold=log_thr, return_alpha=True)
    reference = reference_beam_search(model, maps, fr_in, beam=beam, steps=T, log_threshold=log_thr)
    assert_same_as_reference(result, reference, alpha=True)
    if shift == "never":
        assert (result.length == T).all()
    if shift == "step1":
        assert (result.length == 1).all()


@pytest.mark.parametrize("beam", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_many_stop_rules_in_one_search_match_separate_searches(beam, seed):
    """gamma tuned in one decode: every rule's answer is the slow reference's for that rule alone."""
    model, maps, fr_in = tiny(seed)
    shifts = [-0.3, *SHIFTS.values(), -0.125, -0.135]
    rules = torch.stack([thresholds(shift) for shift in shifts])
    results = beam_search_rules(model, maps, fr_in, beam=beam, steps=T, log_thresholds=rules, return_alpha=True)
    assert len(results) == len(shifts)
    for result, log_thr in zip(results, rules, strict=True):
        reference = reference_beam_search(model, maps, fr_in, beam=beam, steps=T, log_threshold=log_thr)
        assert_same_as_reference(result, reference, alpha=True)
    assert len({tuple(r.length.tolist()) for r in results}) > 3  # the rules do decode differently


def test_thresholds_stop_paths_mid_way():
    """Guard for the test above: the middle thresholds do stop paths after 1 and before T labels."""
    model, maps, fr_in = tiny()
    lengths = set()
    for shift in ("late", "mixed", "early"):
        for beam in (1, 2, 3, 5):
            result = beam_search(model, maps, fr_in, beam=beam, steps=T, log_threshold=thresholds(SHIFTS[shift]))
            lengths |= set(result.length.tolist())
    assert {1, 2, 4, T} <= lengths


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("attention", [True, False])
def test_other_models_match_reference(seed, attention):
    model, maps, fr_in = tiny(seed, attention=attention)
    for shift in (-0.2, -0.12, -0.08):
        log_thr = thresholds(shift)
        result = beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=log_thr, return_alpha=True)
        reference = reference_beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=log_thr)
        assert_same_as_reference(result, reference, alpha=True)


def test_float32_matches_reference():
    model, maps, fr_in = tiny(dtype=torch.float32)
    log_thr = thresholds(-0.12)
    result = beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=log_thr)
    reference = reference_beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=log_thr)
    assert_same_as_reference(result, reference, atol=1e-5)


@pytest.mark.parametrize("shift", SHIFTS)
def test_beam_1_equals_greedy(shift):
    model, maps, fr_in = tiny()
    log_thr = thresholds(SHIFTS[shift])
    beam = beam_search(model, maps, fr_in, beam=1, steps=T, log_threshold=log_thr, return_alpha=True)
    greedy = greedy_decode(model, maps, fr_in, steps=T, log_threshold=log_thr, return_alpha=True)
    for a, b in zip(beam, greedy, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shift", [float("-inf"), -0.12, 0.0])
def test_fewer_labels_than_beams(shift):
    model, maps, fr_in = tiny(n_labels=3)
    log_thr = thresholds(shift, n_labels=3)
    result = beam_search(model, maps, fr_in, beam=5, steps=T, log_threshold=log_thr, return_alpha=True)
    assert result.labels.shape == (B, T) and (result.length <= 3).all()
    reference = reference_beam_search(model, maps, fr_in, beam=5, steps=T, log_threshold=log_thr)
    assert_same_as_reference(result, reference, alpha=True)
    greedy = greedy_decode(model, maps, fr_in, steps=T, log_threshold=log_thr)
    assert greedy.labels.shape == (B, T) and (greedy.length <= 3).all()


def test_alpha_rows_sum_to_one_and_labels_are_distinct():
    model, maps, fr_in = tiny()
    result = beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=thresholds(-0.12), return_alpha=True)
    assert result.alpha.shape == (B, T, L)
    for b in range(B):
        n = result.length[b]
        torch.testing.assert_close(result.alpha[b, :n].sum(-1), torch.ones(n))
        assert len(set(result.labels[b, :n].tolist())) == n


def test_decode_restores_training_mode_and_projects_once():
    model, maps, fr_in = tiny()
    model.train()
    calls, project = [], model.project
    model.project = lambda m: (calls.append(1), project(m))[1]
    result = beam_search(model, maps.float(), fr_in.float(), beam=3, steps=T, log_threshold=thresholds(-0.12))
    assert model.training and calls == [1]
    assert result.labels.dtype == torch.long and result.score.dtype == torch.float32 and result.alpha is None
    with pytest.raises(ValueError, match="log thresholds must have 9 per rule"):
        beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=torch.zeros(4))


def test_decode_under_bf16_autocast():
    model, maps, fr_in = tiny(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=thresholds(-0.12), return_alpha=True)
    assert ((result.length >= 1) & (result.length <= T)).all() and torch.isfinite(result.score).all()
    torch.testing.assert_close(result.alpha.sum(-1)[:, 0], torch.ones(B), atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_decode_alike():
    model, maps, fr_in = tiny()
    log_thr = thresholds(-0.12)
    cpu = beam_search(model, maps, fr_in, beam=3, steps=T, log_threshold=log_thr, return_alpha=True)
    cuda = beam_search(model.cuda(), maps, fr_in, beam=3, steps=T, log_threshold=log_thr, return_alpha=True)
    assert cuda.labels.is_cuda
    assert torch.equal(cpu.labels, cuda.labels.cpu()) and torch.equal(cpu.length, cuda.length.cpu())
    torch.testing.assert_close(cpu.score, cuda.score.cpu())
    torch.testing.assert_close(cpu.alpha, cuda.alpha.cpu())
    greedy = greedy_decode(model, maps.cuda(), fr_in.cuda(), steps=T, log_threshold=log_thr.cuda())
    assert torch.equal(greedy.labels.cpu(), beam_search(model.cpu(), maps, fr_in, beam=1, steps=T,
                                                       log_threshold=log_thr).labels)


def test_top_successors_break_ties_like_a_stable_sort():
    g = torch.Generator().manual_seed(5)
    succ = torch.randint(0, 4, (50, 12), generator=g).double()  # many ties
    succ[torch.rand(50, 12, generator=g) < 0.3] = float("-inf")
    succ[0] = float("-inf")
    for width in (1, 3, 5, 12):
        value, index = _best(succ, width)
        want_value, want_index = succ.sort(dim=1, descending=True, stable=True)
        assert torch.equal(value, want_value[:, :width])
        finite = torch.isfinite(value)  # the order of the -inf ones does not matter: they are never kept
        assert torch.equal(index[finite], want_index[:, :width][finite])
    distinct = torch.randn(50, 12, generator=g, dtype=torch.float64)
    value, index = _best(distinct, 4)
    assert torch.equal(index, distinct.sort(dim=1, descending=True).indices[:, :4])


@pytest.mark.parametrize("beam", [2, 3])
def test_tied_successors_at_the_cut_decode_as_the_reference(beam):
    """Equal label probabilities straddling the beam's cut (as quantised features give): every rule's answer is
    the reference's, which breaks ties by parent rank, then label index."""
    model, maps, fr_in = tiny(4)
    with torch.no_grad():  # p_t from the bias alone: labels 0-3 tie, 4-8 tie below them
        model.pred[-1].weight.zero_()
        model.pred[-1].bias.copy_(torch.tensor([1.0] * 4 + [-1.0] * 5, dtype=model.pred[-1].bias.dtype))
    rules = torch.stack([thresholds(shift) for shift in (-2.0, -0.9, -0.2)])
    results = beam_search_rules(model, maps, fr_in, beam=beam, steps=T, log_thresholds=rules)
    for result, log_thr in zip(results, rules, strict=True):
        reference = reference_beam_search(model, maps, fr_in, beam=beam, steps=T, log_threshold=log_thr)
        assert_same_as_reference(result, reference)


def test_no_samples_give_an_empty_result():
    model, maps, fr_in = tiny()
    for result in (beam_search(model, maps[:0], fr_in[:0], beam=3, steps=T, log_threshold=thresholds(-0.12),
                               return_alpha=True),
                   greedy_decode(model, maps[:0], fr_in[:0], steps=T, log_threshold=thresholds(-0.12),
                                 return_alpha=True)):
        assert result.labels.shape == (0, T) and result.length.shape == (0,) and result.alpha.shape[:2] == (0, T)
