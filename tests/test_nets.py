"""RegistrationNet, SegmentationNet, integrate_velocity and count_parameters (CPU, small volumes)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import deepatlas_cuda as da
from deepatlas.nets import RegistrationNet, SegmentationNet, count_parameters, integrate_velocity

SMALL_REG = dict(enc_channels=(4, 8, 8, 8, 8), dec_channels=(8, 8, 8, 8, 4))


def smooth_field(shape, amplitude, dtype=torch.float64):
    """A random smooth displacement [1, 3, *shape]: coarse noise upsampled trilinearly, max |u| = amplitude."""
    coarse = torch.randn(1, 3, 3, 3, 3, dtype=dtype)
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return field * amplitude / field.abs().max()


def images(n=2, size=16, dtype=torch.float32):
    return torch.rand(n, 1, size, size, size, dtype=dtype), torch.rand(n, 1, size, size, size, dtype=dtype)


def test_registration_net_starts_at_identity_and_gradients_flow():
    net = RegistrationNet()
    moving, fixed = images()
    ddf = net(moving, fixed)
    assert ddf.shape == (2, 3, 16, 16, 16)
    assert ddf.abs().max() < 1e-3
    loss = (da.warp(moving, ddf) - fixed).square().mean() + ddf.square().mean()
    loss.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert net.flow.weight.grad.abs().sum() > 0
    assert net.encoder[0][0].weight.grad.abs().sum() > 0


def test_registration_net_default_widths_and_parameter_count():
    net = RegistrationNet()
    assert [block[0].out_channels for block in net.encoder] == [16, 32, 32, 32, 32]
    assert [block[0].out_channels for block in net.decoder] == [32, 32, 32, 32]
    assert [block[0].out_channels for block in net.refine] == [16, 16]
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
    net.flow.weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == count_parameters(net) - net.flow.weight.numel()


def test_registration_net_rejects_bad_shapes():
    net = RegistrationNet(**SMALL_REG)
    with pytest.raises(ValueError, match=r"divisible by 16.*\(1, 1, 16, 24, 16\)"):
        net(torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16))
    with pytest.raises(ValueError, match="moving must be"):
        net(torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="dec_channels"):
        RegistrationNet(enc_channels=(4, 8, 8), dec_channels=(8,))
    shallow = RegistrationNet(enc_channels=(4, 8, 8), dec_channels=(8, 8, 4))  # 2 levels: divisible by 4
    assert shallow(*images(1, 12)).shape == (1, 3, 12, 12, 12)


def test_integrate_velocity_of_small_field_is_close_to_the_field():
    velocity = smooth_field((16, 16, 16), 0.3)
    displacement = integrate_velocity(velocity, 7)
    # exp(v) = v + O(|v| |grad v|): a small smooth field is nearly its own exponential.
    assert (displacement - velocity).abs().max() < 0.05 * velocity.abs().max()
    assert torch.equal(integrate_velocity(velocity, 0), velocity)
    assert integrate_velocity(torch.zeros_like(velocity), 7).abs().max() == 0


def test_integrate_velocity_inverse_consistency():
    velocity = smooth_field((16, 16, 16), 2.0)
    forward, backward = integrate_velocity(velocity, 7), integrate_velocity(-velocity, 7)
    composed = forward + da.warp(backward, forward)  # displacement of exp(-v) o exp(v): ~ 0
    interior = composed[..., 3:-3, 3:-3, 3:-3]
    assert interior.abs().max() < 0.1
    assert interior.abs().max() < 0.1 * forward.abs().max()
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(velocity, -1)


def test_svf_network_integrates_its_velocity():
    net = RegistrationNet(**SMALL_REG, svf=True, integration_steps=5)
    with torch.no_grad():
        net.flow.bias.copy_(torch.tensor([0.5, -0.25, 1.0]))  # a constant velocity integrates to itself
    ddf = net(*images(1))
    expected = torch.tensor([0.5, -0.25, 1.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(ddf, expected.expand_as(ddf), atol=1e-3, rtol=0)


def test_svf_integrates_in_float32_under_autocast():
    """Under autocast the velocity comes out of the last convolution in bfloat16; the scaling and squaring still
    runs in float32 (the CPU ops take no bfloat16)."""
    net = RegistrationNet(**SMALL_REG, svf=True, integration_steps=4)
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.1)
        moving, fixed = images(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ddf = net(moving, fixed)
        net.svf = False  # the same network's velocity, not integrated
        with torch.autocast("cpu", dtype=torch.bfloat16):
            field = net(moving, fixed)
    assert field.dtype == torch.bfloat16 and ddf.dtype == torch.float32
    torch.testing.assert_close(ddf, integrate_velocity(field.float(), 4))


@pytest.mark.parametrize("svf", [False, True])
def test_registration_checkpointing_matches(svf):
    plain = RegistrationNet(**SMALL_REG, svf=svf, integration_steps=3).double()
    with torch.no_grad():
        plain.flow.weight.normal_(0, 0.05)  # a non-trivial output
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    moving, fixed = images(2, 16, torch.float64)
    outputs = []
    for net in (plain, checkpointed):
        net.train()
        ddf = net(moving, fixed)
        (da.warp(moving, ddf) - fixed).square().mean().backward()
        outputs.append(ddf.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("upsample", ["transpose", "trilinear"])
def test_segmentation_net_shapes_and_gradients(norm, upsample):
    net = SegmentationNet(5, channels=(4, 8, 8, 16), norm=norm, upsample=upsample)
    image = torch.rand(2, 1, 16, 16, 8)
    logits = net(image)
    assert logits.shape == (2, 5, 16, 16, 8)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    assert net(image).shape == (2, 5, 16, 16, 8)


def test_segmentation_net_defaults_and_errors():
    net = SegmentationNet(3)
    assert [block[0].out_channels for block in net.down] == [8, 16, 32, 64]
    assert isinstance(net.down[0][1], torch.nn.BatchNorm3d)
    assert SegmentationNet(2, in_channels=2).eval()(torch.rand(1, 2, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"divisible by 8.*\(1, 1, 8, 12, 8\)"):
        net(torch.rand(1, 1, 8, 12, 8))
    with pytest.raises(ValueError, match=r"image must be \[N, 1"):
        net(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="norm"):
        SegmentationNet(3, norm="group")
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationNet(0)


def test_segmentation_checkpointing_matches_including_batchnorm_statistics():
    plain = SegmentationNet(3, channels=(4, 8, 8, 16)).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    image = torch.rand(2, 1, 16, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 16, 16, 16))
    outputs = []
    for net in (plain, checkpointed):
        logits = net(image)
        F.cross_entropy(logits, labels).backward()
        outputs.append(logits.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
