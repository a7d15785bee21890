"""Tests for patchdiffusion.nets: layers, patching and the U-Net (tiny widths, CPU)."""

import math

import pytest
import torch
from torch import nn

from patchdiffusion.nets import (
    UNET_PRESETS,
    UNet,
    UNetConfig,
    build_unet,
    count_parameters,
    patchify,
    sinusoidal_position_map,
    timestep_embedding,
    unpatchify,
)
from patchdiffusion.nets.layers import AttentionBlock, ResBlock, num_groups

# A few thousand-parameter-scale nets keep the whole file fast on two cores.
TINY = dict(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, head_channels=16,
            attention_resolutions=(4,), resolution=32)


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return build_unet(UNetConfig(**TINY), **overrides)


def randomize_zero_layers(net: nn.Module) -> None:
    """Zero-initialised output convs make every output 0; perturb all parameters so tests see signal."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


# ------------------------------------------------------------------------------------------------
# Layers


def test_timestep_embedding_is_adm_cos_sin():
    t = torch.tensor([0.0, 3.0])
    e = timestep_embedding(t, 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) | sin(0)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert timestep_embedding(t, 7).shape == (2, 7)


def test_num_groups_divides():
    assert num_groups(64) == 32 and num_groups(48) == 24 and num_groups(16) == 16 and num_groups(3) == 3


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_roundtrip_exact(p):
    x = torch.randn(2, 3, 32, 64)
    y = patchify(x, p)
    assert y.shape == (2, 3 * p * p, 32 // p, 64 // p)
    assert torch.equal(unpatchify(y, p), x)


def test_patchify_ordering_documented():
    # Channel c*p*p + i*p + j at (y, x) holds input pixel (p*y + i, p*x + j) of channel c.
    x = torch.randn(1, 3, 8, 8)
    y = patchify(x, 4)
    c, i, j, yy, xx = 2, 1, 3, 1, 0
    assert y[0, c * 16 + i * 4 + j, yy, xx] == x[0, c, 4 * yy + i, 4 * xx + j]


def test_position_map_luhman():
    ch, R = 32, 16
    omega = 64 / R
    pos = sinusoidal_position_map(ch, R, R, omega)
    assert pos.shape == (1, ch, R, R)
    first, second = pos[0, : ch // 2], pos[0, ch // 2 :]
    assert torch.equal(first, first[:, :1, :].expand_as(first))  # constant along each column (over rows)
    assert first.std(dim=2).sum() > 0  # varies with the column index
    assert torch.equal(second, second[:, :, :1].expand_as(second))  # constant along each row (over columns)
    assert second.std(dim=1).sum() > 0  # varies with the row index
    assert torch.all(pos[0, :, 0, 0] == 0)  # sin only: position 0 maps to 0
    half = ch // 2
    k, x = 3, 5
    freq = math.exp(-math.log(10000) * k / (half - 1))
    assert pos[0, k, 0, x].item() == pytest.approx(math.sin(x * omega * freq), abs=1e-6)
    assert pos[0, half + k, x, 0].item() == pytest.approx(math.sin(x * omega * freq), abs=1e-6)
    assert pos[0, 0, 0, 1].item() == pytest.approx(math.sin(omega), abs=1e-6)  # k = 0: frequency 1


def test_resblock_class_gate_is_sigmoid_two_when_zeroed():
    torch.manual_seed(0)
    block = ResBlock(8, emb_dim=12, out_channels=8, class_dim=5)
    randomize_zero_layers(block)
    nn.init.zeros_(block.gate.weight)
    nn.init.zeros_(block.gate.bias)
    gated = {}
    block.out_conv.register_forward_hook(lambda m, i, o: gated.update(h=o))
    x, emb, c = torch.randn(2, 8, 6, 6), torch.randn(2, 12), torch.randn(2, 5)
    out = block(x, emb, c)
    residual = out - x  # identity skip
    assert torch.sigmoid(torch.tensor(2.0)).item() == pytest.approx(0.8808, abs=1e-4)
    assert torch.allclose(residual, gated["h"] * 0.8807970779778823, atol=1e-6)


def test_resblock_resamples_and_changes_channels():
    block = ResBlock(8, emb_dim=4, out_channels=16, down=True)
    assert block(torch.randn(1, 8, 8, 8), torch.randn(1, 4)).shape == (1, 16, 4, 4)
    block = ResBlock(8, emb_dim=4, up=True, use_scale_shift_norm=False)
    assert block(torch.randn(1, 8, 4, 4), torch.randn(1, 4)).shape == (1, 8, 8, 8)


def test_attention_block_matches_manual_softmax():
    torch.manual_seed(0)
    att = AttentionBlock(32, head_channels=16)
    randomize_zero_layers(att)
    x = torch.randn(2, 32, 3, 5)
    B, C, N, n = 2, 32, 15, 2
    q, k, v = att.qkv(att.norm(x).reshape(B, C, N)).chunk(3, dim=1)
    q, k, v = (t.reshape(B, n, C // n, N) for t in (q, k, v))
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(C // n), dim=-1)
    a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(B, C, N)
    expected = x + att.proj_out(a).reshape(B, C, 3, 5)
    assert torch.allclose(att(x), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# U-Net shapes and patching


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_output_shape_equals_input(p):
    net = tiny(patch_size=p)
    for shape in [(2, 3, 64, 64), (1, 3, 32, 64)]:
        x = torch.randn(shape)
        assert net(x, torch.rand(shape[0])).shape == shape


def test_conditioning_inputs():
    net = tiny(patch_size=2, extra_in_channels=2, num_classes=10, embedding_dim=6)
    randomize_zero_layers(net)
    x, extra, e = torch.randn(3, 3, 32, 32), torch.randn(3, 2, 32, 32), torch.randn(3, 6)
    labels = torch.tensor([0, 9, 10])  # 10 = the classifier-free-guidance null label
    out = net(x, torch.rand(3), labels, e, extra)
    assert out.shape == x.shape
    assert torch.allclose(net(x, torch.rand(3) * 0 + 0.3, None, e, extra),
                          net(x, 0.3, torch.full((3,), 10), e, extra))  # None = null label; scalar noise label
    assert not torch.allclose(out, net(x, torch.rand(3), labels, e, torch.zeros_like(extra)))
    with pytest.raises(ValueError, match="extra_channels"):
        net(x, torch.rand(3), labels, e)
    with pytest.raises(ValueError, match="embedding"):
        net(x, torch.rand(3), labels, None, extra)
    with pytest.raises(ValueError, match="class_labels"):
        tiny()(x, torch.rand(3), labels)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_no_conv_at_full_resolution(p):
    net = tiny(patch_size=p, learn_sigma=True, position_map=True)
    H, W = 64, 64
    sides = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: sides.append(inp[0].shape[2:]))
    net(torch.randn(1, 3, H, W), torch.rand(1))
    assert sides and all(max(s) <= H // p for s in sides)


def test_first_and_last_conv_shapes():
    net = tiny(patch_size=4)
    assert net.input_conv.in_channels == 3 * 16 and net.input_conv.out_channels == 16
    assert net.out[-1].out_channels == 3 * 16 and net.out[-1].kernel_size == (3, 3)
    assert torch.all(net.out[-1].weight == 0)  # zero-initialised output conv


def test_bad_size_raises_clear_error():
    net = tiny(patch_size=4)  # divisor 4 * 2**2 = 16
    with pytest.raises(ValueError, match=r"40x64 is not divisible by 16"):
        net(torch.randn(1, 3, 40, 64), torch.rand(1))


def test_attention_placed_at_patched_side():
    # resolution 32, P = 2 -> patched sides 16, 8, 4 per level; attention_resolutions=(8,) -> level 1.
    net = tiny(patch_size=2, attention_resolutions=(8,))
    enc = [any(isinstance(m, AttentionBlock) for m in b) for b in net.encoder]
    assert enc == [False, False, True, False, False]  # level0 res, down, level1 res, down, level2 res


# ------------------------------------------------------------------------------------------------
# Luhman specifics


def test_luhman_time_embedding():
    net = tiny(time_embed_dim=16 * 2)  # model_channels * channel_mult[-1]
    assert net.time_embed[0].in_features == 16 and net.time_embed[0].out_features == 64
    assert net.time_embed[2].out_features == 32
    assert isinstance(net.time_embed[-1], nn.SiLU)  # trailing SiLU
    assert isinstance(net.encoder[0][0].emb_proj[0], nn.Identity)  # blocks project it without another SiLU
    adm = tiny()
    assert adm.time_embed[-1].out_features == 64 and isinstance(adm.encoder[0][0].emb_proj[0], nn.SiLU)


def test_position_map_added_in_unet():
    net = tiny(patch_size=4, position_map=True, resolution=64)
    seen = {}
    net.input_conv.register_forward_hook(lambda m, i, o: seen.update(conv=o))
    net.encoder[0].register_forward_pre_hook(lambda m, args: seen.update(after=args[0]))
    net(torch.randn(1, 3, 64, 64), torch.rand(1))
    expected = sinusoidal_position_map(16, 16, 16, omega=64 / 16)
    assert torch.allclose(seen["after"] - seen["conv"], expected, atol=1e-6)


def test_class_gate_in_unet_uses_null_label_row():
    net = tiny(num_classes=5, class_gate=True)
    assert net.label_embed.num_embeddings == 6 and net.label_embed.embedding_dim == 16  # ch0 wide
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert all(b.gate is not None and b.gate.in_features == 16 for b in blocks)
    out = net(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 5]))
    assert out.shape == (2, 3, 32, 32)


def test_learn_sigma_head():
    net = tiny(patch_size=4, learn_sigma=True, position_map=True, resolution=64)
    randomize_zero_layers(net)
    x = torch.randn(2, 3, 64, 64)
    out = net(x, torch.rand(2))
    assert out.shape == (2, 6, 64, 64)
    v = out[:, 3:]
    assert v.min() >= 0 and v.max() <= 1
    v.sum().backward()
    g = net.input_conv.weight.grad
    assert g is None or torch.all(g == 0)  # the head's input is detached from the trunk
    assert net.var_head[0].weight.grad is not None and net.var_head[0].weight.grad.abs().sum() > 0
    net.zero_grad()
    net(x, torch.rand(2))[:, :3].sum().backward()
    assert net.input_conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Presets, determinism


def test_determinism_same_seed():
    a, b = tiny(patch_size=2), tiny(patch_size=2)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    for net in (a, b):  # same perturbation so the (zero-initialised) outputs carry signal
        torch.manual_seed(1)
        randomize_zero_layers(net)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    assert torch.equal(a(x, t), b(x, t))
    assert a(x, t).abs().sum() > 0


def test_presets_and_build():
    assert set(UNET_PRESETS) >= {"tiny", "small", "adm-256-p4"}
    net = build_unet("tiny")
    assert 0.5e6 <= count_parameters(net) <= 2e6
    cfg = UNetConfig(**UNET_PRESETS["adm-256-p4"])
    assert cfg.patch_size == 4 and cfg.model_channels == 256 and cfg.channel_mult == (1, 1, 2, 2)
    assert cfg.num_res_blocks == 2 and cfg.emb_dim == 256 * 2 and cfg.learn_sigma and cfg.position_map
    with pytest.raises(ValueError, match="Unknown UNet preset"):
        build_unet("nope")
    assert build_unet("tiny", patch_size=2).config.patch_size == 2
    assert UNetConfig(channel_mult=[1, 2]).channel_mult == (1, 2)  # lists from YAML become tuples


def test_patched_flops_match_unpatched_at_internal_size():
    """METHODS.md section 3, test 7: P=4 at 256x256 costs about what P=1 costs at 64x64 (same widths)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(p: int, side: int) -> int:
        with torch.device("meta"):
            net = build_unet(UNetConfig(**TINY), model_channels=32, num_res_blocks=2, patch_size=p,
                             resolution=side, learn_sigma=True, position_map=True)
            x, t = torch.randn(2, 3, side, side), torch.rand(2)
        with FlopCounterMode(display=False) as counter:
            net(x, t).sum().backward()
        return counter.get_total_flops()

    base = flops(1, 64)
    assert 1.0 < flops(4, 256) / base < 1.15  # slightly more: the first conv sees 48 channels, the heads emit 48
    assert flops(1, 256) / base > 15  # without patching, 16x the pixels
