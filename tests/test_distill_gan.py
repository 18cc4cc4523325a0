"""`evcli distill-gan` pieces: generator / discriminator fidelity (parameters, MACs at 256x256), CRD's relational
losses on hand-made tensors, the VGG style terms, GAN losses, the online schedule tables, the image pool and the
built-in / folder data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evcli.data.gan import (
    PAIRED_TRAIN,
    PAIRED_VAL,
    UNPAIRED_TRAIN_A,
    UNPAIRED_TRAIN_B,
    UNPAIRED_VAL_A,
    UNPAIRED_VAL_B,
    PairedDataset,
    Prep,
    UnpairedDataset,
    builtin_paired,
    builtin_unpaired,
    cyclegan_folders,
    pencil_sketch,
    pix2pix_folders,
)
from evcli.errors import DataError
from evcli.methods.distill_gan.cost import count_cost
from evcli.methods.distill_gan.losses import (
    ImagePool,
    columns,
    gan_loss,
    gram,
    pairwise_distances,
    patches,
    relation_losses,
    rkd_loss,
    rows,
    triplet_angles,
)
from evcli.methods.distill_gan.method import make_generator, online_phase, teacher_epoch_decay, teacher_steps_done
from evcli.methods.distill_gan.networks import NLayerDiscriminator, ResnetGenerator, describe_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------------------------
# networks: the card's counts (torchprofile convention, 256x256)


def test_original_cyclegan_generator_has_11_38m_parameters():
    n = _params(ResnetGenerator(64, "resnet"))
    assert abs(n - 11.38e6) / 11.38e6 < 0.02, n
    assert n == 11_378_179  # the CycleGAN ResNet-9 generator, exactly


def test_student_parameters_and_macs_match_the_card():
    cost = count_cost(ResnetGenerator(16, "mobile_resnet"), 256)
    assert abs(cost["params"] - 0.137e6) / 0.137e6 < 0.02, cost
    assert cost["params"] == 137_347
    assert abs(cost["macs"] - 1.41e9) / 1.41e9 < 0.05, cost
    # the card's conv-only count (transposed convs at their true cost): 0.955 G
    assert abs(cost["macs_exact"] - 0.955e9) / 0.955e9 < 0.01, cost


@pytest.mark.slow
def test_original_generator_macs_at_256_match_the_card():
    cost = count_cost(ResnetGenerator(64, "resnet"), 256)
    assert abs(cost["macs"] - 56.8e9) / 56.8e9 < 0.05, cost
    assert abs(cost["macs_exact"] - 49.6e9) / 49.6e9 < 0.01, cost
    reduction = cost["macs"] / count_cost(ResnetGenerator(16, "mobile_resnet"), 256)["macs"]
    assert 38 < reduction < 42  # the card: ~40x


def test_transposed_conv_counted_like_torchprofile():
    m = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1))
    c = count_cost(m, 16, channels=8)
    assert c["macs"] == 32 * 32 * 4 * 8 * 9  # output elements x in-channels x k^2
    assert c["macs_exact"] == 16 * 16 * 8 * 4 * 9  # input elements x out-channels x k^2


def test_mobile_block_structure_and_shapes():
    g = ResnetGenerator(8, "mobile_resnet", n_blocks=3)
    block = g.model[10]
    kinds = [type(m).__name__ for m in block.conv_block]
    assert kinds == [
        "ReflectionPad2d", "SeparableConv2d", "InstanceNorm2d", "ReLU", "Dropout",
        "ReflectionPad2d", "SeparableConv2d", "InstanceNorm2d",
    ]  # fmt: skip
    dw = block.conv_block[1].conv[0]
    assert dw.groups == 32 and dw.kernel_size == (3, 3) and not block.conv_block[2].affine
    y = g(torch.rand(2, 3, 20, 28) * 2 - 1)
    assert y.shape == (2, 3, 20, 28) and y.abs().max() <= 1
    assert describe_generator(g.state_dict()) == ("mobile_resnet", 8, 3)
    assert describe_generator(ResnetGenerator(4, "resnet", 2).state_dict()) == ("resnet", 4, 2)


def test_patchgan_output_and_width():
    d = NLayerDiscriminator(6, ndf=8)
    assert d(torch.rand(1, 6, 64, 64)).shape == (1, 1, 6, 6)  # 70x70 receptive field patches
    assert d.model[0].out_channels == 8 and d.model[-1].in_channels == 64


def test_init_is_normal_0_02():
    w = ResnetGenerator(64, "resnet").model[10].conv_block[1].weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001


# --------------------------------------------------------------------------------------------------
# relational KD


def test_angles_equal_the_direct_definition():
    torch.manual_seed(0)
    x = torch.randn(9, 6, dtype=torch.float64)
    e = F.normalize(x[None] - x[:, None], p=2, dim=2)  # e[i, j] = unit(x_j - x_i)
    direct = torch.bmm(e, e.transpose(1, 2)).reshape(-1)
    assert torch.allclose(triplet_angles(x), direct, atol=1e-12)
    # a right angle: x_i = 0, x_j = e1, x_k = e2
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    a = triplet_angles(pts).reshape(3, 3, 3)
    assert a[0, 1, 2] == pytest.approx(0.0) and a[0, 1, 1] == pytest.approx(1.0) and a[0, 0, 1] == 0


def test_angles_and_rkd_stay_exact_on_near_equal_float32_slices():
    """Rows of a mostly white output: vectors of large norm that differ by 1e-3 or not at all. The Gram-matrix
    angles must still match the direct definition (float32 gave cosines of 1e20 and losses of 1e17 here)."""
    g = torch.Generator().manual_seed(0)
    x = torch.ones(24, 192)
    x[::3] -= 1e-3 * torch.rand(8, 192, generator=g)
    x[5] -= 0.5 * torch.rand(192, generator=g)
    x[7, :40] = -1.0
    x64 = x.double()
    e = F.normalize(x64[None] - x64[:, None], p=2, dim=2)
    direct = torch.bmm(e, e.transpose(1, 2)).reshape(-1)
    angles = triplet_angles(x)
    assert angles.dtype == torch.float32 and torch.allclose(angles.double(), direct, atol=1e-6)
    d = pairwise_distances(x)
    assert d.dtype == torch.float32 and torch.allclose(d.double(), torch.cdist(x64, x64), atol=1e-6)
    student = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert float(rkd_loss(student, x)) < 1.0


def test_distance_matrix_and_normalisation():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    d = pairwise_distances(x)
    assert torch.allclose(d, torch.tensor([[0.0, 5, 10], [5, 0, 5], [10, 5, 0]]))
    # RKD is scale invariant (distances divided by their mean) and zero for identical relations
    assert float(rkd_loss(2.5 * x, x)) == pytest.approx(0.0, abs=1e-6)
    # by hand: student distances [[0,1,1],[1,0,1],[1,1,0]] (mean 1), teacher [[0,5,10],..] / (20/3)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    t_d = d / (d[d > 0].mean())
    s_d = pairwise_distances(s)
    expected_dist = F.smooth_l1_loss(s_d / s_d[s_d > 0].mean(), t_d)
    assert float(rkd_loss(s, x, w_angle=0.0)) == pytest.approx(float(expected_dist), rel=1e-5)
    full = float(rkd_loss(s, x))
    angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(x))
    assert full == pytest.approx(float(expected_dist + 2 * angle), rel=1e-5)  # 1 x distance + 2 x angle


def test_rkd_gradient_flows_to_the_student_only():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    rkd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_slices_rows_columns_patches():
    img = torch.arange(3 * 8 * 12, dtype=torch.float32).reshape(3, 8, 12)
    assert rows(img).shape == (8, 36) and torch.equal(rows(img)[2], img[:, 2, :].reshape(-1))
    assert columns(img).shape == (12, 24) and torch.equal(columns(img)[5], img[:, :, 5].reshape(-1))
    p = patches(img, 4)
    assert p.shape == (6, 48)  # 2 x 3 non-overlapping 4x4x3 patches
    assert torch.equal(p[4], img[:, 4:8, 4:8].reshape(-1))  # row 1, column 1
    assert patches(torch.rand(3, 256, 256), 32).shape == (64, 3072)  # the card: 64 samples of 3072 values
    assert rows(torch.rand(3, 256, 256)).shape == (256, 768)


def test_relation_losses_batch_reduction_and_release_patch_mode():
    torch.manual_seed(1)
    s, t = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    mean = relation_losses(s, t, 8, "mean")
    total = relation_losses(s, t, 8, "sum")
    per_image = [rkd_loss(rows(s[i]), rows(t[i])) for i in range(3)]
    assert float(total["rows"]) == pytest.approx(float(sum(per_image)), rel=1e-5)
    for k in ("rows", "cols", "patch"):
        assert float(total[k]) == pytest.approx(3 * float(mean[k]), rel=1e-5)
    release = relation_losses(s, t, 8, "sum", patch_mode="release_channels")
    first = patches(s[0], 8).reshape(-1, 3, 8, 8)[0], patches(t[0], 8).reshape(-1, 3, 8, 8)[0]
    assert float(release["patch"]) != pytest.approx(float(total["patch"]))
    # the release's "patch" RKD of image 0 is over the 3 channels of one patch
    alone = relation_losses(s[:1], t[:1], 8, "sum", patch_mode="release_channels")["patch"]
    assert float(alone) == pytest.approx(float(rkd_loss(*first)), rel=1e-5)


def test_gram_normalised_by_chw():
    f = torch.ones(1, 2, 3, 4)
    assert torch.allclose(gram(f), torch.full((1, 2, 2), 12.0 / 24.0))


def test_gan_losses_on_hand_values():
    p = torch.tensor([0.5, -1.0])
    assert float(gan_loss(p, True, "lsgan")) == pytest.approx(((0.5 - 1) ** 2 + 4) / 2)
    assert float(gan_loss(p, False, "lsgan")) == pytest.approx((0.25 + 1) / 2)
    assert float(gan_loss(p, True, "hinge")) == pytest.approx((0.5 + 2.0) / 2)
    assert float(gan_loss(p, False, "hinge")) == pytest.approx((1.5 + 0.0) / 2)
    assert float(gan_loss(p, True, "hinge", for_discriminator=False)) == pytest.approx(0.25)


def test_image_pool_keeps_50_and_swaps_half():
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = pool.query(torch.arange(4.0).reshape(4, 1, 1, 1))
    assert torch.equal(first.flatten(), torch.arange(4.0)) and len(pool.images) == 4
    out = pool.query(torch.full((200, 1, 1, 1), 9.0))
    swapped = int((out.flatten() != 9).sum())
    assert 1 <= swapped and len(pool.images) == 4
    state = pool.state()
    again = ImagePool(4)
    again.load(state)
    assert all(torch.equal(a, b) for a, b in zip(again.images, pool.images))


# --------------------------------------------------------------------------------------------------
# schedules


def test_online_cyclegan_phase_table():
    # teacher_phase 2 steps, n_dis 4: 2 teacher steps, then 8 student steps, repeated
    table = "".join("T" if online_phase(s, 2, 4) == "teacher" else "s" for s in range(20))
    assert table == "TTssssssssTTssssssss"
    assert [teacher_steps_done(s, 2, 4) for s in (0, 1, 2, 5, 10, 11, 12, 20)] == [0, 1, 2, 2, 2, 3, 4, 4]
    # the paper: 10 teacher epochs + 40 student epochs per cycle, 1000 epochs = 200 teacher epochs
    assert teacher_steps_done(1000, 10, 4) == 200


def test_teacher_epoch_linear_decay():
    # 100 constant + 100 linear decay (CycleGAN's nepochs / nepochs_decay)
    values = [teacher_epoch_decay(e, 200, 100) for e in (0, 99, 100, 150, 199, 200)]
    assert values == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.01, 0.0])


# --------------------------------------------------------------------------------------------------
# data


def test_builtin_unpaired_domains_are_disjoint_and_val_is_held_out():
    names = [set(UNPAIRED_TRAIN_A), set(UNPAIRED_TRAIN_B), set(UNPAIRED_VAL_A), set(UNPAIRED_VAL_B)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not names[i] & names[j]
    assert not set(PAIRED_VAL) & set(PAIRED_TRAIN)
    data = builtin_unpaired(16, 18, seed=0, samples=5)
    s = data.train[(0, 3)]
    assert s["A"].shape == (3, 16, 16) and s["B"].shape == (3, 16, 16)
    assert s["A"].min() >= -1 and s["A"].max() <= 1
    assert torch.equal(data.train[(0, 3)]["A"], s["A"]) and not torch.equal(data.train[(1, 3)]["A"], s["A"])
    b = (s["B"] + 1) / 2  # a pencil sketch: grey lines on white
    assert torch.equal(b[0], b[2]) and float(b.mean()) > 0.6
    assert len(data.val) == 10
    # every photo of each domain at 18, 36 and 72 px cut into 18 px tiles; the short epoch draws A at random
    assert len(data.train.a) == 21 * len(UNPAIRED_TRAIN_A) and len(data.train.b) == 21 * len(UNPAIRED_TRAIN_B)


def test_builtin_paired_is_photo_to_sketch_on_multiscale_tiles():
    data = builtin_paired(16, 18, seed=0, samples=4)
    s = data.val[(0, 0)]
    photo, sketch = (s["A"] + 1) / 2, (s["B"] + 1) / 2
    assert not torch.equal(photo[0], photo[2])  # a colour photo
    assert torch.allclose(sketch, pencil_sketch(photo), atol=1e-6)
    assert torch.equal(sketch[0], sketch[2]) and float(sketch.mean()) > 0.6  # grey lines on white
    assert len(data.val) == 10 and len(data.train) == 4
    # every package photo at 18, 36 and 72 px cut into 18 px tiles: 1 + 4 + 16 tiles each
    assert len(data.train.items) == 21 * len(PAIRED_TRAIN)
    assert torch.equal(data.train[(3, 1)]["B"], data.train[(3, 1)]["B"])


def test_unpaired_epochs_shorter_than_a_draw_from_all_of_it():
    a = [torch.full((3, 18, 18), k / 100) for k in range(20)]  # A image k is the constant k / 100
    b = [torch.zeros(3, 18, 18)]
    short = UnpairedDataset(a, b, Prep(16, 18, True), seed=0, length=4)
    drawn = {round(float(short[(e, i)]["A"][0, 0, 0] + 1) / 2 * 100) for e in range(10) for i in range(4)}
    assert len(drawn) > 10 and drawn <= set(range(20))
    folder = UnpairedDataset(a, b * 30, Prep(16, 18, True), seed=0)  # a folder: A walked in order
    assert [round(float(folder[(0, i)]["A"][0, 0, 0] + 1) / 2 * 100) for i in range(30)] == [*range(20), *range(10)]


def test_paired_epochs_shorter_than_the_set_draw_from_all_of_it():
    items = [torch.full((6, 18, 18), k / 100) for k in range(20)]  # pair k is the constant k / 100
    short = PairedDataset(items, Prep(16, 18, True), seed=0, length=4)
    drawn = {round(float(short[(e, i)]["A"][0, 0, 0] + 1) / 2 * 100) for e in range(10) for i in range(4)}
    assert len(drawn) > 10 and drawn <= set(range(20))
    assert torch.equal(short[(2, 3)]["A"], short[(2, 3)]["A"])  # the same draw on every call (resume)
    full = PairedDataset(items, Prep(16, 18, True), seed=0)  # a folder: sample i is pair i
    assert [round(float(full[(0, i)]["A"][0, 0, 0] + 1) / 2 * 100) for i in range(20)] == list(range(20))


def test_pencil_sketch_by_hand():
    flat = torch.full((3, 12, 12), 0.3)
    assert torch.allclose(pencil_sketch(flat), torch.ones(3, 12, 12))  # flat areas of any tone are white
    step = torch.full((3, 8, 24), 0.8)
    step[:, :, :12] = 0.2  # dark left half, bright right half
    out = pencil_sketch(step, sigma=1.0)[0, 4]
    # a dark line on the dark side of the edge; white far from it and on the bright side
    assert float(out[11]) < 0.6 and float(out[10]) < float(out[8])
    assert torch.allclose(out[:7], torch.ones(7)) and torch.allclose(out[12:], torch.ones(12))
    # by hand at the pixel next to the edge: grey 0.2 over 1 - blur(negative), the blur weights of a
    # sigma-1 Gaussian of radius 3 put mass w = sum(k[t], t >= 1) on the bright side (negative 0.2)
    k = torch.exp(-(torch.arange(-3, 4.0) ** 2) / 2)
    k = k / k.sum()
    w = float(k[4:].sum())
    assert float(out[11]) == pytest.approx(0.2 / (1 - ((1 - w) * 0.8 + w * 0.2)), abs=1e-5)
    # a darker exposure of the same scene gives the same sketch
    photo = torch.rand(3, 16, 16) * 0.8 + 0.1
    assert torch.allclose(pencil_sketch(0.5 * photo), pencil_sketch(photo), atol=1e-5)


def test_generators_cannot_see_global_brightness():
    """The CycleGAN generators normalise every channel after the first convolution, so their output is the
    same for a x + b (a > 0): why the built-in paired target is a sketch (exposure-free), not a tone curve."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for arch in ("mobile_resnet", "resnet"):
        g = make_generator(arch, 8, 2).eval()
        with torch.no_grad():
            assert torch.allclose(g(x), g(0.5 * x + 0.2), atol=1e-2)
            assert not torch.allclose(g(x), g(x * torch.tensor([1.0, 0.7, 0.5]).view(1, 3, 1, 1)), atol=1e-2)


def _img(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_cyclegan_folder_layout_and_an_empty_side(tmp_path: Path):
    for side in ("trainA", "trainB", "testA", "testB"):
        _img(tmp_path / side / "x.png", 20, 20)
    data = cyclegan_folders(tmp_path, 16, 18, 0, "AtoB")
    assert data.train[(0, 0)]["A"].shape == (3, 16, 16) and len(data.val) == 1
    (tmp_path / "trainB" / "x.png").unlink()
    with pytest.raises(DataError, match="trainB holds no images"):
        cyclegan_folders(tmp_path, 16, 18, 0, "AtoB")


def test_pix2pix_aligned_split_and_bad_width(tmp_path: Path):
    ab = np.zeros((10, 20, 3), dtype=np.uint8)
    ab[:, 10:] = 255  # A black, B white
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.fromarray(ab).save(tmp_path / split / "p.png")
    data = pix2pix_folders(tmp_path, 8, 8, 0, "AtoB")
    s = data.val[(0, 0)]
    assert float(s["A"].max()) == -1.0 and float(s["B"].min()) == 1.0
    flipped = pix2pix_folders(tmp_path, 8, 8, 0, "BtoA").val[(0, 0)]
    assert float(flipped["A"].min()) == 1.0
    _img(tmp_path / "train" / "p.png", 15, 10)
    with pytest.raises(DataError, match="width = 2 x height"):
        pix2pix_folders(tmp_path, 8, 8, 0, "AtoB")


def test_frechet_distance_from_summed_moments():
    from evcli.methods.distill_gan.fid import frechet_distance, moments

    torch.manual_seed(0)
    x = torch.randn(400, 5, dtype=torch.float64)
    x = x - x.mean(0)  # zero mean: scaling below changes only the covariance
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(moments(x), moments(x)) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: ||shift||^2
    assert frechet_distance(moments(x), moments(x + shift)) == pytest.approx(float(shift @ shift), rel=1e-6)
    # moments add over batches like the engine sums them
    halves = [moments(x[:150]), moments(x[150:])]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert frechet_distance(summed, moments(x + shift)) == pytest.approx(float(shift @ shift), rel=1e-6)
    # scaled covariance: Tr(S + 4S - 2*2S) = Tr(S)
    cov = torch.cov(x.T)
    assert frechet_distance(moments(x), moments(2 * x)) == pytest.approx(float(torch.trace(cov)), rel=1e-4)


def test_shipped_recipes_carry_the_cards_settings():
    from evcli.cli.common import shipped_recipes
    from evcli.methods.distill_gan.method import teacher_steps_done
    from evcli.recipe import resolve_recipe

    table = {n: p for n, p in shipped_recipes().items() if n.startswith("distill-gan/")}
    assert {"distill-gan/crd_horse2zebra", "distill-gan/crd_edges2shoes", "distill-gan/tiny"} <= set(table)
    recipes = {n.split("/")[1]: resolve_recipe("distill-gan", recipe_file=p) for n, p in table.items()}
    h2z = recipes["crd_horse2zebra"]
    c = h2z.method
    assert (c.task, c.teacher_width, c.student_width, c.resolved("ndf"), c.resolved("gan_mode")) == (
        "cyclegan", 64, 16, 64, "lsgan",
    )  # fmt: skip
    assert c.resolved("relation_weights") == [25.0, 25.0, 25.0] and c.patch_size == 32
    assert (c.resolved("style_weight"), c.resolved("feature_weight"), c.resolved("adv_weight")) == (1e4, 10.0, 1.0)
    assert h2z.optim.betas == [0.5, 0.999] and h2z.optim.lr == 2e-4 and h2z.data.batch_size == 1
    # 1000 epochs of 10 teacher + 40 student: 200 teacher epochs, as the card's 100 + 100
    assert c.teacher_phase == "10ep" and c.resolved("n_dis") == 4
    assert teacher_steps_done(h2z.schedule.epochs, 10, 4) == 200
    p2p = recipes["crd_edges2shoes"].method
    assert (p2p.task, p2p.resolved("ndf"), p2p.resolved("gan_mode"), p2p.resolved("adv_weight")) == (
        "pix2pix", 128, "hinge", 0.0,
    )  # fmt: skip
    assert p2p.resolved("relation_weights") == [2.5, 2.5, 2.5] and p2p.resolved("relation_reduce") == "sum"
    assert (p2p.resolved("style_weight"), p2p.resolved("feature_weight")) == (2e4, 20.0)
    assert recipes["crd_edges2shoes"].data.batch_size == 4
    assert recipes["tiny"].method.vgg == "random" and recipes["tiny_pix2pix"].method.vgg == "random"
