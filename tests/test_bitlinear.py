import torch

from model.bitlinear import BitLinear158, quantize_activations, quantize_weights, ternary_codes


def test_hand_computed_case():
    # W: mean|W| = (0.5+0.1+1.5+0.2+0.4+0.3)/6 = 0.5 -> s_w = 2; W*2 = [1,-0.2,3 | -0.4,0.8,0.6]
    # round/clamp -> [1,0,1 | 0,1,1] -> w_q = [0.5,0,0.5 | 0,0.5,0.5]
    w = torch.tensor([[0.5, -0.1, 1.5], [-0.2, 0.4, 0.3]])
    layer = BitLinear158(3, 2, eps=0.0)
    with torch.no_grad():
        layer.weight.copy_(w)
    x = torch.tensor([[3.0, -4.0, 0.0]])
    # rms = sqrt((9+16+0)/3) = sqrt(25/3); x_n = x / rms
    rms = (25 / 3) ** 0.5
    x_n = torch.tensor([3.0, -4.0, 0.0]) / rms
    s_x = 127 / x_n.abs().max()  # max is 4/rms
    x_q = (x_n * s_x).round() / s_x  # [95.25 -> 95, -127, 0] / s_x
    expected = torch.stack([0.5 * x_q[0] + 0.5 * x_q[2], 0.5 * x_q[1] + 0.5 * x_q[2]])
    assert torch.allclose(layer(x)[0], expected, atol=1e-6)
    assert torch.equal((x_n * s_x).round(), torch.tensor([95.0, -127.0, 0.0]))
    assert torch.allclose(quantize_weights(w), torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]))
    codes, s_w = ternary_codes(w)
    assert codes.dtype == torch.int8 and codes.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert abs(float(s_w) - 2.0) < 1e-6


def test_activation_quantiser_is_per_token_int8():
    x = torch.randn(4, 7, 33)
    q = quantize_activations(x)
    scale = 127 / x.abs().amax(-1, keepdim=True)
    ints = q * scale
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert ints.abs().max() <= 127.001
    # the largest entry of every token maps to exactly +-127
    assert torch.allclose(ints.abs().amax(-1), torch.full((4, 7), 127.0), atol=1e-3)


def test_weights_are_ternary_times_one_scale():
    w = torch.randn(16, 24)
    q = quantize_weights(w)
    s_w = 1 / w.abs().mean()
    assert set((q * s_w).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(q * s_w, (q * s_w).round(), atol=1e-5)


def test_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear158(8, 5)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    # STE: d y / d W = x_n^T-ish through the quantiser as identity -> grad(W) = sum_tokens x_q (forward value)
    with torch.no_grad():
        x32 = x.detach()
        x_n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + layer.eps)
        x_q = quantize_activations(x_n)
        expected_w_grad = torch.ones(3, 5).T @ x_q
        w_q = quantize_weights(layer.weight)
    assert torch.allclose(layer.weight.grad, expected_w_grad, atol=1e-5)
    # gradient w.r.t. x flows as if quantisation were the identity: d/dx sum(rmsnorm(x) @ w_q^T)
    x2 = x.detach().clone().requires_grad_(True)
    x_n2 = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + layer.eps)
    (x_n2 @ w_q.T).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert layer.weight.grad.abs().sum() > 0
