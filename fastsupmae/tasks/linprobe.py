"""Linear probe of a frozen encoder (the MAE protocol), trained by the DeepSpeed trainer on any number of ranks.

The encoder's pooled feature (``eval.feature``: 'avg' = mean of the patch tokens after the final norm, the
feature SupMAE trains; 'cls' = the cls token, MAE's choice) goes through ``BatchNorm1d(D, affine=False,
eps=1e-6)`` and ``Linear(D, C)`` (weights N(0, 0.01)). Only the head trains: LARS (MAE) or SGD with momentum,
weight decay 0, lr = blr * batch / 256, warmup then cosine (MAE, He et al. 2022, appendix A.2).

The head trains through :class:`fastsupmae.engine.trainer.Trainer`, so the probe has what every training task
has: any launcher and world size, checkpoints in DeepSpeed's layout, exact resume (``train.resume=auto``),
metrics, progress bar, STOP file and signals. The probe's own settings:

- **ZeRO stage 0, fp32.** LARS scales each layer's update by ``||w|| / ||g + wd w||`` of the whole tensor.
  DeepSpeed's ZeRO >= 1 flattens the parameters and hands each rank a shard of them to update, so the trust
  ratio would be computed on shards (a different, world-size dependent optimizer). Stage 0 keeps every tensor
  whole on every rank, with the gradients all-reduced before the step. bf16 in DeepSpeed needs ZeRO >= 1 in this
  project (:func:`fastsupmae.engine.ds_config.effective_zero_stage`), so the head trains in fp32; it is
  D x C parameters, so neither choice costs anything measurable. The frozen encoder's feature extraction still
  runs in the run's precision (bf16 autocast where ``train.precision`` resolves to bf16).
- **BatchNorm over the global batch.** The head's BatchNorm is synchronised over ranks (SyncBatchNorm on CUDA,
  its CPU twin otherwise), so its statistics, and the run, do not depend on how the batch is split over ranks.
- **Data parallel.** The global batch (``--batch``, default ``train.global_batch``) is split over the ranks:
  each rank computes the loss of its ``batch / world`` samples of every step.

Two ways to feed it:

- cached features (default): every rank extracts the features of the un-augmented training images of its own
  shard once (no rank computes or holds the whole set); :class:`CachedFeatureLoader` then serves them in the
  global shuffled order of :class:`fastsupmae.pipelines.sampler.ShardedOrder`, exchanging the rows of each step
  between the ranks that hold them (one collective of ``batch x (D + 1)`` floats per step), so the samples of a
  step are the same at every world size and a resumed run continues exactly where it stopped.
- ``augment=True``: every step runs the frozen encoder on a freshly augmented batch (MAE's protocol:
  RandomResizedCrop + flip from the training pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsupmae.config import Config, ConfigError, config_from_dict
from fastsupmae.pipelines.loader_base import LoaderBase

log = logging.getLogger(__name__)

RESULT_FILE = "linprobe.json"
HEAD_FILE = "linprobe_head.pth"
OPTIONS_FILE = "linprobe_options.json"  # what the head is trained with: a resume must not change it
KEPT_ON_RESUME = ("optimizer", "feature", "augment")


@dataclass
class LinprobeOptions:
    """Linear-probe recipe (defaults: MAE's, except the batch, which follows train.global_batch)."""

    epochs: float = 90.0
    blr: float = 0.1
    warmup_epochs: float = 10.0
    weight_decay: float = 0.0
    optimizer: str = "lars"  # lars | sgd
    batch: int = 0  # global batch; 0: cfg.train.global_batch
    micro_batch: int = 0  # per rank and forward; 0: batch / world size (no accumulation)
    augment: bool = False  # True: encoder forward on augmented batches every step (MAE); False: cached features
    feature: str = ""  # '' = cfg.eval.feature


class LARS(torch.optim.Optimizer):
    """LARS (layer-wise adaptive rate scaling) as MAE uses it for the linear probe, skipping non-finite steps.

    For every parameter with more than one dimension the update is scaled by ``trust * ||w|| / ||g + wd w||``;
    1-D parameters (biases) take plain SGD-with-momentum steps. The norms are of whole tensors: run it where each
    rank holds whole parameters (DeepSpeed ZeRO stage 0), never on ZeRO shards. ``adaptive=False`` is plain SGD
    with momentum and weight decay on every parameter (``torch.optim.SGD``'s update).

    A step whose gradients hold a NaN/Inf leaves the parameters and momenta as they were, decided on the device
    (no host sync); like :class:`fastsupmae.engine.optim.GuardedAdamW` it reports ``last_found_inf`` and
    ``last_grad_norm`` for the trainer's skipped-step accounting.
    """

    guards_steps = True  # the trainer reads last_found_inf / last_grad_norm after each step

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, adaptive: bool = True) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))
        self.adaptive = adaptive
        self.last_found_inf: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum().sqrt()
        ok = torch.isfinite(norm)
        self.last_found_inf, self.last_grad_norm = (~ok).float(), norm
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1 or not self.adaptive:
                    d = d.add(p, alpha=g["weight_decay"])
                if p.ndim > 1 and self.adaptive:
                    pn, un = torch.norm(p), torch.norm(d)
                    q = torch.where((pn > 0) & (un > 0), g["trust_coefficient"] * pn / un, torch.ones_like(pn))
                    d = d.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"]
                # where(), not arithmetic masking: a NaN update must not leak into the kept values
                mu.copy_(torch.where(ok, mu * g["momentum"] + d, mu))
                p.copy_(torch.where(ok, p - g["lr"] * mu, p))


class ProbeHead(nn.Module):
    """BatchNorm1d without affine + Linear: [B, D] -> [B, C].

    Args:
        generator: draws the initial weights (the same on every rank and at every world size).
    """

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class CachedFeatureLoader(LoaderBase):
    """Training loader over features cached on the device, each rank holding a contiguous shard of them.

    Rank ``r`` holds rows ``[lo_r, lo_r + n_r)`` of the dataset (the shard an evaluation loader gave it, in rank
    order). Step ``s`` of epoch ``e`` serves the global samples ``perm_e[s*B*W : (s+1)*B*W]`` of
    :class:`~fastsupmae.pipelines.sampler.ShardedOrder`, rank ``r`` taking its ``B`` of them: every rank fills the
    rows it owns into a zero ``[B*W, D + 1]`` buffer (features and label) and one sum over the ranks (a
    reduce-scatter under NCCL, an all-reduce on gloo) hands each rank its ``B`` rows. Exactly one rank owns each
    row, so the sum is exact. No host sync per batch; the epoch's order crosses to the device once.

    Yields ``{'images': float32 [B, D] (the features: the key the trainer moves), 'labels': int64 [B]}``; the
    length, epoch, resume state and the other loader properties are :class:`LoaderBase`'s, over ``self.order``.

    Args:
        feats: float32 ``[n_r, D]`` this rank's features, on the device the head trains on.
        labels: int64 ``[n_r]``.
        batch_size: samples per batch on this rank (B).
        rank, world_size, seed: as the training loaders' (the order depends on seed and epoch only).
        class_names: the classes of the data the features came from (``[]``: not known).
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, class_names: list[str] | None = None) -> None:
        from fastsupmae.engine.distributed import comm_device
        from fastsupmae.pipelines.sampler import ShardedOrder

        self.feats, self.labels = feats.float(), labels.long().to(feats.device)
        self.rank, self.world_size = rank, world_size
        self.class_names = list(class_names or [])
        counts = [int(feats.shape[0])]
        if world_size > 1:
            mine = torch.tensor([feats.shape[0]], dtype=torch.int64, device=comm_device())
            parts = [torch.zeros_like(mine) for _ in range(world_size)]
            torch.distributed.all_gather(parts, mine)
            counts = [int(p.item()) for p in parts]  # once, at set-up
        self.lo = sum(counts[:rank])
        self.order = ShardedOrder(sum(counts), batch_size, rank, world_size, seed, train=True)
        self._nccl = world_size > 1 and "nccl" in str(torch.distributed.get_backend())

    def _rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, D] and labels [B] of this rank's part of the global batch ``idx`` (int64 [B*W])."""
        b = self.order.batch_size
        if self.world_size == 1:
            return self.feats[idx], self.labels[idx]
        n = self.feats.shape[0]
        local = idx - self.lo
        own = (local >= 0) & (local < n)
        safe = local.clamp(0, max(n - 1, 0))
        rows = torch.cat([self.feats[safe], self.labels[safe, None].to(self.feats.dtype)], dim=1)
        buf = torch.where(own[:, None], rows, torch.zeros((), device=rows.device))  # [B*W, D + 1]
        if self._nccl:
            out = buf.new_empty((b, buf.shape[1]))
            torch.distributed.reduce_scatter_tensor(out, buf)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's block
            torch.distributed.all_reduce(buf)
            out = buf[self.rank * b:(self.rank + 1) * b]
        # labels < 2^24 are exact in fp32
        return out[:, :-1].contiguous(), out[:, -1].round().long()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from fastsupmae.pipelines.transfer import to_device

        o = self.order
        bw = o.batch_size * o.world_size
        steps = o.remaining_steps()
        perm = to_device(o.permutation(o.epoch)[:len(o) * bw], self.feats.device)  # the epoch's order, once
        for step in steps:
            x, y = self._rows(perm[step * bw:(step + 1) * bw])
            o.advance()  # before yielding: a state saved while the trainer holds this batch resumes after it
            yield {"images": x, "labels": y}
        o.finish_epoch()


def probe_config(cfg: Config, opts: LinprobeOptions, world_size: int, output_dir: str | Path) -> Config:
    """The config the probe trains with: ``cfg`` with the probe's schedule, batch, ZeRO 0 / fp32, SyncBN.

    Raises:
        ConfigError: the batch does not split into whole micro-batches over the ranks.
    """
    d = cfg.to_dict()
    t = d["train"]
    batch = opts.batch or t["global_batch"]
    micro = opts.micro_batch or batch // world_size
    if micro < 1 or batch % (micro * world_size):
        raise ConfigError(f"linear-probe batch {batch} does not split into micro-batches of {micro} over "
                          f"{world_size} rank(s); choose --batch (and --micro-batch) so that batch is a multiple of "
                          f"micro-batch x world size")
    t.update(global_batch=batch, micro_batch=micro, epochs=opts.epochs, warmup_epochs=opts.warmup_epochs,
             blr=opts.blr, lr=None, min_lr=0.0, weight_decay=opts.weight_decay, clip_grad=0.0, precision="fp32",
             zero_stage=0, optimizer="auto", offload_optimizer=False, compile=False, output_dir=str(output_dir))
    d["model"]["sync_batchnorm"] = True
    d["eval"]["feature"] = opts.feature or cfg.eval.feature
    return config_from_dict(d)


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _probe_trainer_class() -> type:
    from fastsupmae.engine.trainer import Trainer

    class ProbeTrainer(Trainer):
        """The trainer, reporting no FLOPs: its FLOP model is the pretraining one, not a probe head's."""

        def _start(self) -> Any:
            loop = super()._start()
            loop.flops_per_step = loop.peak = None
            loop.tokens_per_img = 0.0
            return loop

    return ProbeTrainer


def linear_probe(model: nn.Module, cfg: Config, opts: LinprobeOptions, val_loader: Any, output_dir: str | Path,
                 train_eval_loader: Any = None, train_loader: Any = None, explicit: bool = True,
                 resume: str | None = None, info: Any = None,
                 make_train_loader: Callable[[Config], Any] | None = None) -> dict[str, Any]:
    """Train a probe head on ``model``'s frozen features on every rank (collective); returns the result.

    The length is ``opts.epochs`` unless ``cfg.train.max_steps`` > 0 (then exactly that many steps).
    ``cfg.train.resume`` ('auto' or a path) continues a probe run in ``output_dir``.

    Args:
        model: encoder with ``forward_features(imgs, pool)`` (plain, DeepSpeed-wrapped or ZeRO-3-partitioned); it
            stays frozen and in eval mode.
        cfg: the run's config (model, data, seed, logging, checkpoint cadence; the schedule comes from ``opts``).
        val_loader: this rank's shard of the evaluation images (an evaluation loader built with rank / world).
        output_dir: the probe's run directory (config, metrics, checkpoints, result and head files).
        train_eval_loader: this rank's shard of the un-augmented training images (cached-feature mode).
        train_loader: augmented training batches of this rank, ``micro_batch`` each (``opts.augment``; default:
            ``make_train_loader(probe_cfg)``, else the training pipeline built from the probe's config).
        explicit: the caller named ``output_dir`` (a directory holding another run is then refused, not
            replaced by a numbered sibling; see :mod:`fastsupmae.engine.run_dir`).
        resume: the probe run's ``train.resume`` ('auto', a checkpoint path or ''; default ``cfg.train.resume``).
        info: this process's :class:`~fastsupmae.engine.distributed.DistInfo` (default: from
            ``init_distributed(cfg.train.device)``).
        make_train_loader: ``f(probe_cfg) -> loader`` for ``opts.augment`` when ``train_loader`` is None.

    Returns:
        {'top1', 'top5' (percent, every rank the same), 'steps', 'stopped', 'final_loss', 'seconds', 'feature',
        'world_size', 'run_dir', 'head' (the trained module)}; without 'top1' / 'top5' when the run stopped early
        (signal, STOP file, time limit), to be resumed.
    """
    from fastsupmae.engine import run_dir
    from fastsupmae.engine.distributed import init_distributed
    from fastsupmae.engine.ds_config import resolve_precision
    from fastsupmae.engine.rng import seed_everything

    t0 = time.time()
    info = info or init_distributed(cfg.train.device)
    resume = cfg.train.resume if resume is None else resume
    net = _frozen_encoder(model, info.device)
    feature = opts.feature or cfg.eval.feature
    _check_options(opts, feature)
    # the encoder runs in the run's precision; the head trains in fp32 (see the module docstring)
    precision = resolve_precision(cfg, info.device)
    resolved = LinprobeOptions(**{**asdict(opts), "feature": feature})
    out = run_dir.prepare(output_dir, resume, explicit, cfg.train.overwrite, info.rank, info.world_size)
    _check_resumed_options(out, resume, asdict(resolved))
    pcfg = probe_config(cfg, resolved, info.world_size, out)
    pcfg.train.resume = resume
    seed_everything(pcfg.train.seed, info.rank)
    if opts.augment:
        loader, forward_loss = _augmented_feed(train_loader, make_train_loader, net, feature, precision, pcfg, info)
    else:
        loader, forward_loss = _cached_feed(train_eval_loader, net, feature, precision, pcfg, info)
    trainer = _probe_trainer(pcfg, opts, loader, forward_loss, info, net.embed_dim)
    trainer.maybe_resume()
    if info.is_main:  # only now: a failed resume must not rewrite the run's config
        run_dir.save_run_config(pcfg, out / "config.yaml")
        (out / OPTIONS_FILE).write_text(json.dumps(asdict(resolved), indent=1))
        log.info("linear probe: %s features, %d samples, batch %d over %d rank(s), %s lr %.3g, ZeRO 0 fp32 head",
                 feature, getattr(loader, "num_samples", 0) or len(loader) * pcfg.train.global_batch,
                 pcfg.train.global_batch, info.world_size, opts.optimizer, trainer.peak_lr)
    result = trainer.fit()
    res: dict[str, Any] = {"steps": result.step, "stopped": result.stopped,
                           "final_loss": result.metrics.get("loss", float("nan")), "feature": feature,
                           "world_size": info.world_size, "run_dir": str(out)}
    trained = trainer.engine.module.eval()
    if result.stopped == "done":
        res.update(evaluate_head(trained, net, val_loader, feature, info.device))
    res["seconds"] = time.time() - t0
    if info.is_main:
        _write_result(out, res, trained, opts, feature)
    res["head"] = trained
    if hasattr(trainer.engine, "destroy"):
        trainer.engine.destroy()
    run_dir.release(out)  # the probe's directory lock (held since run_dir.prepare)
    return res


def _frozen_encoder(model: nn.Module, device: torch.device) -> nn.Module:
    """The bare encoder of ``model`` on ``device``, in eval mode, with no parameter requiring a gradient."""
    from fastsupmae.tasks.knn import unwrap

    net = unwrap(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device)


def _check_options(opts: LinprobeOptions, feature: str) -> None:
    """The feature and optimizer names (one line naming the fix; the CLI's choices already hold them)."""
    if feature not in ("avg", "cls"):
        raise ConfigError(f"linear-probe feature '{feature}' is unknown; use avg or cls")
    if opts.optimizer not in ("lars", "sgd"):
        raise ConfigError(f"linear-probe optimizer '{opts.optimizer}' is unknown; use lars or sgd")


ForwardLoss = Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _augmented_feed(loader: Any, make_loader: Callable[[Config], Any] | None, net: nn.Module, feature: str,
                    precision: str, pcfg: Config, info: Any) -> tuple[Any, ForwardLoss]:
    """``opts.augment``: every training batch goes through the frozen encoder (in ``precision``) at each step.

    The batches come from ``loader``, else ``make_loader(pcfg)``, else the training pipeline of ``pcfg``.
    """
    from fastsupmae.pipelines import check_num_classes
    from fastsupmae.tasks.knn import full_params

    if loader is None:
        loader = make_loader(pcfg) if make_loader is not None else _default_train_loader(pcfg, info)
    device = info.device
    # The head classifies into model.num_classes whatever the pretraining objective was (MAE's included).
    check_num_classes(getattr(loader, "class_names", None), pcfg.model.num_classes)

    def forward_loss(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), full_params(net), _autocast(device, precision):
            x = net.forward_features(batch["images"], pool=feature).float()  # [B, D]
        return {"loss": F.cross_entropy(engine(x), batch["labels"])}

    return loader, forward_loss


def _cached_feed(train_eval_loader: Any, net: nn.Module, feature: str, precision: str, pcfg: Config,
                 info: Any) -> tuple[CachedFeatureLoader, ForwardLoss]:
    """Cached-feature mode: this rank's shard of the un-augmented training images through the encoder, once."""
    from fastsupmae.pipelines import check_num_classes
    from fastsupmae.tasks.knn import extract_features

    if train_eval_loader is None:
        raise ValueError("linear_probe: cached-feature mode needs train_eval_loader (this rank's shard of the "
                         "un-augmented training images)")
    names = getattr(train_eval_loader, "class_names", None)
    check_num_classes(names, pcfg.model.num_classes)  # the head's classes, whatever the pretraining objective
    with _autocast(info.device, precision):
        tf, tl = extract_features(net, train_eval_loader, feature, normalize=False, gather=False, on_device=True)
    t = pcfg.train
    loader = CachedFeatureLoader(tf.to(info.device), tl.to(info.device), t.micro_batch, info.rank,
                                 info.world_size, t.seed, class_names=names)

    def forward_loss(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(engine(batch["images"]), batch["labels"])}

    return loader, forward_loss


def _probe_trainer(pcfg: Config, opts: LinprobeOptions, loader: Any, forward_loss: ForwardLoss, info: Any,
                   dim: int) -> Any:
    """The trainer of a fresh :class:`ProbeHead` (``dim`` -> the model's classes) with LARS / SGD."""
    head = ProbeHead(dim, pcfg.model.num_classes, torch.Generator().manual_seed(pcfg.train.seed))

    def make_optimizer(module: nn.Module, sharded: bool) -> tuple[torch.optim.Optimizer, str]:
        assert not sharded, "the linear probe runs at ZeRO stage 0 (LARS needs whole tensors)"
        from fastsupmae.engine.optim import peak_lr

        return LARS(module.parameters(), lr=peak_lr(pcfg), weight_decay=opts.weight_decay,
                    adaptive=opts.optimizer == "lars"), opts.optimizer

    return _probe_trainer_class()(pcfg, head, loader, info, forward_loss=forward_loss, loss_keys=("loss",),
                                  progress_name="linprobe", make_optimizer=make_optimizer)


def evaluate_head(head: nn.Module, net: nn.Module, val_loader: Any, feature: str,
                  device: torch.device) -> dict[str, Any]:
    """Top-1 / top-5 (percent) of ``head`` on the frozen features of every rank's evaluation shard (collective).

    Returns:
        {'top1', 'top5', 'num_val'}, the same on every rank.
    """
    from fastsupmae.engine.distributed import all_reduce_sum, comm_device
    from fastsupmae.tasks.knn import extract_features

    vf, vl = extract_features(net, val_loader, feature, normalize=False, gather=False, on_device=True)
    hits = torch.zeros(3, dtype=torch.float64, device=device)
    if vf.shape[0]:  # an evaluation shard may be empty on some ranks
        with torch.no_grad():
            logits = head(vf.to(device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == vl.to(device)[:, None]
        hits[0], hits[1], hits[2] = hit[:, 0].sum(), hit.any(1).sum(), float(logits.shape[0])
    hits = all_reduce_sum(hits.to(comm_device())).cpu()
    n = max(float(hits[2]), 1.0)
    return {"top1": 100.0 * float(hits[0]) / n, "top5": 100.0 * float(hits[1]) / n, "num_val": int(hits[2])}


def _write_result(out: Path, res: dict[str, Any], head: nn.Module, opts: LinprobeOptions, feature: str) -> None:
    """Rank 0: the result file, and the trained head's file when the run completed."""
    from fastsupmae.tasks.common import write_json

    write_json(out / RESULT_FILE, res)
    if res["stopped"] == "done":
        torch.save({"head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                    "options": asdict(opts), "feature": feature}, out / HEAD_FILE)
        log.info("linear probe: top-1 %.2f%% top-5 %.2f%% (%d steps, %.0f s); %s", res["top1"], res["top5"],
                 res["steps"], res["seconds"], out / RESULT_FILE)


def _check_resumed_options(out: Path, resume: str, now: dict[str, Any]) -> None:
    """A resumed probe keeps its optimizer, feature and mode: its checkpoint holds that optimizer's state (SGD
    momenta loaded into LARS would silently change the method)."""
    f = out / OPTIONS_FILE
    if not resume or not f.is_file():
        return
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return  # unreadable: nothing to compare (the checkpoint still loads)
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in KEPT_ON_RESUME if k in saved and saved[k] != now.get(k)]
    if changed:
        from fastsupmae.engine.run_dir import RunDirError, release

        release(out)
        raise RunDirError(f"the probe in '{out}' was trained with other options ({'; '.join(changed)}); its "
                          "checkpoint holds that optimizer's state. Resume with the same options, or start a new "
                          "probe with another --output")


def _default_train_loader(pcfg: Config, info: Any) -> Any:
    from fastsupmae.pipelines import build_train_loader

    return build_train_loader(pcfg, info.rank, info.world_size, info.device)


# ----------------------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`fastsupmae linprobe`: arguments."""
    from fastsupmae.tasks.common import add_model_args

    add_model_args(parser)
    d = LinprobeOptions()
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--blr", type=float, default=d.blr)
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default=d.optimizer)
    parser.add_argument("--batch", type=int, default=d.batch, help="global batch (0: train.global_batch)")
    parser.add_argument("--micro-batch", type=int, default=d.micro_batch,
                        help="per rank and forward (0: batch / world size)")
    parser.add_argument("--augment", action="store_true", help="encoder forward on augmented batches every step")
    parser.add_argument("--feature", choices=("avg", "cls"), default="", help="default: eval.feature")
    parser.add_argument("--output", default="",
                        help="the probe's run directory (default: <train.output_dir>/linprobe, the checkpoint's "
                             "run when its config is used)")
    parser.add_argument("--resume", action="store_const", const="auto", default=None,
                        help="continue the probe run in its directory (same as train.resume=auto)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastsupmae.pipelines import build_eval_loader
    from fastsupmae.tasks.common import load_model_for_eval

    # Without --checkpoint the encoder keeps its random initialisation: the same one on every rank and every run.
    torch.manual_seed(0)
    cfg, model, device = load_model_for_eval(args, encoder_only=True)  # features only: exports load
    if not args.config:  # the pretraining run's own resume / overwrite are not the probe's
        from fastsupmae.config import override_sets

        for key, off in (("resume", ""), ("overwrite", False)):
            if not override_sets(args.overrides, f"train.{key}"):
                setattr(cfg.train, key, off)
    if getattr(args, "resume", None):
        cfg.train.resume = args.resume
    from fastsupmae.engine.distributed import init_distributed

    info = init_distributed(str(device))  # --device decides where the probe runs (cuda:N honoured)
    opts = LinprobeOptions(epochs=args.epochs, blr=args.blr, warmup_epochs=args.warmup_epochs,
                           weight_decay=args.weight_decay, optimizer=args.optimizer, batch=args.batch,
                           micro_batch=args.micro_batch, augment=args.augment, feature=args.feature)
    out = Path(args.output) if args.output else Path(cfg.train.output_dir) / "linprobe"
    val = build_eval_loader(cfg, "val", info.rank, info.world_size, info.device)
    train_eval = None if opts.augment else build_eval_loader(cfg, "train", info.rank, info.world_size, info.device)
    res = linear_probe(model, cfg, opts, val, out, train_eval_loader=train_eval, explicit=bool(args.output),
                       info=info)
    res.pop("head")
    if info.is_main:
        if "top1" in res:
            print(f"linear probe top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['steps']} steps, "
                  f"{res['world_size']} rank(s); {res['run_dir']})", flush=True)
        else:
            print(f"linear probe stopped at step {res['steps']} ({res['stopped']}); continue it with --resume "
                  f"--output {res['run_dir']}", flush=True)
    return res

