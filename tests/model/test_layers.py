"""The U-Net's layers against their formulas: channel LayerNorm and linear attention."""

import torch

from depthdif_hpc.model.layers import ChannelLayerNorm, LinearAttention


def test_channel_layernorm_matches_formula():
    ln = ChannelLayerNorm(6)
    with torch.no_grad():
        ln.g.uniform_(0.5, 2)
        ln.b.uniform_(-1, 1)
    x = torch.randn(2, 6, 5, 7)
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * ln.g + ln.b
    torch.testing.assert_close(ln(x), ref)


def test_linear_attention_against_loops():
    torch.manual_seed(1)
    la = LinearAttention(8, heads=2, dim_head=4)
    x = torch.randn(1, 8, 3, 5)
    qkv = la.to_qkv(x).reshape(1, 3, 2, 4, 15)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out = torch.zeros(1, 2, 4, 15)
    for h in range(2):
        ks = torch.softmax(k[0, h], dim=-1)
        for e in range(4):
            for n in range(15):
                out[0, h, e, n] = sum(
                    sum(ks[d, m] * v[0, h, e, m] for m in range(15)) * q[0, h, d, n] * 4**-0.5
                    for d in range(4)
                )
    ref = la.to_out(out.reshape(1, 8, 3, 5))
    torch.testing.assert_close(la(x), ref, rtol=1e-5, atol=1e-5)
