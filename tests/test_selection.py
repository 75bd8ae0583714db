import pytest
import torch

from optimum_qap.pruning.selection import dpp_greedy_indices, dpp_kernel, resolve_budget, topk_indices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- resolve_budget --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens,keep_ratio,keep_tokens,expected",
    [
        (576, None, 64, 64),
        (576, 0.5, 32, 32),  # keep_tokens wins
        (576, None, 1000, 576),  # clamped to N
        (576, None, 0, 1),  # at least one
        (256, 0.125, None, 32),  # the paper's 12.5 % of 256
        (576, 0.1, None, 58),  # 57.6
        (5, 0.5, None, 3),  # 2.5 rounds half up
        (10, 0.01, None, 1),  # 0.1 -> at least one
        (7, 1.0, None, 7),
    ],
)
def test_resolve_budget(num_tokens, keep_ratio, keep_tokens, expected):
    assert resolve_budget(num_tokens, keep_ratio, keep_tokens) == expected


@pytest.mark.parametrize(
    "num_tokens,keep_ratio,keep_tokens",
    [(576, None, None), (576, 0.0, None), (576, 1.5, None), (0, 0.5, None), (576, None, -1)],
)
def test_resolve_budget_rejects(num_tokens, keep_ratio, keep_tokens):
    with pytest.raises(ValueError):
        resolve_budget(num_tokens, keep_ratio, keep_tokens)


# ---- topk_indices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_by_hand(device):
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9], device=device)
    # descending, ties by lower index: 1, 4, 0, 2, 3
    assert topk_indices(scores, 1).tolist() == [1]
    assert topk_indices(scores, 2).tolist() == [1, 4]
    assert topk_indices(scores, 3).tolist() == [0, 1, 4]
    assert topk_indices(scores, 9).tolist() == [0, 1, 2, 3, 4]
    assert topk_indices(scores, 3).dtype == torch.long


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_ties_are_stable(device):
    scores = torch.ones(1000, device=device)
    scores[500] = 2.0
    assert topk_indices(scores, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 500]
    assert topk_indices(scores.half(), 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 500]


# ---- dpp_greedy_indices ----------------------------------------------------------------------------


def _brute_force_greedy(features, quality, k):
    """Greedy log-det MAP with explicit determinants of the kernel sub-matrices (float64)."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    kernel = quality.double()[:, None] * (unit @ unit.T) * quality.double()[None, :]
    chosen = []
    for _ in range(k):
        candidates = [j for j in range(len(quality)) if j not in chosen]
        dets = [torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]).item() for j in candidates]
        chosen.append(candidates[max(range(len(dets)), key=dets.__getitem__)])
    return sorted(chosen)


def test_dpp_kernel_by_hand():
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    quality = torch.tensor([0.5, 2.0])
    # cos = [[1, c], [c, 1]], c = 1/sqrt2; L_ij = q_i cos_ij q_j
    c = 2**-0.5
    expected = torch.tensor([[0.25, 1.0 * c], [1.0 * c, 4.0]])
    torch.testing.assert_close(dpp_kernel(features, quality), expected)


@pytest.mark.parametrize(
    "seed,num_tokens,dim,clusters,k", [(0, 12, 16, 3, 6), (1, 14, 32, 2, 9), (2, 16, 8, 4, 5), (4, 24, 12, 4, 10)]
)
def test_dpp_greedy_matches_brute_force(seed, num_tokens, dim, clusters, k):
    # clustered features so redundancy matters (DPP != top-K); k <= dim keeps every det well above 0
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=generator)
    features = centers[torch.arange(num_tokens) % clusters] + 0.3 * torch.randn(num_tokens, dim, generator=generator)
    quality = torch.rand(num_tokens, generator=generator) * 0.8 + 0.2
    got = dpp_greedy_indices(features, quality, k)
    assert got.tolist() == _brute_force_greedy(features, quality, k)
    assert got.tolist() != topk_indices(quality, k).tolist()


def test_dpp_first_pick_is_highest_quality_then_diversity():
    # 0 and 1 point the same way; 2 is orthogonal. Token 0 has the top quality, token 1 is nearly
    # as good but redundant with it, so the DPP takes the weaker but new token 2.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    quality = torch.tensor([1.0, 0.9, 0.3])
    assert dpp_greedy_indices(features, quality, 2).tolist() == [0, 2]
    assert topk_indices(quality, 2).tolist() == [0, 1]


def test_dpp_fills_by_quality_when_gains_vanish():
    # three directions, each twice. Greedy by gain: 0 (.81), 2 (.64), then 5 (.36); 1, 3, 4 are
    # then redundant (gain ~0) and are filled by quality: 3 (.7) before 1 (.5).
    e = torch.eye(3)
    features = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2]])
    quality = torch.tensor([0.9, 0.5, 0.8, 0.7, 0.3, 0.6])
    assert dpp_greedy_indices(features, quality, 5).tolist() == [0, 1, 2, 3, 5]
    assert dpp_greedy_indices(features, quality, 6).tolist() == list(range(6))


def test_dpp_rank_deficient_fills_by_quality():
    # rank-2 features: after two picks every gain is float32 round-off, not information
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(30, 2, generator=generator) @ torch.randn(2, 16, generator=generator)
    quality = torch.rand(30, generator=generator) * 0.8 + 0.2
    first_two = _brute_force_greedy(features, quality, 2)
    rest = quality.clone()
    rest[first_two] = -1.0
    expected = sorted(first_two + torch.sort(rest, descending=True, stable=True).indices[:6].tolist())
    assert dpp_greedy_indices(features, quality, 8).tolist() == expected


def test_dpp_zero_quality_falls_back_to_lowest_indices():
    features = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    assert dpp_greedy_indices(features, torch.zeros(8), 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_dpp_always_returns_k_distinct_sorted(device):
    generator = torch.Generator().manual_seed(4)
    # rank-2 features: only two picks are informative, the rest come from the quality fallback
    features = (torch.randn(40, 2, generator=generator) @ torch.randn(2, 16, generator=generator)).to(device)
    quality = torch.rand(40, generator=generator).to(device)
    for k in (1, 2, 3, 17, 39, 40, 41):
        got = dpp_greedy_indices(features, quality, k)
        assert got.device.type == device and got.dtype == torch.long
        assert len(got) == min(k, 40) == len(set(got.tolist()))
        assert got.tolist() == sorted(got.tolist())
    assert dpp_greedy_indices(features, quality, 0).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpp_half_inputs_computed_in_float32(dtype):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(30, 64, generator=generator).to(dtype)
    quality = torch.rand(30, generator=generator).to(dtype)
    expected = dpp_greedy_indices(features.float(), quality.float(), 8)
    assert dpp_greedy_indices(features, quality, 8).tolist() == expected.tolist()


def test_dpp_is_deterministic_under_exact_ties():
    # four identical tokens with equal quality: every choice is a tie, lower index wins
    features = torch.ones(4, 3)
    quality = torch.ones(4)
    assert dpp_greedy_indices(features, quality, 2).tolist() == [0, 1]
    # two orthogonal pairs, all equal quality: 0 first, then the first token of the other pair
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert dpp_greedy_indices(features, quality, 2).tolist() == [0, 2]
