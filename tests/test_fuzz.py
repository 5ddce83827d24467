"""Property-based fuzzing of every op against its plain-PyTorch oracle (deepatlas_cuda.reference, or
torch.nn.functional.grid_sample): random small shapes (every spatial size 1..7, N 1..2, C 1..3), float32 and float64,
non-contiguous inputs, every mode / padding / align_corners, and coordinates or displacements that are NaN, +-inf,
huge (1e30) or tiny (1e-30). Forward values and gradients are compared wherever the oracle is defined; the
documented rules cover the rest: a NaN location samples 0 and gets gradient 0; +-inf is clamped to the edge under
border padding (as torch) and samples 0 otherwise.

Hypothesis draws the shapes, options and a seed; the tensors come from a torch generator seeded with it, with
special values written into a drawn fraction of the entries. Runs are derandomized (the same examples every run).
Examples per test: EXAMPLES[name] (recorded in docs/reliability.md), times DEEPATLAS_FUZZ_EXAMPLES (default 1)
for a longer run, e.g. DEEPATLAS_FUZZ_EXAMPLES=20.
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import deepatlas_cuda as da
from deepatlas_cuda import reference

SCALE = int(os.environ.get("DEEPATLAS_FUZZ_EXAMPLES", "1"))
EXAMPLES = {
    "grid_sample": 300,
    "warp": 300,
    "warp_labels_nearest": 200,
    "warp_labels_soft": 200,
    "warped_dice": 200,
    "jacobian_det": 240,
    "folding_stats": 80,
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
FLOATS = [torch.float32, torch.float64]
LABEL_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
LAYOUTS = ["contiguous", "channels_last", "strided", "permuted"]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e8, -1e8, 1e-30, -1e-30, 1e-40, 0.0]
# Displacements beyond this many voxels are "huge": under reflection padding the plain pipeline's normalise /
# unnormalise round trip moves them by more than a voxel, so the pipeline is no oracle there.
REFLECTION_LIMIT = 1e3


def fuzz(name):
    """Hypothesis settings for one op: EXAMPLES[name] * DEEPATLAS_FUZZ_EXAMPLES examples, reproducible."""
    return settings(max_examples=EXAMPLES[name] * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


sizes = st.integers(1, 7)
spatial_shapes = st.tuples(sizes, sizes, sizes)
seeds = st.integers(0, 2**31 - 1)
special_fractions = st.sampled_from([0.0, 0.05, 0.3, 1.0])


def layout(t, kind):
    """The same values as ``t`` in another memory layout; all but "contiguous" give non-contiguous tensors when
    the shape allows it (channels_last_3d for 5-D, every other element of a larger buffer, a permuted buffer)."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if kind == "strided":
        big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    order = list(reversed(range(t.dim())))  # "permuted": stored with the axes reversed, viewed in the usual order
    return t.permute(order).contiguous().permute(order)


def with_specials(values, fraction, generator, pool=SPECIAL):
    """``values`` (float64) with about ``fraction`` of the entries replaced by values drawn from ``pool``."""
    if fraction == 0:
        return values
    chosen = torch.rand(values.shape, generator=generator, dtype=torch.float64) < fraction
    picks = torch.tensor(pool, dtype=torch.float64)[torch.randint(len(pool), values.shape, generator=generator)]
    return torch.where(chosen, picks, values)


def nan_points(coords, dim):
    """Locations with a NaN in any of their coordinates (``dim``: the coordinate axis)."""
    return torch.isnan(coords).any(dim)


def assert_close_where(actual, expected, where, dtype, **scale):
    """actual == expected (to the dtype's tolerance) on the entries selected by ``where``."""
    torch.testing.assert_close(actual[where], expected[where], **(scale or TOLERANCE[dtype]))


def kinks(ddf):
    """Voxels [N, D, H, W] displaced to within rounding of a voxel centre (x + u an integer: u is zero, tiny or a
    whole number of voxels), where the trilinear weights have a kink: the pipeline's normalise / unnormalise round
    trip may put the location on the other side than warp's direct x + u, and both one-sided derivatives are right.
    ddf gradients are compared everywhere else; huge displacements are outside the volume and are compared."""
    near_integer = (ddf - ddf.round()).abs() < 1e-5
    return (near_integer & (ddf.abs() < 1e6)).any(1)


def pad_size_one_axes(t, replicate):
    """Pad every spatial axis of size 1 by two voxels on each side (zeros, or copies of the slice), so that the
    plain pipeline, which needs sizes > 1, can serve as the oracle; crop_padded undoes it. Two voxels keep the
    parity of indices, so round-half-to-even in nearest mode rounds the same way."""
    for axis in range(2, 5):
        if t.shape[axis] == 1:
            if replicate:
                t = t.repeat_interleave(5, axis)
            else:
                zeros = torch.zeros_like(t).repeat_interleave(2, axis)
                t = torch.cat([zeros, t, zeros], axis)
    return t


def crop_padded(t, spatial):
    for axis, size in enumerate(spatial, start=2):
        if size == 1:
            t = t.narrow(axis, 2, 1)
    return t


def warp_oracle(image, ddf, mode, padding):
    """reference.warp, also for spatial sizes of 1 (where warp samples at x + u like every other axis)."""
    spatial = ddf.shape[2:]
    if min(spatial) > 1:
        return reference.warp(image, ddf, mode, padding)
    image = pad_size_one_axes(image, replicate=padding != "zeros")
    return crop_padded(reference.warp(image, pad_size_one_axes(ddf, replicate=True), mode, padding), spatial)


def random_ddf(generator, n, spatial, dtype, scale, fraction, nearest=False):
    """A displacement field [N, 3, D, H, W] in voxels, uniform in [-scale, scale] plus special values. With
    ``nearest`` the finite moderate values are moved off the round-half ties (fractional part in [-0.4, 0.4])."""
    ddf = (torch.rand(n, 3, *spatial, generator=generator, dtype=torch.float64) * 2 - 1) * scale
    if nearest:
        ddf = ddf.round() + (torch.rand(ddf.shape, generator=generator, dtype=torch.float64) - 0.5) * 0.8
    return with_specials(ddf, fraction, generator).to(dtype)


def one_hot(labels, num_classes, dtype):
    return F.one_hot(labels[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(dtype)


@fuzz("grid_sample")
@given(n=st.integers(1, 2), c=st.integers(1, 3), spatial=spatial_shapes, out=spatial_shapes,
       dtype=st.sampled_from(FLOATS), mode=st.sampled_from(["bilinear", "nearest"]),
       padding=st.sampled_from(["zeros", "border", "reflection"]), align_corners=st.booleans(),
       input_layout=st.sampled_from(LAYOUTS), grid_layout=st.sampled_from(LAYOUTS),
       spread=st.sampled_from([0.5, 1.1, 3.0]), fraction=special_fractions, seed=seeds)
def test_grid_sample(n, c, spatial, out, dtype, mode, padding, align_corners, input_layout, grid_layout, spread,
                     fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    input = layout(torch.randn(n, c, *spatial, generator=generator, dtype=dtype), input_layout).requires_grad_()
    grid = (torch.rand(n, *out, 3, generator=generator, dtype=torch.float64) * 2 - 1) * spread
    grid = layout(with_specials(grid, fraction, generator).to(dtype), grid_layout).requires_grad_()
    grad_out = torch.randn(n, c, *out, generator=generator, dtype=dtype)

    nan = nan_points(grid, -1)  # [N, D', H', W']
    infinite = torch.isinf(grid).any(-1) & ~nan
    # torch's own answer is the oracle except at NaN points, and at +-inf points outside border padding.
    defined = ~nan
    if padding != "border":
        defined &= ~infinite
    # With align_corners=True, +-inf on an axis of size 1 under border padding samples the only slice (torch's
    # forward too), but torch's backward then drops that point's input gradient; ours stays consistent with the
    # forward, so such points are left out of the input-gradient comparison (docs/reliability.md).
    single = torch.tensor([spatial[2] == 1, spatial[1] == 1, spatial[0] == 1]) & align_corners  # grid's x, y, z
    torch_drops_gradient = (torch.isinf(grid) & single).any(-1)
    masked_grad_out = grad_out * (defined & ~torch_drops_gradient)[:, None]

    ours = da.grid_sample(input, grid, mode, padding, align_corners)
    g_input, g_grid = torch.autograd.grad(ours, (input, grid), masked_grad_out, retain_graph=True)
    full_input, full_grid = torch.autograd.grad(ours, (input, grid), grad_out)
    theirs = F.grid_sample(input, grid, mode, padding, align_corners)
    t_input, t_grid = torch.autograd.grad(theirs, (input, grid), masked_grad_out)

    assert ours.shape == theirs.shape and ours.dtype == dtype
    per_point = ours.movedim(1, -1)  # [N, D', H', W', C]
    assert_close_where(per_point, theirs.movedim(1, -1), defined, dtype)
    assert torch.all(per_point[~defined] == 0)
    assert torch.isfinite(ours).all() and torch.isfinite(full_input).all() and torch.isfinite(full_grid).all()
    torch.testing.assert_close(g_input, t_input, **TOLERANCE[dtype])
    assert_close_where(g_grid, t_grid, defined, dtype)
    assert torch.all(full_grid[nan] == 0)


@fuzz("warp")
@given(n=st.integers(1, 2), c=st.integers(1, 3), spatial=spatial_shapes, dtype=st.sampled_from(FLOATS),
       mode=st.sampled_from(["bilinear", "nearest"]), padding=st.sampled_from(["border", "zeros", "reflection"]),
       broadcast=st.booleans(), image_layout=st.sampled_from(LAYOUTS), ddf_layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([0.5, 3.0, 10.0]), fraction=special_fractions, seed=seeds)
def test_warp(n, c, spatial, dtype, mode, padding, broadcast, image_layout, ddf_layout, scale, fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    image_n = 1 if broadcast else n
    image = torch.randn(image_n, c, *spatial, generator=generator, dtype=dtype)
    image = layout(image, image_layout).requires_grad_()
    ddf = random_ddf(generator, n, spatial, dtype, scale, fraction, nearest=mode == "nearest")
    ddf = layout(ddf, ddf_layout).requires_grad_()
    grad_out = torch.randn(n, c, *spatial, generator=generator, dtype=dtype)

    nan = nan_points(ddf, 1)  # [N, D, H, W]
    defined = ~nan
    if padding == "reflection":
        defined &= ~(ddf.abs() > REFLECTION_LIMIT).any(1)
    masked_grad_out = grad_out * defined[:, None]  # the image gradient gathers from defined points only

    ours = da.warp(image, ddf, mode, padding)
    g_image, g_ddf = torch.autograd.grad(ours, (image, ddf), masked_grad_out, retain_graph=True)
    full_image, full_ddf = torch.autograd.grad(ours, (image, ddf), grad_out)
    theirs = warp_oracle(image, ddf, mode, padding)
    t_image, t_ddf = torch.autograd.grad(theirs, (image, ddf), masked_grad_out)

    assert ours.shape == (n, c, *spatial) and ours.dtype == dtype
    assert_close_where(ours.movedim(1, -1), theirs.movedim(1, -1), defined, dtype)
    assert torch.all(ours.movedim(1, -1)[nan] == 0)
    assert torch.isfinite(ours).all() and torch.isfinite(full_image).all() and torch.isfinite(full_ddf).all()
    torch.testing.assert_close(g_image, t_image, **TOLERANCE[dtype])
    assert_close_where(g_ddf.movedim(1, -1), t_ddf.movedim(1, -1), defined & ~kinks(ddf), dtype)
    assert torch.all(full_ddf.movedim(1, -1)[nan] == 0)


@fuzz("warp_labels_nearest")
@given(n=st.integers(1, 2), spatial=spatial_shapes, label_dtype=st.sampled_from(LABEL_DTYPES),
       dtype=st.sampled_from(FLOATS), broadcast=st.booleans(), labels_layout=st.sampled_from(LAYOUTS),
       ddf_layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([0.5, 3.0, 10.0]), fraction=special_fractions,
       extreme=st.booleans(), padding_value=st.sampled_from(["min", "max", 0, 7]), seed=seeds)
def test_warp_labels_nearest(n, spatial, label_dtype, dtype, broadcast, labels_layout, ddf_layout, scale,
                             fraction, extreme, padding_value, seed):
    generator = torch.Generator().manual_seed(seed)
    info = torch.iinfo(label_dtype)
    low, high = (info.min, info.max) if extreme else (0, 100)
    labels_n = 1 if broadcast else n
    labels = torch.randint(low, high, (labels_n, 1, *spatial), generator=generator, dtype=torch.int64)
    labels = layout(labels.to(label_dtype), labels_layout)
    ddf = layout(random_ddf(generator, n, spatial, dtype, scale, fraction, nearest=True), ddf_layout)
    fill = {"min": info.min, "max": info.max}.get(padding_value, padding_value)

    ours = da.warp_labels(labels, ddf, padding_value=fill)

    # Oracle, exact for every label value: warp the voxel numbers 1..V (float64) with nearest / zeros padding, so
    # that 0 means "outside", then look the labels up.
    volume = torch.arange(1, labels[0].numel() + 1, dtype=torch.float64).reshape(1, 1, *spatial)
    index = warp_oracle(volume.expand(n, -1, -1, -1, -1), ddf.double(), "nearest", "zeros").round().long()
    flat = labels.expand(n, -1, -1, -1, -1).reshape(n, -1)
    looked_up = torch.gather(flat, 1, (index.reshape(n, -1) - 1).clamp_min(0)).reshape(index.shape)
    expected = torch.where(index > 0, looked_up, torch.full_like(looked_up, fill))

    assert ours.dtype == label_dtype and ours.shape == (n, 1, *spatial)
    assert torch.equal(ours, expected)


@fuzz("warp_labels_soft")
@given(n=st.integers(1, 2), spatial=spatial_shapes, num_classes=st.integers(1, 4),
       label_dtype=st.sampled_from(LABEL_DTYPES), dtype=st.sampled_from(FLOATS), broadcast=st.booleans(),
       labels_layout=st.sampled_from(LAYOUTS), ddf_layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([0.5, 3.0, 10.0]), fraction=special_fractions, seed=seeds)
def test_warp_labels_soft(n, spatial, num_classes, label_dtype, dtype, broadcast, labels_layout, ddf_layout, scale,
                          fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (1 if broadcast else n, 1, *spatial), generator=generator)
    labels = layout(labels.to(label_dtype), labels_layout)
    ddf = layout(random_ddf(generator, n, spatial, dtype, scale, fraction), ddf_layout).requires_grad_()
    grad_out = torch.randn(n, num_classes, *spatial, generator=generator, dtype=dtype)

    ours = da.warp_labels(labels, ddf, "soft", num_classes=num_classes)
    (g_ours,) = torch.autograd.grad(ours, ddf, grad_out)

    nan = nan_points(ddf, 1)
    source = one_hot(labels, num_classes, dtype).expand(n, -1, -1, -1, -1)
    theirs = warp_oracle(source, ddf, "bilinear", "zeros")
    (g_theirs,) = torch.autograd.grad(theirs, ddf, grad_out * ~nan[:, None])

    assert ours.shape == (n, num_classes, *spatial) and ours.dtype == dtype
    assert_close_where(ours.movedim(1, -1), theirs.movedim(1, -1), ~nan, dtype)
    assert torch.all(ours.movedim(1, -1)[nan] == 0)
    assert torch.isfinite(g_ours).all()
    assert_close_where(g_ours.movedim(1, -1), g_theirs.movedim(1, -1), ~nan & ~kinks(ddf), dtype)
    assert torch.all(g_ours.movedim(1, -1)[nan] == 0)


@fuzz("warped_dice")
@given(n=st.integers(1, 2), spatial=spatial_shapes, num_classes=st.integers(1, 4),
       label_dtype=st.sampled_from(LABEL_DTYPES), dtype=st.sampled_from(FLOATS), broadcast=st.booleans(),
       probability_target=st.booleans(), include_background=st.booleans(), source_layout=st.sampled_from(LAYOUTS),
       ddf_layout=st.sampled_from(LAYOUTS), target_layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([0.5, 3.0, 10.0]), fraction=special_fractions, seed=seeds)
def test_warped_dice(n, spatial, num_classes, label_dtype, dtype, broadcast, probability_target,
                     include_background, source_layout, ddf_layout, target_layout, scale, fraction, seed):
    assume(include_background or num_classes > 1)
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(0, num_classes, (1 if broadcast else n, 1, *spatial), generator=generator)
    source = layout(source.to(label_dtype), source_layout)
    ddf = layout(random_ddf(generator, n, spatial, dtype, scale, fraction), ddf_layout).requires_grad_()
    if probability_target:
        logits = torch.randn(n, num_classes, *spatial, generator=generator, dtype=dtype)
        target = layout(torch.softmax(logits, 1), target_layout).requires_grad_()
        expected_target = target
    else:
        target = torch.randint(0, num_classes, (n, 1, *spatial), generator=generator)
        target = layout(target.to(label_dtype), target_layout)
        expected_target = one_hot(target, num_classes, dtype)
    inputs = (ddf, target) if probability_target else (ddf,)
    first = 0 if include_background else 1
    grad_out = torch.randn(n, num_classes - first, generator=generator, dtype=dtype)

    ours = da.warped_dice(source, ddf, target, num_classes=num_classes, include_background=include_background)
    g_ours = torch.autograd.grad(ours, inputs, grad_out, allow_unused=True)

    warped = warp_oracle(one_hot(source, num_classes, dtype).expand(n, -1, -1, -1, -1), ddf, "bilinear", "zeros")
    warped = torch.where(nan_points(ddf, 1)[:, None], 0, warped)  # the documented NaN rule, in the oracle
    theirs = reference.soft_dice(warped, expected_target)[:, first:]
    g_theirs = torch.autograd.grad(theirs, inputs, grad_out, allow_unused=True)

    assert ours.shape == (n, num_classes - first) and ours.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours, theirs, **tolerance)
    comparable = (~kinks(ddf)[:, None].expand_as(ddf), torch.ones_like(target, dtype=torch.bool))
    for a, b, where in zip(g_ours, g_theirs, comparable):
        assert torch.isfinite(a).all()
        assert_close_where(a, b, where & torch.isfinite(b), dtype, **tolerance)


def neighbourhood_scale(ddf, width):
    """Per voxel [N, D, H, W]: the largest |displacement| within ``width`` voxels (inf where one is non-finite)."""
    magnitude = torch.where(torch.isfinite(ddf), ddf.abs(), torch.inf).double().amax(1, keepdim=True)
    return F.max_pool3d(magnitude, 2 * width + 1, stride=1, padding=width)[:, 0]


@fuzz("jacobian_det")
@given(n=st.integers(1, 2), spatial=spatial_shapes, dtype=st.sampled_from(FLOATS),
       scheme=st.sampled_from(["central", "forward", "backward"]),
       spacing=st.tuples(*[st.sampled_from([0.25, 1.0, 1.5, 4.0])] * 3), ddf_layout=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([0.5, 3.0, 10.0]), fraction=special_fractions, seed=seeds)
def test_jacobian_det(n, spatial, dtype, scheme, spacing, ddf_layout, scale, fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    ddf = layout(random_ddf(generator, n, spatial, dtype, scale, fraction), ddf_layout).requires_grad_()
    grad_out = torch.randn(n, 1, *spatial, generator=generator, dtype=dtype)

    ours = da.jacobian_det(ddf, spacing, scheme)
    (g_ours,) = torch.autograd.grad(ours, ddf, grad_out)
    theirs = reference.jacobian_det(ddf, spacing, scheme)
    # The reference does not depend on ddf at all when every spatial size is 1.
    g_theirs = torch.autograd.grad(theirs, ddf, grad_out)[0] if theirs.requires_grad else torch.zeros_like(ddf)

    assert ours.shape == (n, 1, *spatial) and ours.dtype == dtype
    # The determinant of I + grad u, computed two ways, agrees to rounding relative to the size of its terms,
    # which grows with the cube of the largest displacement difference in the stencil.
    eps = torch.finfo(dtype).eps
    entry = 1 + 2 * neighbourhood_scale(ddf.detach(), 1) / min(spacing)  # bound on every Jacobian entry
    bound = 16 * eps * entry**3
    comparable = bound < torch.finfo(dtype).max / 2 ** 8  # no overflow in either computation
    difference = (ours[:, 0].double() - theirs[:, 0].double()).abs()
    assert torch.all(difference[comparable] <= bound[comparable]), (difference - bound)[comparable].max()
    # The gradient at a voxel gathers cofactors (quadratic in the entries) from its stencil's neighbours.
    entry = 1 + 2 * neighbourhood_scale(ddf.detach(), 2) / min(spacing)
    bound = 16 * 12 * eps * entry**2 * grad_out.abs().amax() / min(spacing)
    comparable = (bound < torch.finfo(dtype).max / 2 ** 8)[:, None].expand_as(g_ours)
    difference = (g_ours.double() - g_theirs.double()).abs()
    assert torch.all(difference[comparable] <= bound[:, None].expand_as(g_ours)[comparable])


@fuzz("folding_stats")
@given(n=st.integers(1, 2), spatial=spatial_shapes, dtype=st.sampled_from(FLOATS),
       scheme=st.sampled_from(["central", "forward", "backward"]), scale=st.sampled_from([0.3, 1.0, 3.0]),
       fraction=special_fractions, ddf_layout=st.sampled_from(LAYOUTS), seed=seeds)
def test_folding_stats(n, spatial, dtype, scheme, scale, fraction, ddf_layout, seed):
    generator = torch.Generator().manual_seed(seed)
    ddf = layout(random_ddf(generator, n, spatial, dtype, scale, fraction), ddf_layout)
    voxels = spatial[0] * spatial[1] * spatial[2]

    stats = da.folding_stats(ddf, scheme=scheme)
    strict = da.folding_stats(ddf, scheme=scheme, strict=True)

    for result in (stats, strict):
        assert result["num_folded"].shape == (n,) and result["num_folded"].dtype == torch.int64
        assert torch.all((0 <= result["num_folded"]) & (result["num_folded"] <= voxels))
        broken = result["num_nonfinite"] > 0
        assert torch.all(result["fraction_folded"][broken].isnan() & result["std_log_det"][broken].isnan())
        torch.testing.assert_close(result["fraction_folded"][~broken], result["num_folded"][~broken].to(dtype) / voxels)
        assert torch.all(result["std_log_det"][~broken] >= 0)
    assert torch.all(strict["num_folded"] >= stats["num_folded"])  # strict also counts every det <= 0 voxel
    assert torch.equal(stats["num_nonfinite"], (~da.jacobian_det(ddf, scheme=scheme).isfinite()).flatten(1).sum(1))
    if fraction == 0:  # all finite: the count agrees with the reference determinant away from det = 0
        det = reference.jacobian_det(ddf, scheme=scheme).flatten(1).double()
        margin = 1e-2 if dtype == torch.float32 else 1e-9
        assert torch.all((det <= -margin).sum(1) <= stats["num_folded"])
        assert torch.all(stats["num_folded"] <= (det <= margin).sum(1))

