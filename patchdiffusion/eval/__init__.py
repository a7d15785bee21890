"""Evaluation: FID, KID, IS and precision/recall on the standard Inception features; SWD and seam score.

    from patchdiffusion.eval import EvalOptions, evaluate, make_reference
    make_reference("datasets/celeba-64.zip", "refs/celeba-64.npz", inception="pt_inception-2015-12-05-6726825d.pth")
    report = evaluate("runs/luhman", "refs/celeba-64.npz", EvalOptions(metrics=("fid",), num=10000))
    print(report.table()); report.write_json("eval.json")

Modules, one job each:
    inception.py          the 2015-12-05 Inception-v3 graph in plain torch (pytorch-fid's key layout)
    detectors.py          weights files (pytorch-fid state dict, TorchScript, EDM pickle), their pipelines, sha256
    features.py           batched feature extraction on CPU or CUDA
    frechet.py            Gaussian statistics and the Fréchet distance (FID)
    kid.py                Kernel Inception Distance (unbiased MMD², polynomial kernel, subsets)
    inception_score.py    Inception Score (10 splits)
    precision_recall.py   improved precision and recall (k-NN balls, k=3)
    swd.py                sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN)
    seam.py               seam score of images assembled from tiles, and across a wrap edge
    inputs.py             image sets: data sources, or a run directory generating its images
    reference.py          reference statistics .npz (EDM's mu/sigma plus features)
    evaluate.py           every metric in one pass over each set; the report (table, JSON)
    monitor.py            SWDMonitor: a cheap metric for the training loop
    cli.py                `patchdiff eval` and `patchdiff eval ref`
"""

from .detectors import (
    ENV_VAR,
    InceptionDetector,
    PUBLISHED_SHA256,
    InceptionOutputs,
    PytorchFIDDetector,
    TorchScriptDetector,
    UnverifiedInceptionWarning,
    find_inception_file,
    load_inception,
    missing_weights_message,
)
from .errors import EvalError
from .evaluate import METRICS, EvalOptions, EvalReport, MetricResult, evaluate, make_reference, parse_metrics
from .features import InceptionFeatures, extract_features
from .frechet import GaussianStatistics, feature_statistics, frechet_distance, frechet_distance_between
from .inception import FEATURE_DIM, NUM_CLASSES, InceptionV3, build_inception
from .inception_score import InceptionScoreResult, inception_score
from .kid import KIDResult, kernel_inception_distance, mmd2_unbiased
from .monitor import SWDMonitor
from .precision_recall import PrecisionRecall, precision_recall
from .reference import ReferenceFile, load_reference, save_reference
from .seam import SeamProfile, SeamScore, WrapSeam, line_seam, seam_profile, seam_score, wrap_seam
from .swd import SWDResult, sliced_wasserstein_distance

__all__ = [
    "ENV_VAR",
    "FEATURE_DIM",
    "METRICS",
    "NUM_CLASSES",
    "PUBLISHED_SHA256",
    "EvalError",
    "EvalOptions",
    "EvalReport",
    "GaussianStatistics",
    "InceptionDetector",
    "InceptionFeatures",
    "InceptionOutputs",
    "InceptionScoreResult",
    "InceptionV3",
    "KIDResult",
    "MetricResult",
    "PrecisionRecall",
    "PytorchFIDDetector",
    "ReferenceFile",
    "SWDMonitor",
    "SWDResult",
    "SeamScore",
    "TorchScriptDetector",
    "UnverifiedInceptionWarning",
    "build_inception",
    "evaluate",
    "extract_features",
    "feature_statistics",
    "find_inception_file",
    "frechet_distance",
    "frechet_distance_between",
    "inception_score",
    "kernel_inception_distance",
    "load_inception",
    "load_reference",
    "make_reference",
    "missing_weights_message",
    "mmd2_unbiased",
    "parse_metrics",
    "precision_recall",
    "save_reference",
    "seam_score",
    "seam_profile",
    "SeamProfile",
    "line_seam",
    "wrap_seam",
    "WrapSeam",
    "sliced_wasserstein_distance",
]
