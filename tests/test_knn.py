"""k-NN evaluation: the vote against a per-query Python reference, and end to end on a tiny model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastsupmae.models import build_model
from fastsupmae.tasks.knn import extract_features, knn_classify, knn_eval
from tests.helpers import tiny_config


def _reference_knn(tf, tl, vf, vl, k, t, c):
    """One query at a time with plain Python sorting: the definition, written differently."""
    top1 = top5 = 0
    for q, y in zip(vf.tolist(), vl.tolist()):
        sims = [(sum(a * b for a, b in zip(q, row)), lab) for row, lab in zip(tf.tolist(), tl.tolist())]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * c
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / t)
        order = sorted((i for i in range(c) if votes[i] > 0), key=lambda i: -votes[i])
        top1 += order[0] == y
        top5 += y in order[:5]
    return 100 * top1 / len(vl), 100 * top5 / len(vl)


def test_knn_matches_reference_on_random_features():
    torch.manual_seed(torch.seed() % 2**31)
    c = 8
    tf = F.normalize(torch.randn(60, 6, dtype=torch.float64), dim=1).float()
    tl = torch.randint(0, c, (60,))
    vf = F.normalize(torch.randn(25, 6, dtype=torch.float64), dim=1).float()
    vl = torch.randint(0, c, (25,))
    got = knn_classify(tf, tl, vf, vl, k=7, temperature=0.1, num_classes=c, chunk=10)
    ref = _reference_knn(tf, tl, vf, vl, 7, 0.1, c)
    assert abs(got["top1"] - ref[0]) < 1e-9 and abs(got["top5"] - ref[1]) < 1e-9, (got, ref)
    assert got["num_train"] == 60 and got["num_test"] == 25


def _separable_clusters(c: int, d: int, per_class: int, eps: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features [c * per_class, d] around c random orthonormal centres, and their labels.

    Each point is normalize(centre + e) with |e| <= eps (a random direction and length, fresh each run), so it is
    within asin(eps) of its centre. With eps = 0.3 (17.5 deg): two points of one class are at most 35 deg apart
    (cosine >= 0.81), points of different classes at least 90 - 35 = 55 deg (cosine <= 0.58). Every same-class
    training point is therefore nearer to a query than every other-class one, for any draw, by a margin far
    above float32 rounding. (Random Gaussian centres, as before, are sometimes close enough to overlap.)
    """
    assert eps < math.sin(math.pi / 8), "clusters only separate for eps < sin(22.5 deg)"
    centres = torch.linalg.qr(torch.randn(d, c, dtype=torch.float64))[0].T  # [c, d], orthonormal rows
    labels = torch.arange(c).repeat(per_class)
    e = F.normalize(torch.randn(len(labels), d, dtype=torch.float64), dim=1)
    e = e * eps * torch.rand(len(labels), 1, dtype=torch.float64)
    return F.normalize(centres[labels] + e, dim=1).float(), labels


def test_knn_separable_clusters_are_perfect_and_shuffled_labels_are_not():
    c, d = 5, 16
    feats, labels = _separable_clusters(c, d, 50)  # one call: queries and memory bank share the centres
    tf, tl, vf, vl = feats[: 40 * c], labels[: 40 * c], feats[40 * c:], labels[40 * c:]
    # k = 20 <= 40 training points per class: every neighbour of every query is of its class
    assert (tl[(vf @ tf.T).topk(20, dim=1).indices] == vl[:, None]).all()  # the construction's guarantee
    assert knn_classify(tf, tl, vf, vl, k=20)["top1"] == 100.0
    # each training point relabelled with a random class other than its own: no neighbour of any query carries
    # the query's label, so nothing may be a hit (not top-1, and not top-5 either, where the query's class only
    # appears among the 5 ranked classes with zero votes)
    wrong = (tl + torch.randint(1, c, tl.shape)) % c
    bad = knn_classify(tf, wrong, vf, vl, k=20)
    assert bad["top1"] == 0.0 and bad["top5"] == 0.0, bad
    # labels shuffled at random: top-5 counts every top-1 hit
    shuffled = knn_classify(tf, tl[torch.randperm(len(tl))], vf, vl, k=20)
    assert shuffled["top1"] <= shuffled["top5"] <= 100.0


def _loader(images, labels, bs):
    return [{"images": images[i:i + bs], "labels": labels[i:i + bs]} for i in range(0, len(labels), bs)]


def test_knn_eval_on_tiny_model_uses_model_features():
    cfg = tiny_config(objective="supmae")
    model = build_model(cfg, device="cpu")
    model.train()
    imgs = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 5, (30,))
    feats, labs = extract_features(model, _loader(imgs, labels, 7), feature="avg")
    assert model.training, "extract_features must restore the training mode"
    assert feats.shape == (30, 32) and torch.equal(labs, labels)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(30))
    model.eval()
    with torch.no_grad():
        want = F.normalize(model.forward_features(imgs, pool="avg"), dim=1)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    cls_feats, _ = extract_features(model, _loader(imgs, labels, 7), feature="cls")
    assert not torch.allclose(cls_feats, feats)
    # memory bank == queries: every query finds itself at similarity 1 and k=1 is exact
    res = knn_eval(model, _loader(imgs, labels, 8), _loader(imgs, labels, 8), k=1)
    assert res["top1"] == 100.0


class _FlatFeatures(torch.nn.Module):
    """A stand-in encoder: the image itself, flattened, is the feature."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, imgs, pool="avg"):
        return imgs.flatten(1).float()


def _knn_worker(rank, world, port, feats, labels, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # uneven contiguous shards, as the evaluation loaders hand out (rank 1 also gets an empty batch)
        cut = [0, 7, len(labels)]
        mine = slice(cut[rank], cut[rank + 1])
        loader = _loader(feats[mine], labels[mine], 4)
        if rank == 1:
            loader.append({"images": feats[:0], "labels": labels[:0]})
        f, lab = extract_features(_FlatFeatures(), loader)
        res = knn_classify(f, lab, f, lab, k=3)
        # the bank left sharded as the loaders hand it out: this rank's part only, merged top-k lists
        mine_f, mine_l = extract_features(_FlatFeatures(), loader, gather=False)
        sharded = knn_classify(mine_f, mine_l, f, lab, k=3, sharded=True)
        sharded10 = knn_classify(mine_f, mine_l, f, lab, k=10, sharded=True)  # k above rank 0's 7 rows
        if rank == 0:
            torch.save({"f": f, "l": lab, "res": res, "sharded": sharded, "sharded10": sharded10,
                        "mine": len(mine_l)}, out)
    finally:
        dist.destroy_process_group()


def test_extract_features_gathers_uneven_shards_from_all_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    feats = torch.randn(19, 1, 2, 3)
    labels = torch.randint(0, 4, (19,))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_knn_worker, args=(2, port, feats, labels, str(tmp_path / "r0.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "r0.pt", weights_only=False)
    torch.testing.assert_close(got["f"], F.normalize(feats.flatten(1), dim=1))  # rank order, nothing lost
    assert torch.equal(got["l"], labels)
    single = knn_classify(got["f"], labels, got["f"], labels, k=3)
    assert got["res"] == single
    assert got["mine"] == 7 and got["sharded"] == single  # no rank held the whole bank; same votes
    assert got["sharded10"] == knn_classify(got["f"], labels, got["f"], labels, k=10)


def test_knn_bank_is_the_first_n_training_images():
    """eval.knn_bank: the bank is the first N training images in file order, within data.limit."""
    from fastsupmae.pipelines import build_eval_loader

    from fastsupmae.tasks.knn import bank_loader

    cfg = tiny_config()
    cfg.data.synthetic_size = 40
    cfg.eval.batch = 16
    full = torch.cat([b["images"] for b in build_eval_loader(cfg, "train")])
    assert full.shape[0] == 40
    for bank, limit, expect in ((0, 0, 40), (25, 0, 25), (25, 10, 10), (10, 25, 10)):
        cfg.eval.knn_bank, cfg.data.limit = bank, limit
        got = torch.cat([b["images"] for b in bank_loader(cfg)])
        assert torch.equal(got, full[:expect]), (bank, limit)
    assert cfg.data.limit == 25  # the caller's config is left alone


def test_eval_tasks_without_config_or_checkpoint_use_the_embedded_default():
    """`fastsupmae knn` alone evaluates the model `fastsupmae pretrain` trains (not a 224-pixel ViT-B/16)."""
    import argparse

    from fastsupmae.config import DEFAULT_CONFIG, load_config
    from fastsupmae.tasks import knn
    from fastsupmae.tasks.common import eval_config

    p = argparse.ArgumentParser()
    knn.add_args(p)
    cfg = eval_config(p.parse_args(["eval.knn_k=5"]))
    expect = load_config([DEFAULT_CONFIG], ["eval.knn_k=5"], world_size=1)
    assert cfg.hash() == expect.hash() and cfg.model.img_size == [28, 28] and cfg.eval.knn_k == 5
    assert eval_config(p.parse_args(["--config", "models/vit_small.yaml"])).model.img_size == [224, 224]
