"""`evaluate(images, ref, options)`: every metric in one pass over each image set (`patchdiff eval`).

    report = evaluate("runs/luhman", "builtin:photos", EvalOptions(metrics=("fid", "swd"), num=1000))
    print(report.table())
    report.write_json("eval.json")

The evaluated images are a folder / .zip / .lmdb / builtin:NAME, or a run directory, from which
`num` images are generated first. The reference is a data set (any of the same forms) or a
statistics .npz written by `patchdiff eval ref` (or EDM's fid-refs, which hold mu and sigma only).
Each set is read once; its batches feed the Inception features, the SWD descriptors and the seam
score together. Every value is labelled with the number of images it was computed from (FID@1k is
not FID@50k: FID falls as the sample count grows).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .detectors import InceptionDetector, find_inception_file, load_inception, missing_weights_message
from .errors import EvalError
from .features import FeatureCollector, InceptionFeatures
from .frechet import GaussianStatistics, feature_statistics, frechet_distance_between
from .inception_score import DEFAULT_SPLITS, inception_score
from .inputs import ImageSet, generate_image_set, is_run_directory, open_image_set
from .kid import DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS, kernel_inception_distance
from .precision_recall import DEFAULT_K, precision_recall
from .reference import ReferenceFile, load_reference
from .seam import SEAM_PROTOCOL, WRAP_PROTOCOL, SeamAccumulator, WrapSeamAccumulator
from .swd import DEFAULT_PATCHES_PER_IMAGE, SWD_PROTOCOL, SWDDescriptors, swd_between

# name -> what it measures; the order is the order of the table.
METRICS = {
    "fid": "Fréchet Inception Distance (Heusel et al. 2017)",
    "kid": "Kernel Inception Distance, unbiased MMD² (Bińkowski et al. 2018)",
    "is": "Inception Score, 10 splits (Salimans et al. 2016)",
    "pr": "precision and recall, k=3 (Kynkäänniemi et al. 2019)",
    "swd": "sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018)",
    "seam": "seam score: steps across tile boundaries / steps beside them (needs --tile)",
    "wrap": "seam score across the wrap edge of textures made with --wrap, beside lines elsewhere in them",
}
INCEPTION_METRICS = ("fid", "kid", "is", "pr")
NEEDS_REFERENCE = ("fid", "kid", "pr", "swd")
DEFAULT_METRICS = ("fid", "kid", "is", "pr", "swd")
METRIC_ALIASES = {"precision": "pr", "recall": "pr", "precision_recall": "pr", "inception_score": "is"}
DEFAULT_SWD_MAX_IMAGES = 8192  # SWD keeps 128 descriptors (147 float16) per image and level in memory


@dataclass
class EvalOptions:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    num: int | None = None  # images to evaluate (a seeded subset), or to generate from a run; None = all
    ref_num: int | None = None  # reference images to use (a seeded subset); None = all
    seed: int = 0  # subsets, generation seeds, KID subsets, SWD patches and directions
    batch_size: int = 64  # images per Inception batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    inception: str | None = None  # weights file; None = $PATCHDIFF_INCEPTION or the cache folder
    size: tuple[int, int] | None = None  # (W, H) images are brought to; None = the evaluated images' own size
    transform: str = "center-crop"  # how images of another size are fitted: center-crop | resize
    tile: tuple[int, int] | None = None  # seam score tile (th, tw)
    tile_offset: tuple[int, int] = (0, 0)  # (y, x) of the first tile boundary
    kid_subsets: int = DEFAULT_SUBSETS
    kid_subset_size: int = DEFAULT_SUBSET_SIZE
    is_splits: int = DEFAULT_SPLITS
    pr_k: int = DEFAULT_K
    swd_max_images: int = DEFAULT_SWD_MAX_IMAGES  # SWD uses the first this-many images of each set
    swd_patches: int = DEFAULT_PATCHES_PER_IMAGE  # 7x7 descriptors per image and level
    workers: int = 0  # DataLoader processes decoding images
    progress: bool = True
    # Only for a run directory as --images:
    samples_dir: str | None = None  # keep generated images here (default: a temporary folder, removed)
    sampler: str | None = None
    steps: int | None = None
    use_ema: bool = True


@dataclass
class MetricResult:
    key: str  # "fid", "kid", "is", "precision", "recall", "swd", "swd_32", "seam", "wrap"
    label: str  # what the table shows, with the image count: "FID@1k"
    value: float
    std: float | None = None  # spread over KID subsets / IS splits
    num_images: int = 0  # evaluated images it was computed from
    details: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    images: str
    reference: str | None
    num_images: int  # evaluated images read (or generated)
    num_reference: int | None  # None for a statistics file that does not record it
    size: tuple[int, int]  # (W, H)
    device: str
    inception: dict | None  # path, format, pipeline; None when no weights were used
    protocols: dict[str, str]  # metric family -> how it was computed (which reference tool it matches)
    metrics: list[MetricResult]
    skipped: dict[str, str]  # metric -> why it was not computed
    notes: list[str]
    seconds: float
    skipped_grid_files: int = 0  # grid.png files of `patchdiff sample` found among --images and left out

    def value(self, key: str) -> float:
        """The value of a metric by key ("fid", "swd", "precision", ...)."""
        for metric in self.metrics:
            if metric.key == key:
                return metric.value
        raise KeyError(f"no metric '{key}' in this report (have: {', '.join(m.key for m in self.metrics)})")

    def table(self) -> str:
        width, height = self.size
        grids = ""
        if self.skipped_grid_files:
            grids = f"; skipped {self.skipped_grid_files} grid file{'s' if self.skipped_grid_files > 1 else ''}"
        lines = [f"images:    {self.images} ({self.num_images} images read, {width}x{height}{grids})"]
        if self.reference is not None:
            count = f"{self.num_reference} images" if self.num_reference else "image count not recorded"
            lines.append(f"reference: {self.reference} ({count})")
        if self.inception:
            lines.append(f"Inception: {self.inception['path']} ({self.inception['format']})")
        lines += [f"{name} pipeline: {text}" for name, text in self.protocols.items()]
        lines += [note if note.startswith("WARNING") else f"note: {note}" for note in self.notes]
        if self.metrics:
            label_width = max(len(m.label) for m in self.metrics)
            lines.append("")
            lines.append(f"{'metric':<{label_width}}  {'value':>12}  {'± std':>10}")
            for metric in self.metrics:
                std = f"{metric.std:10.4g}" if metric.std is not None else ""
                lines.append(f"{metric.label:<{label_width}}  {_format_value(metric):>12}  {std:>10}")
        for key, reason in self.skipped.items():
            lines.append(f"{key}: skipped ({reason})")
        lines.append(f"({self.seconds:.1f} s on {self.device})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        report = asdict(self)
        report["size"] = list(self.size)
        report["metrics"] = {m.key: {k: v for k, v in asdict(m).items() if k != "key"} for m in self.metrics}
        return report

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _format_value(metric: MetricResult) -> str:
    return f"{metric.value:.4f}" if abs(metric.value) < 1e4 else f"{metric.value:.4g}"


def count_label(count: int) -> str:
    """50000 -> '50k', 1000 -> '1k', 1500 -> '1.5k', 300 -> '300'."""
    if count >= 1000 and count % 100 == 0:
        return f"{count / 1000:g}k"
    return str(count)


def parse_metrics(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'fid,kid,swd' (or 'all') -> ('fid', 'kid', 'swd'), in table order, aliases resolved."""
    words = text.split(",") if isinstance(text, str) else list(text)
    chosen = set()
    for word in (w.strip().lower() for w in words):
        if not word:
            continue
        if word == "all":
            chosen.update(METRICS)
            continue
        word = METRIC_ALIASES.get(word, word)
        if word not in METRICS:
            raise EvalError(f"unknown metric '{word}'; choose from {', '.join(METRICS)} (or all)")
        chosen.add(word)
    if not chosen:
        raise EvalError("no metrics asked for")
    return tuple(name for name in METRICS if name in chosen)


# ------------------------------------------------------------------------------------------------


@dataclass
class _Reference:
    description: str
    images: ImageSet | None = None  # a data set
    file: ReferenceFile | None = None  # or a statistics file


class _Limited:
    """Feeds only the first `limit` images of a stream to a consumer (SWD's cost cap)."""

    def __init__(self, consumer, limit: int):
        self.consumer, self.remaining = consumer, limit

    def add(self, images: torch.Tensor) -> None:
        if self.remaining > 0:
            self.consumer.add(images[: self.remaining])
            self.remaining -= min(len(images), self.remaining)


def _read_once(images: ImageSet, consumers: list, options: EvalOptions, description: str) -> None:
    """One pass over the set; each uint8 batch goes to every consumer."""
    if not consumers:
        return
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc=description, unit="img")
    for batch in images.batches(options.batch_size, options.workers):
        for consumer in consumers:
            consumer.add(batch)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def _open_evaluated(images: str, options: EvalOptions, scratch: str | None) -> ImageSet:
    if is_run_directory(images):
        if options.num is None:
            raise EvalError(f"'{images}' is a run directory: give --num, the number of images to generate")
        out_dir = options.samples_dir or scratch
        generated = generate_image_set(
            images, out_dir, options.num, seed=options.seed, batch_size=min(options.batch_size, 64),
            sampler=options.sampler, steps=options.steps, device=options.device, use_ema=options.use_ema,
            progress=options.progress,
        )
        if options.size is not None and options.size != generated.size:
            generated.size = options.size
        return generated
    return open_image_set(images, options.size, options.num, options.seed, options.transform)


def _open_reference(ref: str, size: tuple[int, int], options: EvalOptions) -> _Reference:
    if str(ref).lower().endswith(".npz"):
        return _Reference(str(ref), file=load_reference(ref))
    return _Reference(str(ref), images=open_image_set(ref, size, options.ref_num, options.seed, options.transform))


def _load_detector(metrics: tuple[str, ...], options: EvalOptions,
                   skipped: dict[str, str]) -> InceptionDetector | None:
    wanted = [m for m in metrics if m in INCEPTION_METRICS]
    if not wanted:
        return None
    path = find_inception_file(options.inception)
    if path is None:
        for metric in wanted:
            skipped[metric] = "no Inception weights file"
        return None
    return load_inception(path, warn=False)  # an unverified file's warning goes into the report


def evaluate(
    images: str | os.PathLike, ref: str | os.PathLike | None, options: EvalOptions | None = None
) -> EvalReport:
    """Evaluate `images` against `ref` with the metrics in `options` (see the module docstring)."""
    from patchdiffusion.runtime import resolve_device

    options = options or EvalOptions()
    metrics = parse_metrics(options.metrics)
    started = time.perf_counter()
    device = resolve_device(options.device)
    needing_reference = [m for m in metrics if m in NEEDS_REFERENCE]
    if ref is None and needing_reference:
        raise EvalError(f"--ref is needed for {', '.join(needing_reference)} (without one, ask only for is, seam, wrap)")
    if "seam" in metrics and options.tile is None:
        raise EvalError("the seam score needs the tile size of the image grid: give --tile N or --tile HxW")
    if "wrap" in metrics and options.size is not None:
        raise EvalError("the wrap seam reads the images as they were made (a crop or resize moves their edges); "
                        "leave out --resolution")

    skipped: dict[str, str] = {}
    notes: list[str] = []
    detector = _load_detector(metrics, options, skipped)
    if skipped:
        notes.append(missing_weights_message())
    if detector is not None and detector.warning:
        notes.insert(0, detector.warning)
    with tempfile.TemporaryDirectory(prefix="patchdiff-eval-") as scratch:
        evaluated = _open_evaluated(str(images), options, scratch)
        notes += evaluated.notes
        reference = _open_reference(str(ref), evaluated.size, options) if ref is not None else None
        if reference is not None and reference.images is not None:
            notes += reference.images.notes
        results = _compute(metrics, evaluated, reference, detector, device, options, skipped, notes)

    count = len(evaluated)
    num_reference = None
    if reference is not None:
        num_reference = len(reference.images) if reference.images else (reference.file.statistics.count or None)
    inception = None
    protocols = {}
    computed = {metric.key for metric in results}
    if detector is not None:
        inception = dict(path=str(detector.path), format=detector.format, pipeline=detector.pipeline,
                         sha256=detector.sha256, published_as=detector.published_as)
        protocols["Inception"] = detector.pipeline
    if "swd" in computed:
        protocols["SWD"] = SWD_PROTOCOL
    if "seam" in computed:
        protocols["seam"] = SEAM_PROTOCOL
    if "wrap" in computed:
        protocols["wrap"] = WRAP_PROTOCOL
    return EvalReport(
        images=str(images), reference=None if ref is None else str(ref), num_images=count,
        num_reference=num_reference, size=evaluated.size, device=str(device), inception=inception,
        protocols=protocols, metrics=results, skipped=skipped, notes=notes, seconds=time.perf_counter() - started,
        skipped_grid_files=len(evaluated.skipped_grids),
    )


def _compute(
    metrics: tuple[str, ...], evaluated: ImageSet, reference: _Reference | None,
    detector: InceptionDetector | None, device: torch.device, options: EvalOptions,
    skipped: dict[str, str], notes: list[str],
) -> list[MetricResult]:
    count = len(evaluated)
    at = f"@{count_label(count)}"
    inception_wanted = detector is not None and any(m in INCEPTION_METRICS for m in metrics)
    reference_images = reference.images if reference is not None else None
    reference_file = reference.file if reference is not None else None

    # What can be computed with this reference.
    if "swd" in metrics and reference_images is None:
        skipped["swd"] = "SWD needs reference images (a data set as --ref), not a statistics file"
    if reference_file is not None and reference_file.features is None:
        for metric in ("kid", "pr"):
            if metric in metrics and detector is not None:
                skipped[metric] = f"'{reference_file.path}' holds mu/sigma only; pass the data set as --ref"
    if reference_file is not None and detector is not None:
        notes.extend(_pipeline_notes(reference_file, detector))
    if reference_file is not None and reference_file.image_size not in (None, evaluated.size):
        (rw, rh), (w, h) = reference_file.image_size, evaluated.size
        notes.append(f"'{reference_file.path}' describes {rw}x{rh} images, the evaluated ones are {w}x{h}; "
                     "pass --resolution to compare like with like")

    # One pass over each set, every consumer fed from the same batches.
    consumers = []
    generated_features = reference_features = None
    if inception_wanted:
        generated_features = FeatureCollector(detector, device, with_class_probs="is" in metrics)
        consumers.append(generated_features)
    swd_limit = options.swd_max_images
    generated_swd = reference_swd = None
    if "swd" in metrics and "swd" not in skipped:
        generated_swd = SWDDescriptors(options.seed, options.swd_patches)
        consumers.append(_Limited(generated_swd, swd_limit))
    seam = None
    if "seam" in metrics:
        seam = SeamAccumulator(options.tile, options.tile_offset)
        consumers.append(seam)
    wrap = None
    if "wrap" in metrics:
        wrap = WrapSeamAccumulator()
        consumers.append(wrap)
    _read_once(evaluated, consumers, options, "images")

    if reference_images is not None:
        consumers = []
        if inception_wanted and any(m in metrics and m not in skipped for m in ("fid", "kid", "pr")):
            reference_features = FeatureCollector(detector, device)
            consumers.append(reference_features)
        if generated_swd is not None:
            reference_swd = SWDDescriptors(options.seed, options.swd_patches)
            consumers.append(_Limited(reference_swd, swd_limit))
        _read_once(reference_images, consumers, options, "reference")

    generated = generated_features.result() if generated_features else None
    real = reference_features.result() if reference_features else None
    results: list[MetricResult] = []
    for metric in metrics:
        if metric in skipped:
            continue
        if metric == "fid":
            results.append(_fid(generated, real, reference_file, at, count))
        elif metric == "kid":
            real_features = real.features if real is not None else reference_file.features
            kid = kernel_inception_distance(generated.features, real_features, options.kid_subsets,
                                            options.kid_subset_size, options.seed)
            results.append(MetricResult("kid", f"KID{at} x10^3", 1e3 * kid.mean, 1e3 * kid.std, count,
                                        dict(kid=kid.mean, kid_std=kid.std, subsets=kid.num_subsets,
                                             subset_size=kid.subset_size, scale=1e3)))
        elif metric == "is":
            score = inception_score(generated.class_probs, options.is_splits)
            results.append(MetricResult("is", f"IS{at}", score.mean, score.std, count, dict(splits=score.splits)))
        elif metric == "pr":
            real_features = real.features if real is not None else reference_file.features
            pr = precision_recall(real_features, generated.features, options.pr_k, device)
            results.append(MetricResult("precision", f"precision{at} (k={pr.k})", pr.precision, None, count))
            results.append(MetricResult("recall", f"recall{at} (k={pr.k})", pr.recall, None, count))
        elif metric == "swd":
            swd = swd_between(generated_swd, reference_swd, seed=options.seed)
            used = f"@{count_label(generated_swd.num_images)}"
            details = dict(reference_images=reference_swd.num_images, patches_per_image=swd.patches_per_image,
                           scale=1e3)
            for side, value in swd.levels.items():
                results.append(MetricResult(f"swd_{side}", f"SWD{used} {side}px x10^3", value, None,
                                            generated_swd.num_images, details))
            results.append(MetricResult("swd", f"SWD{used} avg x10^3", swd.average, None,
                                        generated_swd.num_images, details))
        elif metric == "seam":
            score = seam.result()
            th, tw = score.tile
            results.append(MetricResult("seam", f"seam{at} ({th}x{tw} tiles)", score.score, None, count,
                                        dict(boundary_step=score.boundary_step, interior_step=score.interior_step,
                                             tile=[th, tw], offset=list(options.tile_offset))))
        elif metric == "wrap":
            edge, summary = wrap.line(), wrap.summary(seed=options.seed)
            low, high = summary.elsewhere_low, summary.elsewhere_high
            results.append(MetricResult("wrap", f"wrap seam{at} (lines elsewhere {low:.3f}-{high:.3f})", summary.score,
                                        None, count, dict(boundary_step=edge.boundary_step,
                                                          interior_step=edge.interior_step,
                                                          elsewhere_median=summary.elsewhere_median,
                                                          elsewhere_5_95=[low, high])))
    return results


def _fid(generated: InceptionFeatures, real: InceptionFeatures | None, reference_file: ReferenceFile | None,
         at: str, count: int) -> MetricResult:
    statistics = feature_statistics(generated.features)
    reference: GaussianStatistics = feature_statistics(real.features) if real is not None else reference_file.statistics
    details = dict(reference_images=reference.count or None)
    if count < 2048:
        details["note"] = "fewer images than feature dimensions (2048): the covariance is singular and FID biased up"
    return MetricResult("fid", f"FID{at}", frechet_distance_between(statistics, reference), None, count, details)


def _pipeline_notes(reference: ReferenceFile, detector: InceptionDetector) -> list[str]:
    if reference.pipeline is None:
        return [f"'{reference.path}' does not record its Inception pipeline (EDM's fid-refs are made with EDM's "
                "TorchScript detector); FID is comparable only when both sides used the same pipeline"]
    if reference.pipeline != detector.pipeline:
        return [f"'{reference.path}' was made with another Inception pipeline ({reference.pipeline}); "
                "FID across pipelines is not comparable"]
    return []


def make_reference(
    data: str | os.PathLike, dest: str | os.PathLike, num: int | None = None, seed: int = 0,
    size: tuple[int, int] | None = None, transform: str = "center-crop", batch_size: int = 64,
    device: str = "auto", inception: str | None = None, keep_features: bool = True,
    workers: int = 0, progress: bool = True,
) -> tuple[Path, int, InceptionDetector]:
    """Inception statistics of a data set, written to `dest` (.npz) for `evaluate(..., ref=dest)`."""
    from patchdiffusion.runtime import resolve_device

    from .reference import save_reference

    path = find_inception_file(inception)
    if path is None:
        raise EvalError(missing_weights_message())
    detector = load_inception(path, warn=False)  # the caller reports detector.warning
    images = open_image_set(data, size, num, seed, transform)
    collector = FeatureCollector(detector, resolve_device(device))
    options = EvalOptions(batch_size=batch_size, workers=workers, progress=progress)
    _read_once(images, [collector], options, "reference")
    features = collector.result().features
    width, height = images.size
    source = f"{data} ({len(images)} images at {width}x{height})"
    written = save_reference(dest, features, detector.pipeline, detector.format, source, images.size, keep_features)
    return written, len(images), detector
