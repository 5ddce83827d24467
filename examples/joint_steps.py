"""DeepAtlas's two training steps written out with the package's networks and losses, for your own training loop.

One labelled moving image and one unlabelled fixed image (synthetic, 32^3, 5 classes). A registration step trains
F_R with F_S frozen, F_S's prediction standing in for the fixed image's missing label; a segmentation step trains
F_S with F_R frozen: the warped manual labels supervise F_S on the fixed image, and the manual labels on the moving
one. `deepatlas train` runs the same steps with the paper's schedule, checkpoints, DDP and mixed precision
(docs/model.md).

    python examples/joint_steps.py
"""

import torch

import deepatlas_cuda as da
from deepatlas.data import stack_subjects, synthetic_subjects
from deepatlas.losses import LocalNCCLoss, anatomy_loss, diffusion_loss, supervised_loss
from deepatlas.metrics import mean_foreground_dice
from deepatlas.nets import RegistrationNet, SegmentationNet

K = 5  # classes, background included


def main(steps: int = 15) -> None:
    torch.manual_seed(0)
    images, labels, _ = stack_subjects(synthetic_subjects(2, shape=(32, 32, 32), num_classes=K, seed=0))
    moving, fixed = images[:1], images[1:]             # [1, 1, D, H, W] float32 in [0, 1]
    moving_labels, fixed_labels = labels[:1], labels[1:]  # [1, 1, D, H, W] int64; fixed_labels only to score
    reg_net = RegistrationNet(enc_channels=(8, 16, 16, 16, 16), dec_channels=(16, 16, 16, 16, 8, 8))
    seg_net = SegmentationNet(K, channels=(8, 16, 16, 32), norm="instance")
    reg_opt = torch.optim.Adam(reg_net.parameters(), lr=2e-3)
    seg_opt = torch.optim.Adam(seg_net.parameters(), lr=2e-3)
    similarity = LocalNCCLoss(window=9)

    for step in range(steps):
        # Registration step: L_i + lambda_r L_r + lambda_a L_a, F_S frozen.
        with torch.no_grad():
            fixed_probs = seg_net(fixed).softmax(1)   # stand-in for the missing fixed label
        ddf = reg_net(moving, fixed)                  # [1, 3, D, H, W], voxels: out[x] = moving[x + ddf[x]]
        reg_loss = (similarity(da.warp(moving, ddf), fixed) + 0.3 * diffusion_loss(ddf)
                    + 0.3 * anatomy_loss(moving_labels, ddf, fixed_probs, K))  # fused: no warped one-hot
        reg_opt.zero_grad()
        reg_loss.backward()
        reg_opt.step()

        # Segmentation step: lambda_a L_a + lambda_sp L_sp, F_R frozen.
        with torch.no_grad():
            ddf = reg_net(moving, fixed)
        seg_loss = (0.3 * anatomy_loss(moving_labels, ddf, seg_net(fixed).softmax(1), K)
                    + supervised_loss(seg_net(moving), moving_labels, ce_weight=1.0))
        seg_opt.zero_grad()
        seg_loss.backward()
        seg_opt.step()
        print(f"step {step:2d}: registration loss {reg_loss.item():.4f}, segmentation loss {seg_loss.item():.4f}")

    with torch.no_grad():
        ddf = reg_net(moving, fixed)
        warped = da.warp_labels(moving_labels, ddf)   # nearest, integer labels in and out
        predicted = seg_net(fixed).argmax(1, keepdim=True)
        folding = da.folding_stats(ddf)["fraction_folded"].item()
    print(f"registration Dice {mean_foreground_dice(moving_labels, fixed_labels, K).item():.3f} before, "
          f"{mean_foreground_dice(warped, fixed_labels, K).item():.3f} after ({100 * folding:.2f}% folding); "
          f"segmentation Dice of the fixed image {mean_foreground_dice(predicted, fixed_labels, K).item():.3f}")


if __name__ == "__main__":
    main()
