"""Point ops against brute-force references written from the PointNet++ kernel semantics (card: "Grouping /
sampling semantics"): FPS from index 0, ball query = first K in index order strictly inside the radius padded
with the first found, kNN, grouping, three-NN inverse-distance interpolation."""

import numpy as np
import pytest
import torch

from evcli.ops.points import (
    ball_query,
    furthest_point_sample,
    gather_points,
    group,
    group_points,
    knn,
    morton_order,
    three_interpolate,
    three_interpolation,
    three_nn,
    three_nn_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dx*dx + dy*dy + dz*dz in float32, each operation rounded (the kernels' definition)."""
    d = (a - b).astype(np.float32)
    out = d[..., 0] * d[..., 0]
    out = out + d[..., 1] * d[..., 1]
    return out + d[..., 2] * d[..., 2]


def fps_reference(xyz: np.ndarray, m: int) -> list[int]:
    mind = np.full(len(xyz), 1e10, np.float32)
    out, far = [0], 0
    for _ in range(m - 1):
        mind = np.minimum(mind, sq(xyz, xyz[far]))
        far = int(np.argmax(mind))
        out.append(far)
    return out


def ball_reference(radius: float, k: int, support: np.ndarray, query: np.ndarray) -> np.ndarray:
    out = np.zeros((len(query), k), np.int64)
    r2 = np.float32(radius) * np.float32(radius)
    for i, q in enumerate(query):
        found = []
        for j in range(len(support)):  # scan in index order, keep the first k
            if sq(support[j], q) < r2:
                found.append(j)
                if len(found) == k:
                    break
        if found:
            out[i] = found + [found[0]] * (k - len(found))
    return out


def cloud(n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) + offset


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_fps_matches_reference(backend: str):
    xyz = torch.stack([cloud(300, 1), cloud(300, 2, offset=50.0)])
    idx = furthest_point_sample(xyz, 40, backend=backend)
    assert idx.shape == (2, 40) and idx.dtype == torch.long
    for b in range(2):
        assert idx[b].tolist() == fps_reference(xyz[b].numpy(), 40)
    assert (idx[:, 0] == 0).all()  # deterministic start at index 0


def test_fps_ties_go_to_the_lowest_index():
    # points 1 and 2 are equally far from point 0: the kernel's reduction keeps the lowest index
    xyz = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [0.1, 0, 0]]])
    for backend in ("numpy", "torch"):
        assert furthest_point_sample(xyz, 3, backend=backend)[0].tolist() == [0, 1, 2]


def test_fps_refuses_more_points_than_the_cloud():
    with pytest.raises(ValueError, match="5 points from a cloud of 4"):
        furthest_point_sample(torch.zeros(1, 4, 3), 5)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_ball_query_matches_reference(offset: float):
    support = cloud(400, 3, offset)
    query = torch.cat([support[::7], cloud(20, 4, offset + 0.5)])  # some queries far outside: empty balls
    idx = ball_query(0.15, 8, support[None], query[None], chunk_rows=16)
    ref = ball_reference(0.15, 8, support.numpy(), query.numpy())
    assert idx.shape == (1, len(query), 8)
    assert (idx[0].numpy() == ref).all()
    # a query in the support set finds itself; an empty ball is all zeros
    assert (ref[:, 0] <= np.arange(0, 400, 7).tolist() + [10**9] * 20).all()


def test_ball_query_first_k_not_nearest_and_strict_radius():
    # the query at 0; support in index order: far-ish, exactly on the sphere (excluded: strict <), near ones
    support = torch.tensor([[0.4, 0, 0], [0.5, 0, 0], [0.3, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0.9, 0, 0]])
    idx = ball_query(0.5, 2, support[None], torch.zeros(1, 1, 3))
    assert idx[0, 0].tolist() == [0, 2]  # the first two in index order, not the nearest (3, 4)
    idx = ball_query(0.5, 6, support[None], torch.zeros(1, 1, 3))
    assert idx[0, 0].tolist() == [0, 2, 3, 4, 0, 0]  # padded with the first found; 0.5 itself excluded


def test_ball_query_small_chunks_keep_the_result():
    support = cloud(500, 5)[None]
    query = gather_points(support, furthest_point_sample(support, 120))
    full = ball_query(0.2, 16, support, query)
    tiny = ball_query(0.2, 16, support, query, chunk_rows=3, chunk_elements=200)
    assert torch.equal(full, tiny)


def test_morton_order_is_a_permutation():
    xyz = cloud(257, 6)
    order = morton_order(xyz)
    assert sorted(order.tolist()) == list(range(257))


def test_knn_and_three_nn_against_brute_force():
    support, query = cloud(200, 7)[None], cloud(50, 8)[None]
    dist2, idx = knn(5, support, query)
    brute = sq(query[0].numpy()[:, None], support[0].numpy()[None])
    ref = np.sort(brute, 1)[:, :5]
    assert np.allclose(dist2[0].numpy(), ref, atol=1e-7)
    picked = np.take_along_axis(brute, idx[0].numpy(), 1)
    assert np.allclose(picked, dist2[0].numpy())
    d, i3 = three_nn(query, support)
    assert np.allclose(d[0].numpy(), np.sqrt(ref[:, :3]), atol=1e-6) and i3.shape == (1, 50, 3)
    self_d, self_i = knn(1, support, support)
    assert (self_i[0, :, 0] == torch.arange(200)).all() and float(self_d.max()) == 0.0


def test_three_nn_weights_and_interpolation_formula():
    dist = torch.tensor([[[1.0, 2.0, 4.0]]])
    w = three_nn_weights(dist)
    inv = 1 / (dist + 1e-8)
    assert torch.allclose(w, inv / inv.sum(-1, keepdim=True)) and torch.allclose(w.sum(-1), torch.ones(1, 1))
    feats = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]])  # (B=1, C=1, m=4)
    out = three_interpolate(feats, torch.tensor([[[3, 0, 1]]]), w)
    assert torch.allclose(out, (w[0, 0] * torch.tensor([40.0, 10.0, 20.0])).sum().view(1, 1, 1))
    known = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [5.0, 5, 5]]])
    f = torch.arange(8.0).view(1, 2, 4)
    at_known = three_interpolation(known[:, :3], known, f)  # a known point gets (almost) its own feature
    assert torch.allclose(at_known, f[:, :, :3], atol=1e-5)


def test_group_and_relative_positions():
    feats = torch.arange(12.0).view(1, 2, 6)
    idx = torch.tensor([[[0, 5], [2, 2]]])
    g = group(feats, idx)
    assert g.shape == (1, 2, 2, 2) and g[0, 1].tolist() == [[6.0, 11.0], [8.0, 8.0]]
    support = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0]]])
    query = torch.tensor([[[1.0, 0, 0]]])
    dp, none = group_points(support, query, torch.tensor([[[0, 2]]]), None, radius=0.5)
    assert none is None
    assert dp[0, :, 0].T.tolist() == [[-2.0, 0.0, 0.0], [-2.0, 4.0, 0.0]]  # (p_j - p_i) / r
