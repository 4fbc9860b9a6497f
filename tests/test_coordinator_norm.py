"""The coordinator's norm of a tensor list: one float32 pass, float64 only where float32 overflows."""
import math

import torch

from heloco_p2p.roles.commit_state import tensor_norm


def test_norm_by_hand():
    assert tensor_norm([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]) == 13.0


def test_norm_past_float32_range_is_still_finite_and_exact_enough():
    big = torch.full((1000,), 1e20)  # squares overflow float32; the values themselves are finite
    assert math.isclose(tensor_norm([big]), 1e20 * math.sqrt(1000), rel_tol=1e-6)


def test_norm_of_non_finite_input_is_not_finite():
    assert math.isnan(tensor_norm([torch.tensor([1.0, float("nan")])]))
    assert math.isinf(tensor_norm([torch.tensor([float("inf")])]))


def test_norm_agrees_with_float64_on_a_random_pseudo_gradient():
    g = torch.Generator().manual_seed(0)
    ts = [1e-3 * torch.randn(s, generator=g) for s in ((512, 256), (256,), (1000, 3))]
    exact = math.sqrt(sum(float(torch.sum(t.double() * t.double())) for t in ts))
    assert math.isclose(tensor_norm(ts), exact, rel_tol=1e-5)
