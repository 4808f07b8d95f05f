"""One ``finetune`` call: the whole grid of (mode, k, seed, lr) cells, each an MLflow run
nested under the call's run, with the learning rate (and the probe's C) of every
(mode, k, seed) chosen on its validation split.

What a call pays once, whatever the size of its grid: imports, reading the data and the
checkpoint, MLflow set-up, the frozen features (from the cache when a previous call on the
same tower and data stored them), the zero-shot head. Per (k, seed): one split and one probe,
shared by ``lp`` and ``lp-ft``. Per cell: training and a validation score.

Outputs, under ``output``: ``<mode>-k<k>-s<seed>/model.pt`` for every chosen model (and
``cells/<cell>/model.pt`` for every cell with ``keep_models=all``), then ``grid.json``,
written last: a folder without it is not a finished grid. A call whose ``grid.json`` holds
the same config is a no-op returning it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

from upstream.errors import UpstreamError
from upstream.finetune import splits
from upstream.finetune.config import TRAINED, ZERO_SHOT, Cell, FinetuneConfig
from upstream.tracking import GROUP_ENV, owner_tags

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

GRID_FILE = "grid.json"
GRID_FORMAT = "upstream-grid"
GRID_FORMAT_VERSION = 1


def class_counts(manifest: dict[str, Any]) -> dict[str, int]:
    names = [str(c) for c in manifest.get("class_names", [])]
    counts = manifest.get("class_counts")
    if isinstance(counts, dict):
        return {str(k): int(v) for k, v in counts.items()}
    if isinstance(counts, list) and len(counts) == len(names):
        return {n: int(c) for n, c in zip(names, counts, strict=True)}
    return {}


def stored_kshot(data: str, shots: int, seed: int) -> list[int] | None:
    """The k-shot split the shard stage stored beside ``data``'s manifest, if it did.

    Stored lists come from :func:`upstream.shards.loader.kshot_indices` with the same arguments, so
    reading one gives the same images as drawing them here.
    """
    from upstream import storage

    uri = storage.join(data, "kshot", f"k{shots}-seed{seed}.json")
    if not storage.exists(uri):
        return None
    return [int(i) for i in storage.read_json(uri)["indices"]]


def read_grid(uri: str) -> dict[str, Any]:
    """A finished grid (``uri``: its folder or its grid.json)."""
    from upstream import storage

    path = uri if uri.endswith(".json") else storage.join(uri, GRID_FILE)
    if not storage.exists(path):
        raise UpstreamError(f"no finished fine-tuning grid at {uri} ({GRID_FILE} missing)")
    grid = storage.read_json(path)
    if not isinstance(grid, dict) or grid.get("format") != GRID_FORMAT:
        raise UpstreamError(f"{path} is not an {GRID_FORMAT} file")
    return grid


class _Source:
    """Where the towers of a call come from: a pre-trained checkpoint, or random init."""

    def __init__(self, config: FinetuneConfig) -> None:
        from upstream import models
        from upstream.finetune import features

        self.scratch = "scratch" in config.mode_list
        if self.scratch:
            self.ckpt: dict[str, Any] = {}
            self.model_name = config.model
            self.tower = "random-init"
        else:
            self.ckpt = models.load_checkpoint(config.pretrained)
            self.model_name = str(self.ckpt["model_name"])
            self.tower = features.tower_fingerprint(self.ckpt["visual"])
        self.vit = models.tower_is_vit(self.model_name)
        self.pconf: dict[str, Any] = self.ckpt.get("config", {})
        #: What the towers come from, as every run and model file of the call records it.
        self.lineage = self._lineage()

    def encoder(self, seed: int | None = None) -> Any:
        """A fresh encoder: the checkpoint's tower, or a random one drawn with ``seed``."""
        import torch

        from upstream import models

        if self.scratch:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed or 0))
                return models.build_image_encoder(self.model_name)
        return models.encoder_from_state(self.model_name, self.ckpt["visual"])

    def _lineage(self) -> dict[str, str]:
        if self.scratch:
            return {"pretrain.method": "none", "pretrain.model": self.model_name,
                    "pretrain.source": "none", "pretrain.data_fingerprint": "",
                    "pretrain.interventions": "", "pretrain.seed": "", "pretrain.epochs": "",
                    "pretrain.train_samples": "", "pretrain.mlflow_run_id": ""}
        c, p = self.ckpt, self.pconf
        return {
            "pretrain.method": str(c.get("method", "")),
            "pretrain.model": self.model_name,
            "pretrain.source": str(c.get("data_source", "")),
            "pretrain.data_fingerprint": str(c.get("data_fingerprint", "")),
            "pretrain.interventions": str(c.get("data_interventions", "")),
            "pretrain.seed": str(p.get("seed", "")),
            "pretrain.epochs": str(p.get("epochs", "")),
            "pretrain.train_samples": str(p.get("train_samples", "")),
            "pretrain.mlflow_run_id": str(c.get("mlflow_run_id", "")),
            "pretrain.tower_fingerprint": self.tower,
        }


def _check(config: FinetuneConfig) -> tuple[str, dict[str, Any], list[str]]:
    """Every input check that needs no compute; returns (output, manifest, class names)."""
    from upstream import storage, tracking, training
    from upstream.shards import loader

    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    tracking.check_reachable()
    manifest = loader.read_manifest(config.data)
    if manifest.get("labelled") is False:
        raise UpstreamError(f"finetune: {config.data} has no labels (shard it from labelled data)")
    class_names = [str(c) for c in manifest.get("class_names", [])]
    if len(class_names) < 2:
        raise UpstreamError(f"finetune: {config.data} has {len(class_names)} classes; need ≥ 2")
    splits.check_sizes(class_counts(manifest), config.shot_list, config.val_per_class,
                       config.data)
    return output, manifest, class_names


def _existing(output: str, config: FinetuneConfig) -> dict[str, Any] | None:
    from upstream import storage

    uri = storage.join(output, GRID_FILE)
    if not storage.exists(uri):
        return None
    try:
        grid = storage.read_json(uri)
    except ValueError:
        grid = None
    if isinstance(grid, dict) and grid.get("fingerprint") == config.fingerprint():
        return grid
    log.warning("%s holds another grid; replacing it", output)
    storage.remove_file(uri)  # so that this call's partial output never looks finished
    return None


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run the grid; return {grid, output, mlflow_run_id, selected: [...], ...}."""
    import numpy as np
    import torch

    from upstream import allocator, storage, tracking, training
    from upstream.finetune import zeroshot
    from upstream.shards import loader

    # Input checks, cheapest first, all before any image is decoded or model built.
    output, manifest, class_names = _check(config)
    done = _existing(output, config)
    if done is not None:
        log.info("finetune: %s already holds this grid; nothing to do", output)
        return _result(done, reused=True)
    source = _Source(config)
    modes = config.mode_list
    if any(m in ZERO_SHOT for m in modes):
        zeroshot.check_checkpoint(source.ckpt, config.pretrained)
    recipe = config.recipe()

    t0 = time.perf_counter()
    images: dict[str, torch.Tensor] = {}

    def all_images() -> torch.Tensor:
        if "x" not in images:
            x, _, _ = loader.load_split(config.data)
            images["x"] = torch.as_tensor(x, dtype=torch.float32)
        return images["x"]

    # The shards are read once: with the images when a mode trains on them; an LP or zero-shot
    # grid reads the labels alone, and its features may all come from the cache.
    if any(m in TRAINED for m in modes):
        x, y, _ = loader.load_split(config.data)
        images["x"] = torch.as_tensor(x, dtype=torch.float32)
        labels = y.numpy().astype(np.int64)
    else:
        labels = loader.load_labels(config.data).numpy().astype(np.int64)
    if (labels < 0).any():
        raise UpstreamError(f"finetune: {config.data} has samples without a label")

    allocator.keep_freed_memory()  # freed memory stays for the next step
    data_fp = training.manifest_fingerprint(manifest)
    parent_tags = {
        "upstream.role": "grid",
        "upstream.method": source.lineage["pretrain.method"],
        "upstream.model": source.model_name,
        "upstream.source": source.lineage["pretrain.source"],
        "upstream.downstream": training.manifest_source(manifest),
        "upstream.modes": config.modes,
    }
    cells = config.cells()
    with tracking.stage_run(config, config.experiment, tags=parent_tags) as parent:
        import mlflow

        mlflow.log_params({
            "data.fingerprint": data_fp,
            "data.num_train": len(labels),
            "data.num_classes": len(class_names),
            "grid.num_cells": len(cells),
            "output.grid": storage.join(output, GRID_FILE),
            **source.lineage,
            **recipe.params(),
        })
        runner = _Runner(config, source, recipe, labels, class_names, all_images, data_fp,
                         manifest, output, parent.info.run_id)
        runner.run(cells)
        grid = runner.finish(time.perf_counter() - t0)
    return _result(grid, reused=False)


def _result(grid: dict[str, Any], reused: bool) -> dict[str, Any]:
    summary: dict[str, float] = {}
    by: dict[str, list[float]] = {}
    for s in grid["selected"]:
        key = s["mode"] if s["shots"] is None else f"{s['mode']} k={s['shots']}"
        by.setdefault(key, []).append(s["val_top1"])
    for key, values in by.items():
        summary[f"val_top1 {key}"] = round(float(sum(values) / len(values)), 4)
    return {
        "grid": grid["uri"],
        "output": grid["output"],
        "mlflow_run_id": grid["mlflow_run_id"],
        "num_cells": grid["num_cells"],
        "num_selected": len(grid["selected"]),
        "seconds": grid["seconds"],
        "reused": reused,
        "summary": summary,
        "selected": grid["selected"],
    }


def _log_history(run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch metrics in one synchronous call: a cell is short, and MLflow's asynchronous
    queue costs about a second to shut down at the end of every run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from upstream import tracking

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for step, row in enumerate(history)
             for k, v in row.items() if math.isfinite(v)]
    client = MlflowClient(tracking.tracking_uri())
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


class _Runner:
    """The cells of one call, in order, and the choice within each (mode, k, seed)."""

    def __init__(self, config: FinetuneConfig, source: _Source, recipe: Any,
                 labels: np.ndarray, class_names: list[str], all_images: Any, data_fp: str,
                 manifest: dict[str, Any], output: str, parent_id: str) -> None:
        self.config, self.source, self.recipe = config, source, recipe
        self.labels, self.class_names, self.all_images = labels, class_names, all_images
        self.data_fp, self.manifest, self.output = data_fp, manifest, output
        self.parent_id = parent_id
        import mlflow

        self.experiment_id = mlflow.get_run(parent_id).info.experiment_id
        self.features: torch.Tensor | None = None
        self.zs_head: tuple[torch.Tensor, torch.Tensor] | None = None
        self.records: list[dict[str, Any]] = []
        self.selected: list[dict[str, Any]] = []
        self.curves: dict[str, list[float]] = {}
        self.features_cached = False

    # -- what cells share ----------------------------------------------------------------

    def _features(self) -> torch.Tensor:
        if self.features is None:
            from upstream import training
            from upstream.finetune import features

            encoder = self.source.encoder().to(training.device())
            self.features, self.features_cached = features.cached_features(
                encoder, self.all_images, len(self.labels), tower=self.source.tower,
                data=self.data_fp, model_name=self.source.model_name,
                cache=self.config.feature_cache, desc="finetune features",
            )
        return self.features

    def _zero_shot(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.zs_head is None:
            from upstream.finetune import zeroshot

            self.zs_head = zeroshot.zero_shot_head(
                self.source.ckpt, self.class_names, zeroshot.templates_for(self.config.templates)
            )
        return self.zs_head

    # -- the grid ------------------------------------------------------------------------

    def run(self, cells: list[Cell]) -> None:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(cells), desc="finetune grid", unit="cell", mininterval=1.0)
        groups: dict[tuple[Any, ...], list[Cell]] = {}
        for cell in cells:
            groups.setdefault(cell.group, []).append(cell)
        split_cache: dict[tuple[int, int], splits.Split] = {}
        probe_cache: dict[tuple[int, int], dict[str, Any]] = {}
        try:
            for group, members in groups.items():
                mode, k, seed = group
                split = None
                if k is not None:
                    if (k, seed) not in split_cache:
                        stored = stored_kshot(self.config.data, k, seed) if k else None
                        split_cache[(k, seed)] = splits.draw(
                            self.labels, k, seed, self.config.val_per_class, stored)
                    split = split_cache[(k, seed)]
                probe = None
                if mode in ("lp", "lp-ft"):
                    assert split is not None and k is not None and seed is not None
                    if (k, seed) not in probe_cache:
                        probe_cache[(k, seed)] = self._probe(split)
                    probe = probe_cache[(k, seed)]
                results = []
                for cell in members:
                    results.append(self._cell(cell, split, probe))
                    progress.update(1)
                self._choose(group, results)
        finally:
            progress.close()

    def _probe(self, split: splits.Split) -> dict[str, Any]:
        import numpy as np

        from upstream.finetune.probe import fit_probe

        f = self._features().numpy().astype(np.float64)
        return fit_probe(f[split.train], self.labels[split.train], len(self.class_names),
                         self.config.c_grid, f[split.val], self.labels[split.val])

    def _new_model(self, cell: Cell, probe: dict[str, Any] | None) -> Any:
        import torch

        from upstream import models, training

        encoder = self.source.encoder(seed=cell.seed)
        model = models.Classifier(encoder, len(self.class_names),
                                  normalize=cell.mode in ZERO_SHOT)
        with torch.no_grad():
            if probe is not None:
                model.head.weight.copy_(probe["weight"])
                model.head.bias.copy_(probe["bias"])
            elif cell.mode in ZERO_SHOT:
                weight, bias = self._zero_shot()
                model.head.weight.copy_(weight)
                model.head.bias.copy_(bias)
            else:  # ft and scratch start from a zero head (Kumar et al.)
                model.head.weight.zero_()
                model.head.bias.zero_()
        return model.to(training.device())

    def _cell(self, cell: Cell, split: splits.Split | None,
              probe: dict[str, Any] | None) -> dict[str, Any]:
        import mlflow
        import torch

        from upstream import training
        from upstream.finetune import train

        tags = {
            **cell.tags(),
            "upstream.stage": "finetune",
            "upstream.role": "cell",
            "upstream.selected": "false",
            "upstream.method": self.source.lineage["pretrain.method"],
            "upstream.model": self.source.model_name,
            "upstream.source": self.source.lineage["pretrain.source"],
            "upstream.downstream": training.manifest_source(self.manifest),
            "upstream.fingerprint": self.config.fingerprint(),
        }
        if os.environ.get(GROUP_ENV):
            tags["upstream.group"] = os.environ[GROUP_ENV]
        tags.update(owner_tags())  # so that a rerun can close it if this process dies
        y = torch.as_tensor(self.labels)
        rec: dict[str, Any] = {"cell": cell, "mode": cell.mode, "shots": cell.shots,
                               "seed": cell.seed, "lr": cell.lr, "C": None}
        t0 = time.perf_counter()
        with mlflow.start_run(run_name=cell.lr_name(), nested=True, tags=tags,
                              experiment_id=self.experiment_id) as run:
            rec["run_id"] = run.info.run_id
            params = {"cell.mode": cell.mode, "cell.shots": str(cell.shots),
                      "cell.seed": str(cell.seed), "cell.lr": str(cell.lr),
                      "data.fingerprint": self.data_fp}
            if split is not None:
                params.update({"cell.num_train": len(split.train), "cell.num_val": len(split.val)})
            mlflow.log_params(params)
            metrics: dict[str, float] = {}
            model = None
            if cell.mode == "zeroshot":
                weight, bias = self._zero_shot()
                f = torch.nn.functional.normalize(self._features(), dim=-1)
                metrics.update(train.score_logits(f @ weight.T + bias, y))
                model = self._new_model(cell, None)
            elif cell.mode == "lp":
                assert split is not None and probe is not None
                f = self._features()[torch.as_tensor(split.val)]
                logits = f @ probe["weight"].T + probe["bias"]
                metrics.update(train.score_logits(logits, y[split.val]))
                metrics.update({"probe_C": probe["C"], "probe_train_accuracy":
                                probe["train_accuracy"]})
                rec["C"] = probe["C"]
                # The C path in one request (a request per point cost 23 ms each).
                _log_history(run.info.run_id, [{"probe_val_accuracy": point["val_accuracy"]}
                                               for point in probe["path"]])
                model = self._new_model(cell, probe)
            else:
                assert split is not None and cell.lr is not None
                training.seed_everything(int(cell.seed or 0))
                model = self._new_model(cell, probe)
                if probe is not None:
                    rec["C"] = probe["C"]
                    metrics["probe_C"] = probe["C"]
                x = self.all_images()
                gen = torch.Generator().manual_seed(int(cell.seed or 0))
                result = train.train(model, x[split.train], y[split.train], self.recipe,
                                     cell.lr, gen, self.source.vit)
                _log_history(run.info.run_id, result.history)
                metrics.update({"train_steps": result.steps, "train_seconds": result.seconds})
                val_logits = None if result.diverged else train.predict(model, x[split.val])
                rec["diverged"] = result.diverged or not bool(torch.isfinite(val_logits).all())
                if rec["diverged"]:
                    mlflow.set_tag("upstream.diverged", "true")
                    log.warning("%s: the loss stopped being finite after %d steps; "
                                "this cell is left out of the choice", cell.lr_name(),
                                result.steps)
                    metrics.update({"val_top1": math.nan, "val_loss": math.nan,
                                    "val_macro_f1": math.nan})
                else:
                    metrics.update({"final_loss": result.final_loss,
                                    "train_accuracy": result.train_accuracy})
                    metrics.update(train.score_logits(val_logits, y[split.val]))
                    self.curves[cell.lr_name()] = result.losses
            finite = {k: v for k, v in metrics.items() if isinstance(v, float | int)
                      and math.isfinite(v)}
            mlflow.log_metrics(finite)
            rec.update(metrics)
            rec["seconds"] = time.perf_counter() - t0
            log.info("%s: val top-1 %.4f (%.1f s)", cell.lr_name(), rec["val_top1"],
                     rec["seconds"])
        if rec.get("diverged"):
            from mlflow.tracking import MlflowClient

            from upstream import tracking

            MlflowClient(tracking.tracking_uri()).set_terminated(rec["run_id"], "FAILED")
        rec["model_obj"] = None if rec.get("diverged") else model
        if self.config.keep_models == "all" and rec["model_obj"] is not None:
            rec["model_uri"] = self._save(model, cell, rec, f"cells/{cell.lr_name()}")
        self.records.append(rec)
        return rec

    def _choose(self, group: tuple[Any, ...], results: list[dict[str, Any]]) -> None:
        """Tag the cell with the best validation top-1 (ties: lower validation loss, then the
        smaller lr), save its model and log it to MLflow."""
        import mlflow

        valid = [r for r in results if r["model_obj"] is not None
                 and math.isfinite(r.get("val_top1", math.nan))]
        if not valid:
            log.warning("%s: every learning rate diverged; nothing chosen", results[0]["cell"].name)
            for r in results:
                r["model_obj"] = None
            return
        best = max(valid, key=lambda r: (r["val_top1"], -r["val_loss"], -(r["lr"] or 0)))
        cell: Cell = best["cell"]
        best["model"] = self._save(best["model_obj"], cell, best, cell.name)
        with mlflow.start_run(run_id=best["run_id"], nested=True):
            mlflow.set_tag("upstream.selected", "true")
            mlflow.log_param("output.model", best["model"])
            from upstream import models

            m = best["model_obj"].cpu()
            models.log_mlflow_model(m, m.encoder.image_size, len(self.class_names))
        self.selected.append(best)
        for r in results:
            r["model_obj"] = None  # free the weights of the cells not chosen

    def _save(self, model: Any, cell: Cell, rec: dict[str, Any], folder: str) -> str:
        from upstream import models, storage

        uri = storage.join(self.output, folder, models.MODEL_FILE)
        lineage = {
            **self.source.lineage,
            "finetune.mode": cell.mode,
            "finetune.shots": "none" if cell.shots is None else str(cell.shots),
            "finetune.seed": "none" if cell.seed is None else str(cell.seed),
            "finetune.lr": "none" if cell.lr is None else f"{cell.lr:g}",
            "finetune.C": "" if rec.get("C") is None else f"{rec['C']:g}",
            "finetune.val_top1": f"{rec['val_top1']:.6f}",
            "finetune.val_per_class": str(self.config.val_per_class),
            "finetune.source": str(self.manifest.get("source", "")),
            "finetune.data_fingerprint": self.data_fp,
            "finetune.mlflow_run_id": rec["run_id"],
            "finetune.grid_run_id": self.parent_id,
            "finetune.fingerprint": self.config.fingerprint(),
            **{f"finetune.{k}": v for k, v in self.recipe.params().items()},
        }
        encoder = model.encoder
        saved = {
            "format": models.MODEL_FORMAT,
            "format_version": models.FORMAT_VERSION,
            "model_name": self.source.model_name,
            "architecture": models.describe_architecture(self.source.model_name, encoder.visual),
            "image_size": encoder.image_size,
            "embed_dim": int(model.head.in_features),
            "visual": models.plain_state_dict(encoder.visual),
            "head_weight": model.head.weight.detach().cpu().clone(),
            "head_bias": model.head.bias.detach().cpu().clone(),
            "normalize": bool(model.normalize),
            "class_names": self.class_names,
            "config": self.config.model_dump(mode="json") | {"output": self.output},
            "cell": {"mode": cell.mode, "shots": cell.shots, "seed": cell.seed, "lr": cell.lr},
            "pretrain_config": self.source.pconf,
            "lineage": {k: str(v) for k, v in lineage.items()},
        }
        models.save_file(saved, uri)
        return uri

    def finish(self, seconds: float) -> dict[str, Any]:
        """The parent run's selection table and figures, then grid.json (last)."""
        import mlflow

        from upstream import storage
        from upstream.finetune import figures

        def row(r: dict[str, Any]) -> dict[str, Any]:
            keep = ("mode", "shots", "seed", "lr", "C", "val_top1", "val_loss", "val_macro_f1",
                    "run_id", "seconds")
            out = {k: r.get(k) for k in keep}
            out["diverged"] = bool(r.get("diverged"))
            out["selected"] = any(s is r for s in self.selected)
            return out

        table = [row(r) for r in self.records]
        selected = [row(r) | {"model": r["model"]} for r in self.selected]
        grid_uri = storage.join(self.output, GRID_FILE)
        grid = {
            "format": GRID_FORMAT,
            "format_version": GRID_FORMAT_VERSION,
            "fingerprint": self.config.fingerprint(),
            "uri": grid_uri,
            "output": self.output,
            "config": self.config.model_dump(mode="json"),
            "recipe": self.recipe.params(),
            "data": self.config.data,
            "data_fingerprint": self.data_fp,
            "pretrained": self.config.pretrained,
            "model_name": self.source.model_name,
            "tower_fingerprint": self.source.tower,
            "class_names": self.class_names,
            "mlflow_run_id": self.parent_id,
            "num_cells": len(self.records),
            "features_cached": self.features_cached,
            "seconds": round(seconds, 2),
            "selected": selected,
            "cells": table,
        }
        means: dict[str, list[float]] = {}
        for s in selected:
            key = f"val_top1.{s['mode']}" + ("" if s["shots"] is None else f".k{s['shots']}")
            means.setdefault(key, []).append(s["val_top1"])
        mlflow.log_metrics({k: float(sum(v) / len(v)) for k, v in means.items()})
        mlflow.log_metric("grid_seconds", seconds)
        mlflow.log_dict({"selected": selected, "cells": table}, "selection.json")
        figures.log_grid_figures(table, self.curves)
        storage.write_json(grid_uri, grid)  # the completion marker, last
        log.info("finetune: %d cells, %d chosen, %.1f s; %s", len(table), len(selected),
                 seconds, grid_uri)
        return grid
