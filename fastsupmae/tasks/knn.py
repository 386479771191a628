"""k-nearest-neighbour evaluation of a frozen encoder (the DINO protocol, the project's retrieval metric).

Features of the full (unmasked) training and validation images are L2-normalised; each validation image takes
the ``k`` training images of highest cosine similarity, and each neighbour votes for its label with weight
``exp(sim / T)``. Top-1 / top-5 are the fraction of validation images whose label is among the 1 / 5 classes
with the most vote weight. Defaults k = 20, T = 0.07 (DINO's values, Caron et al. 2021; the MIM paper does not
publish its own).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DeepSpeed engine / DDP / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


@contextlib.contextmanager
def full_params(net: nn.Module) -> Iterator[None]:
    """Gather ZeRO-3-partitioned parameters for the duration (a no-op for ordinary modules).

    Under ZeRO stage 3 each rank holds a shard of every parameter and DeepSpeed re-assembles them in hooks around
    ``forward`` of each sub-module; the evaluation tasks call ``forward_features`` instead, which bypasses the
    top-level hook (cls_token would be an empty shard), so the parameters are gathered explicitly.
    """
    params = [p for p in net.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank in rank order (ranks may hold different n_r)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    ws = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    pad = x.new_zeros((max(sizes_l), *x.shape[1:]))
    pad[: x.shape[0]] = x
    parts = [torch.zeros_like(pad) for _ in range(ws)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_l)])


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], feature: str = "avg",
                     normalize: bool = True, max_batches: int = 0, gather: bool = True,
                     on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled encoder features of every image the loader yields (gathered over ranks when distributed).

    Args:
        model: a fastsupmae model (or a wrapper around one) with ``forward_features(imgs, pool)``.
        loader: yields {'images': [B, C, H, W] uint8 or normalised float, 'labels': int64 [B]}.
        feature: 'avg' (mean of the patch tokens, after the final norm / fc_norm) or 'cls' (the cls token).
        normalize: L2-normalise each feature vector.
        max_batches: stop after this many batches (0: all).
        gather: concatenate every rank's features in rank order (False: this rank's shard only).
        on_device: leave the result on the model's device (default: CPU).

    Returns:
        features float32 [M, D] and labels int64 [M].
    """
    if feature not in ("avg", "cls"):
        raise ValueError(f"feature '{feature}' is unknown; use 'avg' or 'cls'")
    net = unwrap(model)
    was = net.training
    net.eval()  # BatchNorm running statistics, no drop path
    device = _model_device(net)
    feats, labels = [], []
    try:
        with full_params(net):
            for i, batch in enumerate(loader):
                if max_batches and i >= max_batches:
                    break
                imgs = batch["images"].to(device, non_blocking=True)
                if imgs.shape[0] == 0:  # evaluation shards may end with an empty batch on some ranks
                    continue
                f = net.forward_features(imgs, pool=feature).float()
                feats.append(F.normalize(f, dim=1) if normalize else f)
                labels.append(batch["labels"].to(device))
    finally:
        net.train(was)
    if not feats:
        d = getattr(net, "embed_dim", 0)
        out_f, out_l = torch.zeros(0, d, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    else:
        out_f, out_l = torch.cat(feats), torch.cat(labels).long()
    if gather:
        out_f, out_l = _gather_variable(out_f), _gather_variable(out_l)
    return (out_f, out_l) if on_device else (out_f.cpu(), out_l.cpu())


def _local_topk(bank: torch.Tensor, bank_labels: torch.Tensor, q: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of queries ``q`` [Q, D] within this rank's bank [M_r, D] and the neighbours'
    labels, both [Q, k]; a bank shard with fewer than ``k`` rows pads with -inf (weight exp(-inf) = 0)."""
    kk = min(k, bank.shape[0])
    sims = torch.full((q.shape[0], k), float("-inf"), device=q.device)
    labels = torch.zeros((q.shape[0], k), dtype=torch.int64, device=q.device)
    if kk:
        top_sim, top_idx = (q @ bank.T).topk(kk, dim=1)
        sims[:, :kk], labels[:, :kk] = top_sim, bank_labels[top_idx]
    return sims, labels


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024, sharded: bool = False) -> dict[str, float]:
    """Weighted k-NN vote on L2-normalised features, on the features' device.

    Args:
        train_feats: [M, D] L2-normalised memory bank; train_labels: int64 [M]. With ``sharded``, this rank's
            part of the bank only (the ranks' parts together are the bank; any split).
        test_feats: [Q, D] L2-normalised; test_labels: int64 [Q] (the same on every rank when sharded).
        k: neighbours (clipped to the bank's size).
        temperature: vote weight exp(sim / T).
        num_classes: C (default: the largest label + 1).
        chunk: test rows per similarity block (bounds memory at chunk x M per rank).
        sharded: each rank searches its part of the bank and the ranks' top-k lists are merged (one all-gather
            of [chunk, k] per block): no rank ever holds the whole bank. Every rank returns the same result.

    Returns:
        {'top1': %, 'top5': %, 'num_train': M, 'num_test': Q}; top-5 counts the top min(5, C) classes that
        received votes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    world = _world() if sharded else 1
    dev = test_feats.device
    stats = torch.tensor([float(train_feats.shape[0]), float(train_labels.max()) if train_labels.numel() else -1.0],
                         device=dev)
    if world > 1:  # bank size and largest label over every shard: one small collective
        parts = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(parts, stats)
        stats = torch.stack(parts)
        m_total, max_label = int(stats[:, 0].sum()), int(stats[:, 1].max())
    else:
        m_total, max_label = train_feats.shape[0], int(stats[1])
    if m_total == 0 or test_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training and one test feature")
    c = int(num_classes or max(max_label, int(test_labels.max())) + 1)
    k = min(int(k), m_total)
    bank = train_feats.float()
    bank_labels = train_labels.to(dev)
    test_labels = test_labels.to(dev)
    correct1 = torch.zeros((), dtype=torch.int64, device=dev)
    correct5 = torch.zeros((), dtype=torch.int64, device=dev)
    for s in range(0, test_feats.shape[0], chunk):
        q = test_feats[s:s + chunk].float()
        y = test_labels[s:s + chunk]
        top_sim, top_lab = _local_topk(bank, bank_labels, q, k)
        if world > 1:  # merge: the k best of every rank's k best are the k best of the whole bank
            sims = [torch.empty_like(top_sim) for _ in range(world)]
            labs = [torch.empty_like(top_lab) for _ in range(world)]
            dist.all_gather(sims, top_sim)
            dist.all_gather(labs, top_lab)
            top_sim, pick = torch.cat(sims, dim=1).topk(k, dim=1)
            top_lab = torch.cat(labs, dim=1).gather(1, pick)
        w = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], c, dtype=torch.float32, device=dev)
        votes.scatter_add_(1, top_lab, w)  # [q, C]
        top_votes, ranked = votes.topk(min(5, c), dim=1)
        # a class no neighbour voted for is never a hit (ties at zero would otherwise be broken arbitrarily)
        hit = (ranked == y[:, None]) & (top_votes > 0)
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
    n = test_feats.shape[0]
    return {"top1": 100.0 * int(correct1) / n, "top5": 100.0 * int(correct5) / n, "num_train": m_total,
            "num_test": int(n)}


def knn_eval(model: nn.Module, train_loader: Iterable[dict[str, torch.Tensor]],
             val_loader: Iterable[dict[str, torch.Tensor]], k: int = 20, temperature: float = 0.07,
             feature: str = "avg", num_classes: int | None = None) -> dict[str, float]:
    """k-NN top-1 / top-5 (percent) of ``model``'s frozen features: train_loader is the memory bank.

    The training loader should not augment (``build_eval_loader(cfg, 'train')``). The search runs on the model's
    device (the GPU when there is one); the memory bank stays sharded as the loaders hand it out (each rank
    holds its part), the validation features are gathered, and every rank computes the same result.
    """
    tf, tl = extract_features(model, train_loader, feature, gather=False, on_device=True)
    vf, vl = extract_features(model, val_loader, feature, on_device=True)
    res = knn_classify(tf, tl, vf, vl, k=k, temperature=temperature, num_classes=num_classes, sharded=True)
    log.info("kNN (k=%d, T=%g, feature %s): top-1 %.2f%%, top-5 %.2f%% (%d train / %d val images)",
             k, temperature, feature, res["top1"], res["top5"], res["num_train"], res["num_test"])
    return res


def bank_loader(cfg: Any, rank: int = 0, world_size: int = 1, device: Any = "cpu") -> Any:
    """The memory bank's loader: the un-augmented training images, the first ``eval.knn_bank`` of them (in file
    order) when it is set, within ``data.limit``."""
    import copy

    from fastsupmae.pipelines import build_eval_loader

    n = cfg.eval.knn_bank
    if n > 0 and (cfg.data.limit == 0 or n < cfg.data.limit):
        cfg = copy.deepcopy(cfg)
        cfg.data.limit = n
    return build_eval_loader(cfg, "train", rank, world_size, device)


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae knn`: arguments."""
    from fastsupmae.tasks.common import add_model_args

    add_model_args(parser)
    parser.add_argument("--k", type=int, default=None, help="neighbours (default: eval.knn_k)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="vote temperature (default: eval.knn_temperature)")
    parser.add_argument("--feature", choices=("avg", "cls"), default=None,
                        help="pooled feature (default: eval.feature)")
    parser.add_argument("--output", default="", help="also write the result as JSON here")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`fastsupmae knn`: build the model from the config, load ``--checkpoint``, print top-1 / top-5."""
    from fastsupmae.errors import UserError
    from fastsupmae.pipelines import build_eval_loader
    from fastsupmae.tasks.common import load_model_for_eval

    if args.k is not None and args.k < 1:
        raise UserError(f"--k {args.k}: the number of neighbours must be >= 1, e.g. --k 20")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(f"--temperature {args.temperature}: the vote temperature must be > 0, e.g. 0.07")
    if args.output:  # checked before the whole k-NN runs: its result must have somewhere to go
        from fastsupmae.tasks.common import check_output_file

        check_output_file(args.output, "--output")
    cfg, model, device = load_model_for_eval(args, encoder_only=True)  # features only: exports load
    e = cfg.eval
    res = knn_eval(model, bank_loader(cfg, device=device), build_eval_loader(cfg, "val", device=device),
                   k=args.k or e.knn_k, temperature=args.temperature or e.knn_temperature,
                   feature=args.feature or e.feature, num_classes=cfg.model.num_classes)
    print(f"kNN top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['num_train']} train, {res['num_test']} val)")
    if args.output:
        from fastsupmae.tasks.common import write_json

        write_json(args.output, res)  # creates the missing folders
    return res
